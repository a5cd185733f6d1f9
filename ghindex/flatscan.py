"""Exact Hamming k-NN and range search over packed binary codes on the CPU (numba kernels).

Numpy in, numpy out; no index. ``Index.search`` / ``Index.range_search`` use it for flat indexes on
the CPU (``engine="ghindex"``), reading the codes FAISS holds in place (`faiss_codes` gives a view of
them, no copy).

Results:

- ``knn(codes, queries, k)`` -> (distances int32 (Q, k'), positions int64 (Q, k')), k' = min(k, N).
  Each row is the k' nearest codes sorted by distance, **ties ranked by database position**: exactly
  the first k' entries of a stable sort of the query's distances (the rule `ghindex eval` uses).
  FAISS computes the same distances but leaves the order of ties, and which tied code makes the cut
  at k, to its heap.
- ``range_search(codes, queries, radius)`` -> (lims int64 (Q+1,), distances int32, positions int64),
  FAISS's layout and FAISS's strict rule (distance < radius); each query's results are sorted by
  distance, then position.

How it is fast (one pass over the database; 2-4x FAISS's binary flat scan per core, see
benchmarks/bench_index.py scan):

- Codes are read in place with unaligned 8-byte (or 4-byte) loads, whatever their width. 4, 8, 16,
  20, 32 and 64-byte codes (FAISS's fast widths, which `ghindex.index` pads to) have kernels
  compiled with the width as a constant; other widths share a generic kernel, which copies each
  chunk of the database word-major (a chunk-sized buffer) so that its loops also run over codes.
- Queries go in tiles of four over blocks of ``BLOCK`` codes: each code loaded is compared with four
  queries while in registers, and the loop keeps only each query's minimum distance over the block
  (no branch per code), which LLVM vectorises (AVX2: nibble-table popcount; AVX-512 VPOPCNTDQ:
  vector popcount; numba compiles for the CPU it runs on).
- A block whose minimum is not below a query's current k-th distance cannot change its top k (a
  later position never wins a tie), so it is skipped; otherwise its distances are offered to that
  query's max-heap of ``distance << 40 | position`` keys. Once the heaps fill, almost every block is
  skipped: the scan is the popcount loop.
- The database is walked in chunks of ``CHUNK_BYTES`` (they stay in L2) by groups of ``GROUP``
  queries, so a chunk comes from memory once per group. A group of fewer than ``TILE`` queries
  over a database of ``STREAM_BYTES`` or more (past what the last-level cache keeps between
  searches) with codes of 16 bytes or more streams it a cache line at a time, each line a few KiB
  ahead prefetched by hand (the hardware prefetcher alone leaves the core waiting), the minimum
  over a block kept in registers. Threads (a pool; the kernels release the
  GIL) take (query group, database part) items one at a time; few queries are split over database
  parts and merged, so one query still uses every thread.
- For large k (k * LARGE_K_RATIO >= N) a per-query counting selection replaces the heaps: all
  distances (N int32 of scratch per thread), their histogram, then one ordered pass.
- Range search counts the hits of each query per superblock of codes (same tiles), then a second
  pass writes them at known offsets, visiting only the superblocks that have any.

The first call with a new code width compiles its kernel (a few seconds of CPU), cached on disk
(``cache=True``) after that. The kernels are in `ghindex.flatscan_kernels`; this module checks the
arguments, makes the work items, runs them on threads and merges the parts.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import sys
import threading

import numba
import numpy as np

from .errors import SearchError
from .flatscan_kernels import (  # noqa: F401  (BLOCK, CHUNK_BYTES: re-exported, with TILE and SUPERBLOCK)
    _EMPTY,
    _POS_BITS,
    _POS_MASK,
    BLOCK,
    CHUNK_BYTES,
    SUPERBLOCK,
    TILE,
    _knn_count_kernel,
    _knn_heap_kernel,
    _query_words,
    _range_count_kernel,
    _range_fill_kernel,
)

#: Code widths (bytes) with a kernel of their own; other widths share a generic kernel.
FAST_WIDTHS = (4, 8, 16, 20, 32, 64)
#: Queries per work item (threads take items one at a time).
GROUP = 64
#: Work items per thread wanted when there are few queries (the database is split to make them):
#: small items keep a thread that the OS delays from holding up the end of a search.
SPLIT = 4
#: Codes per database part below which a search is not split further: MIN_PART, and PART_PER_K * k
#: (each part fills its own heaps, and most blocks are offered to them until they are full and tight:
#: about the first 256 * k codes of a part). One query, 1M codes, k = 100, 2 threads: 4096 (2 parts)
#: ran 1.3-1.5x faster than 1024 (8 parts) at 32-256 bits; k <= 30 is the same (MIN_PART rules).
MIN_PART = 32 * 1024
PART_PER_K = 4096
#: Counting selection instead of heaps when k * LARGE_K_RATIO >= N.
LARGE_K_RATIO = 512
#: Queries per range-search kernel call (bounds its per-query, per-superblock counts).
RANGE_QUERIES = 1024

#: The kernels load codes as native integers and compare them with little-endian query words.
SUPPORTED = sys.byteorder == "little"


# ----------------------------------------------------------------------------------------- API
def _check(codes, queries, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not SUPPORTED:
        raise SearchError("ghindex.flatscan needs a little-endian CPU")
    codes = np.asarray(codes)
    queries = np.asarray(queries)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise SearchError(f"database codes must be a 2-d uint8 array, got {codes.dtype} {codes.shape}")
    if queries.dtype != np.uint8 or queries.ndim != 2:
        raise SearchError(f"query codes must be a 2-d uint8 array, got {queries.dtype} {queries.shape}")
    if codes.shape[1] != queries.shape[1] or codes.shape[1] == 0:
        raise SearchError(f"{what}: database codes are {codes.shape[1]} bytes wide, queries {queries.shape[1]}")
    if len(codes) > _POS_MASK:
        raise SearchError(f"{what}: at most {_POS_MASK} database codes, got {len(codes)}")
    if not codes.flags.c_contiguous:
        raise SearchError("database codes must be C-contiguous (a view of the index's buffer, not a copy)")
    return codes, queries


def _threads(threads) -> int:
    if threads is None:
        return int(numba.config.NUMBA_NUM_THREADS)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise SearchError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


_pool = None
_pool_lock = threading.Lock()


def _run(kernel, items: list, threads: int) -> None:
    """kernel(*item) for every item, on up to `threads` threads (the calling one included), items
    handed out one at a time so that a thread slowed by other work takes fewer of them."""
    threads = min(threads, len(items))
    if threads <= 1:
        for item in items:
            kernel(*item)
        return
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = concurrent.futures.ThreadPoolExecutor(max(threads - 1, os.cpu_count() or 1),
                                                          thread_name_prefix="ghindex-flatscan")
        pool = _pool
    counter = itertools.count()  # next() is atomic under the GIL

    def work():
        for i in iter(counter.__next__, None):
            if i >= len(items):
                return
            kernel(*items[i])

    futures = [pool.submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for future in futures:
            future.result()


def _kernel_width(width: int) -> tuple:
    """What selects a kernel's compiled width: a tuple of that many zeros, whose length numba knows at
    compile time (so the width is a constant there); () for the generic kernel, which reads `width`.
    (numba.literally would do the same but types the kernel again on every call.)"""
    return (0,) * width if width in FAST_WIDTHS else ()


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    return [(n * p // parts, n * (p + 1) // parts) for p in range(parts)]


def knn(codes: np.ndarray, queries: np.ndarray, k: int, *, threads: int | None = None,
        method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The k nearest database codes of each query by Hamming distance, ties by database position.

    `codes` (N, width) uint8, C-contiguous (read in place); `queries` (Q, width) uint8. Returns
    (distances int32 (Q, k'), positions int64 (Q, k')), k' = min(k, N): row q is the first k' entries
    of a stable sort of query q's distances. `threads`: worker threads (default: NUMBA_NUM_THREADS,
    i.e. the CPU count). `method`: 'heap' (pruned scan), 'count' (all distances, counting
    selection) or 'auto' (count when k * LARGE_K_RATIO >= N).
    """
    codes, queries = _check(codes, queries, "knn")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"k must be a positive integer, got {k!r}")
    if method not in ("auto", "heap", "count"):
        raise SearchError(f"method must be 'auto', 'heap' or 'count', got {method!r}")
    nthreads = _threads(threads)
    n, width = codes.shape
    nq = len(queries)
    k = int(min(k, n))
    if k == 0 or nq == 0:
        return np.zeros((nq, k), np.int32), np.zeros((nq, k), np.int64)
    if method == "auto":
        method = "count" if k * LARGE_K_RATIO >= n else "heap"
    db = codes.reshape(-1)
    qwords = _query_words(np.ascontiguousarray(queries))
    fast = _kernel_width(width)
    groups = _spans(nq, -(-nq // GROUP))
    if method == "count":
        keys = np.empty((nq, k), np.int64)
        _run(_knn_count_kernel, [(db, qwords[a:b], k, fast, width, n, width * 8, keys[a:b])
                                 for a, b in groups], nthreads)
    else:
        parts = 1
        if nthreads > 1 and len(groups) < SPLIT * nthreads:  # few queries: split the database, merge after
            smallest = max(MIN_PART, PART_PER_K * k)
            parts = int(max(1, min(-(-SPLIT * nthreads // len(groups)), n // smallest)))
        keys = np.full((parts, nq, k), _EMPTY, np.int64)
        _run(_knn_heap_kernel, [(db, qwords[a:b], k, fast, width, lo, hi, keys[p, a:b])
                                for a, b in groups for p, (lo, hi) in enumerate(_spans(n, parts))], nthreads)
        if parts > 1:
            keys = np.sort(keys.transpose(1, 0, 2).reshape(nq, parts * k), axis=1)[:, :k]
        else:
            keys = keys[0]
    return (keys >> _POS_BITS).astype(np.int32), keys & _POS_MASK


def range_search(codes: np.ndarray, queries: np.ndarray, radius: int, *,
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All database codes at Hamming distance < `radius` (strict, as FAISS) of each query.

    Returns (lims int64 (Q+1,), distances int32, positions int64): query q's results are
    ``positions[lims[q]:lims[q+1]]``, sorted by distance, then position.
    """
    codes, queries = _check(codes, queries, "range_search")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise SearchError(f"radius must be a non-negative integer, got {radius!r}")
    nthreads = _threads(threads)
    n, width = codes.shape
    nq = len(queries)
    radius = int(min(radius, width * 8 + 1))
    if n == 0 or nq == 0 or radius == 0:
        return np.zeros(nq + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
    db = codes.reshape(-1)
    fast = _kernel_width(width)
    nsb = -(-n // SUPERBLOCK)
    lims_parts, d_parts, i_parts = [np.zeros(1, np.int64)], [], []
    total = 0
    for start in range(0, nq, RANGE_QUERIES):
        qwords = _query_words(np.ascontiguousarray(queries[start:start + RANGE_QUERIES]))
        m = len(qwords)
        counts = np.empty((m, nsb), np.int64)
        # items: (tile of queries, span of superblocks), about 4 per thread
        tiles = _spans(m, max(1, min(-(-m // TILE), 4 * nthreads)))
        blocks = _spans(nsb, max(1, min(nsb, -(-4 * nthreads // len(tiles)))))
        _run(_range_count_kernel, [(db, qwords[a:b], radius, fast, width, n, s0, s1, counts[a:b])
                                   for a, b in tiles for s0, s1 in blocks if b > a], nthreads)
        ends = np.cumsum(counts, axis=None).reshape(m, nsb)  # results end here, query by query
        offsets = ends - counts
        lims = ends[:, -1].copy()
        out_d = np.empty(int(lims[-1]), np.int32)
        out_i = np.empty(int(lims[-1]), np.int64)
        _run(_range_fill_kernel, [(db, qwords[a:b], radius, fast, width, n, offsets[a:b], lims[a:b],
                                   out_d, out_i) for a, b in _spans(m, max(1, min(m, 4 * nthreads)))],
             nthreads)
        lims_parts.append(lims + total)
        d_parts.append(out_d)
        i_parts.append(out_i)
        total += int(lims[-1])
    return np.concatenate(lims_parts), np.concatenate(d_parts), np.concatenate(i_parts)


def faiss_codes(index) -> np.ndarray:
    """The codes of a FAISS IndexBinaryFlat as an (ntotal, code_size) uint8 view of its own buffer.

    No copy: valid while the index lives and until codes are added or removed (which may move the
    buffer); take a new view after that.
    """
    import faiss

    n, width = int(index.ntotal), int(index.code_size)
    if n == 0:
        return np.zeros((0, width), np.uint8)
    return faiss.rev_swig_ptr(index.xb.data(), n * width).reshape(n, width)
