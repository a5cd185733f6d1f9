"""The numba kernels of the exact Hamming scan (`ghindex.flatscan`, which documents how it works and
drives them: checks, work items, threads, merging).

- `_dist` (and `_query_words`, the query words it compares with): one code's distance, read in place
  with unaligned loads (`_load64`, `_load32`).
- `_knn_heap_kernel`: a group of queries over a span of the database, in chunks of ``CHUNK_BYTES``,
  tiles of ``TILE`` queries and blocks of ``BLOCK`` codes, into per-query max-heaps of
  ``distance << _POS_BITS | position`` keys. A group of fewer than ``TILE`` queries over a database
  of ``STREAM_BYTES`` or more streams it from memory: codes of ``STREAM_WIDTH`` bytes or more then go
  a cache line at a time, prefetched ``PREFETCH_BYTES`` ahead (`_block_stream1`).
- `_knn_count_kernel`: the counting selection for large k.
- `_range_count_kernel`, `_range_fill_kernel`: range search's two passes over superblocks of
  ``SUPERBLOCK`` codes.

The constants here are compile-time constants of the kernels (numba freezes module globals when it
compiles), so changing them at run time has no effect on compiled code.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .popcount import popcount

#: Queries compared with each loaded code.
TILE = 4
#: Codes per pruning block (the unit that is skipped or offered to a heap).
BLOCK = 256
#: Bytes of database scanned by a group of queries before moving on (stays in L2).
CHUNK_BYTES = 128 * 1024
#: Codes per superblock in range search (counts are kept per query and superblock).
SUPERBLOCK = 4096
#: Fewer than TILE queries, codes of STREAM_WIDTH bytes or more, a database of STREAM_BYTES or more
#: (past what the last-level cache keeps between searches): `_block_stream1`, which prefetches
#: PREFETCH_BYTES ahead. One query on one core (AVX2 EPYC, 32 MiB L3, loaded): 1.15-1.4x faster over
#: 1M codes of 16-64 bytes (16-64 MB); over 3-10 MB, and with 4 and 8-byte codes, `_block_min1`, which
#: LLVM vectorises, is faster (up to 1.3x).
STREAM_WIDTH = 16
STREAM_BYTES = 12 << 20
PREFETCH_BYTES = 4096
#: Bytes of a cache line (x86-64, ARM64).
LINE = 64

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


@intrinsic
def _prefetch(typingctx, arr, offset):
    """Prefetch, for reading into every cache level, the line at byte `offset` of a 1-d uint8 array: a
    hint (llvm.prefetch), which never faults, so `offset` may lie past the end of the array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(offset, types.Integer)):
        return None
    sig = types.void(arr, offset)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [ptr.type], ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]))
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data cache
        return context.get_dummy_value()

    return sig, codegen


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
def _offer_fresh(db, width, qw, b0, b1, dist, heap, k):
    """`_offer` codes [b0, b1) to query `qw`'s heap, their distances computed here (into dist)."""
    for j in range(b0, b1):
        dist[j - b0] = _dist(db, j * width, qw, width)
    _offer(dist, b0, b1, heap, k)


@numba.njit(inline="always")
def _offer_block(db, width, qw, b0, b1, dist, heap, k):
    """`_offer` the distances `_block_min1/4` left in dist (4-byte codes: computed here, for this query)."""
    if width == 4:
        _offer_fresh(db, width, qw, b0, b1, dist, heap, k)
    else:
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
def _block_stream1(db, width, qw, b0, b1):
    """One query's smallest distance over codes [b0, b1) read from memory (codes of STREAM_WIDTH bytes or
    more): a cache line of codes at a time, the line PREFETCH_BYTES ahead prefetched, no distance stored
    (`_offer_fresh` computes them for the rare block offered to the heap). Scalar popcounts: in the
    vectorised loop of `_block_min1`, the core waits on memory (the hardware prefetcher alone falls
    behind), and a prefetch in that loop stops LLVM vectorising it."""
    per = max(1, LINE // width)  # codes per prefetch (every line is reached: per * width <= LINE)
    m0 = np.int64(1 << 30)
    j = b0
    while j + per <= b1:
        _prefetch(db, j * width + PREFETCH_BYTES)
        for u in range(per):
            m0 = min(m0, _dist(db, (j + u) * width, qw, width))
        j += per
    for i in range(j, b1):
        m0 = min(m0, _dist(db, i * width, qw, width))
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
                # no tile brings the chunk into cache, nor is the database likely to be there
                stream = nq < TILE and width >= STREAM_WIDTH and db.shape[0] >= STREAM_BYTES
                for t in range(t0, nq):
                    for b0 in range(c0, c1, BLOCK):
                        b1 = min(c1, b0 + BLOCK)
                        if stream:
                            if _block_stream1(db, width, qwords[t], b0, b1) < heaps[t, 0] >> _POS_BITS:
                                _offer_fresh(db, width, qwords[t], b0, b1, dist[0], heaps[t], k)
                        elif _block_min1(db, width, qwords[t], b0, b1, dist[0]) < heaps[t, 0] >> _POS_BITS:
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
