"""File helpers shared by every writer: atomic replacement and content fingerprints."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A crash or exception leaves any previous `path` untouched and removes the temporary file, so a
    reader never sees a half-written file under the final name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    remove_stale_temps(final, (suffix,))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(final: str | os.PathLike, suffixes=(".tmp",)) -> None:
    """Delete `.NAME.<pid><suffix>` files or folders next to `final` whose writer process is gone.

    A writer killed with SIGKILL cannot clean up its temporary copy; the next successful write of
    the same target does. Temporaries of live processes (another run writing now) are left alone.
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)(?:{'|'.join(map(re.escape, suffixes))})")
    try:
        entries = os.listdir(final.parent)
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        stale = final.parent / entry
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, as hex: identifies the exact model or store a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
