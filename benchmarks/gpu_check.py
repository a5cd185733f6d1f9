"""GPU check: one run, under 5 minutes, on a machine with a CUDA GPU and faiss-gpu.

    python benchmarks/gpu_check.py [--out DIR] [--steps 300] [--sizes 1000000,10000000]

1. trains a GreedyHash encoder (resnet18, 64 px, 64 bits) for a few hundred steps with AMP on the
   shipped demo images, and reports training images/s;
2. encodes the demo database with `ghindex.encode` on the GPU (images/s of the whole command) and
   times the bare model forward on pre-decoded tensors;
3. builds flat indexes over 1M and 10M random 64-bit codes (and 48-bit, padded), searches 10,000
   queries (k = 10) on GPU (`GpuIndexBinaryFlat` through `ghindex.index.Index.to_gpu`) and on CPU,
   checks that GPU distances equal CPU distances exactly and that GPU ids are correct up to ties,
   and reports queries/s for both.
Prints a JSON summary last; exits non-zero if any GPU result differs from the CPU result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

import ghindex  # noqa: E402
from ghindex.encode import encode  # noqa: E402
from ghindex.hashing import hamming_distances  # noqa: E402
from ghindex.index import build_from_arrays, gpu_count  # noqa: E402
from ghindex.train import train  # noqa: E402

DEMO = ROOT / "data" / "cifar10-demo"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def check_training(work: Path, steps: int, batch_size: int, device: str) -> dict:
    n_images = 5000
    epochs = max(1, round(steps * batch_size / n_images))
    t0 = time.perf_counter()
    train(str(DEMO / "database"), bits=64, backbone="resnet18", weights="none", out=str(work / "m.ghm"),
          epochs=epochs, batch_size=batch_size, image_size=64, device=device, workers=8, progress=False)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(work / "m.ghm.log.jsonl")]
    epoch_rates = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    return {"epochs": epochs, "steps": epochs * (n_images // batch_size), "batch_size": batch_size,
            "seconds_total": round(seconds, 1), "images_per_s_per_epoch": epoch_rates}


def check_encoding(work: Path, device: str) -> dict:
    summary = encode(str(work / "m.ghm"), str(DEMO / "database"), str(work / "db.h5"), device=device,
                     workers=8, batch_size=256, progress=False)
    model = ghindex.Encoder.load(work / "m.ghm", device=device).eval()
    x = torch.rand(256, 3, 64, 64, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device, enabled=device == "cuda", dtype=torch.float16):
        for _ in range(3):
            model.hash(x)
        sync()
        t0 = time.perf_counter()
        reps = 40 if device == "cuda" else 2
        for _ in range(reps):
            model.hash(x)
        sync()
    bare = reps * 256 / (time.perf_counter() - t0)
    return {"command_images_per_s": round(summary["rate"], 1), "count": summary["count"],
            "precision": summary.get("precision"), "bare_forward_images_per_s": round(bare, 1)}


def timed_search(index, queries, k):
    index.search(queries[:100], k)  # warm-up (GPU kernels, thread pools)
    t0 = time.perf_counter()
    dist, ids = index.search(queries, k)
    return dist, ids, time.perf_counter() - t0


def check_search(n: int, bits: int, n_queries: int, k: int, rng, use_gpu: bool = True) -> dict:
    codes = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(n_queries, bits // 8), dtype=np.uint8)
    index = build_from_arrays(codes, index_key="BFlat")
    d_cpu, i_cpu, t_cpu = timed_search(index, queries, k)
    if use_gpu:
        assert index.to_gpu("on"), "index did not move to the GPU"
    d_gpu, i_gpu, t_gpu = timed_search(index, queries, k)
    same_distances = bool(np.array_equal(d_cpu, d_gpu))
    # ids may differ inside ties; each GPU id must sit at exactly the distance the GPU reported
    sample = rng.choice(n_queries, size=min(200, n_queries), replace=False)
    ids_ok = all(
        np.array_equal(hamming_distances(queries[q:q + 1], codes[i_gpu[q]])[0], d_gpu[q]) for q in sample
    )
    index.to_cpu()
    return {"n": n, "bits": bits, "queries": n_queries, "k": k, "distances_equal": same_distances,
            "gpu_ids_consistent": bool(ids_ok), "cpu_qps": round(n_queries / t_cpu, 1),
            "gpu_qps": round(n_queries / t_gpu, 1), "padded_bytes": index.padded_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="folder for the JSON summary, gpu_check.json (runs kept: benchmarks/results/gpu_check/)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only, tiny sizes: checks the script itself on a machine without GPU")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.steps, args.sizes, args.queries = 80, "20000", 500
    elif not torch.cuda.is_available() or gpu_count() == 0:
        log(f"no GPU: torch.cuda.is_available()={torch.cuda.is_available()}, faiss GPUs={gpu_count()}")
        return 2
    summary = {
        "machine": {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)", "gpus_faiss": gpu_count(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "faiss": faiss.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        summary["train"] = check_training(work, args.steps, args.batch_size, device)
        log(f"train: {summary['train']}")
        summary["encode"] = check_encoding(work, device)
        log(f"encode: {summary['encode']}")
        summary["search"] = []
        for n in (int(s) for s in args.sizes.split(",")):
            for bits in (64, 48):
                row = check_search(n, bits, args.queries, 10, rng, use_gpu=not args.dry_run)
                log(f"search: {row}")
                summary["search"].append(row)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
    ok = all(r["distances_equal"] and r["gpu_ids_consistent"] for r in summary["search"])
    summary["gpu_equals_cpu"] = ok
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.json").write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
