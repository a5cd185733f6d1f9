"""Packed codes as FAISS takes them: padding to the fast Hamming widths, and checks of codes and ids passed in."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, SearchError

#: Code widths (bytes) with a specialised FAISS Hamming kernel.
FAST_WIDTHS = (4, 8, 16, 20, 32, 64)


def padded_width(code_bytes: int) -> int:
    """Byte width FAISS will search at: the next fast width (codes wider than 64 bytes stay as they are)."""
    for width in FAST_WIDTHS:
        if code_bytes <= width:
            return width
    return int(code_bytes)


def pad_codes(codes: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad packed codes on the right to `width` bytes (C-contiguous uint8 for FAISS)."""
    n, code_bytes = codes.shape
    if code_bytes == width:
        return np.ascontiguousarray(codes)
    out = np.zeros((n, width), dtype=np.uint8)
    out[:, :code_bytes] = codes
    return out


def _check_codes(codes, code_bytes: int, what: str) -> np.ndarray:
    """Packed codes as a 2-d uint8 array of the right width, or a SearchError that says what is wrong."""
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise SearchError(
            f"{what} must be packed uint8 codes (N, {code_bytes}), got dtype {arr.dtype}"
            + ("; pack 0/1 or +-1 values with ghindex.pack_bits / pack_signs" if arr.ndim == 2 else "")
        )
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise SearchError(f"{what} must be a 2-d array (N, {code_bytes}), got shape {arr.shape}")
    if arr.shape[1] != code_bytes:
        raise SearchError(
            f"{what} are {arr.shape[1]} bytes ({arr.shape[1] * 8} bits) wide but the index holds "
            f"{code_bytes}-byte ({code_bytes * 8}-bit) codes"
        )
    return arr


def _check_ids(ids, n: int, what: str, error=ConfigError) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise error(f"{what}: expected {n} ids in a 1-d array, got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise error(f"{what}: ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n and arr.min() < 0:
        raise error(f"{what}: ids must be >= 0 (FAISS uses -1 for 'no result'), found {arr.min()}")
    return np.ascontiguousarray(arr)
