"""The numba kernels of `ghindex dedup` (`ghindex.dedup_join` drives them: plans, tasks, threads).

Codes are held word-major: ``X[w, i]`` is 64-bit word ``w`` of code ``i`` (bit ``b`` of a code is bit
``b % 64`` of word ``b // 64``, the packed codes' LSB-first order read as little-endian words, zero
padded to whole words; padding bits are equal in every code, so distances do not change). Distances
of one code against a block of codes then run over consecutive words, the loop LLVM vectorises (as
in `ghindex.flatscan_kernels`' generic kernel).

- `join_kernel`: every pair (i, j) of a list of tasks (rectangles of rows x columns, or triangles
  j > i of one segment) at Hamming distance <= radius, in tiles of ``TILE`` rows over blocks of
  ``BLOCK`` columns, a chunk of ``CHUNK`` columns at a time (it stays in L2 while the tiles go over
  it). A block whose smallest distance is above the radius costs only its distances
  (kept as running minima, not stored); the rare other blocks are gone over again pair by pair.
- `radix_argsort`, `runs`: the order of the substring keys and their runs (multi-index hashing's buckets).
- `components`: union-find over pairs (connected components).
- `greedy_keep`: the members kept by `ghindex dedup --keep` (see `ghindex.dedup`).
- `diameters`: the largest distance between any two members of each group.

The constants are compile-time constants (numba freezes module globals when it compiles).
"""
from __future__ import annotations

import numba
import numpy as np

from .flatscan_kernels import _load64
from .popcount import popcount

#: Rows compared with each loaded column code.
TILE = 4
#: Columns per block (the unit whose minimum distance decides whether it is searched for pairs).
BLOCK = 256
#: Columns per chunk: a chunk's words stay in L2 while every tile of rows goes over it.
CHUNK = 8192

_FAR = np.int32(1 << 30)


@numba.njit(inline="always")
def _word(xb, n, w, i):
    """Word w of code i of a word-major array of n codes, given as its bytes (`xb`): a plain load,
    which LLVM vectorises where indexing the uint64 array (with its negative-index check) it did not
    (measured 1.6 vs 5.7 G distances/s on one core)."""
    return _load64(xb, (w * n + i) * 8)


@numba.njit(inline="always")
def _block_min(xi, ni, xj, nj, nw, t0, r1, r2, r3, b0, n, dist):
    """The smallest distance between rows t0, r1, r2, r3 of xi and columns [b0, b0 + n) of xj. One and
    two-word codes keep only running minima (the loop LLVM vectorises, nothing stored); wider codes
    add their words' distances up in `dist` first."""
    m = _FAR
    if nw == 1:
        a0, a1, a2, a3 = _word(xi, ni, 0, t0), _word(xi, ni, 0, r1), _word(xi, ni, 0, r2), _word(xi, ni, 0, r3)
        for j in range(b0, b0 + n):
            x = _word(xj, nj, 0, j)
            d0 = np.int32(popcount(x ^ a0))
            d1 = np.int32(popcount(x ^ a1))
            d2 = np.int32(popcount(x ^ a2))
            d3 = np.int32(popcount(x ^ a3))
            m = min(m, min(min(d0, d1), min(d2, d3)))
        return m
    if nw == 2:
        a0, a1, a2, a3 = _word(xi, ni, 0, t0), _word(xi, ni, 0, r1), _word(xi, ni, 0, r2), _word(xi, ni, 0, r3)
        e0, e1, e2, e3 = _word(xi, ni, 1, t0), _word(xi, ni, 1, r1), _word(xi, ni, 1, r2), _word(xi, ni, 1, r3)
        for j in range(b0, b0 + n):
            x = _word(xj, nj, 0, j)
            y = _word(xj, nj, 1, j)
            d0 = np.int32(popcount(x ^ a0)) + np.int32(popcount(y ^ e0))
            d1 = np.int32(popcount(x ^ a1)) + np.int32(popcount(y ^ e1))
            d2 = np.int32(popcount(x ^ a2)) + np.int32(popcount(y ^ e2))
            d3 = np.int32(popcount(x ^ a3)) + np.int32(popcount(y ^ e3))
            m = min(m, min(min(d0, d1), min(d2, d3)))
        return m
    dist[:, :n] = 0
    for w in range(nw):
        a0, a1, a2, a3 = _word(xi, ni, w, t0), _word(xi, ni, w, r1), _word(xi, ni, w, r2), _word(xi, ni, w, r3)
        for j in range(n):
            x = _word(xj, nj, w, b0 + j)
            dist[0, j] += np.int32(popcount(x ^ a0))
            dist[1, j] += np.int32(popcount(x ^ a1))
            dist[2, j] += np.int32(popcount(x ^ a2))
            dist[3, j] += np.int32(popcount(x ^ a3))
    for t in range(TILE):
        for j in range(n):
            m = min(m, dist[t, j])
    return m


