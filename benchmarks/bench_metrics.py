"""Benchmark: exact mAP over Hamming ranking, ghindex kernel vs the plain reference (CalcTopMap loop).

Run by hand:  .venv/bin/python benchmarks/bench_metrics.py [--queries 10000] [--database 50000]
              [--large-database 1000000] [--skip-large]

Data: synthetic 64-bit codes of 10 classes (each class a random centre, every bit flipped with
probability 0.3), so distances crowd into a few dozen values and ties are everywhere, as with real
hash codes. Part 1 (issue bar): mAP@all over Q x 50,000, ghindex vs the reference on the same data and
the same tie rule (ties by database position), both timed in full. Part 2: mAP@1000 over
Q x 1,000,000; the reference is timed on a subset of queries only (it needs ~0.1 s per query there).
Each part runs in a fresh process so its peak resident memory (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time

import numpy as np

BITS = 64
CLASSES = 10
FLIP = 0.3


def make_codes(n: int, rng: np.random.Generator, centres: np.ndarray):
    labels = rng.integers(0, CLASSES, n)
    out = np.empty((n, BITS // 8), np.uint8)
    for s in range(0, n, 100_000):  # in blocks: the bit matrix of 1M x 64 would be 64 MB at once
        e = min(s + 100_000, n)
        bits = centres[labels[s:e]] ^ (rng.random((e - s, BITS)) < FLIP)
        out[s:e] = np.packbits(bits, axis=1, bitorder="little")
    return out, labels


def data(n_queries: int, n_db: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, (CLASSES, BITS)).astype(bool)
    qc, ql = make_codes(n_queries, rng, centres)
    dc, dl = make_codes(n_db, rng, centres)
    return qc, ql, dc, dl


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def part(args: dict, out: mp.Queue) -> None:
    from ghindex import metrics

    qc, ql, dc, dl = data(args["queries"], args["database"])
    res = {"queries": args["queries"], "database": args["database"], "topk": args["topk"],
           "input_mib": (qc.nbytes + ql.nbytes + dc.nbytes + dl.nbytes) / 2**20,
           "rss_after_data_mib": peak_rss_mib()}
    hist = np.bincount(np.bitwise_count(qc[:100, None, :] ^ dc[None, :2000, :]).sum(2).ravel())
    res["largest_tie_share"] = float(hist.max() / hist.sum())  # share of pairs at the modal distance
    # warm-up compiles (or loads the cached) kernel on a tiny slice, outside the timing
    metrics.query_stats(qc[:2], dc[:100], ql[:2], dl[:100], topk=args["topk"])
    t, c = time.perf_counter(), time.process_time()
    stats = metrics.query_stats(qc, dc, ql, dl, topk=args["topk"])
    res["ghindex_s"] = time.perf_counter() - t
    res["ghindex_cpu_s"] = time.process_time() - c
    res["ghindex_map"] = float(stats.ap.mean())
    res["ghindex_map_tie_avg"] = float(stats.ap_tie_avg.mean())
    res["peak_rss_mib"] = peak_rss_mib()
    nref = args["reference_queries"]
    t, c = time.perf_counter(), time.process_time()
    res["reference_map_subset"] = metrics.reference_map(qc[:nref], dc, ql[:nref], dl, topk=args["topk"])
    res["reference_s"] = time.perf_counter() - t
    res["reference_cpu_s"] = time.process_time() - c
    res["reference_queries"] = nref
    res["ghindex_map_subset"] = float(stats.ap[:nref].mean())
    out.put(res)


def run_part(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=part, args=(args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--database", type=int, default=50_000)
    ap.add_argument("--large-database", type=int, default=1_000_000)
    ap.add_argument("--large-reference-queries", type=int, default=100)
    ap.add_argument("--skip-large", action="store_true")
    a = ap.parse_args()
    import numba

    print(f"# {platform.machine()}, numba threads {numba.get_num_threads()}, load average before {os.getloadavg()}")
    r1 = run_part({"queries": a.queries, "database": a.database, "topk": None,
                   "reference_queries": a.queries})
    r1["speedup"] = r1["reference_s"] / r1["ghindex_s"]
    r1["abs_diff"] = abs(r1["reference_map_subset"] - r1["ghindex_map"])
    print(json.dumps({"part1_map_all": r1}, indent=1), flush=True)
    if not a.skip_large:
        r2 = run_part({"queries": a.queries, "database": a.large_database, "topk": 1000,
                       "reference_queries": a.large_reference_queries})
        r2["reference_s_per_query"] = r2["reference_s"] / r2["reference_queries"]
        r2["abs_diff_subset"] = abs(r2["reference_map_subset"] - r2["ghindex_map_subset"])
        print(json.dumps({"part2_map_at_1000": r2}, indent=1), flush=True)
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
