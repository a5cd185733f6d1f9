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
  queries, so a chunk comes from memory once per group. Threads (a pool; the kernels release the
  GIL) take (query group, database part) items one at a time; few queries are split over database
  parts and merged, so one query still uses every thread.
- For large k (k * LARGE_K_RATIO >= N) a per-query counting selection replaces the heaps: all
  distances (N int32 of scratch per thread), their histogram, then one ordered pass.
- Range search counts the hits of each query per superblock of codes (same tiles), then a second
  pass writes them at known offsets, visiting only the superblocks that have any.

The first call with a new code width compiles its kernel (a few seconds of CPU), cached on disk
(``cache=True``) after that.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import sys
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .errors import SearchError
from .popcount import popcount

#: Code widths (bytes) with a kernel of their own; other widths share a generic kernel.
FAST_WIDTHS = (4, 8, 16, 20, 32, 64)
#: Queries compared with each loaded code.
TILE = 4
#: Codes per pruning block (the unit that is skipped or offered to a heap).
BLOCK = 256
#: Bytes of database scanned by a group of queries before moving on (stays in L2).
CHUNK_BYTES = 128 * 1024
#: Queries per work item (threads take items one at a time).
GROUP = 64
#: Work items per thread wanted when there are few queries (the database is split to make them):
#: small items keep a thread that the OS delays from holding up the end of a search.
SPLIT = 4
#: Codes per database part below which a search is not split further: MIN_PART, and PART_PER_K * k
#: (each part fills its own heaps, and most blocks are offered to them until they are full and tight).
MIN_PART = 32 * 1024
PART_PER_K = 1024
#: Counting selection instead of heaps when k * LARGE_K_RATIO >= N.
LARGE_K_RATIO = 512
#: Queries per range-search kernel call (bounds its per-query, per-superblock counts).
RANGE_QUERIES = 1024
#: Codes per superblock in range search (counts are kept per query and superblock).
SUPERBLOCK = 4096

#: The kernels load codes as native integers and compare them with little-endian query words.
SUPPORTED = sys.byteorder == "little"

_POS_BITS = 40
_POS_MASK = (1 << _POS_BITS) - 1
_EMPTY = np.iinfo(np.int64).max  # heap sentinel: compares above every real key


# ----------------------------------------------------------------------------------- intrinsics
def _make_load(bits: int):
    itype = ir.IntType(bits)
    rtype = getattr(types, f"uint{bits}")

    @intrinsic
    def load(typingctx, arr, offset):
        """Unaligned load (native byte order) of `bits` bits at byte `offset` of a 1-d uint8 array."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(offset, types.Integer)):
            return None
        sig = rtype(arr, offset)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.gep(ary.data, [args[1]])
            ptr = builder.bitcast(ptr, itype.as_pointer())
            return builder.load(ptr, align=1)

        return sig, codegen

    return load


_load64 = _make_load(64)
_load32 = _make_load(32)


# ---------------------------------------------------------------------------------- distances
@numba.njit(inline="always")
def _dist(db, base, qw, width):
    """Hamming distance between the code at byte `base` of `db` and query words `qw` (see _query_words)."""
    if width == 4:
        return np.int64(popcount(np.uint32(_load32(db, base) ^ np.uint32(qw[0]))))  # numba widens ^
    if width < 8:
        word = np.uint64(0)
        for b in range(width):
            word |= np.uint64(db[base + b]) << np.uint64(8 * b)
        return np.int64(popcount(word ^ qw[0]))
    d = np.int64(0)
    full = width // 8
    for i in range(full):
        d += np.int64(popcount(_load64(db, base + 8 * i) ^ qw[i]))
    tail = width % 8
    if tail:  # the code's last 8 bytes, shifted past the bytes the full words already counted
        d += np.int64(popcount((_load64(db, base + width - 8) >> np.uint64(64 - 8 * tail)) ^ qw[full]))
    return d


def _query_words(queries: np.ndarray) -> np.ndarray:
    """Queries (Q, width) uint8 -> (Q, words) uint64 in the order `_dist` reads codes."""
    nq, width = queries.shape
    if width < 8:
        powers = np.uint64(256) ** np.arange(width, dtype=np.uint64)
        return (queries.astype(np.uint64) * powers).sum(axis=1, dtype=np.uint64).reshape(nq, 1)
    full = width // 8
    words = np.ascontiguousarray(queries[:, :full * 8]).view("<u8").astype(np.uint64)
    if width % 8:
        powers = np.uint64(256) ** np.arange(width % 8, dtype=np.uint64)
        tail = (queries[:, full * 8:].astype(np.uint64) * powers).sum(axis=1, dtype=np.uint64)
        words = np.concatenate([words, tail.reshape(nq, 1)], axis=1)
    return np.ascontiguousarray(words)


# ------------------------------------------------------------------------------------ k-NN heaps
@numba.njit(inline="always")
def _replace_top(heap, k, key):
    """Replace the largest key of a full max-heap of `k` keys by a smaller `key`."""
    i = 0
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        right = child + 1
        if right < k and heap[right] > heap[child]:
            child = right
        if heap[child] <= key:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = key


@numba.njit(inline="always")
def _offer(dist, b0, b1, heap, k):
    """Offer codes [b0, b1), at distances dist[:b1 - b0], to one query's heap. Positions increase
    from call to call, so a code tied with the heap's largest key comes later and never enters."""
    limit = heap[0] >> _POS_BITS
    for j in range(b0, b1):
        d = np.int64(dist[j - b0])
        if d < limit:
            _replace_top(heap, k, (d << _POS_BITS) | j)
            limit = heap[0] >> _POS_BITS


