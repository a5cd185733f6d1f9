"""The HDF5 code store: packed binary codes with their ids, labels and paths, in one self-describing file.

Layout (format_version 1, or 2 when the paths are relative: see below)::

    /codes            uint8 (N, bits/8), chunked, resizable. Bit i of a code is
                      (code[i >> 3] >> (i & 7)) & 1 (LSB first, FAISS's order): attr bit_order="little".
    /ids              int64 (N,): the id each code is known by (search results return these).
    /labels           optional: int64 (N,) class indices, or uint8 (N, C) multi-hot rows.
    /paths            optional: variable-length strings (N,), the image each code came from.
    /confidences      optional: uint8 (N, bits/4), how sure each bit of each code is, in 4 levels kept as two
                      bit planes (`ghindex.hashing.pack_confidences`); `encode` writes them and image
                      queries' re-ranking weighs differing bits by them (`weighted_hamming`).
    /skipped/{position,path,reason}   inputs that could not be encoded (int64, str, str).
    /deleted          optional: uint8 (N,), 1 where a row was removed (`ghindex remove`); such rows keep
                      their id (never reused) but no index built from the store holds them.
    attrs             format_version, bits, bit_order, encoder_fingerprint (sha256 of the model file),
                      source, created (UTC, ISO 8601), complete, plus the writer's own keys
                      (strings, numbers; lists and dicts are stored as JSON text).

Paths hold each file name's bytes exactly as the file system gives them (`os.fsencode`), which is
UTF-8 for every name that is valid UTF-8; the Python API returns `str` via `os.fsdecode`, so a name
with undecodable bytes comes back with surrogate escapes and still opens the same file.

Relative paths (format_version 2, `create(..., paths_root=ROOT)`): the attribute `paths_root` holds
ROOT relative to the store's folder (and `paths_root_absolute` ROOT as it was), and every path under
ROOT is stored relative to it (others stay absolute). Readers resolve them against the store's own
location, so a folder with images and stores keeps working after it is copied or moved; when that
folder does not exist but the recorded absolute one does (the store alone was moved), that one. A
`root` given to `open` (the CLI's `--root`) replaces both. `paths()`, `read()` and `skipped()`
return resolved paths; `images_link()` tells where the root resolves. Version-1 stores hold the
paths as given (absolute, from `ghindex encode`) and read as before.

A store is `complete` only after `mark_complete()`. Readers refuse an incomplete store (a writer
that crashed or is still running) unless `allow_incomplete=True`, so a half-written store is never
mistaken for a finished one. Nothing here reads the whole store unless asked (`codes()`, `ids()`...):
use `read(start, stop)` and `iter_chunks()` for bounded memory.

This module opens stores and reads them; the writing methods are `ghindex.store_write`'s (a mixin of
`CodeStore`), the format's constants and value conversions `ghindex.store_format`'s.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np

from . import store_write
from .errors import ConfigError, OutputError, StoreError
from .hashing import check_bits
from .io import file_fingerprint
from .io import writing
from .store_format import (  # noqa: F401 - CodeBatch, is_hdf5, _RESERVED_ATTRS...: also imported from here
    _RESERVED_ATTRS,
    BIT_ORDER,
    CHUNK_BYTES,
    CHUNK_CACHE_BYTES,
    FORMAT_VERSION,
    HDF5_SIGNATURE,
    ITER_BYTES,
    CodeBatch,
    _attr_value,
    _decode_paths,
    _paths_link,
    _py,
    default_chunk_rows,
    is_hdf5,
)
from .store_write import StoreWriting, _hdf5_write_failed, _hold_datasets


def __getattr__(name: str):
    # `hdf5_failed` (cli/main.py reads `ghindex.store.hdf5_failed`) is set by the writer, in store_write:
    # read it there, as it is now, rather than a copy taken at import.
    if name == "hdf5_failed":
        return store_write.hdf5_failed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_radius(radius, attrs: dict, bits: int, where: str) -> int:
    """A Hamming radius in bits: an integer (or its text), or 'auto': the copy radius the store's model
    recorded (attribute `copy_radius`, written by `ghindex encode`). `attrs`, `bits`: the code store's;
    `where`: how to name it in errors. `ghindex query` and `ghindex dedup` both resolve `--radius` here."""
    if isinstance(radius, str) and radius.strip().lower() == "auto":
        recorded = attrs.get("copy_radius")
        if recorded is None or recorded == "":
            raise ConfigError(f"{where} records no copy radius (its model has none): pass --radius N, "
                              "the Hamming distance within which codes count as copies")
        radius = int(recorded)
    elif isinstance(radius, str):
        try:
            radius = int(radius)
        except ValueError:
            raise ConfigError(f"radius must be an integer number of bits or 'auto', got {radius!r}") from None
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise ConfigError(f"radius must be an integer number of bits or 'auto', got {radius!r}")
    if radius < 0:
        raise ConfigError(f"radius must be at least 0 bits, got {radius}")
    if radius > bits:
        raise ConfigError(f"radius {radius} is above the code width ({bits} bits)")
    return int(radius)


class CodeStore(StoreWriting):
    """A code store opened for reading (`open`) or writing (`create`, `open(mode="a")`).

    Use as a context manager or call `close()`. Writers `append` batches, `flush()` to make them
    durable, and `mark_complete()` when the store holds everything it should.
    """

    def __init__(self, h5file, path: str, writable: bool, root: str | os.PathLike | None = None):
        self._f = h5file
        self.path = path
        self.writable = writable
        self._fingerprint: str | None = None
        self._n = int(self._f["codes"].shape[0])
        self._root_override = None if root is None else os.path.abspath(os.fspath(root))
        self._root: str | None = None  # the resolved images root, once asked for
        self._failed = False  # a write failed (no space...): nothing more is written; close lets the file go
        self._dirty = 0  # bytes appended since the last flush (what the next flush writes, about)
        self._heap = 0  # of which path strings (HDF5 keeps them in heap collections)
        self._flushed_rows = self._n  # rows when last flushed: chunks up to there exist on disk
        self._held = _hold_datasets(h5file) if writable else []

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        bits: int,
        *,
        encoder_fingerprint: str | None = None,
        source: str = "",
        label_shape: tuple | None = None,
        with_paths: bool = False,
        chunk_rows: int | None = None,
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
        paths_root: str | os.PathLike | None = None,
        confidences: bool = False,
    ) -> "CodeStore":
        """Create an empty, incomplete store for `bits`-bit codes.

        `label_shape`: None (no labels), `()` (one int64 class per row) or `(C,)` (uint8 multi-hot).
        `attrs`: extra provenance attributes (class_names, protocol, model path...). An existing file
        is refused unless `overwrite`. `paths_root` (with `with_paths`): the folder the inputs come
        from; paths under it are stored relative to it and it relative to the store (format version 2,
        see the module docstring). `confidences`: rows carry their bits' confidences (`append(confidences=)`).
        Failing to write raises OutputError.
        """
        import h5py

        name = os.fspath(path)
        bits = check_bits(bits)
        code_bytes = bits // 8
        if label_shape is not None:
            label_shape = tuple(int(v) for v in label_shape)
            if len(label_shape) > 1 or (label_shape and label_shape[0] <= 0):
                raise StoreError(f"{name}: label_shape must be None, () or (C,) with C > 0, got {label_shape}")
        chunk_rows = int(chunk_rows or default_chunk_rows(code_bytes))
        if chunk_rows <= 0:
            raise StoreError(f"{name}: chunk_rows must be positive, got {chunk_rows}")
        if os.path.exists(name) and not overwrite:
            raise StoreError(f"{name} already exists (refusing to overwrite it)")
        parent = os.path.dirname(os.path.abspath(name))
        with writing(name):
            os.makedirs(parent, exist_ok=True)
        try:
            with writing(name):
                f = h5py.File(name, "w", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError as exc:
            raise StoreError(f"cannot create code store {name}: {str(exc).splitlines()[0]}") from None
        link = _paths_link(name, paths_root) if (with_paths and paths_root is not None) else None
        try:
            f.create_dataset("codes", shape=(0, code_bytes), maxshape=(None, code_bytes), dtype=np.uint8,
                             chunks=(chunk_rows, code_bytes))
            f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(chunk_rows,))
            if label_shape == ():
                f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(chunk_rows,))
            elif label_shape is not None:
                c = label_shape[0]
                f.create_dataset("labels", shape=(0, c), maxshape=(None, c), dtype=np.uint8,
                                 chunks=(max(1, min(chunk_rows, CHUNK_BYTES // c)), c))
            if confidences:
                f.create_dataset("confidences", shape=(0, 2 * code_bytes), maxshape=(None, 2 * code_bytes),
                                 dtype=np.uint8, chunks=(chunk_rows, 2 * code_bytes))
            if with_paths:
                f.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                                 chunks=(min(chunk_rows, 4096),))
            skipped = f.create_group("skipped")
            skipped.create_dataset("position", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
            for key in ("path", "reason"):
                skipped.create_dataset(key, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                                       chunks=(256,))
            f.attrs["format_version"] = FORMAT_VERSION if link else 1
            if link:
                f.attrs["paths_root"], f.attrs["paths_root_absolute"] = (_attr_value(v) for v in link)
            f.attrs["bits"] = bits
            f.attrs["bit_order"] = BIT_ORDER
            f.attrs["encoder_fingerprint"] = encoder_fingerprint or ""
            f.attrs["source"] = _attr_value(source or "")
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = False
            for key, value in (attrs or {}).items():
                if key in _RESERVED_ATTRS:
                    raise StoreError(f"{name}: attribute {key!r} is reserved")
                f.attrs[key] = _attr_value(value)
            with writing(name):
                f.flush()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                f.close()
            if isinstance(exc, OutputError):  # a half-made file is of no use to anyone
                with contextlib.suppress(OSError):
                    os.remove(name)
            raise
        return cls(f, name, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", allow_incomplete: bool = False,
             root: str | os.PathLike | None = None) -> "CodeStore":
        """Open an existing store: mode "r" (read) or "a" (append).

        `root`: the folder the store's relative image paths are resolved against, instead of the one
        it records (`images_root`); it does not apply to stores of absolute paths (format version 1).

        Raises StoreError naming the file if it is missing, not HDF5, truncated or corrupt, not a
        ghindex code store, from a newer ghindex, inconsistent, or incomplete (unless
        `allow_incomplete`).
        """
        import h5py

        name = os.fspath(path)
        if mode not in ("r", "a"):
            raise StoreError(f"{name}: mode must be 'r' or 'a', got {mode!r}")
        if os.path.isdir(name):
            raise StoreError(f"{name} is a directory, not a code store")
        if not os.path.exists(name):
            raise StoreError(f"code store not found: {name}")
        if not is_hdf5(name):
            raise StoreError(f"{name} is not a ghindex code store (not an HDF5 file)")
        try:
            f = h5py.File(name, "r" if mode == "r" else "r+", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # ("lock" alone would also match "sblock->base_addr" in the message for a truncated file)
            if "unable to lock" in text.lower():
                raise StoreError(f"{name} is open for writing by another process ({text})") from None
            if "truncated file" in text.lower():
                raise StoreError(f"{name} is truncated (an incomplete copy or download?): {text}") from None
            raise StoreError(f"{name} is not a readable code store (truncated or corrupt HDF5: {text})") from None
        try:
            cls._validate(f, name, allow_incomplete)
        except BaseException:
            f.close()
            raise
        return cls(f, name, writable=(mode == "a"), root=root)

    @staticmethod
    def _validate(f, name: str, allow_incomplete: bool) -> None:
        try:
            if "codes" not in f or "ids" not in f or "format_version" not in f.attrs or "bits" not in f.attrs:
                raise StoreError(f"{name} is an HDF5 file but not a ghindex code store (no codes/ids datasets or format attributes)")
            version = int(f.attrs["format_version"])
            if version > FORMAT_VERSION:
                raise StoreError(f"{name}: code store format version {version} is newer than this ghindex supports ({FORMAT_VERSION})")
            bits = int(f.attrs["bits"])
            codes = f["codes"]
            if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] * 8 != bits:
                raise StoreError(f"{name}: codes dataset {codes.dtype} {codes.shape} does not hold {bits}-bit codes")
            order = _py(f.attrs.get("bit_order", BIT_ORDER))
            if order != BIT_ORDER:
                raise StoreError(f"{name}: bit order {order!r} is not supported (expected {BIT_ORDER!r})")
            n = codes.shape[0]
            if "confidences" in f and (f["confidences"].dtype != np.uint8 or f["confidences"].ndim != 2
                                       or f["confidences"].shape[1] * 4 != bits):
                raise StoreError(f"{name}: confidences dataset {f['confidences'].dtype} {f['confidences'].shape} "
                                 f"does not hold the confidences of {bits}-bit codes (damaged store)")
            for key in ("ids", "labels", "paths", "deleted", "confidences"):
                if key in f and f[key].shape[0] != n:
                    raise StoreError(f"{name}: {key} has {f[key].shape[0]} rows but codes has {n} (damaged store)")
            if not allow_incomplete and not bool(f.attrs.get("complete", False)):
                raise StoreError(
                    f"{name} is an incomplete code store ({n} rows written; its writer was interrupted or is "
                    "still running): finish it with `ghindex encode ... --resume`, or open it with allow_incomplete=True"
                )
        except StoreError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"{name} is a damaged code store ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None

    # -- description ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def bits(self) -> int:
        return int(self._f.attrs["bits"])

    @property
    def code_bytes(self) -> int:
        return self.bits // 8

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs.get("complete", False))

    @property
    def encoder_fingerprint(self) -> str:
        return _py(self._f.attrs.get("encoder_fingerprint", ""))

    @property
    def attrs(self) -> dict[str, Any]:
        """All attributes as plain Python values (JSON text for lists/dicts stays text)."""
        return {key: _py(value) for key, value in self._f.attrs.items()}

    @property
    def class_names(self) -> list[str] | None:
        raw = self._f.attrs.get("class_names")
        if raw is None or raw == "":
            return None
        try:
            names = json.loads(_py(raw))
        except (ValueError, TypeError):
            return None
        return [str(n) for n in names] if isinstance(names, list) else None

    @property
    def has_labels(self) -> bool:
        return "labels" in self._f

    @property
    def label_shape(self) -> tuple | None:
        """None (no labels), () single-label, or (C,) multi-hot."""
        return tuple(self._f["labels"].shape[1:]) if self.has_labels else None

    @property
    def has_confidences(self) -> bool:
        return "confidences" in self._f

    @property
    def has_paths(self) -> bool:
        return "paths" in self._f

    @property
    def chunk_rows(self) -> int:
        return int(self._f["codes"].chunks[0])

    @property
    def num_skipped(self) -> int:
        return int(self._f["skipped/position"].shape[0]) if "skipped" in self._f else 0

    @property
    def fingerprint(self) -> str:
        """sha256 of the file's bytes (after a flush, so it matches what is on disk)."""
        if self._fingerprint is None or self.writable:
            if self.writable:
                self._f.flush()
            self._fingerprint = file_fingerprint(self.path)
        return self._fingerprint

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"<CodeStore {self.path!r}: {self._n} x {self.bits}-bit codes, {state}>"

    # -- image paths ---------------------------------------------------------------------------
    @property
    def relative_paths(self) -> bool:
        """True when the store keeps its image paths relative to a recorded root (format version 2)."""
        return "paths_root" in self._f.attrs

    def images_link(self) -> dict[str, Any] | None:
        """Where the image paths' root is: {"recorded" (relative to the store's folder), "absolute"
        (as recorded), "override" (`root` of `open`), "resolved", "exists"}; None for a store of
        absolute paths (version 1) or without paths."""
        if not (self.has_paths and self.relative_paths):
            return None
        recorded = _py(self._f.attrs["paths_root"])
        absolute = _py(self._f.attrs.get("paths_root_absolute", "")) or None
        resolved = self.images_root()
        return {"recorded": recorded, "absolute": absolute, "override": self._root_override,
                "resolved": resolved, "exists": os.path.isdir(resolved)}

    def images_root(self) -> str | None:
        """The folder relative image paths are resolved against: `root` given to `open`, else the recorded
        root next to the store (where a copied or moved folder has it), else the recorded absolute
        root when only that exists. None for a store of absolute paths."""
        if not self.relative_paths:
            return None
        if self._root_override is not None:
            return self._root_override
        if self._root is None:
            recorded = _py(self._f.attrs["paths_root"])
            absolute = _py(self._f.attrs.get("paths_root_absolute", "")) or None
            near = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.path)), recorded))
            self._root = absolute if (not os.path.isdir(near) and absolute and os.path.isdir(absolute)) else near
        return self._root

    def _resolve(self, stored: list[str], root: str | os.PathLike | None = None) -> list[str]:
        """Stored paths -> paths to open: relative ones joined to `root` or `images_root()`."""
        if not self.relative_paths:
            return stored
        base = os.path.abspath(os.fspath(root)) if root is not None else self.images_root()
        return [p if (not p or os.path.isabs(p)) else os.path.join(base, p) for p in stored]

    def resolved_paths(self, rows, root: str | os.PathLike | None = None) -> list[str | None]:
        """The image paths of store rows (positions; -1 gives None), resolved (see `images_root`;
        `root` replaces it for this call). None for every row when the store keeps no paths."""
        rows = [int(r) for r in rows]
        if not self.has_paths:
            return [None] * len(rows)
        self._check_open()
        wanted = sorted({r for r in rows if 0 <= r < self._n})
        ds = self._f["paths"]
        if len(wanted) * 50 > self._n:  # many: one sequential read
            everything = _decode_paths(ds[: self._n])
            found = {r: everything[r] for r in wanted}
        else:
            found = {r: _decode_paths(ds[r : r + 1])[0] for r in wanted}
        resolved = dict(zip(found, self._resolve(list(found.values()), root)))
        return [resolved.get(r) for r in rows]

    # -- reading -------------------------------------------------------------------------------
    def _check_open(self):
        if not self._f.id.valid:
            raise StoreError(f"{self.path}: the store is closed")

    def read(self, start: int = 0, stop: int | None = None, paths: bool = True) -> CodeBatch:
        """Rows [start, stop) (clipped to the store). `paths=False` skips the (slow) path strings."""
        self._check_open()
        n = self._n
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        f = self._f
        try:
            labels = f["labels"][start:stop] if self.has_labels else None
            names = self._resolve(_decode_paths(f["paths"][start:stop])) if (paths and self.has_paths) else None
            sure = f["confidences"][start:stop] if self.has_confidences else None
            return CodeBatch(f["codes"][start:stop], f["ids"][start:stop], labels, names, sure)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read rows {start}:{stop} ({str(exc).splitlines()[0]})") from None

    def default_iter_rows(self) -> int:
        row_bytes = (self.code_bytes * (3 if self.has_confidences else 1) + 8
                     + (int(np.prod(self.label_shape or (1,))) * 8 if self.has_labels else 0))
        rows = max(self.chunk_rows, ITER_BYTES // row_bytes)
        return rows - rows % self.chunk_rows  # whole chunks: every chunk is decoded once

    def iter_chunks(self, rows: int | None = None, start: int = 0, stop: int | None = None,
                    paths: bool = True) -> Iterator[CodeBatch]:
        """Yield consecutive CodeBatches of at most `rows` rows covering [start, stop) exactly once.

        Default `rows`: whole HDF5 chunks, about 32 MiB of codes+ids+labels per batch.
        """
        rows = int(rows or self.default_iter_rows())
        if rows <= 0:
            raise StoreError(f"{self.path}: rows must be positive, got {rows}")
        start, stop, _ = slice(start, stop).indices(self._n)
        for begin in range(start, stop, rows):
            yield self.read(begin, min(begin + rows, stop), paths=paths)

    def codes(self) -> np.ndarray:
        """All codes in memory (N x bits/8 bytes)."""
        return self.read(paths=False).codes

    def ids(self) -> np.ndarray:
        self._check_open()
        return self._f["ids"][: self._n]

    def labels(self) -> np.ndarray | None:
        self._check_open()
        return self._f["labels"][: self._n] if self.has_labels else None

    def confidences(self) -> np.ndarray | None:
        """All rows' packed bit confidences in memory (N x bits/4 bytes; `hashing.unpack_confidences`), or
        None for a store without them."""
        self._check_open()
        return self._f["confidences"][: self._n] if self.has_confidences else None

    def paths(self) -> list[str] | None:
        self._check_open()
        return self._resolve(_decode_paths(self._f["paths"][: self._n])) if self.has_paths else None

    def skipped(self) -> list[dict[str, Any]]:
        """Inputs that could not be encoded: [{"position", "path", "reason"}...]."""
        self._check_open()
        if "skipped" not in self._f:
            return []
        g = self._f["skipped"]
        return [
            {"position": int(pos), "path": p, "reason": r}
            for pos, p, r in zip(g["position"][:], self._resolve(_decode_paths(g["path"][:])),
                                 _decode_paths(g["reason"][:]))
        ]

    # -- deleted rows (`ghindex remove`; marking them is `StoreWriting.mark_deleted`) ---------------
    def deleted(self) -> np.ndarray:
        """Boolean mask (N,): True for rows marked deleted (all False when none ever was)."""
        self._check_open()
        if "deleted" not in self._f:
            return np.zeros(self._n, dtype=bool)
        return self._f["deleted"][: self._n] != 0

    @property
    def num_deleted(self) -> int:
        return int(self.deleted().sum()) if "deleted" in self._f else 0

    def close(self) -> None:
        """Close the file; a writer's last appends are flushed first (OutputError if they cannot be).
        After a failed write the file is let go (`abandon`); while another exception is on its way
        (`with` or `finally`) a failing close is not reported, and after a failed write elsewhere
        (OutputError) unflushed appends are not risked on a full disk."""
        if not self._f.id.valid:
            return
        pending = sys.exc_info()[1]
        if self._failed or (pending is not None and self._dirty and isinstance(pending, OutputError)):
            self.abandon()
            return
        if pending is not None:
            self._held = []
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - the exception on its way is the one to report
                _hdf5_write_failed()
            return
        if self.writable:
            self.flush()
        self._held = []
        with self._writing():
            self._f.close()

    def __enter__(self) -> "CodeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
