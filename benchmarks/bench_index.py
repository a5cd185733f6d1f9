"""Index benchmarks (issue 5's bars), run by hand; prints a markdown section for RESULTS.md.

    .venv/bin/python benchmarks/bench_index.py                  # all parts, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_index.py --parts flat     # 1M x 64-bit and 48-bit flat bars only
    .venv/bin/python benchmarks/bench_index.py --parts ivf --n-ivf 1000000   # smaller IVF run
    .venv/bin/python benchmarks/bench_index.py --parts gpu      # needs faiss-gpu and a CUDA device
    .venv/bin/python benchmarks/bench_index.py lifecycle --n 10000000   # add 10% vs rebuild (issue 16)
    .venv/bin/python benchmarks/bench_index.py tune --n 10000000        # tuned nprobe on held-out queries
    .venv/bin/python benchmarks/bench_index.py scan --quick             # exact scan vs FAISS, < 2 minutes
    .venv/bin/python benchmarks/bench_index.py scan                     # the full grid, < 15 minutes on 2 cores

Bars:
1. 1M random 64-bit codes, 1,000 queries, k=10: ghindex flat search >= 0.95x the throughput of a bare
   faiss.IndexBinaryFlat on the same codes (ghindex adds an id map and query checks).
2. Same with 48-bit codes: ghindex (padded to 64 bits) >= 3x a bare faiss.IndexBinaryFlat(48).
3. 10M 64-bit codes with neighbourhood structure: IVF recall@10 >= 0.95 at >= 10x flat's throughput,
   recall counted tie-aware: a returned item counts when its exact distance is <= the exact distance
   of the query's 10th nearest neighbour. The codes go through the real pipeline: HDF5 code store ->
   `ghindex.index.build(index_key="auto")` -> `Index.load`.
4. (GPU machines only) GpuIndexBinaryFlat equals CPU results; throughput at 1M / 10M with 10k queries.
5. `lifecycle` (issue 16): N codes of the mixture in an IVF index; `ghindex.index.add` of N/10 more
   codes of the same mixture against rebuilding the index over all N + N/10 (time), their drift
   against the build, recall of the grown and the rebuilt index on fresh queries at the same nprobe,
   and `remove` of N/1000 ids.
6. `tune` (issue 16): `build(target_recall=R)` on N codes; the chosen nprobe's recall@10 on a separate
   set of fresh queries must be within 0.01 of R (more targets are tuned on the same index with the
   same code path).
7. `scan` (issue 17): exact search of a flat index on the CPU, `Index.search` (engine ghindex:
   ghindex.flatscan) against a bare faiss.IndexBinaryFlat with its best query_batch_size, side by side
   in one process, for 1M and 10M random codes of 32/64/128/256 bits, 1 and 10,000 queries, k = 1, 10,
   100, 1 and 2 threads: queries/s, codes/s per core, the ratio (bar at 1M 64-bit, k = 10: >= 2.5x with
   both thread counts) and codes per CPU cycle per core (clock from /proc/cpuinfo). Distances are
   checked equal in every cell. A cell of 10,000 queries times the first m of them (m sized so that
   one FAISS pass takes about 0.3 s, at least 32): throughput is linear in the number of queries once
   there are enough to batch, and the whole grid then fits in 15 minutes. A pass of a one-query cell
   is m searches of one query each ("m x 1"), m sized the same way from one thread (FAISS searches a
   single query on one thread), at least 20: about 0.3 s of FAISS, long enough to time steadily.

How the structured codes are made (part 3): SimHash of a Gaussian mixture, i.e. codes = sign(W x)
packed LSB-first, with W a fixed random 128x64 Gaussian projection and x = c_j + s_j * e, e ~ N(0, I)
in 128-d, c_j ~ N(0, I) one of 20,000 cluster centres (about 500 codes each) and a per-cluster spread
s_j ~ U(0.3, 0.9). Sign random projections preserve angles (P[bit differs] = angle / pi), so codes
of one cluster lie a few to a dozen bits apart and different clusters ~32 bits apart: the tight,
tie-heavy neighbourhoods that learned hash codes of classed images have, at a scale (10M) for which no
trained encoder's codes are available offline. Queries are 1,000 fresh draws from the same mixture.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghindex.index import Index, build, build_from_arrays, gpu_count  # noqa: E402
from ghindex.index.tuning import TUNE_QUERIES  # noqa: E402
from ghindex.store import CodeStore  # noqa: E402

K = 10


def timed_qps(search, queries, repeats):
    """Median queries/second over `repeats` full passes (each pass searches all queries once)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries)
        times.append(time.perf_counter() - start)
    return len(queries) / float(np.median(times)), float(np.median(times))


