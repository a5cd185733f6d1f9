"""`ghindex dedup` (issue 25): time, peak memory and pairs of the all-pairs join; exactness; imagededup.

    .venv/bin/python benchmarks/bench_dedup.py [PART ...] [--sizes 1000000 10000000] [--bits 64 128]
        [--radii 0 1 2 3 4 5 6 7 8] [--threads N] [--max-seconds 900] [--json results.jsonl]

Parts (default: all but `real`):

- `grid`: random codes with planted groups of 2-5 near-copies (each copy at most the radius from its
  group's original, so a group is connected through it), for every size x bits x radius: the library
  join (`ghindex.dedup_join.pairs`, method auto, and the other method where it is affordable), the
  groups, wall time, the most memory the join and grouping added (RSS sampled every 5 ms, above the
  process with its codes made; each cell runs in a process of its own), pairs found, planted groups found whole and alone, other
  groups. Cells whose plan estimates more than --max-seconds (at 4e9 distances/s a thread) are skipped
  and reported as such.
- `exact`: a 100k sample (`--exact-n`) per bits x radius: the pairs of mih and of the scan equal an
  independent brute force (`ghindex.flatscan.range_search`, every code as a query).
- `imagededup`: imagededup's `PHash().find_duplicates(encoding_map=..., max_distance_threshold=R)`
  with both its search methods (`brute_force_cython`, `bktree`) on the same 20k and 100k 64-bit codes
  (`--imagededup-sizes`) as hex strings: same pairs (as sets), time ratio. Needs imagededup (benchmark
  only): `pip install --no-deps imagededup && pip install PyWavelets scipy scikit-learn` (without
  --no-deps pip may replace the pinned torch). Their cost grows with N^2:
  the issue's 37 s (brute force) and 85 s (BK-tree) at 20k make some 15 and 35 minutes at 100k.
- `e2e`: the issue's bar: `ghindex dedup --codes STORE --radius 3 --format jsonl --out F` as a fresh
  process on a code store of 1M 64-bit codes with planted groups (`--e2e-n`), run twice (the first
  may compile the kernels); checks that every planted group is one group and nothing else is grouped.
- `real`: `--real-store STORE` (encoded with a model that records its copy radius) and `--real-truth
  FILE` (the planted copies: one group of ids per line, an original and its copies, separated by
  spaces or commas): `dedup(radius=r)` for each of `--real-radii` (default: auto), then precision and recall over pairs of items put in
  one group (found: every two members of a found group; planted: every two members of a truth group).

Prints one line per cell and appends JSON records to --json. The default run takes one to two hours on
2 cores, most of it imagededup at 100k and the 10M cells at radius 6-8 with 64 bits. Numbers from a
loaded machine are not results: run on a quiet one and say which.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from ghindex import dedup_join  # noqa: E402
from ghindex.dedup import group_pairs  # noqa: E402

RATE = 4e9  # scan distances per second and thread assumed for the --max-seconds estimate (conservative)


# ------------------------------------------------------------------------------------------- data
def planted(n: int, bits: int, radius: int, groups: int, seed: int = 0):
    """n random codes; `groups` groups of 2-5 rows: an original and copies with 0..radius bits flipped.
    Returns (codes, group label per row or -1)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    sizes = rng.integers(2, 6, groups)
    rows = rng.choice(n, int(sizes.sum()), replace=False)
    label = np.full(n, -1, np.int64)
    starts = np.cumsum(sizes) - sizes
    group_of = np.repeat(np.arange(groups), sizes)
    label[rows] = group_of
    originals = rows[starts]
    copy_pos = np.flatnonzero(np.arange(len(rows)) != np.repeat(starts, sizes))
    copies = rows[copy_pos]
    src = originals[group_of[copy_pos]]
    flips = rng.integers(0, radius + 1, len(copies))
    # flip `flips[c]` distinct bits of copy c: the first ones of a random permutation of the bits
    ranks = np.argsort(rng.random((len(copies), bits)), axis=1)
    flip_mask = ranks < flips[:, None]
    xor = np.zeros((len(copies), bits // 8), np.uint8)
    for b in range(bits):
        xor[:, b // 8] |= (flip_mask[:, b].astype(np.uint8) << np.uint8(b % 8))
    codes[copies] = codes[src] ^ xor
    return codes, label


def planted_check(label: np.ndarray, groups) -> dict:
    """Planted groups found whole and alone, and found groups that are not a planted one."""
    found = np.full(len(label), -1, np.int64)
    for g in range(len(groups)):
        found[groups.members[groups.member_starts[g]:groups.member_starts[g + 1]]] = g
    planted_rows = np.flatnonzero(label >= 0)
    order = np.lexsort((found[planted_rows], label[planted_rows]))
    pl, fd = label[planted_rows][order], found[planted_rows][order]
    n_planted = int(label.max()) + 1 if len(planted_rows) else 0
    whole = 0
    sizes = np.diff(groups.member_starts)
    for g in range(n_planted):
        f = fd[pl == g]
        if len(f) and f[0] >= 0 and (f == f[0]).all() and sizes[f[0]] == len(f):
            whole += 1
    other = len(groups) - len(set(fd[fd >= 0].tolist()))
    return {"planted": n_planted, "planted_whole": whole, "other_groups": int(other)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The largest RSS while the block runs, sampled every 5 ms by a thread (ru_maxrss would also count
    the peak of making the data before it)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


# ------------------------------------------------------------------------------------------- cells
def grid_cell(n: int, bits: int, radius: int, threads: int, max_seconds: float, groups_per: int,
              compare: bool) -> dict:
    """One cell, in this process (run by `--cell` in a child)."""
    codes, label = planted(n, bits, radius, max(1, n // groups_per), seed=bits * 100 + radius)
    X = dedup_join.words_of(codes)
    del codes
    base = rss_mb()
    record = {"part": "grid", "n": n, "bits": bits, "radius": radius, "threads": threads}
    plan = dedup_join.plan(X, bits, radius)
    record["plan"] = plan.method
    record["estimated_s"] = round(dedup_join.estimated_seconds(plan, RATE * threads), 1)
    if record["estimated_s"] > max_seconds:
        record["skipped"] = f"estimated {record['estimated_s']} s > --max-seconds {max_seconds}"
        return record
    dedup_join.pairs(X[:, :2000].copy(), bits, radius, threads=threads)  # compile / load the kernels
    before = rss_mb()
    with PeakRSS() as peak:
        t = time.perf_counter()
        a, b, d, plan = dedup_join.pairs(X, bits, radius, threads=threads)
        record["join_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        groups = group_pairs(a, b, d, np.arange(n, dtype=np.int64))
        record["groups_s"] = round(time.perf_counter() - t, 3)
    record["codes_mb"] = round(X.nbytes / 2**20, 1)
    record["join_extra_rss_mb"] = round(peak.peak - before, 1)  # above the process with its codes made
    record.update(pairs=len(a), groups=len(groups), **planted_check(label, groups))
    other = "scan" if plan.method == "mih" else "mih"
    p_other = dedup_join.plan(X, bits, radius, method=other) if compare and dedup_join.mih_substrings(bits, radius) else None
    if p_other is not None and dedup_join.estimated_seconds(p_other, RATE * threads) <= max_seconds:
        t = time.perf_counter()
        a2, b2, d2, _ = dedup_join.pairs(X, bits, radius, method=other, threads=threads)
        record[f"{other}_s"] = round(time.perf_counter() - t, 3)
        record[f"{other}_same_pairs"] = bool(np.array_equal(a, a2) and np.array_equal(b, b2) and np.array_equal(d, d2))
    record["process_rss_mb"] = round(base, 1)  # python, torch (imported by ghindex), numba and the codes
    return record


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cell", *args], capture_output=True,
                         text=True)
    if out.returncode != 0:
        return {"part": "grid", "cell": args, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def exact_part(n: int, bits_list, radii, threads: int):
    for bits, radius in itertools.product(bits_list, radii):
        codes, _ = planted(n, bits, radius, max(1, n // 100), seed=7 + radius)
        X = dedup_join.words_of(codes)
        t = time.perf_counter()
        ref = dedup_join.reference_pairs(codes, radius)
        ref_s = time.perf_counter() - t
        record = {"part": "exact", "n": n, "bits": bits, "radius": radius, "pairs": len(ref[0]),
                  "brute_force_s": round(ref_s, 2)}
        for method in ("mih", "scan"):
            if method == "mih" and not dedup_join.mih_substrings(bits, radius):
                continue
            t = time.perf_counter()
            got = dedup_join.pairs(X, bits, radius, method=method, threads=threads)[:3]
            record[f"{method}_s"] = round(time.perf_counter() - t, 2)
            record[f"{method}_exact"] = all(np.array_equal(x, y) for x, y in zip(got, ref))
        yield record


def imagededup_part(sizes, radius: int, threads: int, methods):
    from imagededup.methods import PHash

    hasher = PHash(verbose=False)
    for n in sizes:
        codes, _ = planted(n, 64, radius - 1 if radius else 0, max(1, n // 100), seed=25)
        names = [f"{i}.jpg" for i in range(n)]
        encoding = {name: code.tobytes().hex() for name, code in zip(names, codes)}
        X = dedup_join.words_of(codes)
        dedup_join.pairs(X[:, :1000].copy(), 64, radius, threads=threads)
        t = time.perf_counter()
        a, b, d, plan = dedup_join.pairs(X, 64, radius, threads=threads)
        ours_s = time.perf_counter() - t
        ours = set(zip(a.tolist(), b.tolist()))
        for method in methods:
            t = time.perf_counter()
            found = hasher.find_duplicates(encoding_map=encoding, max_distance_threshold=radius,
                                           search_method=method, num_dist_workers=threads)
            theirs_s = time.perf_counter() - t
            theirs = {(min(int(k[:-4]), int(v[:-4])), max(int(k[:-4]), int(v[:-4])))
                      for k, vs in found.items() for v in vs}
            yield {"part": "imagededup", "n": n, "bits": 64, "radius": radius, "method": method,
                   "imagededup_s": round(theirs_s, 2), "ghindex_s": round(ours_s, 4), "ghindex_method": plan.method,
                   "ratio": round(theirs_s / max(ours_s, 1e-9), 1), "pairs": len(ours),
                   "same_pairs": ours == theirs, "imagededup_pairs": len(theirs)}


def e2e_part(n: int, radius: int, workdir: str, repeats: int = 2):
    from ghindex.store import CodeStore

    codes, label = planted(n, 64, radius, max(1, n // 1000), seed=3)
    store = os.path.join(workdir, "e2e.h5")
    with CodeStore.create(store, 64, overwrite=True) as s:
        s.append(codes, np.arange(n, dtype=np.int64))
        s.mark_complete()
    out = os.path.join(workdir, "groups.jsonl")
    for k in range(repeats):
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "ghindex_cli", "dedup", "--codes", store, "--radius",
                              str(radius), "--format", "jsonl", "--out", out, "--no-progress"],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        record = {"part": "e2e", "n": n, "bits": 64, "radius": radius, "run": k + 1, "wall_s": round(wall, 2),
                  "rc": run.returncode}
        if run.returncode == 0:
            with open(out) as f:
                found = [json.loads(line)["ids"] for line in f]
            truth = {}
            for row in np.flatnonzero(label >= 0).tolist():
                truth.setdefault(int(label[row]), []).append(row)
            planted_sets = {tuple(sorted(v)) for v in truth.values()}
            found_sets = {tuple(g) for g in found}
            record.update(groups=len(found), planted=len(planted_sets),
                          planted_whole=len(planted_sets & found_sets), other_groups=len(found_sets - planted_sets))
        else:
            record["error"] = run.stderr.strip().splitlines()[-1:]
        yield record


def real_part(store: str, truth_file: str, threads: int, radii=("auto",)):
    from ghindex.dedup import dedup

    truth = []
    with open(truth_file) as f:
        for line in f:
            ids = [int(t) for t in line.split("#")[0].replace(",", " ").split()]
            if len(ids) > 1:
                truth.append(ids)
    planted_pairs = {(min(a, b), max(a, b)) for g in truth for a, b in itertools.combinations(g, 2)}
    for radius in radii:
        t = time.perf_counter()
        result = dedup(store, radius=radius if radius == "auto" else int(radius), threads=threads)
        seconds = time.perf_counter() - t
        found_pairs = set()
        for record in result.records(with_paths=False):
            found_pairs.update((min(a, b), max(a, b)) for a, b in itertools.combinations(record["ids"], 2))
        hit = len(planted_pairs & found_pairs)
        yield {"part": "real", "store": store, "asked": radius, "radius": result.radius, "seconds": round(seconds, 2),
               "groups": result.summary["groups"], "planted_pairs": len(planted_pairs),
               "found_pairs": len(found_pairs), "recall": round(hit / max(1, len(planted_pairs)), 4),
               "precision": round(hit / max(1, len(found_pairs)), 4)}


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help="grid, exact, imagededup, e2e, real [default: all but real]")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--radii", type=int, nargs="+", default=list(range(9)))
    ap.add_argument("--groups-per", type=int, default=1000, help="one planted group per this many codes")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-seconds", type=float, default=900.0, help="skip grid cells estimated slower")
    ap.add_argument("--exact-n", type=int, default=100_000)
    ap.add_argument("--imagededup-sizes", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--imagededup-radius", type=int, default=3)
    ap.add_argument("--imagededup-methods", nargs="+", default=["brute_force_cython", "bktree"])
    ap.add_argument("--e2e-n", type=int, default=1_000_000)
    ap.add_argument("--e2e-radius", type=int, default=3)
    ap.add_argument("--real-store")
    ap.add_argument("--real-truth")
    ap.add_argument("--real-radii", nargs="+", default=["auto"], help="real: radii to score ('auto' or bits)")
    ap.add_argument("--json", default=None, help="append JSON records to this file")
    ap.add_argument("--compare", action="store_true",
                    help="grid: also time the other method (where estimated within --max-seconds) and compare pairs")
    ap.add_argument("--cell", nargs=7, type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()

    parts = args.parts or ["grid", "exact", "imagededup", "e2e"]
    unknown = set(parts) - {"grid", "exact", "imagededup", "e2e", "real"}
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.cell:  # a child running one grid cell
        n, bits, radius, threads, max_seconds, groups_per, compare = args.cell
        print(json.dumps(grid_cell(int(n), int(bits), int(radius), int(threads), max_seconds, int(groups_per),
                                   bool(compare))))
        return

    header = {"part": "machine", "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": args.threads, "load": os.getloadavg(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    records = [header]
    print(json.dumps(header))

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")

    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(header) + "\n")
    if "grid" in parts:
        for n, bits, radius in itertools.product(args.sizes, args.bits, args.radii):
            emit(run_child([str(n), str(bits), str(radius), str(args.threads), str(args.max_seconds),
                            str(args.groups_per), str(int(args.compare))]))
    if "exact" in parts:
        for record in exact_part(args.exact_n, args.bits, args.radii, args.threads):
            emit(record)
    if "imagededup" in parts:
        try:
            for record in imagededup_part(args.imagededup_sizes, args.imagededup_radius, args.threads,
                                          args.imagededup_methods):
                emit(record)
        except ImportError as exc:
            emit({"part": "imagededup", "skipped": f"imagededup is not installed ({exc})"})
    if "e2e" in parts:
        with tempfile.TemporaryDirectory() as workdir:
            for record in e2e_part(args.e2e_n, args.e2e_radius, workdir):
                emit(record)
    if "real" in parts:
        if not (args.real_store and args.real_truth):
            ap.error("real needs --real-store and --real-truth")
        for record in real_part(args.real_store, args.real_truth, args.threads, args.real_radii):
            emit(record)


if __name__ == "__main__":
    main()
