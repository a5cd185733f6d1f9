"""Keep large freed memory blocks in the process instead of handing them back to the kernel (glibc only).

A CNN forward on the CPU allocates and frees tensors of tens to hundreds of megabytes per layer
(MobileNetV2 at 224 px, batch 64: 100 MB for its first layer's output). glibc's malloc serves blocks
above its mmap threshold (at most 32 MB) with a fresh `mmap` and returns them with `munmap` when freed,
so every layer of every batch touches new pages and takes a page fault per 4 KiB. On the 2-core VM this
project is measured on, that was most of PyTorch's time: the bare MobileNetV2 forward at 224 px ran at
25-27 images/s with 14 s of kernel time per 320 images (6.6 million faults); with the thresholds below,
95-113 images/s, bit-identical features, 0.0-0.3 s of kernel time; `ghindex encode --runtime torch` went
from 44-60 to 88-130 images/s (benchmarks/RESULTS.md, "Encode"). ONNX Runtime reuses its own arena and
gained nothing, which is why its lead over PyTorch shrank.

`keep_freed_memory()` raises the mmap threshold to 1 GiB (larger blocks still get their own mapping) and
the trim threshold to 2 GiB, so freed blocks stay in malloc's heap for the next batch. The price: the
process keeps its peak heap instead of shrinking after it (as jemalloc, tcmalloc and PyTorch's CUDA
caching allocator do), and a loop that keeps a small result per batch between large temporaries pins
their freed space: training's feature extraction grew by 35 MB per batch that way until it wrote into one
buffer allocated up front (`ghindex.train_inputs.FilledRows`); such loops should do the same. It is called
when an Encoder is built (every command and API function that runs a model builds one), once per process,
and inherited by the data loader's forked workers. It changes nothing
where the process chose for itself: another C library (macOS, Windows, musl), `GLIBC_TUNABLES` or a
`MALLOC_*_` variable set, or ``GHINDEX_MALLOC=system``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks of this size and more still get a mapping of their own
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top is returned beyond this (mallopt takes an int)
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")

_applied: bool | None = None  # the outcome of the first call


def _skip_reason() -> str | None:
    if os.environ.get("GHINDEX_MALLOC", "").strip().lower() == "system":
        return "GHINDEX_MALLOC=system"
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen:
        return f"{chosen[0]} is set"
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    return None


def keep_freed_memory() -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (see the module docstring), once;
    True when they are set (now or by an earlier call), False where nothing was changed."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    reason = _skip_reason()
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # noqa: B018 - AttributeError where the C library is not glibc (musl)
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            reason = None if _applied else "mallopt refused"
        except (OSError, AttributeError):
            reason = "not glibc"
    if reason:
        log.debug("malloc thresholds left as they are: %s", reason)
    return _applied
