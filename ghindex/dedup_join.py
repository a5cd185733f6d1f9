"""Every pair of codes within a Hamming radius, exactly: a self-join of one collection, or the join of
two (`ghindex dedup`'s pairs; numpy in, numpy out).

Two exact methods, chosen per call by their estimated cost (`plan`):

- **scan**: the blocked scan as a self-join: every pair i < j once (or every cross pair), in tasks of
  rows x columns on threads (`ghindex.dedup_kernels.join_kernel`). N^2 / 2 distances: the method for
  large radii, where no index helps.
- **mih** (multi-index hashing, Norouzi et al.): split the code into m > radius substrings of about
  bits / m bits. Two codes within the radius differ in at most radius < m substrings, so they agree
  exactly on at least one (pigeonhole). One pass per substring sorts the codes by it; only codes
  sharing a bucket are compared, each pair in the pass of the first substring it agrees on, so it
  comes out once. Candidates: about m * N^2 / 2^(bits / m) instead of N^2 / 2, plus m sorts.

`plan` estimates the candidates of every substring from a sample of the codes (pairs that collide
in the sample, scaled up), so skewed real codes (many sharing a substring) fall back to the scan
when buckets would be too full. Both methods return the same pairs; `method` forces one.

Memory: the codes as 64-bit words (N x 8 bytes per 64 bits); for one pass at a time, the sort of
its keys (about 24 bytes a code) and a copy of the codes that share a bucket; and the pairs found (20
bytes each). Nothing grows with N^2.
"""
from __future__ import annotations

import concurrent.futures
import math
import sys
from dataclasses import dataclass

import numba
import numpy as np

from . import flatscan
from .dedup_kernels import join_kernel, radix_argsort, runs
from .errors import ConfigError

METHODS = ("auto", "mih", "scan")
#: Codes sampled by `plan` to estimate how full the buckets of each substring are.
PLAN_SAMPLE = 65536
#: What sorting one code into one pass's buckets (keys, argsort, gathering its words) costs, in
#: distances of the scan: the exchange rate `plan` compares the two methods with (rough: a sort
#: moves each code a few times; the scan computes about 4 distances per nanosecond per core).
SORT_COST = 512
#: What one candidate pair in a bucket costs, in distances of the scan (short segments, task setup).
BUCKET_PAIR_COST = 2.0
#: Pairs per task and per work item handed to a thread (progress is updated per item).
TASK_PAIRS = 1 << 22
ITEM_PAIRS = 1 << 25
#: Per-task overhead in pairs (a task of a 2-code bucket still costs its setup).
TASK_OVERHEAD = 64


def words_of(codes: np.ndarray) -> np.ndarray:
    """Packed codes (N, bytes) uint8 -> word-major (ceil(bytes / 8), N) uint64, zero padded."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ConfigError(f"codes must be a 2-d uint8 array, got {codes.dtype} {codes.shape}")
    n, width = codes.shape
    nw = -(-width // 8)
    if width % 8:
        padded = np.zeros((n, nw * 8), np.uint8)
        padded[:, :width] = codes
        codes = padded
    return np.ascontiguousarray(np.ascontiguousarray(codes).view("<u8").astype(np.uint64, copy=False).T)


def substrings(bits: int, m: int) -> list[tuple[int, int]]:
    """m contiguous bit ranges [start, stop) covering `bits`, lengths differing by at most one."""
    return [(bits * s // m, bits * (s + 1) // m) for s in range(m)]


def substring_masks(bits: int, m: int, nwords: int) -> np.ndarray:
    """(m, nwords) uint64: the bits of each substring, word by word."""
    masks = np.zeros((m, nwords), np.uint64)
    for s, (lo, hi) in enumerate(substrings(bits, m)):
        for w in range(nwords):
            a, b = max(lo, 64 * w), min(hi, 64 * (w + 1))
            if a < b:
                masks[s, w] = np.uint64(((1 << (b - a)) - 1) << (a - 64 * w))
    return masks


def substring_keys(X: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The value of bits [lo, hi) (at most 64) of every code of word-major X, as uint64 (uint32 when
    it fits: faster to sort)."""
    length = hi - lo
    w, shift = divmod(lo, 64)
    keys = X[w] >> np.uint64(shift)  # one new array, then in place
    if shift and shift + length > 64:
        keys |= X[w + 1] << np.uint64(64 - shift)
    if length < 64:
        keys &= np.uint64((1 << length) - 1)
    return keys.astype(np.uint32) if length <= 32 else keys


