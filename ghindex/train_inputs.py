"""The training items and what the epochs read of them: the data source (or a protocol's training
split), its labels as a tensor, the held-out slice, and the frozen backbone's features over the items
(`_extract_features`, in several processes `_extract_features_sharded`), their statistics for the
unsupervised objective (`_feature_stats`), and the hash layer's PCA start from them (`_pca_init`)."""
from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .data import (
    DataSource,
    ImageDataset,
    cifar_pool,
    collate,
    load_data,
    protocol_splits,
)
from .encoder import Encoder
from .errors import ConfigError, DataError
from .images import image_to_tensor
from .train_epoch import MAX_WARNED_IMAGES

logger = logging.getLogger("ghindex.train")  # one logger for all of training

MAX_VAL_ITEMS = 1000  # held-out slice: val_fraction of the training items, at most this many
MIN_VAL_ITEMS = 10  # a smaller slice says nothing: no held-out evaluation then


class _Preprocess:
    """Encode-time preprocessing (`Encoder.preprocess`): resize to image_size, normalise. Picklable for
    DataLoader workers."""

    def __init__(self, image_size: int, mean, std):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __call__(self, img):
        return image_to_tensor(img, self.image_size, self.mean, self.std)


def _load_source(data, protocol: str | None, seed: int, root) -> tuple[DataSource, dict[str, np.ndarray] | None]:
    if isinstance(data, DataSource):
        if protocol is not None:
            raise ConfigError("pass protocol only with a dataset folder, not with a ready DataSource")
        return data, None
    if protocol is None:
        return load_data(data, root=root), None
    pool, n_train = cifar_pool(data)
    splits = protocol_splits(pool.labels, n_train, protocol, seed)
    description = f"{pool.description} protocol={protocol} split=train seed={seed}"
    return pool.subset(splits["train"], description=description), splits


def _labels_tensor(source: DataSource, kind: str) -> torch.Tensor | None:
    if kind == "unsupervised":
        return None
    if source.labels is None:
        raise DataError(f"{source.description} has no labels: supervised training needs them (or use unsupervised)")
    if kind == "multi-label":
        labels = source.labels
        if labels.ndim == 1:  # single-label data trained with the multi-label objective: one-hot
            labels = np.eye(source.num_classes, dtype=np.float32)[labels]
        return torch.from_numpy(np.asarray(labels, dtype=np.float32))
    if source.labels.ndim == 2:
        raise ConfigError(f"{source.description} has multi-hot labels: train with multi_label (--multi-label)")
    return torch.from_numpy(source.labels.astype(np.int64))