@numba.njit(inline="always")
def _offer_block(db, width, qw, b0, b1, dist, heap, k):
    """`_offer` the distances `_block_min1/4` left in dist (4-byte codes: computed here, for this query)."""
    if width == 4:
        for j in range(b0, b1):
            dist[j - b0] = _dist(db, j * width, qw, width)
    _offer(dist, b0, b1, heap, k)


@numba.njit(inline="always")
def _dist4(db, base, width, q0, q1, q2, q3):
    return (_dist(db, base, q0, width), _dist(db, base, q1, width),
            _dist(db, base, q2, width), _dist(db, base, q3, width))


@numba.njit(inline="always")
def _transpose(db, width, c0, c1, words):
    """words[i, j - c0] <- word i of code j, as `_dist` reads it, for codes [c0, c1) (generic widths)."""
    full = width // 8
    tail = width % 8
    for j in range(c0, c1):
        base = j * width
        if width < 8:
            word = np.uint64(0)
            for b in range(width):
                word |= np.uint64(db[base + b]) << np.uint64(8 * b)
            words[0, j - c0] = word
            continue
        for i in range(full):
            words[i, j - c0] = _load64(db, base + 8 * i)
        if tail:
            words[full, j - c0] = _load64(db, base + width - 8) >> np.uint64(64 - 8 * tail)


@numba.njit(inline="always")
def _words_dist4(words, j0, j1, q0, q1, q2, q3, dist):
    """dist[t, j - j0] <- distance of code j of `words` (transposed) to query t, for j in [j0, j1).
    Codes in the inner loop whatever the number of words: the loop LLVM vectorises."""
    n = j1 - j0
    dist[:, :n] = 0
    for i in range(words.shape[0]):
        row = words[i]
        a0, a1, a2, a3 = q0[i], q1[i], q2[i], q3[i]
        for j in range(n):
            x = row[j0 + j]
            dist[0, j] += np.int64(popcount(x ^ a0))
            dist[1, j] += np.int64(popcount(x ^ a1))
            dist[2, j] += np.int64(popcount(x ^ a2))
            dist[3, j] += np.int64(popcount(x ^ a3))


@numba.njit(inline="always")
def _tile(qwords, t0):
    """The three queries after t0 (t0 again past the last query) and the words of all four."""
    nq = qwords.shape[0]
    t1 = t0 + 1 if t0 + 1 < nq else t0
    t2 = t0 + 2 if t0 + 2 < nq else t0
    t3 = t0 + 3 if t0 + 3 < nq else t0
    return t1, t2, t3, qwords[t0], qwords[t1], qwords[t2], qwords[t3]


@numba.njit(inline="always")
def _block_min1(db, width, qw, b0, b1, dist):
    """`_block_min4` for one query (those left over from tiles of four)."""
    if width == 4:
        n0 = np.int32(1 << 30)
        for j in range(b0, b1):
            n0 = min(n0, np.int32(_dist(db, j * width, qw, width)))
        return np.int64(n0)
    m0 = np.int64(1 << 30)
    for j in range(b0, b1):
        d0 = _dist(db, j * width, qw, width)
        dist[j - b0] = d0
        m0 = min(m0, d0)
    return m0


