"""The code store's file format: its constants, the row batch type, and how attribute values and image
paths are converted to and from what HDF5 holds. Shared by the reader (`ghindex.store`) and the writer
(`ghindex.store_write`); the layout itself is described in `ghindex.store`'s docstring."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

FORMAT_VERSION = 2  # the newest version this module reads and writes (1: paths as given; 2: relative paths)
BIT_ORDER = "little"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Bytes of one chunk of the widest per-row dataset (codes, or the int64 ids for codes under 64 bits):
# big enough for fast sequential I/O, small enough that tiny stores stay small and a few chunks per
# dataset fit the chunk cache below.
CHUNK_BYTES = 128 * 1024
CHUNK_CACHE_BYTES = 64 * 1024 * 1024
# Rows per batch of `iter_chunks` by default: about this many bytes of codes + ids + labels.
ITER_BYTES = 32 * 1024 * 1024
_RESERVED_ATTRS = frozenset({"format_version", "bits", "bit_order", "encoder_fingerprint", "source", "created", "complete",
                             "paths_root", "paths_root_absolute"})


class CodeBatch(NamedTuple):
    codes: np.ndarray  # (n, bits/8) uint8
    ids: np.ndarray  # (n,) int64
    labels: np.ndarray | None  # (n,) int64 or (n, C) uint8, None if the store has no labels
    paths: list[str] | None  # None if the store has no paths (or they were not requested)
    confidences: np.ndarray | None = None  # (n, bits/4) uint8 (`hashing.pack_confidences`), None if the store has none


def is_hdf5(path: str | os.PathLike) -> bool:
    """True if the file starts with the HDF5 signature (at 0 or a power-of-two user-block offset)."""
    try:
        with open(path, "rb") as f:
            offset = 0
            while True:
                f.seek(offset)
                head = f.read(8)
                if head == HDF5_SIGNATURE:
                    return True
                if len(head) < 8:
                    return False
                offset = 512 if offset == 0 else offset * 2
                if offset > 1 << 20:
                    return False
    except (IsADirectoryError, PermissionError, FileNotFoundError):
        return False


def default_chunk_rows(code_bytes: int) -> int:
    return max(1024, CHUNK_BYTES // max(code_bytes, 8))


def _attr_value(value: Any):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A file name with undecodable bytes (surrogate escapes): store its bytes; reads decode them back.
            return value.encode("utf-8", "surrogateescape")
        return value
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True)


def _py(value: Any):
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _encode_paths(paths: Sequence) -> np.ndarray:
    return np.array([p if isinstance(p, bytes) else os.fsencode(p) for p in paths], dtype=object)


def _decode_paths(raw: np.ndarray) -> list[str]:
    return [os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in raw]


def _paths_link(store_name: str, root) -> tuple[str, str]:
    """(root relative to the store's folder, root absolute): what a version-2 store records."""
    absolute = os.path.abspath(os.fspath(root))
    try:
        relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(store_name)))
    except ValueError:  # another drive (Windows): only the absolute path can say where it is
        relative = absolute
    return relative, absolute


def _relative_to(paths: Sequence, root: str) -> list[str]:
    """Paths under `root` relative to it; others as they are (absolute)."""
    prefix = root.rstrip(os.sep) + os.sep
    out = []
    for p in paths:
        p = os.fsdecode(p)
        full = os.path.normpath(os.path.abspath(p))
        out.append(full[len(prefix):] if full.startswith(prefix) else p)
    return out


def parse_history(raw) -> list:
    """The store's `history` attribute (a JSON list of run records); [] when absent or unreadable."""
    try:
        value = json.loads(raw) if raw else []
    except (TypeError, ValueError):
        return []
    return value if isinstance(value, list) else []