def interleaved_qps(searches: dict, queries, repeats):
    """Alternate the contenders run by run so machine load (other processes) hits both alike."""
    times = {name: [] for name in searches}
    for name, search in searches.items():  # warm-up
        search(queries)
    for _ in range(repeats):
        for name, search in searches.items():
            start = time.perf_counter()
            search(queries)
            times[name].append(time.perf_counter() - start)
    return {name: len(queries) / float(np.median(t)) for name, t in times.items()}


def part_flat(rng, n, n_queries, repeats, lines):
    lines += ["", f"### Flat search: {n:,} random codes, {n_queries:,} queries, k = {K}", "",
              "| codes | bare faiss.IndexBinaryFlat, defaults (q/s) | same, query_batch_size=1024 (q/s) | "
              "ghindex Index, BFlat (q/s) | ghindex / bare defaults | bar |",
              "|---|---|---|---|---|---|"]
    for bits, bar in ((64, 0.95), (48, 3.0)):
        database = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
        queries = rng.integers(0, 256, (n_queries, bits // 8), dtype=np.uint8)
        bare = faiss.IndexBinaryFlat(bits)
        bare.add(database)
        batched = faiss.IndexBinaryFlat(bits)  # shows what batching alone buys, without padding
        batched.query_batch_size = 1024
        batched.add(database)
        ours = build_from_arrays(database, index_key="BFlat")
        d_bare, _ = bare.search(queries, K)
        d_ours, _ = ours.search(queries, K)
        assert np.array_equal(d_bare, d_ours), "ghindex and FAISS distances differ"
        qps = interleaved_qps({"bare": lambda q: bare.search(q, K), "batched": lambda q: batched.search(q, K),
                               "ours": lambda q: ours.search(q, K)}, queries, repeats)
        ratio = qps["ours"] / qps["bare"]
        verdict = "met" if ratio >= bar else "NOT met"
        lines.append(f"| {bits}-bit ({bits // 8} B; ghindex searches {ours.padded_bytes} B) | "
                     f"{qps['bare']:,.0f} | {qps['batched']:,.0f} | {qps['ours']:,.0f} | {ratio:.2f}x | "
                     f">= {bar}x: {verdict} |")
        print(lines[-1], file=sys.stderr)
        del bare, batched, ours, database


def structured_codes(rng, n, projection, centres, spreads, chunk=1_000_000):
    """SimHash codes of a Gaussian mixture, generated in chunks (see the module docstring)."""
    dim = projection.shape[0]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.integers(0, len(centres), m)
        x = centres[which] + spreads[which, None] * rng.standard_normal((m, dim), dtype=np.float32)
        yield np.packbits(x @ projection >= 0, axis=1, bitorder="little")


def tie_aware_recall(found_d, found_i, exact_d):
    """Mean over queries of |returned items with exact distance <= exact k-th distance| / k.

    Distances returned by the index are exact Hamming distances of the returned items, so an item
    qualifies when its distance is <= the query's exact k-th smallest distance (ties included)."""
    kth = exact_d[:, K - 1:K]
    good = (found_i[:, :K] >= 0) & (found_d[:, :K] <= kth)
    return float(good.sum(axis=1).mean() / K)


def part_ivf(rng, n, n_queries, workdir, lines, nprobes, key="auto", params=()):
    dim, bits, n_centres = 128, 64, 20_000
    projection = rng.standard_normal((dim, bits), dtype=np.float32)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    spreads = rng.uniform(0.3, 0.9, n_centres).astype(np.float32)
    store_path = Path(workdir) / "codes.h5"
    start = time.perf_counter()
    with CodeStore.create(store_path, bits, source="bench_index: SimHash of a Gaussian mixture") as store:
        written = 0
        for codes in structured_codes(rng, n, projection, centres, spreads):
            store.append(codes, np.arange(written, written + len(codes)))
            written += len(codes)
        store.mark_complete()
    queries = next(structured_codes(rng, n_queries, projection, centres, spreads))
    t_store = time.perf_counter() - start

    start = time.perf_counter()
    meta_flat = build(store_path, Path(workdir) / "flat", index_key="BFlat")
    t_flat_build = time.perf_counter() - start
    flat = Index.load(Path(workdir) / "flat", gpu="off")
    start = time.perf_counter()
    exact_d, _ = flat.search(queries, K)
    flat_seconds = time.perf_counter() - start
    flat_qps = n_queries / flat_seconds
    if n <= 2_000_000:  # cheap enough to repeat
        flat_qps, flat_seconds = timed_qps(lambda q: flat.search(q, K), queries, 3)
    del flat

    start = time.perf_counter()
    meta_ivf = build(store_path, Path(workdir) / "ivf", index_key=key, index_param=params)
    t_ivf_build = time.perf_counter() - start
    ivf = Index.load(Path(workdir) / "ivf", gpu="off")
    nlist = int(meta_ivf["index_key"][4:].split("_")[0])
    default = ivf.nprobe

    lines += [
        "", f"### IVF vs flat: {n:,} structured 64-bit codes, {n_queries:,} queries, k = {K}", "",
        f"Codes: SimHash (64 random hyperplanes) of a 128-d Gaussian mixture, 20,000 clusters of about "
        f"{n // n_centres:,} codes, per-cluster spread U(0.3, 0.9); queries are fresh draws from the mixture. "
        f"Exact 10th-neighbour distance over the queries: median {int(np.median(exact_d[:, K - 1]))} bits, "
        f"range {exact_d[:, K - 1].min()}-{exact_d[:, K - 1].max()}; nearest: median {int(np.median(exact_d[:, 0]))}.",
        "",
        f"Pipeline timings: code store written in {t_store:.0f} s; `build --index-key BFlat` "
        f"{t_flat_build:.0f} s; `build --index-key {key}` -> {meta_ivf['index_key']} "
        f"(train_size {meta_ivf['train_size']:,}) {t_ivf_build:.0f} s. Index estimate: flat "
        f"{meta_flat['estimated_memory']['resident'] / 2**20:.0f} MiB, IVF "
        f"{meta_ivf['estimated_memory']['resident'] / 2**20:.0f} MiB.",
        "",
        f"Flat (exact): {flat_qps:,.0f} queries/s ({flat_seconds:.2f} s for {n_queries:,} queries).",
        "",
        "| nprobe | recall@10 (tie-aware) | queries/s | speed-up vs flat |",
        "|---|---|---|---|",
    ]
    for nprobe in [p for p in nprobes if p <= nlist]:
        ivf.nprobe = nprobe
        found_d, found_i = ivf.search(queries, K)
        recall = tie_aware_recall(found_d, found_i, exact_d)
        qps, _ = timed_qps(lambda q: ivf.search(q, K), queries, 3)
        mark = " (default)" if nprobe == default else ""
        lines.append(f"| {nprobe}{mark} | {recall:.3f} | {qps:,.0f} | {qps / flat_qps:.1f}x |")
        print(lines[-1], file=sys.stderr)


def mixture(rng, dim=128, bits=64, n_centres=20_000):
    """The fixed parts of the mixture: projection, centres, spreads (drawn in this order from rng)."""
    projection = rng.standard_normal((dim, bits), dtype=np.float32)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    spreads = rng.uniform(0.3, 0.9, n_centres).astype(np.float32)
    return projection, centres, spreads


def write_store(path, rng, n, parts, first_id=0, source="bench_index: SimHash of a Gaussian mixture"):
    with CodeStore.create(path, 64, source=source, encoder_fingerprint="bench") as store:
        written = 0
        for codes in structured_codes(rng, n, *parts):
            store.append(codes, np.arange(first_id + written, first_id + written + len(codes)))
            written += len(codes)
        store.mark_complete()


def exact_kth(store_path, queries, k=K):
    """Exact k-th neighbour distance of each query over the store's live codes."""
    from ghindex.index.tuning import exact_knn_distances

    with CodeStore.open(store_path) as store:
        live = ~store.deleted()
        chunks = (b.codes[live[i * 2**20:(i + 1) * 2**20]]
                  for i, b in enumerate(store.iter_chunks(rows=2**20, paths=False)))
        return exact_knn_distances(queries, chunks, k, 8)[:, k - 1]


def recall_of(index, queries, kth, k=K):
    from ghindex.index.tuning import recall_at

    return recall_at(index, queries, kth, k)


def part_lifecycle(n, n_queries, workdir, key, lines):
    from ghindex.lifecycle import add, remove

    rng = np.random.default_rng(0)
    parts = mixture(rng)
    work = Path(workdir)
    m = n // 10
    start = time.perf_counter()
    write_store(work / "codes.h5", rng, n, parts)
    write_store(work / "new.h5", rng, m, parts)
    queries = next(structured_codes(rng, n_queries, *parts))
    t_stores = time.perf_counter() - start

    start = time.perf_counter()
    meta = build(work / "codes.h5", work / "ivf", index_key=key)
    t_build = time.perf_counter() - start
    nprobe = meta["params"]["nprobe"]
    start = time.perf_counter()
    added = add(work / "ivf", codes=work / "new.h5")
    t_add = time.perf_counter() - start
    start = time.perf_counter()
    rebuilt = build(work / "codes.h5", work / "rebuilt", index_key=meta["index_key"])
    t_rebuild = time.perf_counter() - start
    kth = exact_kth(work / "codes.h5", queries)
    grown, fresh_index = Index.load(work / "ivf", gpu="off"), Index.load(work / "rebuilt", gpu="off")
    r_grown, r_rebuilt = recall_of(grown, queries, kth), recall_of(fresh_index, queries, kth)
    del grown, fresh_index
    doomed = np.random.default_rng(1).choice(n + m, size=max(1, n // 1000), replace=False)
    start = time.perf_counter()
    removed = remove(work / "ivf", ids=doomed.tolist())
    t_remove = time.perf_counter() - start
    drift = added["drift"]
    lines += [
        "", f"### Lifecycle: {n:,} codes + {m:,} added, {meta['index_key']}, nprobe {nprobe}, "
            f"{n_queries:,} fresh queries, k = {K}", "",
        f"Stores written in {t_stores:.0f} s. Build over {n:,}: {t_build:.1f} s (train_size {meta['train_size']:,}).",
        "",
        "| step | seconds | notes |",
        "|---|---|---|",
        f"| `add` {m:,} codes (store copy + append, lists, meta, fingerprints) | {t_add:.1f} | drift x"
        f"{drift['last_add_ratio']:.3f} of the build's {drift['build_mean_distance']:.2f} bits, rebuild "
        f"{'recommended' if added['rebuild_recommended'] else 'not needed'}; recall@{K} {r_grown:.3f} |",
        f"| rebuild over {n + m:,} codes | {t_rebuild:.1f} | recall@{K} {r_rebuilt:.3f} at the same nprobe "
        f"({rebuilt['index_key']}) |",
        f"| `remove` {len(doomed):,} ids | {t_remove:.1f} | ntotal {removed['ntotal']:,} |",
        "",
        f"add / rebuild time: {t_add / t_rebuild:.2f}",
    ]
    print("\n".join(lines[-9:]), file=sys.stderr)


def part_tune(n, n_queries, workdir, key, targets, tune_queries, lines):
    from ghindex.index.sampling import live_chunks
    from ghindex.index.tuning import tune_from_database

    rng = np.random.default_rng(0)
    parts = mixture(rng)
    work = Path(workdir)
    write_store(work / "codes.h5", rng, n, parts)
    held_out = next(structured_codes(rng, n_queries, *parts))  # never in the database or the tuning sample
    start = time.perf_counter()
    meta = build(work / "codes.h5", work / "ivf", index_key=key, target_recall=targets[0], tune_queries=tune_queries)
    t_build = time.perf_counter() - start
    kth = exact_kth(work / "codes.h5", held_out)
    index = Index.load(work / "ivf", gpu="off")
    lines += [
        "", f"### Tuned nprobe: {n:,} codes, {meta['index_key']}, recall@{K} targets, {tune_queries:,} database "
            f"codes as tuning queries (leave-one-out), {n_queries:,} separate fresh queries", "",
        f"`build(target_recall={targets[0]})` took {t_build:.1f} s, of which tuning "
        f"{meta['tuning']['seconds'] + meta['tuning']['exact_seconds']:.1f} s (exact neighbours of the sample "
        f"{meta['tuning']['exact_seconds']:.1f} s).",
        "",
        "| target | nprobe | recall, tuning sample | recall, held-out queries | held-out - target | queries/s | bar (within 0.01) |",
        "|---|---|---|---|---|---|---|",
    ]
    with CodeStore.open(work / "codes.h5") as store:
        chunks = live_chunks(store, work / "codes.h5", 2**20)
        for target in targets:
            tuning = meta["tuning"] if target == targets[0] else tune_from_database(
                index, chunks, len(store), target, K, tune_queries)
            index.nprobe = tuning["value"]
            held = recall_of(index, held_out, kth)
            qps, _ = timed_qps(lambda q: index.search(q, K), held_out, 3)
            verdict = "met" if abs(held - target) <= 0.01 else "NOT met"
            lines.append(f"| {target} | {tuning['value']} | {tuning['recall']:.4f} | {held:.4f} | {held - target:+.4f} "
                         f"| {qps:,.0f} | {verdict} |")
            print(lines[-1], file=sys.stderr)


def part_gpu(rng, lines, n_queries=10_000):
    if gpu_count() == 0:
        lines += ["", "### GPU", "", "Not run: FAISS sees no GPU on this machine (faiss.get_num_gpus() == 0)."]
        return
    lines += ["", f"### GPU flat ({gpu_count()} GPU(s)), {n_queries:,} queries, k = {K}", "",
              "| codes | equals CPU | GPU q/s | CPU q/s |", "|---|---|---|---|"]
    for n in (1_000_000, 10_000_000):
        database = rng.integers(0, 256, (n, 8), dtype=np.uint8)
        queries = rng.integers(0, 256, (n_queries, 8), dtype=np.uint8)
        index = build_from_arrays(database, index_key="BFlat")
        cpu_d, _ = index.search(queries[:1000], K)
        cpu_qps, _ = timed_qps(lambda q: index.search(q, K), queries[:1000], 1)
        index.to_gpu("on")
        gpu_d, _ = index.search(queries[:1000], K)
        gpu_qps, _ = timed_qps(lambda q: index.search(q, K), queries, 3)
        lines.append(f"| {n:,} x 64-bit | {np.array_equal(cpu_d, gpu_d)} | {gpu_qps:,.0f} | {cpu_qps:,.0f} |")
        print(lines[-1], file=sys.stderr)


# --------------------------------------------------------------------------------------------- scan
SCAN_FULL = dict(sizes=(1_000_000, 10_000_000), bits=(32, 64, 128, 256), queries=(1, 10_000), ks=(1, 10, 100),
                 threads=(1, 2), batches=(32, 256, 1024, 4096), repeats=3)
SCAN_QUICK = dict(sizes=(1_000_000,), bits=(64, 256), queries=(1, 10_000), ks=(10,), threads=(1, 2),
                  batches=(256, 1024), repeats=2)
#: 64-bit words one timed FAISS pass should scan per thread (FAISS does about 1e9 per second per core).
SCAN_PASS_WORDS = 3e8
#: The issue-17 bar: Index.search / bare IndexBinaryFlat at 1M 64-bit codes, k = 10, 1 and 2 threads.
SCAN_BAR = 2.5
#: A pass of a one-query cell: at least this many searches of one query each (one is too short to time).
SCAN_SINGLES = 20


def scan_pass(n: int, bits: int, nq: int, threads: int) -> int:
    """Queries one timed pass of a cell searches: about SCAN_PASS_WORDS words per thread for FAISS (at
    least 32 and at most nq queries), or for a one-query cell SCAN_PASS_WORDS words of single-query
    searches (FAISS searches one query on one thread), at least SCAN_SINGLES of them."""
    words = n * bits / 64
    if nq == 1:
        return max(SCAN_SINGLES, int(SCAN_PASS_WORDS / words))
    return int(np.clip(SCAN_PASS_WORDS * threads / words, 32, nq))


def cpu_hz() -> float | None:
    """The CPU clock /proc/cpuinfo reports (first `cpu MHz`), in Hz; None where there is none. A virtual
    machine reports its nominal clock, and turbo is not counted: codes per cycle are then an upper bound."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return None


def alternate(searches: dict, queries, repeats: int) -> dict:
    """Median seconds per pass of each contender, passes alternated so machine load hits all alike."""
    times = {name: [] for name in searches}
    for _ in range(repeats):
        for name, search in searches.items():
            start = time.perf_counter()
            search(queries)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def effective_batches(batches, m):
    """The query_batch_size values that behave differently on m queries (all sizes >= m act alike)."""
    below = [b for b in sorted(batches) if b < m]
    above = [b for b in sorted(batches) if b >= m]
    return below + above[:1]


def part_scan(cfg: dict, lines: list) -> bool:
    """The issue-17 grid (see the module docstring); returns whether the bar was met."""
    hz = cpu_hz()
    lines += ["", "### Exact scan: Index.search (engine ghindex) vs bare faiss.IndexBinaryFlat, random codes", "",
              f"CPU clock {hz / 1e9:.2f} GHz (/proc/cpuinfo). FAISS: best query_batch_size of "
              f"{', '.join(map(str, cfg['batches']))} per cell (in brackets). Median of {cfg['repeats']} "
              "alternated passes. 'timed' = queries per pass (see the module docstring).", "",
              "| codes | bits | queries (timed) | k | threads | FAISS q/s [batch] | ghindex q/s | ghindex / FAISS | "
              "FAISS codes/s/core | ghindex codes/s/core | ghindex codes/cycle/core |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    bar_ratios = []
    saved_threads = faiss.omp_get_max_threads()
    try:
        for n in cfg["sizes"]:
            for bits in cfg["bits"]:
                rng = np.random.default_rng(bits)
                database = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
                most = max(scan_pass(n, bits, nq, t) for nq in cfg["queries"] for t in cfg["threads"])
                pool = rng.integers(0, 256, (max(most, *cfg["queries"]), bits // 8), dtype=np.uint8)
                bare = faiss.IndexBinaryFlat(bits)
                bare.add(database)
                ours = build_from_arrays(database, index_key="BFlat")
                del database
                for nq in cfg["queries"]:
                    for k in cfg["ks"]:
                        for threads in cfg["threads"]:
                            faiss.omp_set_num_threads(threads)
                            m = scan_pass(n, bits, nq, threads)
                            queries = pool[:m]
                            batches = effective_batches(cfg["batches"], m) if nq > 1 else cfg["batches"][:1]

                            def one_by_one(search):  # a pass of a one-query cell: m searches of one query
                                return lambda q: [search(q[j:j + 1]) for j in range(len(q))][-1]

                            def faiss_search(q, b=None):
                                bare.query_batch_size = b
                                return bare.search(q, k)

                            searches = {b: (lambda q, b=b: faiss_search(q, b)) for b in batches}
                            searches["ghindex"] = lambda q: ours.search(q, k)
                            d_faiss, _ = searches[batches[0]](queries)  # also the warm-up (and compiles)
                            d_ours, _ = searches["ghindex"](queries)
                            if nq == 1:
                                searches = {name: one_by_one(search) for name, search in searches.items()}
                            assert np.array_equal(d_faiss, d_ours), f"distances differ: {n} x {bits} bits, k={k}"
                            seconds = alternate(searches, queries, cfg["repeats"])
                            best = min(batches, key=lambda b: seconds[b])
                            ratio = seconds[best] / seconds["ghindex"]
                            per_core = {name: n * m / t / threads for name, t in seconds.items()}
                            per_cycle = f"{per_core['ghindex'] / hz:.2f}" if hz else "?"
                            lines.append(
                                f"| {n:,} | {bits} | {nq:,} ({m:,}{' x 1' if nq == 1 else ''}) | {k} | {threads} | "
                                f"{m / seconds[best]:,.0f} [{best}] | {m / seconds['ghindex']:,.0f} | {ratio:.2f}x | "
                                f"{per_core[best] / 1e9:.2f} G | {per_core['ghindex'] / 1e9:.2f} G | {per_cycle} |")
                            print(lines[-1], file=sys.stderr, flush=True)
                            if n == 1_000_000 and bits == 64 and k == 10 and nq > 1:
                                bar_ratios.append(ratio)
                del bare, ours
    finally:
        faiss.omp_set_num_threads(saved_threads)
    met = bool(bar_ratios) and min(bar_ratios) >= SCAN_BAR
    if bar_ratios:
        lines += ["", f"Bar (1M 64-bit, k = 10, {', '.join(map(str, cfg['threads']))} threads): "
                      f"ghindex / FAISS = {', '.join(f'{r:.2f}x' for r in bar_ratios)}, >= {SCAN_BAR}x: "
                      f"{'met' if met else 'NOT met'}."]
    return met


def main():
    # (no abbreviations: `lifecycle --n` must not read as a prefix of --n-flat / --n-ivf / --nprobes)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    for name, helptext in (("lifecycle", "add N/10 codes to an IVF index vs rebuilding it"),
                           ("tune", "build --target-recall, then recall on held-out queries")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--n", type=int, default=10_000_000, help="database codes [10,000,000]")
        # tune: 10,000 held-out queries, so that the check itself is precise (about +-0.002 on recall)
        fresh = 10_000 if name == "tune" else 1000
        p.add_argument("--queries", type=int, default=fresh, help=f"fresh queries [{fresh:,}]")
        p.add_argument("--index-key", default="BIVF", help="IVF key [BIVF: nlist from N]")
        p.add_argument("--workdir", default=None, help="Where stores and indexes go [a temp dir]")
        if name == "tune":
            p.add_argument("--targets", default="0.9,0.95,0.99", help="recall@10 targets [0.9,0.95,0.99]")
            p.add_argument("--tune-queries", type=int, default=TUNE_QUERIES,
                           help=f"database codes sampled to tune [{TUNE_QUERIES:,}, build's default]")
    p = sub.add_parser("scan", help="exact flat scan: Index.search (engine ghindex) vs IndexBinaryFlat (issue 17)")
    p.add_argument("--quick", action="store_true", help="1M codes, 64 and 256 bits, k = 10 only (< 2 minutes)")
    for name, default in SCAN_FULL.items():
        p.add_argument(f"--{name}", default=None, help=f"comma-separated [{','.join(map(str, default))}]"
                       if name != "repeats" else f"passes per contender [{default}]")
    parser.add_argument("--parts", default="flat,ivf,gpu")
    parser.add_argument("--n-flat", type=int, default=1_000_000)
    parser.add_argument("--n-ivf", type=int, default=10_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--index-key", default="auto")
    parser.add_argument("--index-param", action="append", default=[])
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--workdir", default=None, help="Where the store and indexes go [a temp dir]")
    args = parser.parse_args()
    if args.command == "scan":
        cfg = dict(SCAN_QUICK if args.quick else SCAN_FULL)
        for name in SCAN_FULL:
            if getattr(args, name) is not None:
                value = [int(float(v)) for v in getattr(args, name).split(",")]
                cfg[name] = value[0] if name == "repeats" else tuple(value)
        lines = [f"## Exact scan (benchmarks/bench_index.py scan{' --quick' if args.quick else ''})", "",
                 f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; FAISS "
                 f"{faiss.__version__}; date: {time.strftime('%Y-%m-%d %H:%M')}; load average "
                 f"{os.getloadavg()[0]:.1f} at the start."]
        start = time.perf_counter()
        part_scan(cfg, lines)
        lines.append(f"\nTook {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f} at the end.")
        print("\n".join(lines))
        return
    if args.command in ("lifecycle", "tune"):
        import logging

        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        lines = [f"## Index lifecycle (benchmarks/bench_index.py {args.command} --n {args.n})", "",
                 f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; FAISS "
                 f"{faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; date: "
                 f"{time.strftime('%Y-%m-%d %H:%M')}; load average {os.getloadavg()[0]:.1f} at the start."]
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            if args.command == "lifecycle":
                part_lifecycle(args.n, args.queries, workdir, args.index_key, lines)
            else:
                part_tune(args.n, args.queries, workdir, args.index_key,
                          [float(t) for t in args.targets.split(",")], args.tune_queries, lines)
        print("\n".join(lines))
        return
    parts = args.parts.split(",")
    rng = np.random.default_rng(0)
    machine = ("2-core x86_64 CPU, 24 GiB, no GPU" if gpu_count() == 0
               else f"{os.cpu_count()} CPU cores, {gpu_count()} GPU(s) visible to FAISS")
    lines = [
        "## Index search (benchmarks/bench_index.py)", "",
        f"Machine: {machine} ({platform.processor() or platform.machine()}); "
        f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; "
        f"date: {time.strftime('%Y-%m-%d')}. Other processes shared the machine, so contenders were "
        f"timed alternately (median of {args.repeats} passes) and ratios matter more than absolute numbers.",
    ]
    if "flat" in parts:
        part_flat(rng, args.n_flat, args.queries, args.repeats, lines)
    if "ivf" in parts:
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            part_ivf(rng, args.n_ivf, args.queries, workdir, lines,
                     [int(p) for p in args.nprobes.split(",")], args.index_key, args.index_param)
    if "gpu" in parts:
        part_gpu(rng, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