@numba.njit(inline="always")
def _block_min4(db, width, q0, q1, q2, q3, b0, b1, dist):
    """Each query's smallest distance over codes [b0, b1), and (width != 4) all the distances in
    dist[t, :b1 - b0] (the loop LLVM vectorises; the distances serve the blocks offered to a heap)."""
    if width == 4:  # in 32-bit lanes, twice the codes per vector register; storing them costs 2x here
        n0 = n1 = n2 = n3 = np.int32(1 << 30)
        for j in range(b0, b1):
            base = j * width
            n0 = min(n0, np.int32(_dist(db, base, q0, width)))
            n1 = min(n1, np.int32(_dist(db, base, q1, width)))
            n2 = min(n2, np.int32(_dist(db, base, q2, width)))
            n3 = min(n3, np.int32(_dist(db, base, q3, width)))
        return np.int64(n0), np.int64(n1), np.int64(n2), np.int64(n3)
    m0 = m1 = m2 = m3 = np.int64(1 << 30)
    for j in range(b0, b1):
        d0, d1, d2, d3 = _dist4(db, j * width, width, q0, q1, q2, q3)
        dist[0, j - b0] = d0
        dist[1, j - b0] = d1
        dist[2, j - b0] = d2
        dist[3, j - b0] = d3
        m0 = min(m0, d0)
        m1 = min(m1, d1)
        m2 = min(m2, d2)
        m3 = min(m3, d3)
    return m0, m1, m2, m3


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _knn_heap_kernel(db, qwords, k, fast_width, width, lo, hi, heaps):
    """heaps[q] <- the k smallest keys of query q over database codes [lo, hi), sorted (_EMPTY pads).

    Fast widths compare codes straight from `db`; generic widths copy each chunk word-major first
    (`words`, the size of a chunk), so that their loops run over codes too."""
    generic = len(fast_width) == 0
    if not generic:
        width = len(fast_width)
    nq = qwords.shape[0]
    chunk = max(BLOCK, CHUNK_BYTES // width // BLOCK * BLOCK)
    words = np.empty((qwords.shape[1] if generic else 0, chunk), np.uint64)
    dist = np.empty((TILE, BLOCK), np.int64)
    for c0 in range(lo, hi, chunk):
        c1 = min(hi, c0 + chunk)
        if generic:
            _transpose(db, width, c0, c1, words)
        for t0 in range(0, nq, TILE):
            t1, t2, t3, q0, q1, q2, q3 = _tile(qwords, t0)
            if t0 + TILE > nq and not generic:  # fewer than four left: one query at a time
                for t in range(t0, nq):
                    for b0 in range(c0, c1, BLOCK):
                        b1 = min(c1, b0 + BLOCK)
                        if _block_min1(db, width, qwords[t], b0, b1, dist[0]) < heaps[t, 0] >> _POS_BITS:
                            _offer_block(db, width, qwords[t], b0, b1, dist[0], heaps[t], k)
                continue
            for b0 in range(c0, c1, BLOCK):
                b1 = min(c1, b0 + BLOCK)
                if generic:
                    _words_dist4(words, b0 - c0, b1 - c0, q0, q1, q2, q3, dist)
                    for t, q in enumerate((t0, t1, t2, t3)):
                        if (t == 0 or q != t0) and dist[t, :b1 - b0].min() < heaps[q, 0] >> _POS_BITS:
                            _offer(dist[t], b0, b1, heaps[q], k)
                    continue
                m0, m1, m2, m3 = _block_min4(db, width, q0, q1, q2, q3, b0, b1, dist)
                if m0 < heaps[t0, 0] >> _POS_BITS:
                    _offer_block(db, width, q0, b0, b1, dist[0], heaps[t0], k)
                if m1 < heaps[t1, 0] >> _POS_BITS:
                    _offer_block(db, width, q1, b0, b1, dist[1], heaps[t1], k)
                if m2 < heaps[t2, 0] >> _POS_BITS:
                    _offer_block(db, width, q2, b0, b1, dist[2], heaps[t2], k)
                if m3 < heaps[t3, 0] >> _POS_BITS:
                    _offer_block(db, width, q3, b0, b1, dist[3], heaps[t3], k)
    for q in range(nq):
        heaps[q].sort()


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _knn_count_kernel(db, qwords, k, fast_width, width, n, max_dist, keys):
    """keys[q] <- the k smallest keys of query q, sorted, by a counting selection over all distances."""
    if len(fast_width):
        width = len(fast_width)
    dist = np.empty(n, np.int32)
    hist = np.empty(max_dist + 2, np.int64)
    for q in range(qwords.shape[0]):
        qw = qwords[q]
        hist[:] = 0
        for j in range(n):
            d = _dist(db, j * width, qw, width)
            dist[j] = d
            hist[d] += 1
        # hist[d] becomes the output slot of the first code at distance d; `cut` is the first
        # distance whose codes do not all fit in the top k (only its first ones, by position, enter)
        slot = 0
        cut = max_dist + 1
        for d in range(max_dist + 1):
            count = hist[d]
            hist[d] = slot
            slot += count
            if slot >= k and cut > max_dist:
                cut = d
        out = keys[q]
        for j in range(n):
            d = dist[j]
            if d <= cut:
                s = hist[d]
                if s < k:
                    out[s] = (np.int64(d) << _POS_BITS) | j
                    hist[d] = s + 1


# ------------------------------------------------------------------------------- range search
@numba.njit(inline="always")
def _count_below1(db, width, qw, b0, b1, radius):
    c = np.int64(0)
    for j in range(b0, b1):
        c += _dist(db, j * width, qw, width) < radius
    return c


@numba.njit(inline="always")
def _count_below4(db, width, q0, q1, q2, q3, b0, b1, radius):
    c0 = c1 = c2 = c3 = np.int64(0)
    for j in range(b0, b1):
        d0, d1, d2, d3 = _dist4(db, j * width, width, q0, q1, q2, q3)
        c0 += d0 < radius
        c1 += d1 < radius
        c2 += d2 < radius
        c3 += d3 < radius
    return c0, c1, c2, c3


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _range_count_kernel(db, qwords, radius, fast_width, width, n, s0, s1, counts):
    """counts[q, s] <- codes of superblock s (s0 <= s < s1) closer than `radius` to query q."""
    generic = len(fast_width) == 0
    if not generic:
        width = len(fast_width)
    nq = qwords.shape[0]
    words = np.empty((qwords.shape[1] if generic else 0, SUPERBLOCK), np.uint64)
    dist = np.empty((TILE, SUPERBLOCK), np.int64)
    for s in range(s0, s1):
        c0 = s * SUPERBLOCK
        c1 = min(n, c0 + SUPERBLOCK)
        if generic:
            _transpose(db, width, c0, c1, words)
        for t0 in range(0, nq, TILE):
            t1, t2, t3, q0, q1, q2, q3 = _tile(qwords, t0)
            if generic:
                _words_dist4(words, 0, c1 - c0, q0, q1, q2, q3, dist)
                for t, q in enumerate((t0, t1, t2, t3)):
                    counts[q, s] = np.sum(dist[t, :c1 - c0] < radius)
                continue
            if t0 + TILE > nq:  # fewer than four left: one query at a time
                for t in range(t0, nq):
                    counts[t, s] = _count_below1(db, width, qwords[t], c0, c1, radius)
                continue
            a0, a1, a2, a3 = _count_below4(db, width, q0, q1, q2, q3, c0, c1, radius)
            counts[t0, s] = a0
            counts[t1, s] = a1
            counts[t2, s] = a2
            counts[t3, s] = a3


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _range_fill_kernel(db, qwords, radius, fast_width, width, n, offsets, lims, out_d, out_i):
    """Write each query's results (distance < radius) at offsets[q, s] for superblock s on, then sort
    them by distance (stably: positions stay increasing within a distance). Query q's results end at
    lims[q] (offsets and lims count from the same origin as out_d, out_i)."""
    if len(fast_width):
        width = len(fast_width)
    nq, nsb = offsets.shape
    hist = np.empty(radius + 1, np.int64)
    for q in range(nq):
        qw = qwords[q]
        for s in range(nsb):
            o = offsets[q, s]
            end = offsets[q, s + 1] if s + 1 < nsb else lims[q]
            if o == end:
                continue
            for j in range(s * SUPERBLOCK, min(n, (s + 1) * SUPERBLOCK)):
                d = _dist(db, j * width, qw, width)
                if d < radius:
                    out_d[o] = d
                    out_i[o] = j
                    o += 1
        lo, hi = offsets[q, 0], lims[q]
        if hi - lo > 1:
            hist[:] = 0
            for o in range(lo, hi):
                hist[out_d[o]] += 1
            start = lo
            for d in range(radius):
                count = hist[d]
                hist[d] = start
                start += count
            tmp_d = out_d[lo:hi].copy()
            tmp_i = out_i[lo:hi].copy()
            for o in range(hi - lo):
                d = tmp_d[o]
                out_d[hist[d]] = d
                out_i[hist[d]] = tmp_i[o]
                hist[d] += 1


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
