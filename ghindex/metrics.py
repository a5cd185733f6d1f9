"""Retrieval metrics for binary codes: mAP@K, precision/recall@K, Hamming-radius metrics, curves.

Numpy in, numpy/dicts out; no index needed. Definitions follow the published hashing references
(DeepHash-pytorch ``CalcTopMap``, used by GreedyHash, HashNet and most later papers):

- **Relevance**: a database item is relevant to a query when they share at least one label. Labels
  are either single-label integers, shape (N,), or multi-hot rows, shape (N, C) (non-zero = label
  present). A multi-hot row without any label is relevant to nothing.
- **Ranking**: by Hamming distance, ascending. **Tie rule**: items at the same distance are ranked by
  their position in the database (row order), so a result does not depend on the machine, the index
  type or a sort algorithm. (``CalcTopMap`` uses numpy's default quicksort, whose tie order is an
  implementation detail; with a stable sort it is exactly this rule.)
- **AP@K** of one query: over the relevant items at ranks r <= K, the mean of
  (relevant items in the top r) / r. That is, the sum is divided by the number of relevant items
  *found in the top K*, not by all relevant items. A query without any relevant item in the top K
  has AP 0 and still counts in the mean (mAP = sum of AP / number of queries). K larger than the
  database means the whole database ("mAP@all").
- **Tie-averaged AP**: the expected AP@K when the items of each distance are put in uniformly
  random order (McSherry & Najork, ECIR 2008). It is computed in closed form from two counts per
  query and distance (items, relevant items), see `tie_averaged_ap`. It removes the swing that the
  arbitrary tie order causes and needs no random numbers.
- **precision@K** = relevant items in the top K / min(K, database size); **recall@K** = relevant
  items in the top K / all relevant items (0 for a query without relevant items).
- **Within Hamming radius r** (distance <= r): precision = relevant / retrieved, 0 when nothing is
  retrieved (the usual convention for "precision within Hamming radius 2": a failed lookup counts
  as precision 0); recall = relevant retrieved / all relevant. The **PR curve** is this pair for
  r = 0..bits; the **P@N curve** is precision@N for a grid of N.

Scale: a compiled (numba) kernel makes one pass over the database per query, computing distance
and relevance and counting items per (distance, relevance) bucket. When an item arrives, the
counts of its own distance are the items that precede it in its tie group, so each relevant item
records (distance, relevant before it, others before it); once the pass is done, the bucket offsets
turn those records into exact ranks (rank = items at smaller distances + items at the same distance
earlier in the database + 1). Nothing is sorted. Memory is O(queries x (bits + cutoffs)) for the
results plus about 10 bytes x database size of scratch per thread: no queries x database matrix is
ever allocated. numpy alone measured ~4x faster than the reference here (sorting or cumulative sums
over a Q x N block take many passes); the fused kernel is what reaches the >= 30x bar (see
benchmarks/bench_metrics.py). The first call compiles the kernel (~5 s of CPU), cached on disk after.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numba
import numpy as np

from .errors import ConfigError, DataError
from .metric_kernels import _harmonic, _query_stats_kernel, _tie_averaged_ap

CUTOFFS = (1, 10, 100, 1000)
"""K values reported for precision@K and recall@K."""

PN_POINTS = (1, 5, 10, 20, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
"""N values of the precision@N curve (those above the database size are dropped)."""


# --------------------------------------------------------------------------------------------
# input checks and conversions


def _code_words(codes: np.ndarray, name: str) -> np.ndarray:
    """Packed uint8 codes (N, nbytes) -> (N, ceil(nbytes/8)) uint64; zero padding keeps distances."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ConfigError(f"{name}: packed codes must be a 2-d uint8 array, got {codes.dtype} {codes.shape}")
    n, nbytes = codes.shape
    if nbytes == 0:
        raise ConfigError(f"{name}: codes have zero width")
    words = -(-nbytes // 8)
    if nbytes % 8:
        padded = np.zeros((n, words * 8), np.uint8)
        padded[:, :nbytes] = codes
        codes = padded
    return np.ascontiguousarray(codes).view(np.uint64).reshape(n, words)


def _labels_array(labels, n: int, name: str) -> np.ndarray:
    if labels is None:
        raise DataError(f"{name}: metrics need labels, and there are none")
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        raise ConfigError(
            f"{name}: expected labels of shape ({n},) or ({n}, C), got {labels.shape}"
        )
    if labels.dtype.kind not in "biu":
        raise ConfigError(f"{name}: labels must be integers or booleans, got {labels.dtype}")
    return labels


def _one_hot(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"{name}: single-label values must lie in 0..{num_classes - 1} to match multi-hot labels")
    out = np.zeros((labels.shape[0], num_classes), bool)
    out[np.arange(labels.shape[0]), labels] = True
    return out


def _label_bitmask(labels: np.ndarray) -> np.ndarray:
    """Multi-hot (N, C) -> (N, ceil(C/64)) uint64 bitmasks, so relevance is a few ANDs."""
    bits = np.packbits(labels != 0, axis=1, bitorder="little")
    words = max(1, -(-bits.shape[1] // 8))
    padded = np.zeros((bits.shape[0], words * 8), np.uint8)
    padded[:, : bits.shape[1]] = bits
    return padded.view(np.uint64).reshape(bits.shape[0], words)


@dataclass
class _Relevance:
    multi: bool
    query_int: np.ndarray
    db_int: np.ndarray
    query_mask: np.ndarray
    db_mask: np.ndarray


def _relevance(query_labels, db_labels, nq: int, ndb: int) -> _Relevance:
    ql = _labels_array(query_labels, nq, "query labels")
    dl = _labels_array(db_labels, ndb, "database labels")
    empty_int, empty_mask = np.zeros(0, np.int64), np.zeros((0, 1), np.uint64)
    if ql.ndim == 1 and dl.ndim == 1:
        return _Relevance(False, ql.astype(np.int64), dl.astype(np.int64), empty_mask, empty_mask)
    if ql.ndim == 1:
        ql = _one_hot(ql, dl.shape[1], "query labels")
    if dl.ndim == 1:
        dl = _one_hot(dl, ql.shape[1], "database labels")
    if ql.shape[1] != dl.shape[1]:
        raise ConfigError(
            f"query labels have {ql.shape[1]} classes but database labels have {dl.shape[1]}"
        )
    return _Relevance(True, empty_int, empty_int, _label_bitmask(ql), _label_bitmask(dl))


def relevance_matrix(query_labels, db_labels) -> np.ndarray:
    """(Q, N) bool: True where query and database item share a label. Small inputs only (tests)."""
    ql, dl = np.asarray(query_labels), np.asarray(db_labels)
    rel = _relevance(ql, dl, ql.shape[0] if ql.ndim else 0, dl.shape[0] if dl.ndim else 0)
    if not rel.multi:
        return rel.query_int[:, None] == rel.db_int[None, :]
    return (rel.query_mask[:, None, :] & rel.db_mask[None, :, :]).any(axis=2)


def _check_topk(topk, n_db: int) -> int:
    """None / "all" -> the database size; otherwise a positive int, capped at the database size."""
    if topk is None or (isinstance(topk, str) and topk.lower() == "all"):
        return n_db
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk <= 0:
        raise ConfigError(f"topk must be a positive integer or 'all', got {topk!r}")
    return min(int(topk), n_db)


def tie_averaged_ap(counts, relevant, topk=None) -> float:
    """Expected AP@topk of one query under random order within ties, from per-distance counts.

    `counts[d]` = database items at distance d, `relevant[d]` = relevant ones among them.
    """
    counts = np.ascontiguousarray(counts, np.int64)
    relevant = np.ascontiguousarray(relevant, np.int64)
    if counts.ndim != 1 or counts.shape != relevant.shape:
        raise ConfigError(f"counts and relevant must be 1-d of equal length, got {counts.shape}, {relevant.shape}")
    if (relevant < 0).any() or (relevant > counts).any():
        raise ConfigError("relevant counts must lie in 0..counts for every distance")
    n = int(counts.sum())
    k = _check_topk(topk, n) if n else 0
    return float(_tie_averaged_ap(counts, relevant, k, _harmonic(n), np.empty(k + 1)))


# --------------------------------------------------------------------------------------------
# per-query statistics and their summary


@dataclass
class QueryStats:
    """Per-query counts every metric here is computed from (see `summarize`).

    ap / ap_tie_avg: (Q,) AP@topk under the position tie rule / averaged over tie orders.
    relevant_total: (Q,) relevant items in the whole database.
    relevant_at: (Q, len(cutoffs)) relevant items in the top n for each n in `cutoffs`.
    dist_counts / dist_relevant: (Q, bits + 1) items / relevant items at each Hamming distance over
    the whole database; None when the statistics come from truncated result lists
    (`ranked_list_stats`), which cannot give radius metrics for every radius.
    """

    bits: int
    n_db: int
    topk: int
    cutoffs: np.ndarray
    ap: np.ndarray
    ap_tie_avg: np.ndarray
    relevant_total: np.ndarray
    relevant_at: np.ndarray
    dist_counts: np.ndarray | None = None
    dist_relevant: np.ndarray | None = None

    @property
    def n_queries(self) -> int:
        return int(self.ap.shape[0])


def query_stats(query_codes, db_codes, query_labels, db_labels, topk=None, cutoffs=None,
                chunk_size: int = 2048, progress: bool = False) -> QueryStats:
    """Exact per-query statistics of Hamming ranking (ties by database position).

    query_codes (Q, B/8), db_codes (N, B/8): packed uint8 codes of equal width.
    query_labels, db_labels: (Q,)/(N,) integer classes or (Q, C)/(N, C) multi-hot.
    topk: K of AP@K (None or "all": the whole database). cutoffs: n values for `relevant_at`
    (default: CUTOFFS and PN_POINTS). Queries are processed in chunks of `chunk_size`;
    `progress` shows a bar on stderr.
    """
    q_words = _code_words(query_codes, "query codes")
    db_words = _code_words(db_codes, "database codes")
    nbytes = np.asarray(query_codes).shape[1]
    if np.asarray(db_codes).shape[1] != nbytes:
        raise ConfigError(
            f"code widths differ: queries have {nbytes * 8} bits, database {np.asarray(db_codes).shape[1] * 8}"
        )
    n_q, n_db = q_words.shape[0], db_words.shape[0]
    if n_db == 0:
        raise ConfigError("the database is empty")
    if n_db >= 2**31:
        raise ConfigError(f"database too large for one evaluation ({n_db} items, limit 2^31 - 1)")
    bits = nbytes * 8
    if bits > 32000:
        raise ConfigError(f"codes of {bits} bits are too wide for the metric kernel (max 32000)")
    rel = _relevance(query_labels, db_labels, n_q, n_db)
    k = _check_topk(topk, n_db)
    cut = _cutoff_array(cutoffs)
    max_rank = int(min(cut[-1], n_db))
    # slot_of_rank[r] = index of the first cutoff >= r, for ranks 1..max_rank
    slot_of_rank = np.searchsorted(cut, np.arange(max_rank + 1)).astype(np.int64)
    harmonic = _harmonic(n_db)

    ap = np.zeros(n_q, np.float64)
    ap_avg = np.zeros(n_q, np.float64)
    dist_counts = np.zeros((n_q, bits + 1), np.int64)
    dist_relevant = np.zeros((n_q, bits + 1), np.int64)
    relevant_at = np.zeros((n_q, cut.size), np.int64)
    chunk_size = max(1, int(chunk_size))
    # one block of queries per thread (all queries cost the same); each reuses its scratch
    n_blocks = numba.get_num_threads()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_q, unit="query", file=sys.stderr, desc="metrics")
    for s in range(0, n_q, chunk_size):
        e = min(s + chunk_size, n_q)
        if rel.multi:
            q_int, q_mask = rel.query_int, rel.query_mask[s:e]
        else:
            q_int, q_mask = rel.query_int[s:e], rel.query_mask
        _query_stats_kernel(q_words[s:e], db_words, rel.multi, q_int, rel.db_int, q_mask,
                            rel.db_mask, k, slot_of_rank, harmonic, n_blocks, ap[s:e], ap_avg[s:e],
                            dist_counts[s:e], dist_relevant[s:e], relevant_at[s:e])
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    # cutoffs above the database size hold everything: relevant_at is the total there
    over = cut > n_db
    if over.any():
        relevant_at[:, over] = dist_relevant.sum(axis=1)[:, None]
    return QueryStats(bits, n_db, k, cut, ap, ap_avg, dist_relevant.sum(axis=1), relevant_at,
                      dist_counts, dist_relevant)


def _cutoff_array(cutoffs) -> np.ndarray:
    cut = np.unique(np.asarray(sorted(set(CUTOFFS) | set(PN_POINTS)) if cutoffs is None else cutoffs, np.int64))
    if cut.size == 0 or cut[0] <= 0:
        raise ConfigError(f"cutoffs must be positive integers, got {cutoffs!r}")
    return cut


def relevant_counts(query_labels, db_labels, chunk_size: int = 1024) -> np.ndarray:
    """(Q,) number of database items sharing a label with each query (no codes needed).

    Single-label: a class histogram. Multi-hot: database rows are grouped by their distinct label
    pattern first (a few thousand at most in practice), so the work is queries x patterns.
    """
    ql, dl = np.asarray(query_labels), np.asarray(db_labels)
    rel = _relevance(ql, dl, ql.shape[0] if ql.ndim else 0, dl.shape[0] if dl.ndim else 0)
    if not rel.multi:
        classes, counts = np.unique(rel.db_int, return_counts=True)
        idx = np.clip(np.searchsorted(classes, rel.query_int), 0, max(len(classes) - 1, 0))
        if not len(classes):
            return np.zeros(len(rel.query_int), np.int64)
        return np.where(classes[idx] == rel.query_int, counts[idx], 0).astype(np.int64)
    patterns, counts = np.unique(rel.db_mask, axis=0, return_counts=True)
    out = np.zeros(rel.query_mask.shape[0], np.int64)
    for s in range(0, len(out), chunk_size):
        hit = (rel.query_mask[s:s + chunk_size, None, :] & patterns[None, :, :]).any(axis=2)
        out[s:s + chunk_size] = hit @ counts
    return out


def ranked_list_stats(rows, distances, query_labels, db_labels, bits: int, n_db: int,
                      relevant_total=None, cutoffs=None) -> QueryStats:
    """Statistics of truncated result lists, e.g. from an approximate (IVF, HNSW, hash) index.

    rows (Q, K): database positions of the results (-1 for an empty slot); distances (Q, K): their
    Hamming distances. Each list is re-ranked by (distance, database position), the same tie rule as
    `query_stats`, so the order a search library returns ties in does not matter; which tied items
    made it into a list at its last distance is the index's choice. AP is AP@K over the list;
    the tie-averaged AP averages over tie orders inside the list. `relevant_total` (Q,) defaults to
    `relevant_counts(query_labels, db_labels)`. Only cutoffs <= K (or all, if K >= n_db) are kept.
    """
    rows = np.asarray(rows, np.int64)
    distances = np.asarray(distances, np.int64)
    if rows.ndim != 2 or rows.shape != distances.shape:
        raise ConfigError(f"rows and distances must be 2-d arrays of equal shape, got {rows.shape}, {distances.shape}")
    n_q, k = rows.shape
    if rows.size and rows.max() >= n_db:
        raise ConfigError(f"result rows must lie in 0..{n_db - 1} (or -1 for none), found {rows.max()}")
    ql, dl = np.asarray(query_labels), np.asarray(db_labels)
    rel_info = _relevance(ql, dl, n_q, n_db)
    if relevant_total is None:
        relevant_total = relevant_counts(ql, dl)
    relevant_total = np.asarray(relevant_total, np.int64)
    valid = rows >= 0
    # rank key: distance, then database position; empty slots last
    key = np.where(valid, distances * (n_db + 1) + rows, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    rows = np.take_along_axis(rows, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    safe = np.where(valid, rows, 0)
    if rel_info.multi:
        rel = (rel_info.query_mask[:, None, :] & rel_info.db_mask[safe]).any(axis=2)
    else:
        rel = rel_info.query_int[:, None] == rel_info.db_int[safe]
    rel &= valid
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, k + 1)
    found = hits[:, -1] if k else np.zeros(n_q, np.int64)
    ap = _safe_div(np.where(rel, hits / ranks, 0.0).sum(axis=1), found)
    # tie-averaged AP within each list: counts per distance among the returned items
    ap_avg = np.zeros(n_q)
    harmonic = _harmonic(max(k, 1))
    logp = np.empty(1)
    for i in range(n_q):
        d = distances[i][valid[i]]
        if not d.size:
            continue
        counts = np.bincount(d, minlength=bits + 1)
        rel_counts = np.bincount(d[rel[i][valid[i]]], minlength=bits + 1)
        ap_avg[i] = _tie_averaged_ap(counts, rel_counts, int(d.size), harmonic, logp)
    cut = _cutoff_array(cutoffs)
    if k < n_db:
        cut = cut[cut <= k]
    relevant_at = np.zeros((n_q, cut.size), np.int64)
    for j, c in enumerate(cut):
        relevant_at[:, j] = hits[:, min(int(c), k) - 1] if k else 0
    return QueryStats(int(bits), int(n_db), int(min(k, n_db)), cut, ap, ap_avg, relevant_total, relevant_at)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _at(stats: QueryStats, n: int) -> np.ndarray | None:
    idx = np.searchsorted(stats.cutoffs, n)
    if idx >= stats.cutoffs.size or stats.cutoffs[idx] != n:
        return None
    return stats.relevant_at[:, idx]


def _mean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else 0.0


def summarize(stats: QueryStats, radius: int = 2, cutoffs=CUTOFFS, pn_points=PN_POINTS,
              radius_counts=None) -> dict:
    """Mean metrics over queries, as a JSON-ready dict (see the module docstring for definitions).

    Radius metrics and the PR curve come from the per-distance counts; for list statistics
    (no counts) pass `radius_counts=(retrieved, relevant)`, (Q,) arrays for `radius`, or get None.
    precision/recall@n are reported for the n in `cutoffs` the statistics hold.
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ConfigError(f"radius must be a non-negative integer, got {radius!r}")
    radius = int(min(radius, stats.bits))
    total_rel = stats.relevant_total
    out = {
        "queries": stats.n_queries,
        "database": stats.n_db,
        "bits": stats.bits,
        "topk": "all" if stats.topk >= stats.n_db else stats.topk,
        "tie_rule": "ties ranked by database position",
        "map": _mean(stats.ap),
        "map_tie_avg": _mean(stats.ap_tie_avg),
        "queries_without_relevant": int((total_rel == 0).sum()),
        "precision_at": {},
        "recall_at": {},
        "radius": radius,
        "precision_within_radius": None,
        "recall_within_radius": None,
        "retrieved_within_radius": None,
        "queries_retrieving_nothing_within_radius": None,
        "pr_curve": None,
        "pn_curve": None,
    }
    for n in cutoffs:
        hits = _at(stats, int(n))
        if hits is not None:
            out["precision_at"][str(n)] = _mean(hits / min(int(n), stats.n_db))
            out["recall_at"][str(n)] = _mean(_safe_div(hits, total_rel))
    if stats.dist_counts is not None:
        cum_all = np.cumsum(stats.dist_counts, axis=1)
        cum_rel = np.cumsum(stats.dist_relevant, axis=1)
        precision_r = _safe_div(cum_rel, cum_all)  # (Q, bits+1): 0 where nothing is retrieved
        recall_r = _safe_div(cum_rel, total_rel[:, None])
        retrieved, relevant = cum_all[:, radius], cum_rel[:, radius]
        out["pr_curve"] = {
            "radius": list(range(stats.bits + 1)),
            "precision": [float(v) for v in precision_r.mean(axis=0)] if stats.n_queries else [],
            "recall": [float(v) for v in recall_r.mean(axis=0)] if stats.n_queries else [],
        }
    elif radius_counts is not None:
        retrieved, relevant = (np.asarray(v, np.int64) for v in radius_counts)
    else:
        retrieved = relevant = None
    if retrieved is not None:
        out["precision_within_radius"] = _mean(_safe_div(relevant, retrieved))
        out["recall_within_radius"] = _mean(_safe_div(relevant, total_rel))
        out["retrieved_within_radius"] = _mean(retrieved)
        out["queries_retrieving_nothing_within_radius"] = int((retrieved == 0).sum())
    points = [int(n) for n in pn_points if n <= stats.n_db and _at(stats, int(n)) is not None]
    out["pn_curve"] = {"n": points, "precision": [_mean(_at(stats, n) / n) for n in points]}
    return out


def retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=None, radius: int = 2,
                      progress: bool = False) -> dict:
    """All metrics of the module docstring in one dict (exact, ties by database position)."""
    stats = query_stats(query_codes, db_codes, query_labels, db_labels, topk=topk, progress=progress)
    return summarize(stats, radius=radius)


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, topk=None,
                           ties: str = "position") -> float:
    """mAP@topk (None / "all": whole database). ties="position" (deterministic) or "average"."""
    if ties not in ("position", "average"):
        raise ConfigError(f"ties must be 'position' or 'average', got {ties!r}")
    stats = query_stats(query_codes, db_codes, query_labels, db_labels, topk=topk, cutoffs=[1])
    values = stats.ap if ties == "position" else stats.ap_tie_avg
    return float(values.mean()) if values.size else 0.0


def reference_map(query_codes, db_codes, query_labels, db_labels, topk=None) -> float:
    """The reference algorithm, kept plain for tests and benchmarks: DeepHash-pytorch's CalcTopMap.

    One query at a time: full Hamming distances, a stable argsort of the whole database (ties by
    database position), then AP over the relevant items in the top K. O(Q N log N).
    """
    qc, dc = np.asarray(query_codes, np.uint8), np.asarray(db_codes, np.uint8)
    ql, dl = np.asarray(query_labels), np.asarray(db_labels)
    k = _check_topk(topk, dc.shape[0])
    total = 0.0
    for i in range(qc.shape[0]):
        if ql.ndim == 1 and dl.ndim == 1:
            gnd = (ql[i] == dl).astype(np.float64)
        else:
            qi = ql[i] if ql.ndim == 2 else np.eye(dl.shape[1], dtype=np.int64)[ql[i]]
            dm = dl if dl.ndim == 2 else np.eye(ql.shape[1], dtype=np.int64)[dl]
            gnd = ((dm != 0).astype(np.int64) @ (qi != 0).astype(np.int64) > 0).astype(np.float64)
        hamm = np.bitwise_count(qc[i] ^ dc).sum(axis=1)
        order = np.argsort(hamm, kind="stable")
        top = gnd[order][:k]
        found = int(top.sum())
        if found == 0:
            continue
        count = np.arange(1, found + 1, dtype=np.float64)
        positions = np.flatnonzero(top) + 1.0
        total += float(np.mean(count / positions))
    return total / qc.shape[0] if qc.shape[0] else 0.0
