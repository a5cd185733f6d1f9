"""Recall of approximate indexes against exact search, and the smallest search setting that reaches a target.

Recall is tie-aware: for a query, a returned item counts when its exact Hamming distance is <= the
query's exact K-th nearest distance (Hamming ties are everywhere, so which of several equally near
codes an index returns must not matter). recall@K = mean over queries of (items that count) / K.
Approximate indexes return each item's exact distance, so this needs only the exact K-th distance of
every query, which `exact_kth_distances` gets in one pass over the database, chunk by chunk.

`tune` picks, for IVF (`nprobe`) and HNSW (`efSearch`), the smallest setting whose recall@K on the
given queries reaches the target: doubling until it does, then bisecting between the last failure
and the first success. For IVF recall never decreases with nprobe (more lists are a superset of
candidates), so this is the smallest such nprobe; for HNSW it is the smallest up to the (small)
non-monotone wobbles of graph search. `build(target_recall=...)` tunes on a seeded sample of the
database's own codes used as queries, leave-one-out: each query's own id is dropped from its exact
and approximate neighbours, so the sample behaves like fresh queries from the same distribution.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import numpy as np

from .. import flatscan
from ..errors import ConfigError
from .codes import pad_codes
from .sampling import ChunkSource, gather, sample_positions
from .structures import _apply_params, _inner

log = logging.getLogger(__name__)

#: The setting tuned per index kind.
TUNED_PARAM = {"ivf": "nprobe", "hnsw": "efSearch"}
#: Database codes sampled as queries by `build(target_recall=...)`. With 1,000 the recall estimate's
#: noise (about 0.005) let the chosen nprobe miss a 0.9 target by 0.012 on held-out queries
#: (benchmarks/RESULTS.md); 5,000 cost seconds with the fast exact scan.
TUNE_QUERIES = 5000
#: Largest efSearch tried for HNSW.
MAX_EF_SEARCH = 32768


def check_target(target_recall, target_k, kind: str | None = None, index_key: str = "") -> tuple[float, int]:
    """Validate a recall target and its K; `kind` (if given) must be tunable."""
    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float, np.floating, np.integer)) \
            or not 0 < float(target_recall) <= 1:
        raise ConfigError(f"target recall must be a number in (0, 1], got {target_recall!r}")
    if isinstance(target_k, bool) or not isinstance(target_k, (int, np.integer)) or target_k < 1:
        raise ConfigError(f"target K must be a positive integer, got {target_k!r}")
    if kind is not None and kind not in TUNED_PARAM:
        what = "exact already (recall 1)" if kind == "flat" else "not tunable here"
        raise ConfigError(
            f"a recall target applies to IVF (nprobe) and HNSW (efSearch) indexes; {index_key or kind} is {what}"
        )
    return float(target_recall), int(target_k)


def exact_knn_distances(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, width: int) -> np.ndarray:
    """The k smallest exact Hamming distances (Q, k') of each query over all codes the chunks yield.

    `chunks` yields packed codes (n, code_bytes); k' = min(k, total codes). Memory: one chunk plus
    (Q, 2k) distances. The scan is `flatscan.knn` (several times FAISS's flat scan on CPUs), so
    tuning can afford thousands of queries.
    """
    queries = np.ascontiguousarray(queries, dtype=np.uint8)
    best = np.empty((len(queries), 0), dtype=np.int32)
    for codes in chunks:
        if not len(codes):
            continue
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.shape[1] != queries.shape[1]:  # zero bytes change no distance
            codes, queries = pad_codes(codes, width), pad_codes(queries, width)
        d, _ = flatscan.knn(codes, queries, int(min(k, len(codes))))
        best = np.sort(np.concatenate([best, d], axis=1), axis=1)[:, :k]
    return best


def tie_aware_hits(found_d: np.ndarray, found_i: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
    """Per query: how many of the first k returned items have exact distance <= the exact k-th distance."""
    found_d, found_i = found_d[:, :k], found_i[:, :k]
    good = (found_i >= 0) & (found_d <= np.asarray(kth)[:, None])
    return good.sum(axis=1)


def _search_leave_one_out(index, queries, k, own_ids):
    """Search k+1 and drop each query's own id (or, if absent, the last result): k results per query."""
    d, i = index.search(queries, k + 1)
    keep = i != own_ids[:, None]
    drop_last = keep.all(axis=1)
    keep[drop_last, -1] = False
    width = d.shape[1] - 1
    return d[keep].reshape(len(d), width), i[keep].reshape(len(d), width)


def recall_at(index, queries: np.ndarray, kth: np.ndarray, k: int, own_ids: np.ndarray | None = None) -> float:
    """Tie-aware recall@k of `index` on `queries`, whose exact k-th distances are `kth` (see module doc).

    With `own_ids` (queries taken from the database), each query's own id is left out of its results.
    """
    k = int(min(k, index.ntotal - (own_ids is not None)))
    if k < 1:
        return 1.0
    if own_ids is not None:
        d, i = _search_leave_one_out(index, queries, k, np.asarray(own_ids, np.int64))
    else:
        d, i = index.search(queries, k)
    return float(tie_aware_hits(d, i, kth, k).mean() / k)


def queries_per_second(index, queries: np.ndarray, k: int, min_seconds: float = 0.2, max_repeats: int = 5) -> float:
    """Searches of all `queries` at k, repeated until `min_seconds` have passed (at most `max_repeats`):
    queries per second of the fastest pass."""
    times = []
    while len(times) < max_repeats and (not times or sum(times) < min_seconds):
        start = time.perf_counter()
        index.search(queries, k)
        times.append(time.perf_counter() - start)
    return round(len(queries) / max(min(times), 1e-9), 1)


def set_search_param(index, name: str, value: int) -> None:
    """Set nprobe / efSearch on a loaded `Index` and in its metadata."""
    _apply_params(index.faiss_index, index.kind, {name: int(value)})
    index.meta.setdefault("params", {})[name] = int(value)


def _search_space(index, name: str, k: int) -> tuple[int, int]:
    """(first value to try, largest allowed)."""
    if name == "nprobe":
        return 1, int(_inner(index.faiss_index).nlist)
    # FAISS's HNSW search uses max(efSearch, k): values below k behave like k.
    return int(k), int(max(k, min(MAX_EF_SEARCH, index.ntotal)))


def smallest_setting(measure: Callable[[int], float], first: int, last: int, target: float) -> tuple[int, float, list]:
    """Smallest value in [first, last] with measure(value) >= target, assuming measure grows with the
    value: doubling from `first`, then bisecting. Returns (value, its measure, [(value, measure)...]);
    when even `last` misses the target, (last, measure(last), trials)."""
    trials: dict[int, float] = {}

    def at(value: int) -> float:
        if value not in trials:
            trials[value] = measure(value)
            log.info("  %d: recall %.4f", value, trials[value])
        return trials[value]

    lo, hi = first - 1, first  # measure(lo) < target (or lo below the range), measure(hi) to test
    while at(hi) < target:
        if hi >= last:
            return hi, trials[hi], sorted(trials.items())
        lo, hi = hi, min(last, hi * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, trials[hi], sorted(trials.items())


def tune(index, queries: np.ndarray, kth: np.ndarray, target_recall: float, target_k: int = 10,
         own_ids: np.ndarray | None = None) -> dict:
    """Set the smallest nprobe (IVF) or efSearch (HNSW) whose tie-aware recall@target_k on `queries`
    reaches `target_recall`, given the queries' exact K-th distances `kth`. Returns what goes into
    meta.json's `tuning`: param, value, recall, queries_per_second, target_recall, k, target_met, trials.
    """
    target_recall, target_k = check_target(target_recall, target_k, index.kind, index.index_key)
    name = TUNED_PARAM[index.kind]
    first, last = _search_space(index, name, target_k)
    start = time.perf_counter()
    log.info("tuning %s of %s for recall@%d >= %s on %s queries", name, index.index_key, target_k,
             target_recall, f"{len(queries):,}")

    def measure(value: int) -> float:
        set_search_param(index, name, value)
        return recall_at(index, queries, kth, target_k, own_ids)

    value, recall, trials = smallest_setting(measure, first, last, target_recall)
    set_search_param(index, name, value)
    qps = queries_per_second(index, queries, target_k)
    met = recall >= target_recall
    if not met:
        log.warning("warning: recall@%d reaches only %.4f at %s=%d, below the target %s", target_k, recall,
                    name, value, target_recall)
    log.info("chose %s=%d: recall@%d %.4f, %s queries/s", name, value, target_k, recall, f"{qps:,.0f}")
    return {
        "param": name,
        "value": int(value),
        "recall": round(float(recall), 6),
        "queries_per_second": qps,
        "target_recall": target_recall,
        "k": target_k,
        "target_met": bool(met),
        "queries": int(len(queries)),
        "seconds": round(time.perf_counter() - start, 3),
        "trials": [[int(v), round(float(r), 6)] for v, r in trials],
    }


def tune_from_database(index, chunks: ChunkSource, n: int,
                       target_recall: float, target_k: int = 10, queries: int = TUNE_QUERIES,
                       seed: int = 0) -> dict:
    """`tune` on a seeded sample of `queries` database codes used as queries (leave-one-out), against
    exact results over everything `chunks()` yields ((codes, ids) pairs, `n` codes in all)."""
    target_recall, target_k = check_target(target_recall, target_k, index.kind, index.index_key)
    if isinstance(queries, bool) or not isinstance(queries, (int, np.integer)) or queries < 1:
        raise ConfigError(f"the number of tuning queries must be a positive integer, got {queries!r}")
    picks = sample_positions(n, int(min(queries, n)), [int(seed), 1])  # not the k-means sample
    sample, own = gather(chunks, picks, index.code_bytes, n)
    t0 = time.perf_counter()
    k = int(min(target_k, n - 1))
    if k < 1:
        raise ConfigError(f"tuning needs at least 2 codes in the index, there are {n}")
    exact = exact_knn_distances(sample, (codes for codes, _ in chunks()), k + 1, index.padded_bytes)
    kth = exact[:, k]  # the k-th nearest other code (the query's own code sits at distance 0)
    log.info("exact neighbours of %s sampled codes in %.1f s", f"{len(sample):,}", time.perf_counter() - t0)
    result = tune(index, sample, kth, target_recall, k, own_ids=own)
    result["seed"] = int(seed)
    result["exact_seconds"] = round(time.perf_counter() - t0 - result["seconds"], 3)
    return result


def measure_recall(index, queries: np.ndarray, database_chunks: Callable[[], Iterable[np.ndarray]], k: int) -> dict:
    """Tie-aware recall@k of `index` on `queries` against exact search over the database codes that
    `database_chunks()` yields, and the index's queries/s (see `ghindex eval --recall`)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"recall K must be a positive integer, got {k!r}")
    start = time.perf_counter()
    exact = exact_knn_distances(queries, database_chunks(), int(k), index.padded_bytes)
    exact_seconds = time.perf_counter() - start
    k_eff = exact.shape[1]
    if k_eff == 0:
        raise ConfigError("the database holds no codes")
    start = time.perf_counter()
    d, i = index.search(queries, k_eff)
    search_seconds = time.perf_counter() - start
    hits = tie_aware_hits(d, i, exact[:, k_eff - 1], k_eff)
    qps = queries_per_second(index, queries, k_eff) if search_seconds < 0.2 else round(len(queries) / search_seconds, 1)
    return {
        "k": int(k_eff),
        "recall": round(float(hits.mean() / k_eff), 6),
        "queries_with_full_recall": int((hits == k_eff).sum()),
        "queries": int(len(queries)),
        "queries_per_second": qps,
        "exact_queries_per_second": round(len(queries) / max(exact_seconds, 1e-9), 1),
        "index_key": index.index_key,
        "params": dict(index.meta.get("params", {})),
    }