def mih_substrings(bits: int, radius: int) -> int:
    """Substrings multi-index hashing needs: more than `radius` (the pigeonhole rule), each at most 64
    bits (a sortable key); 0 when there cannot be enough (radius >= bits)."""
    m = max(radius + 1, -(-bits // 64))
    return m if m <= bits else 0


@dataclass
class Plan:
    """What `pairs`/`cross_pairs` will do: `method` ('mih' or 'scan'), `substrings` (mih), the
    estimated candidate pairs each method compares, and their estimated costs (in scan distances)."""

    method: str
    substrings: int
    scan_pairs: float
    mih_candidates: float | None
    scan_cost: float
    mih_cost: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _collisions(keys_a: np.ndarray, keys_b: np.ndarray | None) -> int:
    """Pairs of equal keys within keys_a (keys_b None) or between keys_a and keys_b."""
    values, counts = np.unique(keys_a, return_counts=True)
    if keys_b is None:
        return int((counts * (counts - 1) // 2).sum())
    other, other_counts = np.unique(keys_b, return_counts=True)
    _, ia, ib = np.intersect1d(values, other, assume_unique=True, return_indices=True)
    return int((counts[ia] * other_counts[ib]).sum())


def plan(X: np.ndarray, bits: int, radius: int, Y: np.ndarray | None = None, method: str = "auto",
         seed: int = 0) -> Plan:
    """Choose the method for the pairs of word-major X (with Y: the cross pairs of X and Y)."""
    n = X.shape[1]
    ny = n if Y is None else Y.shape[1]
    scan_pairs = n * (n - 1) / 2 if Y is None else float(n) * ny
    m = mih_substrings(bits, radius)
    candidates = mih_cost = None
    if m and method != "scan":
        rng = np.random.default_rng(seed)
        sx = rng.choice(n, min(n, PLAN_SAMPLE), replace=False) if n > PLAN_SAMPLE else slice(None)
        sy = None if Y is None else (rng.choice(ny, min(ny, PLAN_SAMPLE), replace=False)
                                     if ny > PLAN_SAMPLE else slice(None))
        kx, ky = min(n, PLAN_SAMPLE), min(ny, PLAN_SAMPLE)
        candidates = 0.0
        for lo, hi in substrings(bits, m):
            keys = substring_keys(X[:, sx], lo, hi)
            if Y is None:
                scale = n * (n - 1) / max(1, kx * (kx - 1))
                candidates += _collisions(keys, None) * scale
            else:
                candidates += _collisions(keys, substring_keys(Y[:, sy], lo, hi)) * (float(n) * ny / max(1, kx * ky))
        mih_cost = m * (n + (0 if Y is None else ny)) * SORT_COST + candidates * BUCKET_PAIR_COST
    if method == "mih" and not m:
        raise ConfigError(f"radius {radius} leaves no substrings for multi-index hashing of {bits}-bit codes "
                          "(it needs radius < bits); use the scan")
    if method == "auto":
        method = "mih" if mih_cost is not None and mih_cost < scan_pairs else "scan"
    return Plan(method, m if method == "mih" else 0, scan_pairs, candidates, scan_pairs, mih_cost)


# ------------------------------------------------------------------------------------------- tasks
def _triangle_tasks(lo: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tasks (i_lo, i_hi, j_lo, j_hi, 1) covering the pairs j > i of each segment [lo, lo + size),
    a segment of more than TASK_PAIRS pairs split into row ranges of about equal pairs; and the pairs
    of each task."""
    pairs = size * (size - 1) // 2
    small = pairs <= TASK_PAIRS
    parts = [np.stack([lo[small], lo[small] + size[small], lo[small], lo[small] + size[small],
                       np.ones(int(small.sum()), np.int64)], axis=1)]
    work = [pairs[small]]
    for start, c in zip(lo[~small].tolist(), size[~small].tolist()):
        total = c * (c - 1) // 2
        pieces = -(-total // TASK_PAIRS)
        # rows [0, k) of the segment hold k (2c - 1 - k) / 2 pairs: solve for each piece's end
        targets = total * np.arange(1, pieces) / pieces
        ends = ((2 * c - 1) - np.sqrt(np.maximum((2 * c - 1) ** 2 - 8 * targets, 0))) / 2
        bounds = np.unique(np.concatenate([[0], np.clip(np.round(ends), 0, c).astype(np.int64), [c]]))
        a, b = bounds[:-1], bounds[1:]
        parts.append(np.stack([start + a, start + b, np.full_like(a, start), np.full_like(a, start + c),
                               np.ones_like(a)], axis=1))
        work.append((b - a) * (2 * c - 1 - a - b) // 2)  # rows [a, b): sum of (c - 1 - k)
    return np.concatenate(parts).astype(np.int64), np.concatenate(work).astype(np.int64)


def _rectangle_tasks(lo_a, size_a, lo_b, size_b) -> tuple[np.ndarray, np.ndarray]:
    """Tasks (i_lo, i_hi, j_lo, j_hi, 0) covering segment pairs [lo_a, +size_a) x [lo_b, +size_b), rows
    split so that a task has about TASK_PAIRS pairs; and the pairs of each task."""
    rows_per = np.maximum(1, TASK_PAIRS // np.maximum(size_b, 1))
    pieces = -(-size_a // rows_per)
    seg = np.repeat(np.arange(len(size_a)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(len(seg)) - first
    i_lo = lo_a[seg] + k * rows_per[seg]
    i_hi = np.minimum(i_lo + rows_per[seg], lo_a[seg] + size_a[seg])
    tasks = np.stack([i_lo, i_hi, lo_b[seg], lo_b[seg] + size_b[seg], np.zeros_like(seg)], axis=1)
    return tasks.astype(np.int64), ((i_hi - i_lo) * size_b[seg]).astype(np.int64)


def _threads(threads) -> int:
    if threads is None:
        return int(numba.config.NUMBA_NUM_THREADS)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


def _run(Xi, Xj, tasks, work, radius, sub, masks, threads, bar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """join_kernel over `tasks`, in work items of about ITEM_PAIRS pairs (at least a few per thread),
    on threads (the kernel releases the GIL); the pairs of all items in task order."""
    if not len(tasks):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    cost = np.cumsum(work + TASK_OVERHEAD)
    per_item = max(1, min(ITEM_PAIRS, int(cost[-1]) // (4 * threads) + 1))
    cuts = np.searchsorted(cost, np.arange(per_item, int(cost[-1]), per_item), side="left")
    bounds = np.unique(np.concatenate([[0], cuts, [len(tasks)]]))
    items = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    done = np.concatenate([[0], np.cumsum(work)])

    xi, xj = Xi.reshape(-1).view(np.uint8), Xj.reshape(-1).view(np.uint8)
    ni, nj, nw = Xi.shape[1], Xj.shape[1], Xi.shape[0]

    def one(item):
        a, b = item
        return join_kernel(xi, ni, xj, nj, nw, tasks[a:b], radius, sub, masks)

    results = [None] * len(items)
    if threads <= 1 or len(items) == 1:
        for k, item in enumerate(items):
            results[k] = one(item)
            if bar is not None:
                bar.update(int(done[item[1]] - done[item[0]]))
    else:
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="ghindex-dedup") as pool:
            futures = {pool.submit(one, item): k for k, item in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                k = futures[future]
                results[k] = future.result()
                if bar is not None:
                    a, b = items[k]
                    bar.update(int(done[b] - done[a]))
    return tuple(np.concatenate([r[c] for r in results]) for c in range(3))


# ------------------------------------------------------------------------------------------- joins
def _check_radius(radius, bits: int) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ConfigError(f"radius must be a non-negative integer number of bits, got {radius!r}")
    if radius > bits:
        raise ConfigError(f"radius {radius} is above the code width ({bits} bits)")
    return int(radius)


def _buckets(keys: np.ndarray, nbits: int, min_size: int = 2):
    """Rows sorted by key (`nbits` bits), and the (start, size) of each run of equal keys of at least
    `min_size`."""
    order, sorted_keys = radix_argsort(keys, nbits)
    starts, sizes = runs(sorted_keys, min_size)
    return order, sorted_keys, starts, sizes


def _gather(order, starts, sizes) -> np.ndarray:
    """The rows of `order` in the runs (starts, sizes), run after run."""
    offsets = np.cumsum(sizes) - sizes
    positions = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(offsets - starts, sizes)
    return order[positions]


def _finish(a, b, d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((b, a))
    return a[order], b[order], d[order]


def _bar(total: float, progress, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=int(total), unit="pair", unit_scale=True, file=sys.stderr, desc=desc, dynamic_ncols=True,
                smoothing=0.1)


def _extrapolate(bar, this_pass: int, s: int, m: int) -> None:
    """The bar's total once pass s's candidates are known: those done, this pass's, and as many for
    each pass still to come."""
    if bar is not None:
        bar.total = int(bar.n + this_pass * (m - s))
        bar.refresh()


def pairs(X: np.ndarray, bits: int, radius: int, *, method: str = "auto", threads: int | None = None,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, Plan]:
    """Every pair of codes of word-major X (`words_of`) within `radius` bits (distance <= radius).

    Returns (a, b, distance, plan): positions a < b (int64), each pair once, sorted by (a, b);
    distances int32. `method`: 'auto' (cheaper by `plan`), 'mih' or 'scan'; `progress`: a tqdm bar
    of the pairs compared on stderr."""
    radius = _check_radius(radius, bits)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    nthreads = _threads(threads)
    n = X.shape[1]
    p = plan(X, bits, radius, method=method)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), p)
    if n < 2:
        return empty
    if p.method == "scan":
        tasks, work = _triangle_tasks(np.zeros(1, np.int64), np.array([n], np.int64))
        return (*_scan(X, X, tasks, work, radius, nthreads, p.scan_pairs, progress), p)

    def blocks(lo, hi):  # the codes that share substring [lo, hi) with another, bucket by bucket
        order, _, starts, sizes = _buckets(substring_keys(X, lo, hi), hi - lo)
        if not len(sizes):
            return None
        rows = _gather(order, starts, sizes)
        del order  # N positions: only the rows in buckets are needed from here on
        Xs = np.ascontiguousarray(X[:, rows])
        return (Xs, Xs, *_triangle_tasks(np.cumsum(sizes) - sizes, sizes), rows, rows)

    found = _mih(X, bits, radius, p, nthreads, progress, blocks)
    if found is None:
        return empty
    a, b, d = found
    return (*_finish(np.minimum(a, b), np.maximum(a, b), d), p)


def _mih(X, bits: int, radius: int, p, nthreads: int, progress: bool, blocks):
    """Multi-index hashing: for each of the plan's substrings, `blocks(lo, hi)` gives the candidates
    (codes A, codes B, tasks, work, rows of A, rows of B) or None; returns the pairs within the radius as
    (rows of A, rows of B, distances), each pair found once over all rounds, or None when there are none."""
    masks = substring_masks(bits, p.substrings, X.shape[0])
    bar = _bar(p.mih_candidates or 0, progress, "dedup mih")
    found = []
    try:
        for s, (lo, hi) in enumerate(substrings(bits, p.substrings)):
            if bar is not None:
                bar.set_description(f"dedup mih {s + 1}/{p.substrings}")
            got = blocks(lo, hi)
            if got is None:
                continue
            A, B, tasks, work, rows_a, rows_b = got
            _extrapolate(bar, int(work.sum()), s, p.substrings)
            i, j, d = _run(A, B, tasks, work, radius, s, masks, nthreads, bar)
            found.append((rows_a[i], rows_b[j], d))
    finally:
        if bar is not None:
            bar.close()
    if not found:
        return None
    return tuple(np.concatenate([f[c] for f in found]) for c in range(3))


def _scan(X, Y, tasks, work, radius: int, nthreads: int, total, progress: bool):
    """The exact blocked scan over `tasks` (no substring filter): sorted (i, j, distances)."""
    bar = _bar(total, progress, "dedup scan")
    try:
        i, j, d = _run(X, Y, tasks, work, radius, -1, np.zeros((1, X.shape[0]), np.uint64), nthreads, bar)
    finally:
        if bar is not None:
            bar.close()
    return _finish(i, j, d)


def cross_pairs(X: np.ndarray, Y: np.ndarray, bits: int, radius: int, *, method: str = "auto",
                threads: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, Plan]:
    """Every pair (a, b) of a code of X and a code of Y within `radius` bits: (a positions in X,
    b positions in Y, distances, plan), sorted by (a, b); as `pairs` otherwise."""
    radius = _check_radius(radius, bits)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if X.shape[0] != Y.shape[0]:
        raise ConfigError(f"codes of {X.shape[0]} and {Y.shape[0]} words cannot be compared")
    nthreads = _threads(threads)
    p = plan(X, bits, radius, Y, method=method)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), p)
    nx, ny = X.shape[1], Y.shape[1]
    if not nx or not ny:
        return empty
    if p.method == "scan":
        tasks, work = _rectangle_tasks(np.zeros(1, np.int64), np.array([nx]), np.zeros(1, np.int64), np.array([ny]))
        return (*_scan(X, Y, tasks, work, radius, nthreads, p.scan_pairs, progress), p)

    def blocks(lo, hi):  # buckets of substring [lo, hi) that both sides have
        order_x, keys_x, starts_x, sizes_x = _buckets(substring_keys(X, lo, hi), hi - lo, 1)
        order_y, keys_y, starts_y, sizes_y = _buckets(substring_keys(Y, lo, hi), hi - lo, 1)
        _, ix, iy = np.intersect1d(keys_x[starts_x], keys_y[starts_y], assume_unique=True, return_indices=True)
        if not len(ix):
            return None
        sx, cx, sy, cy = starts_x[ix], sizes_x[ix], starts_y[iy], sizes_y[iy]
        rows_x, rows_y = _gather(order_x, sx, cx), _gather(order_y, sy, cy)
        Xs, Ys = np.ascontiguousarray(X[:, rows_x]), np.ascontiguousarray(Y[:, rows_y])
        return (Xs, Ys, *_rectangle_tasks(np.cumsum(cx) - cx, cx, np.cumsum(cy) - cy, cy), rows_x, rows_y)

    found = _mih(X, bits, radius, p, nthreads, progress, blocks)
    if found is None:
        return empty
    return (*_finish(*found), p)


def reference_pairs(codes: np.ndarray, radius: int, other: np.ndarray | None = None):
    """The same pairs by another road, for tests and benchmarks: `ghindex.flatscan.range_search`, every
    code as a query against all (or against `other`). (a, b, distance) sorted by (a, b)."""
    codes = np.ascontiguousarray(codes)
    db = codes if other is None else np.ascontiguousarray(other)
    if not len(codes) or not len(db):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    lims, d, j = flatscan.range_search(db, codes, radius + 1)  # strict: distance < radius + 1
    i = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims))
    keep = (i < j) if other is None else np.ones(len(i), bool)
    return _finish(i[keep], j[keep].astype(np.int64), d[keep].astype(np.int32))


def estimated_seconds(p: Plan, rate: float = 4e9) -> float:
    """A rough time at `rate` scan distances per second (for benchmarks that skip hopeless cells)."""
    cost = p.mih_cost if p.method == "mih" else p.scan_cost
    return float(cost) / rate if cost is not None and math.isfinite(cost) else float("inf")
