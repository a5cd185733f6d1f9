"""The writing side of `CodeStore`: appending rows, skipped inputs, attributes and deletions, flushing,
and what happens when a write fails (checking for room first, letting a failed file go).

`StoreWriting` is a mixin of `ghindex.store.CodeStore` and uses its reading side (`_f`, `path`, `_n`,
`has_paths`, `images_root`...); it lives apart so that each module holds one side of the store."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Sequence

import numpy as np

from .errors import OutputError, StoreError
from .io import writing
from .store_format import _RESERVED_ATTRS, _attr_value, _encode_paths, _relative_to

# Chunk cache of each dataset a writer holds open (`_hold_datasets`).
HELD_CHUNK_CACHE_BYTES = 4 * 1024 * 1024


def _hold_datasets(f) -> list:
    """A writer keeps its datasets open, so HDF5 writes appended rows while `append` or `flush` runs
    (where a failure is caught and reported, after `_ensure_space`), never when a dataset object of
    `append` is freed (where it could only be printed). Opened with a small chunk cache (shared by
    every later opening): full chunks go to disk as they fill, and memory stays bounded."""
    import h5py

    held = []
    for key in ("codes", "ids", "labels", "paths", "confidences"):
        if key in f:
            access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            access.set_chunk_cache(521, HELD_CHUNK_CACHE_BYTES, 0.75)
            held.append(h5py.Dataset(h5py.h5d.open(f.id, key.encode(), access)))
    return held


def _writes(method):
    """A CodeStore method that writes: failing to write raises OutputError (`CodeStore._writing`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._writing():
            return method(self, *args, **kwargs)

    return wrapper


#: True once HDF5 itself failed to write a file in this process: HDF5 can then neither flush nor close
#: that file, and its own clean-up when the process exits may crash. `ghindex` (cli/main.py, which reads
#: it as `ghindex.store.hdf5_failed`) ends such a process with os._exit after reporting the error.
#: Writers avoid getting there: see `_ensure_space`.
hdf5_failed = False

# Space a flush may need beyond its new chunks and path strings: B-tree and object-header updates.
_SPACE_MARGIN = 64 * 1024
# Appends flush on their own past this many unflushed bytes (before HDF5's chunk cache would write them).
_AUTO_FLUSH_BYTES = 32 * 1024 * 1024


def _hdf5_write_failed() -> None:
    """Once a write to an HDF5 file failed, HDF5 cannot flush or close it any more and h5py reports
    that again whenever one of its objects is freed (a traceback through sys.excepthook, then
    "Exception ignored in ... __dealloc__"). The failure itself is reported once (OutputError); these
    echoes are dropped from then on."""
    global hdf5_failed
    hdf5_failed = True
    if getattr(sys.unraisablehook, "_ghindex_h5py_filter", False):
        return
    unraisable_hook, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_unraisable(unraisable):
        where = unraisable.object
        if not (isinstance(where, str) and where.startswith("h5py.")):
            unraisable_hook(unraisable)

    def quiet_excepthook(kind, value, tb):
        last = tb
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        if last is None or "h5py" not in last.tb_frame.f_code.co_filename or \
                "dealloc" not in last.tb_frame.f_code.co_name:
            excepthook(kind, value, tb)

    quiet_unraisable._ghindex_h5py_filter = True
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook

class StoreWriting:
    """The methods of `CodeStore` that write (see the module docstring)."""

    # -- writing -------------------------------------------------------------------------------
    def _check_writable(self):
        self._check_open()
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only")
        if self._failed:
            raise StoreError(f"{self.path}: an earlier write failed; nothing more is written to it")

    @contextlib.contextmanager
    def _writing(self):
        """An HDF5 write: a full disk, read-only file system... raises OutputError(path) and leaves the
        store failed (HDF5 cannot flush it any more; `close` then only lets it go)."""
        try:
            with writing(self.path):
                yield
        except OutputError as exc:
            self._failed = True
            if not getattr(exc, "before_hdf5", False):
                _hdf5_write_failed()
            raise

    def _ensure_space(self, rows: int | None = None) -> None:
        """Before HDF5 may write what was appended (at a flush, or earlier when its caches fill up): make
        sure the file system has room for it. If not, raise OutputError while the HDF5 file is still
        consistent, so that it can be let go cleanly (`abandon`): HDF5 cannot recover from a failed
        write. (Free space as `statvfs` tells it; a quota or a race can still make HDF5 fail.)"""
        if not self._dirty:
            return
        need = _SPACE_MARGIN + 2 * self._heap  # heap collections hold each string and its header
        rows = self._n if rows is None else rows
        for ds in self._held:
            if ds.chunks and ds.shape:
                new_chunks = -(-rows // ds.chunks[0]) - (-(-self._flushed_rows // ds.chunks[0]))
                item = 16 if ds.dtype.kind == "O" else ds.dtype.itemsize
                need += max(0, new_chunks) * int(np.prod(ds.chunks)) * item
        need += need // 8
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        if free < need:
            self._failed = True
            error = OutputError(self.path, "no space left on device")
            error.before_hdf5 = True  # HDF5 wrote nothing: `abandon` can still let the file go cleanly
            raise error

    def abandon(self) -> None:
        """Let the file go without writing anything more to it (after a failed write, or when the disk is
        full): what HDF5 still holds in memory goes to /dev/null instead of the disk. The file on disk
        is left as it was, incomplete and maybe unreadable: a writer that can redo it removes it."""
        if not self._f.id.valid:
            return
        self._failed = True
        self._held = []
        try:
            fd = self._f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except Exception:  # noqa: BLE001 - not the default file driver: close as well as it goes
            pass
        try:
            self._f.close()
        except Exception:  # noqa: BLE001
            _hdf5_write_failed()

    def _stored_paths(self, paths: Sequence) -> Sequence:
        """Paths as this store keeps them: relative to its images root when it has one."""
        root = self.images_root()
        return paths if root is None else _relative_to(paths, root)

    def _mark_incomplete(self):
        if self._f.attrs.get("complete", False):
            # An append in place makes the file temporarily not what it claims; say so on disk first.
            with self._writing():
                self._f.attrs["complete"] = False
                self._f.flush()

    @_writes
    def append(self, codes, ids, labels=None, paths=None, confidences=None) -> None:
        """Append rows: codes (n, bits/8) uint8, ids (n,) integers, labels/paths/confidences (n, bits/4) uint8
        iff the store has them."""
        self._check_writable()
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_bytes:
            raise StoreError(
                f"{self.path}: expected codes of shape (n, {self.code_bytes}) uint8 for {self.bits}-bit codes, "
                f"got {codes.dtype} {codes.shape}"
            )
        k = codes.shape[0]
        ids = np.asarray(ids)
        if ids.shape != (k,) or not (np.issubdtype(ids.dtype, np.integer) or k == 0):
            raise StoreError(f"{self.path}: expected {k} integer ids, got {ids.dtype} {ids.shape}")
        if self.has_labels:
            if labels is None:
                raise StoreError(f"{self.path}: this store has labels; append needs labels too")
            labels = np.asarray(labels)
            want = (k, *self.label_shape)
            if labels.shape != want:
                raise StoreError(f"{self.path}: expected labels of shape {want}, got {labels.shape}")
            labels = labels.astype(np.int64) if not self.label_shape else (labels != 0).astype(np.uint8)
        elif labels is not None:
            raise StoreError(f"{self.path}: this store was created without labels")
        if self.has_paths:
            if paths is None or len(paths) != k:
                raise StoreError(f"{self.path}: this store keeps paths; append needs {k} paths")
        elif paths is not None:
            raise StoreError(f"{self.path}: this store was created without paths")
        if self.has_confidences:
            if confidences is None:
                raise StoreError(f"{self.path}: this store keeps bit confidences; append needs them too")
            confidences = np.asarray(confidences)
            if confidences.dtype != np.uint8 or confidences.shape != (k, 2 * self.code_bytes):
                raise StoreError(f"{self.path}: expected confidences of shape ({k}, {2 * self.code_bytes}) uint8, "
                                 f"got {confidences.dtype} {confidences.shape}")
        elif confidences is not None:
            raise StoreError(f"{self.path}: this store was created without bit confidences")
        if k == 0:
            return
        if self.has_paths:
            paths = self._stored_paths(paths)
        if self._dirty > _AUTO_FLUSH_BYTES:
            self.flush()
        heap = sum(len(os.fsencode(p)) + 16 for p in paths) if self.has_paths else 0
        self._heap += heap
        self._dirty += (codes.nbytes + 8 * k + (0 if labels is None else np.asarray(labels).nbytes) + heap
                        + (0 if confidences is None else confidences.nbytes))
        self._ensure_space(self._n + k)
        self._mark_incomplete()
        f, n = self._f, self._n
        try:
            for key, value in (("codes", codes), ("ids", ids.astype(np.int64, copy=False)), ("labels", labels),
                               ("paths", _encode_paths(paths) if self.has_paths else None),
                               ("confidences", confidences),
                               ("deleted", np.zeros(k, np.uint8) if "deleted" in f else None)):
                if value is not None:
                    ds = f[key]
                    ds.resize(n + k, axis=0)
                    ds[n : n + k] = value
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write rows ({str(exc).splitlines()[0]})") from None
        self._n = n + k

    @_writes
    def add_skipped(self, positions: Sequence[int], paths: Sequence, reasons: Sequence[str]) -> None:
        """Record inputs that could not be encoded: their position in the data, path and reason."""
        self._check_writable()
        if not (len(positions) == len(paths) == len(reasons)):
            raise StoreError(f"{self.path}: skipped positions, paths and reasons differ in length")
        k = len(positions)
        if not k:
            return
        if self.has_paths:
            paths = self._stored_paths(paths)
        self._mark_incomplete()
        g = self._f["skipped"]
        m = g["position"].shape[0]
        for key, value in (("position", np.asarray(positions, dtype=np.int64)), ("path", _encode_paths(paths)),
                           ("reason", _encode_paths(reasons))):
            g[key].resize(m + k, axis=0)
            g[key][m : m + k] = value

    @_writes
    def set_attrs(self, **values) -> None:
        """Set writer-defined attributes (not the reserved format attributes)."""
        self._check_writable()
        for key, value in values.items():
            if key in _RESERVED_ATTRS:
                raise StoreError(f"{self.path}: attribute {key!r} is reserved")
            self._f.attrs[key] = _attr_value(value)

    def flush(self) -> None:
        """Write everything appended so far to the file (HDF5 metadata included). OutputError when the
        file system cannot take it (checked first: `_ensure_space`)."""
        self._check_open()
        if self.writable:
            self._ensure_space()
            with self._writing():
                self._f.flush()
            self._dirty = self._heap = 0
            self._flushed_rows = self._n

    def mark_complete(self) -> None:
        """Declare the store finished: readers accept it from now on."""
        self._check_writable()
        self._ensure_space()
        with self._writing():
            self._f.attrs["complete"] = True
            self._f.flush()
        self._dirty = self._heap = 0
        self._flushed_rows = self._n

    @_writes
    def mark_deleted(self, rows) -> None:
        """Mark rows (positions) deleted; their codes and ids stay, builds and metrics leave them out."""
        self._check_writable()
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self._n):
            raise StoreError(f"{self.path}: rows to delete must lie in 0..{self._n - 1}")
        self._mark_incomplete()
        f = self._f
        if "deleted" not in f:
            f.create_dataset("deleted", shape=(self._n,), maxshape=(None,), dtype=np.uint8,
                             chunks=(max(1, min(self.chunk_rows * 8, 1 << 20)),), fillvalue=0)
        mask = f["deleted"][: self._n]
        mask[rows] = 1
        f["deleted"][: self._n] = mask