def _held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(training rows, held-out rows) of n training items, or None when the slice would be too small."""
    n_val = min(MAX_VAL_ITEMS, int(fraction * n))
    if n_val < MIN_VAL_ITEMS or n - n_val < 2:
        return None
    perm = np.random.default_rng([int(seed), 14]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class FilledRows:
    """The rows an extraction loop produces, written batch by batch into one float32 tensor allocated at the
    first batch, with the indices of their items. Why not a list of per-batch tensors joined at the end: each
    of those lives on between the batches' large temporaries, and with `ghindex.allocator`'s thresholds (freed
    memory kept, large blocks on the heap) they pinned the temporaries' freed space, so memory grew by about
    35 MB per batch (views of 3,000 images: 1.0 GB -> 4.2 GB; training on 50,000 images was killed at 24 GB)."""

    def __init__(self, n: int):
        self.n, self.rows, self.items, self.filled = n, None, np.empty(n, np.int64), 0

    def add(self, rows: torch.Tensor, items: np.ndarray) -> None:
        if self.rows is None:
            self.rows = torch.empty((self.n, *rows.shape[1:]), dtype=torch.float32)
        end = self.filled + len(rows)
        self.rows[self.filled:end] = rows
        self.items[self.filled:end] = items
        self.filled = end

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        """(rows, item indices) of what was added (at least one batch)."""
        return self.rows[:self.filled], self.items[:self.filled].copy()


def _extract_features(model: Encoder, source: DataSource, device, batch_size: int, workers: int,
                      autocast, progress: bool, fn=None) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen backbone (`model.features`, in the runtime `ghindex.runtime.use_runtime` chose; or `fn`) over
    the whole source once (eval mode). Returns (outputs float32 on CPU, indices of the items that decoded);
    bad images are skipped with a warning."""
    fn = fn or model.features
    if source.kind == "features":
        return torch.from_numpy(np.ascontiguousarray(source.features, dtype=np.float32)), np.arange(len(source))
    c = model.config
    dataset = ImageDataset(source, _Preprocess(c.image_size, c.mean, c.std), (3, c.image_size, c.image_size),
                           c.decode_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    filled, bad = FilledRows(len(source)), 0
    model.eval()
    with torch.inference_mode(), tqdm(total=len(source), unit="img", desc="caching backbone features",
                                      file=sys.stderr, disable=not progress, leave=False) as bar:
        for idx, x, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            for e in errors:
                if e:
                    bad += 1
                    if bad <= MAX_WARNED_IMAGES:
                        logger.warning("skipping %s", e)
            if ok.any():
                with autocast():
                    f = fn(x[ok].to(device, non_blocking=True))
                filled.add(f.float().cpu(), idx[ok].numpy())
            bar.update(len(idx))
    if bad:
        logger.warning("skipped %d undecodable image(s) of %d", bad, len(source))
    if not filled.filled:
        raise DataError(f"no decodable images in {source.description}")
    return filled.result()


def _extract_features_sharded(model: Encoder, source: DataSource, *args) -> tuple[torch.Tensor, np.ndarray]:
    """`_extract_features` with several processes: each runs the frozen backbone over its contiguous
    1/N of the items, then all gather the pieces in rank order, so every process holds the same cache
    a single process would have built (the items are shuffled across all of it every epoch)."""
    if not distributed.is_distributed() or source.kind == "features":
        return _extract_features(model, source, *args)
    start, stop = distributed.shard_range(len(source))
    feats, kept = _extract_features(model, source.subset(np.arange(start, stop)), *args)
    return (distributed.all_gather_rows(feats),
            distributed.all_gather_rows(torch.from_numpy(kept + start)).numpy())


def _feature_stats(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, float, float]:
    """(mean row, mean squared length of the centred rows, mean cosine over all pairs of distinct rows)
    of features x (N >= 2, D), in float64, a chunk of rows at a time (no N x N matrix, no float64 copy of x).
    The mean pairwise cosine is (|sum of unit rows|^2 - N') / (N (N - 1)), N' the rows of nonzero length
    (a row of length 0 has cosine 0 with every other)."""
    n = len(x)
    chunks = [x[start:start + chunk] for start in range(0, n, chunk)]
    mean = sum(part.double().sum(0) for part in chunks) / n
    unit_total, centred_square, nonzero = torch.zeros_like(mean), 0.0, 0
    for part in chunks:
        part = part.double()
        centred_square += float((part - mean).pow(2).sum())
        norms = part.norm(dim=1, keepdim=True)
        unit_total += (part / norms.clamp_min(1e-300)).sum(0)
        nonzero += int((norms > 0).sum())
    cosine = (float(unit_total @ unit_total) - nonzero) / (n * (n - 1))
    return mean.float().cpu(), centred_square / n, cosine


def _pca_init(x: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """Hash-layer weights (bits, dim) for centred features x: the top principal directions (as many as there
    are, at most `bits`; random directions for the rest) turned by a seeded random rotation, as ITQ starts,
    scaled so that H has a mean square of 1. Training then starts from codes about as good as ITQ's."""
    x64 = x.double().cpu()
    evals, evecs = torch.linalg.eigh(x64.T @ x64 / max(len(x64) - 1, 1))
    top = evecs[:, torch.argsort(evals, descending=True)[:bits]].T  # (<= bits, dim)
    rng = np.random.default_rng([int(seed), 16])
    if len(top) < bits:
        top = torch.cat([top, torch.from_numpy(rng.normal(size=(bits - len(top), x.shape[1])))])
    rotation, _ = np.linalg.qr(rng.normal(size=(bits, bits)))
    w = torch.from_numpy(rotation) @ top
    h = x64 @ w.T
    return (w / h.pow(2).mean().sqrt().clamp_min(1e-30)).float()
