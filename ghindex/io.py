"""File helpers shared by every writer: atomic replacement, output errors, file modes, fingerprints."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import OutputError

#: errno -> the words `Error: PATH: ...` uses. Anything else is not an output problem of this kind.
OUTPUT_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "I/O error",
}
# Libraries that wrap the OS error in their own (h5py and FAISS: RuntimeError; safetensors:
# SafetensorError; torch.save: RuntimeError) keep its text or its number in the message.
_REASON_TEXTS = (
    ("no space left on device", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT),
    ("read-only file system", errno.EROFS),
    ("permission denied", errno.EACCES),
    ("operation not permitted", errno.EPERM),
    ("input/output error", errno.EIO),
)
_ERRNO_TEXT = re.compile(r"errno = (\d+)|os error (\d+)|\[errno (\d+)\]", re.IGNORECASE)


def output_reason(exc: BaseException) -> str | None:
    """'no space left on device', 'read-only file system', 'permission denied' or 'I/O error' when
    `exc` (or an exception it was raised from) says that a file cannot be written; else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in OUTPUT_REASONS:
            return OUTPUT_REASONS[exc.errno]
        if not isinstance(exc, OSError) or exc.errno is None:
            text = str(exc)
            for match in _ERRNO_TEXT.finditer(text):
                code = int(next(g for g in match.groups() if g))
                if code in OUTPUT_REASONS:
                    return OUTPUT_REASONS[code]
            lowered = text.lower()
            for needle, code in _REASON_TEXTS:
                if needle in lowered:
                    return OUTPUT_REASONS[code]
        exc = exc.__cause__ or exc.__context__
    return None


def output_error(exc: BaseException, path: str | os.PathLike, hint: str = "") -> OutputError | None:
    """`OutputError(path, reason)` when `exc` means `path` cannot be written (see `output_reason`)."""
    if isinstance(exc, OutputError):
        return exc
    reason = output_reason(exc)
    return None if reason is None else OutputError(os.fspath(path), reason, hint)


@contextlib.contextmanager
def writing(path: str | os.PathLike, hint: str = "") -> Iterator[None]:
    """Run a block that writes `path`: a full disk, a read-only file system, a permission or an I/O
    error inside it (as the OS, h5py, FAISS, torch or safetensors report them) becomes
    `OutputError(path, ...)`; every other exception passes unchanged.

    The OutputError is raised outside the handler, so it does not keep the failed library call's
    frames (and, for h5py, objects of a file that can no longer be flushed) alive as its context.
    """
    error = None
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - only the classified ones are replaced
        error = output_error(exc, path, hint)
        if error is None:
            raise
    if error is not None:
        raise error


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file the mode a newly created file gets (0666 less the umask: 0644 under umask 022).

    Temporary files made by `tempfile.mkstemp` or by libraries (safetensors writes 0600) would
    otherwise pass their private mode on to the output they are renamed to.
    """
    os.chmod(path, 0o666 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A crash or exception leaves any previous `path` untouched and removes the temporary file, so a
    reader never sees a half-written file under the final name. The file gets the umask's mode
    (`honour_umask`); failing to write it raises `OutputError(path, ...)` (`writing`).
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{suffix}")
    try:
        with writing(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                yield tmp
                if tmp.exists():
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                    honour_umask(tmp)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    with contextlib.suppress(OSError):
                        tmp.unlink()
    except OutputError as exc:
        exc.set_hint(unchanged_hint(exc), replace=False)
        raise
    remove_stale_temps(final, (suffix,))


def unchanged_hint(exc: OutputError) -> str:
    """The hint of an output written all at once: nothing half-written is left."""
    return f"nothing was written; {exc.remedy} and rerun"


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
