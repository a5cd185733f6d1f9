"""The crash-safe change of an index together with its code store, as `add` and `remove` make it: the
lock, recovery from a killed run, STORE.pending, and the commit (new index, then the store rename).
The steps and what a kill between them leaves are in `ghindex.lifecycle`'s docstring."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import os
import shutil
import signal
from pathlib import Path

from ..errors import IndexFileError, StoreError
from ..io import _pid_alive, atomic_path, file_fingerprint
from ..store import CodeStore
from ..store_format import parse_history
from .files import INDEX_FILE, META_FILE, read_meta, store_path_of

log = logging.getLogger("ghindex.lifecycle")  # one logger for add, remove and their recovery

#: Entries kept in meta.json's lifecycle history.
HISTORY_LIMIT = 1000
#: Test hook: SIGKILL this process at the named point (see `_kill_point` calls).
KILL_ENV = "GHINDEX_TEST_KILL_AT"


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _sync_dir_of(path) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pending(store: Path) -> Path:
    return store.with_name(store.name + ".pending")


def _store_path(index_dir: Path, meta: dict) -> Path:
    recorded = store_path_of(index_dir, meta)
    if not recorded or not meta.get("store_fingerprint"):
        raise StoreError(
            f"index {index_dir} records no code store (built from arrays?); add and remove change an index "
            "together with the code store it was built from: build it with `ghindex build --codes`"
        )
    path = Path(recorded)
    if not path.is_file():
        raise StoreError(f"code store {path} (recorded in index {index_dir}) not found")
    return path


@contextlib.contextmanager
def _locked(index_dir: Path):
    import fcntl

    lock = index_dir.with_name(f".{index_dir.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        read_meta(index_dir)  # names the missing index
        raise
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise IndexFileError(f"another `ghindex add` or `ghindex remove` is changing {index_dir}") from None
        raise
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the (empty) lock file stays, so two runs always lock one file


def _restore_interrupted_swap(index_dir: Path) -> None:
    """An index directory is replaced by two renames (DIR -> .DIR.PID.old, .DIR.PID.tmp -> DIR); a kill
    between them leaves no DIR. Put the new one (complete: written and synced before the renames) there."""
    if index_dir.exists():
        return
    prefix = f".{index_dir.name}."
    for old in sorted(index_dir.parent.glob(f"{prefix}*.old")):
        pid = old.name[len(prefix):-len(".old")]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        new = old.with_name(f"{prefix}{pid}.tmp")
        pick = new if (new / INDEX_FILE).is_file() and (new / META_FILE).is_file() else old
        os.replace(pick, index_dir)
        _sync_dir_of(index_dir)
        log.info("restored index %s from an interrupted replacement", index_dir)
        return


def _recover(index_dir: Path) -> tuple[dict, Path]:
    """Finish or undo what a killed add/remove left (see the module docstring); returns (meta, store)."""
    _restore_interrupted_swap(index_dir)
    meta = read_meta(index_dir)
    store = _store_path(index_dir, meta)
    pending = _pending(store)
    recorded = meta["store_fingerprint"]
    if file_fingerprint(store) == recorded:
        if pending.exists():
            pending.unlink()  # written by a run killed before its index was: it is redone
    elif pending.is_file() and file_fingerprint(pending) == recorded:
        os.replace(pending, store)  # killed between writing the index and renaming the store
        _sync_dir_of(store)
        log.info("completed an interrupted add/remove: %s is the store index %s was written for", store, index_dir)
    else:
        raise StoreError(
            f"code store {store} has changed since index {index_dir} was written (fingerprint differs): "
            f"rebuild the index with `ghindex build --codes {store} --out {index_dir} --overwrite`"
        )
    return meta, store


def _history(store) -> list:
    return parse_history(store.attrs.get("history"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_pending(store: Path, change, entry: dict) -> str:
    """STORE.pending = STORE changed by `change(writable copy)`, its history extended by `entry`,
    complete; written as a temporary file, synced, renamed. Returns its fingerprint."""
    pending = _pending(store)
    with atomic_path(pending) as tmp:
        shutil.copyfile(store, tmp)
        with CodeStore.open(tmp, mode="a") as new:
            change(new)
            new.set_attrs(history=[*_history(new), entry])
            new.mark_complete()
    _sync_dir_of(pending)
    return file_fingerprint(pending)


def _lifecycle(meta: dict) -> dict:
    life = meta.setdefault("lifecycle", {})
    life.setdefault("ntotal_at_build", int(meta["ntotal"]))
    life.setdefault("added", 0)
    life.setdefault("removed", 0)
    life.setdefault("history", [])
    return life


def _commit(index, index_dir: Path, store: Path, new_fingerprint: str, entry: dict, point: str) -> None:
    """Steps 5 and 6: the new index (recording STORE.pending's fingerprint), then STORE.pending -> STORE."""
    meta = index.meta
    meta["store_fingerprint"] = new_fingerprint
    history = _lifecycle(meta)["history"]
    history.append(entry)
    del history[:-HISTORY_LIMIT]
    index.save(index_dir)
    _kill_point(f"{point}:index-written")
    os.replace(_pending(store), store)
    _sync_dir_of(store)
    _kill_point(f"{point}:store-replaced")