@numba.njit(inline="always")
def _distance(xi, ni, xj, nj, nw, i, j):
    d = np.int32(0)
    for w in range(nw):
        d += np.int32(popcount(_word(xi, ni, w, i) ^ _word(xj, nj, w, j)))
    return d


@numba.njit(inline="always")
def _first_agreement(xi, ni, xj, nj, nw, i, j, sub, masks):
    """True when substring `sub` is the first substring on which code i of xi and code j of xj agree
    exactly (always True for sub < 0: no substrings). A pair that agrees on several substrings is
    met in the bucket of each; only the first reports it, so every pair comes out once."""
    if sub < 0:
        return True
    for t in range(sub + 1):
        equal = True
        for w in range(nw):
            if (_word(xi, ni, w, i) ^ _word(xj, nj, w, j)) & masks[t, w]:
                equal = False
                break
        if equal:
            return t == sub
    return False


@numba.njit(inline="always")
def _emit(count, out_i, out_j, out_d, i, j, d):
    """Append pair (i, j, d), doubling the output arrays when full."""
    if count == len(out_i):
        grown_i = np.empty(2 * count, np.int64)
        grown_j = np.empty(2 * count, np.int64)
        grown_d = np.empty(2 * count, np.int32)
        grown_i[:count] = out_i[:count]
        grown_j[:count] = out_j[:count]
        grown_d[:count] = out_d[:count]
        out_i, out_j, out_d = grown_i, grown_j, grown_d
    out_i[count] = i
    out_j[count] = j
    out_d[count] = d
    return count + 1, out_i, out_j, out_d


@numba.njit(cache=True, nogil=True, error_model="numpy")
def join_kernel(xi, ni, xj, nj, nw, tasks, radius, sub, masks):
    """Pairs (i, j, distance) with distance <= `radius` over `tasks` (K, 5) int64 rows
    (i_lo, i_hi, j_lo, j_hi, triangle): rows [i_lo, i_hi) of the ni codes of xi against columns
    [j_lo, j_hi) of the nj codes of xj (word-major, `nw` words a code, as bytes: `X.reshape(-1).view(
    np.uint8)`), only j > i when `triangle` (then xi is xj). `sub` >= 0: the bucket pass of substring
    `sub` (masks (m, nw)): a pair is kept only where `sub` is the first substring it agrees on.
    Returns (i int64, j int64, distance int32), task by task."""
    out_i = np.empty(1024, np.int64)
    out_j = np.empty(1024, np.int64)
    out_d = np.empty(1024, np.int32)
    count = 0
    dist = np.empty((TILE, BLOCK), np.int32)
    for k in range(tasks.shape[0]):
        i_lo, i_hi, j_lo, j_hi = tasks[k, 0], tasks[k, 1], tasks[k, 2], tasks[k, 3]
        triangle = tasks[k, 4] != 0
        start = max(j_lo, i_lo + 1) if triangle else j_lo
        for c0 in range(start, j_hi, CHUNK):
            c1 = min(j_hi, c0 + CHUNK)
            rows_end = min(i_hi, c1 - 1) if triangle else i_hi  # rows with a column j > i in the chunk
            for t0 in range(i_lo, rows_end, TILE):
                nt = min(TILE, rows_end - t0)
                # rows past the last one repeat t0: the same distances, which do not change the minimum
                r1 = t0 + 1 if nt > 1 else t0
                r2 = t0 + 2 if nt > 2 else t0
                r3 = t0 + 3 if nt > 3 else t0
                first = c0
                if triangle:
                    # pairs among the tile's own rows one by one: a row against itself (distance 0)
                    # would otherwise make every tile's first block look like it holds a pair
                    for i in range(t0, t0 + nt):
                        for j in range(max(c0, i + 1), min(c1, t0 + nt)):
                            d = _distance(xi, ni, xj, nj, nw, i, j)
                            if d <= radius and _first_agreement(xi, ni, xj, nj, nw, i, j, sub, masks):
                                count, out_i, out_j, out_d = _emit(count, out_i, out_j, out_d, i, j, d)
                    first = max(c0, t0 + nt)
                for b0 in range(first, c1, BLOCK):
                    n = min(c1 - b0, BLOCK)
                    if _block_min(xi, ni, xj, nj, nw, t0, r1, r2, r3, b0, n, dist) > radius:
                        continue
                    # rare (a pair within the radius): the block again, one distance at a time
                    for t in range(nt):
                        i = t0 + t
                        for j in range(max(b0, i + 1) if triangle else b0, b0 + n):
                            d = _distance(xi, ni, xj, nj, nw, i, j)
                            if d <= radius and _first_agreement(xi, ni, xj, nj, nw, i, j, sub, masks):
                                count, out_i, out_j, out_d = _emit(count, out_i, out_j, out_d, i, j, d)
    return out_i[:count].copy(), out_j[:count].copy(), out_d[:count].copy()


