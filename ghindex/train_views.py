"""Edited views for training: their frozen backbone features, the hash layer's view-LDA start, and the
copy measures (held-out copy recall@1, the copy radius) of unsupervised runs on images.

- `extract_views(model, source, views, seed, ...)`: the backbone's features of each item's un-edited image
  (view 0, unless `original=False`) and `views` edited views (`ghindex.augment.edited_views`, seeded by
  (seed, item, stream)), run once through the runtime `ghindex.runtime.use_runtime` attached
  (`Encoder.features`), as `ghindex.train_inputs` caches plain features: (N, [1+]V, D) float32 on the CPU,
  with a progress bar and its rate on stderr. Images are edited at the model's input size.
- `lda_init(rows, bits)`: the directions that best separate images relative to how their views spread.
- `copy_recall(queries, originals, others)`: tie-averaged recall@1 of edited views among originals.
- `copy_radius(view_codes, original_codes, other_codes)`: the radius within which edited views fall on
  their originals (99th percentile of Hamming(view, its original)), lowered until pairs of different
  images within it are rarer than FALSE_MATCH_RATE.
- `prepare_copy_views`, `held_out_copy_recall`, `measure_copy_radius`: those measures for a training run
  (views of a "copies" stream, never the training views: a radius measured on views the codes were
  trained on would be too small).
"""
from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from tqdm import tqdm

from .augment import edited_views
from .data import DataSource, collate
from .encoder import Encoder
from .errors import DataError, ImageError
from .hashing import hamming_distances, pack_signs
from .images import load_image, resized
from .train_inputs import FilledRows, _Preprocess
from .train_state import TrainingState

logger = logging.getLogger("ghindex.train")  # one logger for all of training

COPY_VIEWS = 4  # edited views per image that measure copies (held-out recall, copy radius)
RADIUS_PERCENTILE = 99.0
# At most this fraction of pairs of different images may fall within the copy radius. Without it the 99th
# percentile alone gave 28 of 64 bits on CIFAR-10 (views objective): 1,114 false matches per query among
# 5,000 images (benchmarks/RESULTS.md, "Copies"); a dedup at that radius groups nearly everything.
FALSE_MATCH_RATE = 1e-5
MAX_RADIUS_ITEMS = 500  # without a held-out slice, the copy radius comes from this many training images
MAX_RECALL_OTHERS = 5000  # held-out copy recall: originals are searched among at most this many other items
LDA_SHRINK = 0.3  # within-image scatter + LDA_SHRINK * its mean eigenvalue: a ridge for directions views never span.
# Chosen on a validation split of training images (64 bits, MobileNetV2 128 px): copies recall@1 0.844 / 0.853 / 0.863
# at 0.1 / 0.3 / 1 with 1-3-edit views, 0.832 / 0.869 / 0.850 with SimCLR-style views (RESULTS.md, "Copies")


class ViewDataset(torch.utils.data.Dataset):
    """Items `(i, tensor ([1+]V, 3, S, S), error)` of an image source: the un-edited image (with
    `original`) and `views` edited ones; a bad image yields zeros and its one-line error."""

    def __init__(self, source: DataSource, views: int, seed: int, preprocess: _Preprocess, stream: str,
                 original: bool = True, decode_size: int | None = None):
        self.source, self.views, self.seed, self.preprocess = source, views, seed, preprocess
        self.stream, self.original, self.decode_size = stream, original, decode_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        size = self.preprocess.image_size
        count = self.views + (1 if self.original else 0)
        try:
            # edits see the image as the model's input: resized the way `images.image_to_tensor` resizes it
            img = resized(load_image(self.source.paths[i], self.decode_size), size)
        except ImageError as exc:
            return i, torch.zeros(count, 3, size, size), str(exc)
        edited = edited_views(img, self.views, self.seed, i, self.stream)
        return i, torch.stack([self.preprocess(v) for v in ([img] if self.original else []) + edited]), ""


