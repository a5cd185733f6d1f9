"""The numba kernel that turns a batch of decoded uint8 pixels into the model's normalised float input.

A uint8 pixel has 256 values per channel, so ``(v / 255 - mean[c]) / std[c]`` is a table of 3 x 256
floats, computed once with the very operations `ghindex.images.normalize` runs (the caller builds it,
`ghindex.batching.normalize_table`); looking values up in it gives bit-identical results in one pass
over the pixels, where the elementwise route makes three passes and two 4-byte-per-value temporaries
(35-39 ms per batch of 64 images at 224 px on the 2-core machine, 0.55 ms per image of the main
process while the backbone waits).

`normalize_into`: (N, H, W, 3) uint8 pixels, as the data loader's workers decode them, into float32
in either layout the backbone runs on: NCHW (ONNX Runtime) or NHWC memory (PyTorch's channels-last).
`ghindex.batching.BatchNormalizer` builds the table and keeps the output buffer.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True)
def _to_nchw(pixels, table, out):
    # one output row (image i, channel k, line y) per step: contiguous writes, reads 3 bytes apart
    n, h, w, c = pixels.shape
    for row in numba.prange(n * c * h):
        i, k, y = row // (c * h), (row // h) % c, row % h
        lut = table[k]
        src = pixels[i, y]
        dst = out[i, k, y]
        for x in range(w):
            dst[x] = lut[src[x, k]]


@numba.njit(parallel=True, nogil=True, cache=True)
def _to_nhwc(pixels, table, out):
    # the same memory order in and out: one flat pass, channel = position % 3
    n, h, w, c = pixels.shape
    src = pixels.reshape(n * h, w * c)
    dst = out.reshape(n * h, w * c)
    for row in numba.prange(n * h):
        a, b = src[row], dst[row]
        for j in range(0, w * c, c):
            for k in range(c):
                b[j + k] = table[k, a[j + k]]


def normalize_into(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 pixels looked up in ``table`` (C, 256 float32) into ``out``: float32
    (N, C, H, W), or (N, H, W, C) for the memory of a channels-last NCHW tensor. Returns ``out``.

    The caller keeps ``out`` from batch to batch: a fresh 38 MB array per batch of 64 at 224 px costs
    more in page faults (~10 ms here) than the lookups (2-5 ms on 2 threads)."""
    n, h, w, c = pixels.shape
    if out.shape == (n, c, h, w):
        _to_nchw(pixels, table, out)
    elif out.shape == (n, h, w, c):
        _to_nhwc(pixels, table, out)
    else:
        raise ValueError(f"output shape {out.shape} fits neither layout of pixels {pixels.shape}")
    return out