#: Bits a pass of `radix_argsort` sorts by (2,048 counters: they stay in L1).
RADIX_DIGIT = 11


@numba.njit(cache=True, nogil=True)
def radix_argsort(keys, nbits):
    """(order, keys[order]): a stable sort of unsigned `keys` (uint32 or uint64) below 2**nbits, least
    significant digit first, RADIX_DIGIT bits a pass (one pass for up to 11-bit keys, two up to 22,
    three up to 33...): several times faster than numpy's argsort on millions of keys."""
    n = len(keys)
    order = np.arange(n, dtype=np.int64)
    k = keys.copy()
    if nbits <= 0 or n < 2:
        return order, k
    spare_order = np.empty(n, np.int64)
    spare_keys = np.empty_like(k)
    size = 1 << RADIX_DIGIT
    count = np.empty(size + 1, np.int64)
    for shift in range(0, nbits, RADIX_DIGIT):
        count[:] = 0
        for i in range(n):
            count[((np.uint64(k[i]) >> np.uint64(shift)) & np.uint64(size - 1)) + 1] += 1
        for b in range(size):
            count[b + 1] += count[b]
        for i in range(n):
            b = (np.uint64(k[i]) >> np.uint64(shift)) & np.uint64(size - 1)
            p = count[b]
            count[b] = p + 1
            spare_keys[p] = k[i]
            spare_order[p] = order[i]
        k, spare_keys = spare_keys, k
        order, spare_order = spare_order, order
    return order, k


@numba.njit(cache=True, nogil=True)
def runs(sorted_keys, min_size):
    """(starts, sizes) of the runs of equal keys of at least `min_size` in sorted keys: only those (most
    runs of long substrings are single codes, from which no pair comes), counted first, then written."""
    n = len(sorted_keys)
    count = 0
    for second in range(2):
        if second:
            starts = np.empty(count, np.int64)
            sizes = np.empty(count, np.int64)
            count = 0
        i = 0
        while i < n:
            j = i + 1
            while j < n and sorted_keys[j] == sorted_keys[i]:
                j += 1
            if j - i >= min_size:
                if second:
                    starts[count] = i
                    sizes[count] = j - i
                count += 1
            i = j
    return starts, sizes


@numba.njit(inline="always")
def _root(parent, v):
    while parent[v] != v:
        parent[v] = parent[parent[v]]  # path halving
        v = parent[v]
    return v


@numba.njit(cache=True, nogil=True)
def components(n, a, b):
    """Connected components of nodes 0..n-1 joined by edges (a[k], b[k]): each node's label is the
    smallest node of its component."""
    parent = np.arange(n, dtype=np.int64)
    for k in range(len(a)):
        ra = _root(parent, a[k])
        rb = _root(parent, b[k])
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb
    for v in range(n):
        parent[v] = _root(parent, v)
    return parent


@numba.njit(cache=True, nogil=True)
def greedy_keep(order, indptr, neighbours):
    """Visit nodes in `order`; keep a node unless a node already kept is one of its neighbours (CSR
    `indptr`, `neighbours`). Kept nodes are never neighbours of each other, and every node not kept
    has a kept neighbour (a maximal independent set, preferring nodes early in `order`)."""
    kept = np.zeros(len(indptr) - 1, np.bool_)
    for v in order:
        free = True
        for e in range(indptr[v], indptr[v + 1]):
            if kept[neighbours[e]]:
                free = False
                break
        kept[v] = free
    return kept


@numba.njit(cache=True, nogil=True)
def diameters(X, starts, limit):
    """For groups of consecutive columns of word-major X [starts[g], starts[g+1]): the largest distance
    between two of them; -1 for groups of more than `limit` members (not computed: quadratic)."""
    groups = len(starts) - 1
    out = np.full(groups, -1, np.int32)
    for g in range(groups):
        lo, hi = starts[g], starts[g + 1]
        if hi - lo > limit:
            continue
        best = np.int32(0)
        for p in range(lo, hi):
            for q in range(p + 1, hi):
                d = np.int32(0)
                for w in range(X.shape[0]):
                    d += np.int32(popcount(X[w, p] ^ X[w, q]))
                best = max(best, d)
        out[g] = best
    return out