def extract_views(model: Encoder, source: DataSource, views: int, seed: int, device, batch_size: int,
                  workers: int, autocast, progress: bool, *, stream: str = "train", original: bool = True,
                  desc: str = "caching backbone features of edited views") -> tuple[torch.Tensor, np.ndarray]:
    """(features (N', [1+]V, D) float32 on the CPU, indices of the N' items that decoded)."""
    c = model.config
    dataset = ViewDataset(source, views, seed, _Preprocess(c.image_size, c.mean, c.std), stream, original,
                          c.decode_size)
    count = views + (1 if original else 0)
    per_batch = max(1, batch_size // count)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_batch, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    filled, bad = FilledRows(len(source)), 0
    model.eval()
    with torch.inference_mode(), tqdm(total=len(source) * count, unit="view", desc=desc, file=sys.stderr,
                                      disable=not progress, leave=False) as bar:
        for idx, x, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            bad += len(errors) - int(ok.sum())
            for e in errors:
                if e and bad <= 5:
                    logger.warning("skipping %s", e)
            if ok.any():
                x = x[ok]
                with autocast():
                    f = model.features(x.flatten(0, 1).to(device, non_blocking=True))
                filled.add(f.float().cpu().view(len(x), count, -1), idx[ok].numpy())
            bar.update(len(idx) * count)
    if bad:
        logger.warning("skipped %d undecodable image(s) of %d", bad, len(source))
    if not filled.filled:
        raise DataError(f"no decodable images in {source.description}")
    return filled.result()


def lda_init(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Hash-layer weights (bits, D) from rows (N, 1+V, D) of each image's views (centred, as the head reads
    them): the top `bits` solutions of Sb v = lambda (Sw + shrink I) v, Sb the scatter of the images' mean
    rows and Sw that of the rows around their image's mean, each direction scaled so that the projected
    rows have a standard deviation of 1. Its signs alone found 0.83 of edited copies at 64 bits where PCA's
    found 0.64-0.72 (issue 24's research notes)."""
    x = rows.double().cpu()
    n, _, dim = x.shape
    means = x.mean(1)
    centred_means = means - means.mean(0)
    between = centred_means.T @ centred_means / max(n - 1, 1)
    spread = (x - means[:, None]).reshape(-1, dim)
    within = spread.T @ spread / max(len(spread) - n, 1)
    within += LDA_SHRINK * float(torch.trace(within)) / dim * torch.eye(dim, dtype=x.dtype)
    # Cholesky-whiten the within scatter, then an ordinary symmetric eigenproblem
    lower = torch.linalg.cholesky(within)
    inv = torch.linalg.solve_triangular(lower, torch.eye(dim, dtype=x.dtype), upper=False)
    evals, evecs = torch.linalg.eigh(inv @ between @ inv.T)
    top = evecs[:, torch.argsort(evals, descending=True)[:bits]]
    directions = inv.T @ top  # (D, <= bits)
    if directions.shape[1] < bits:  # fewer dimensions than bits: random directions for the rest
        gen = torch.Generator().manual_seed(24)
        directions = torch.cat([directions, torch.randn(dim, bits - directions.shape[1], generator=gen,
                                                         dtype=x.dtype)], 1)
    projected = x.reshape(-1, dim) @ directions
    return (directions / projected.std(0).clamp_min(1e-30)).T.float()


def hamming_rows(queries: np.ndarray, database: np.ndarray, chunk: int = 256) -> np.ndarray:
    """`ghindex.hashing.hamming_distances`, a chunk of queries at a time (its XOR of all pairs at once
    would take Q x N x bytes)."""
    out = np.empty((len(queries), len(database)), np.int32)
    for i in range(0, len(queries), chunk):
        out[i:i + chunk] = hamming_distances(queries[i:i + chunk], database)
    return out


def copy_recall(view_codes: np.ndarray, original_codes: np.ndarray, other_codes: np.ndarray) -> float:
    """Tie-averaged recall@1: view_codes (N, V, bytes) of N images' edited views, each searched among the N
    originals plus `other_codes`; a view scores 1/k when its original and k-1 others are nearest (exact
    Hamming), 0 when anything else is nearer."""
    n, v, _ = view_codes.shape
    database = np.concatenate([original_codes, other_codes])
    dist = hamming_rows(view_codes.reshape(n * v, -1), database)
    truth = np.repeat(np.arange(n), v)
    to_original = dist[np.arange(n * v), truth][:, None]
    closer, tied = (dist < to_original).sum(1), (dist == to_original).sum(1)
    return float(np.where(closer == 0, 1.0 / tied, 0.0).mean())


def copy_radius(view_codes: np.ndarray, original_codes: np.ndarray, other_codes: np.ndarray) -> dict:
    """The copy radius from edited views (N, V, bytes) of N images, their originals (N, bytes) and codes of
    other, different images (M, bytes): the 99th percentile (rounded up) of Hamming(view, its original),
    lowered to the largest radius within which at most FALSE_MATCH_RATE of the pairs of different images
    (originals and others) fall. {"bits", "copies_p99", "false_match_rate", "copy_recall"}: the radius,
    the percentile, the measured rate of different-image pairs within the radius, and the fraction of
    views within it of their original."""
    copies = np.bitwise_count(view_codes ^ original_codes[:, None, :]).sum(2).ravel()
    p99 = int(np.ceil(np.percentile(copies, RADIUS_PERCENTILE)))
    codes = np.concatenate([original_codes, other_codes])
    n, bits = len(codes), codes.shape[1] * 8
    counts = np.zeros(bits + 1, np.int64)
    for i in range(0, n, 512):  # every pair once: each chunk against the codes after its first row
        d = hamming_rows(codes[i:i + 512], codes[i:])
        later = np.arange(d.shape[1])[None, :] > np.arange(d.shape[0])[:, None]
        counts += np.bincount(d[later], minlength=bits + 1)
    pairs = max(n * (n - 1) // 2, 1)
    rate = np.cumsum(counts) / pairs  # fraction of different-image pairs within each radius
    allowed = np.flatnonzero(rate <= FALSE_MATCH_RATE)
    radius = min(p99, int(allowed.max())) if len(allowed) else 0
    return {"bits": radius, "copies_p99": p99, "false_match_rate": float(rate[radius]),
            "copy_recall": round(float((copies <= radius).mean()), 4)}


# -- the copy measures of a run (`ghindex.train._TrainingRun` calls these with itself) ----------------------
def measures_copies(run: TrainingState) -> bool:
    """Unsupervised runs on images measure copies (held-out copy recall, copy radius); feature arrays
    cannot be edited."""
    return run.kind == "unsupervised" and run.source.kind == "images"


def prepare_copy_views(run: TrainingState, extract_args: tuple) -> None:
    """The features of the images whose edited views measure copies, and of COPY_VIEWS views each, once:
    the held-out slice (which also fills `val_cached`), or without one up to MAX_RADIUS_ITEMS training
    images (seeded). Runs while the backbone runner of `use_runtime` is attached."""
    if run.val_source is not None:
        both, kept = extract_views(run.model, run.val_source, COPY_VIEWS, run.seed, *extract_args, stream="copies",
                                   desc="caching held-out features and edited views")
        run.val_cached = both[:, 0].contiguous().to(run.cached.device)
        run.val_labels = run.val_labels[kept] if run.val_labels is not None else None
        n = len(run.cached)
        rng = np.random.default_rng([int(run.seed), 24])
        run.copy_others = np.sort(rng.choice(n, MAX_RECALL_OTHERS, replace=False)) if n > MAX_RECALL_OTHERS \
            else np.arange(n)
    else:
        rows = run.cached_rows
        if len(rows) > MAX_RADIUS_ITEMS:
            rows = np.sort(np.random.default_rng([int(run.seed), 25]).choice(rows, MAX_RADIUS_ITEMS, replace=False))
        both, _ = extract_views(run.model, run.source.subset(rows), COPY_VIEWS, run.seed, *extract_args,
                                stream="copies", desc="caching edited views for the copy radius")
    run.copy_originals, run.copy_views = both[:, 0].contiguous(), both[:, 1:].contiguous()


def _codes(run: TrainingState, features: torch.Tensor) -> np.ndarray:
    """Packed codes of features as the head reads them while it trains (`centred_rows`)."""
    model = run.model
    model.eval()
    with torch.inference_mode():
        return np.concatenate([pack_signs(model.head(run.centred_rows(features[i:i + 8192].to(run.device))))
                               for i in range(0, len(features), 8192)])


def held_out_copy_recall(run: TrainingState) -> float:
    """Recall@1 of the held-out images' edited views among the held-out originals and up to
    MAX_RECALL_OTHERS other training items (codes recomputed, features cached once)."""
    views = run.copy_views
    view_codes = _codes(run, views.flatten(0, 1)).reshape(len(views), views.shape[1], -1)
    others = run.cached[torch.from_numpy(run.copy_others).to(run.cached.device)]
    return copy_recall(view_codes, _codes(run, run.copy_originals), _codes(run, others))


def measure_copy_radius(run: TrainingState) -> dict:
    """The copy radius of the trained head (`copy_radius`), with how it was measured."""
    views = run.copy_views
    view_codes = _codes(run, views.flatten(0, 1)).reshape(len(views), views.shape[1], -1)
    originals = _codes(run, run.copy_originals)
    others = originals[:0] if run.copy_others is None else \
        _codes(run, run.cached[torch.from_numpy(run.copy_others).to(run.cached.device)])
    measured = copy_radius(view_codes, originals, others)
    return {**measured, "percentile": RADIUS_PERCENTILE, "max_false_match_rate": FALSE_MATCH_RATE,
            "views": int(views.shape[0] * views.shape[1]),
            "from": "held-out images" if run.val_source is not None else "training images"}
