"""Training GreedyHash encoders: supervised (CE), multi-label (BCE) and unsupervised (cosine preservation).

`train(data, bits, ...)` reads a data source (image folder, list file, feature array, or the training
split of a named protocol), builds an `Encoder`, trains it with SGD and returns it; with `out` it also
writes, next to the model file MODEL:

- ``MODEL``             the final encoder (`Encoder.save`, atomic), provenance in ``config.extra["training"]``;
- ``MODEL.ckpt``        a checkpoint after every epoch (atomic; tensors and primitives only, read back
                        with ``weights_only=True``): weights, optimizer, scheduler and RNG state;
- ``MODEL.log.jsonl``   one JSON line per epoch (loss, penalty, mean |H|, bit balance, seconds...);
- ``MODEL.splits.npz``  with a protocol: the split indices (train / query / database) into the pool.

Reproducibility: all randomness of epoch e (shuffling, flips, dropout) is drawn from generators seeded
with (seed, e), so `resume=True` from the checkpoint of epoch e reaches the same final weights as an
uninterrupted run with the same seed (bit for bit on CPU).

Frozen backbones (always the case for `identity` and for the unsupervised objective) are run once over
the training set in eval mode and their features cached; every epoch then only trains the hash layer
(and classifier), which is why flips are not applied then. Model selection: the model of the last epoch
is kept; nothing here ever looks at query labels (protocols only contribute their training split).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .data import DataSource, ImageDataset, cifar_pool, collate, load_data, protocol_splits
from .encoder import Encoder
from .errors import ConfigError, DataError, ModelFileError
from .hashing import check_bits, greedy_sign
from .images import image_to_tensor
from .io import atomic_path, file_fingerprint
from .losses import Objective

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
DEFAULT_LR = {"supervised": 1e-3, "multi-label": 1e-3, "unsupervised": 1e-4}
MAX_WARNED_IMAGES = 5


def output_paths(out: str | os.PathLike) -> dict[str, str]:
    """Files written for a model path: model, checkpoint, log and split indices."""
    out = os.fspath(out)
    return {"model": out, "checkpoint": out + ".ckpt", "log": out + ".log.jsonl", "splits": out + ".splits.npz"}


class _Preprocess:
    """Encode-time preprocessing (`Encoder.preprocess`): resize to image_size, normalise. Picklable for
    DataLoader workers."""

    def __init__(self, image_size: int, mean, std):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __call__(self, img):
        return image_to_tensor(img, self.image_size, self.mean, self.std)


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1)


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


def _check_args(bits, epochs, lr, lr_step, momentum, weight_decay, batch_size, alpha, image_size, workers):
    check_bits(bits)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if lr_step is not None and (not isinstance(lr_step, (int, np.integer)) or lr_step < 0):
        raise ConfigError(f"lr_step must be an integer >= 0 (0: never decay), got {lr_step!r}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    if not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be >= 0, got {alpha!r}")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers!r}")


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


def _write_splits(path: str, splits: dict[str, np.ndarray], protocol: str, seed: int, description: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, protocol=np.array(protocol), seed=np.array(seed, dtype=np.int64),
                 data=np.array(description), **{k: np.asarray(v, dtype=np.int64) for k, v in splits.items()})


def _write_log(path: str, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in history:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ModelFileError(f"no checkpoint to resume from: {path} (train without resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path} is not a ghindex training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


class _EpochStats:
    """Running sums for the per-epoch summary."""

    def __init__(self, bits: int, device):
        self.n = 0
        self.loss = self.main = self.penalty = self.abs_h = 0.0
        self.ones = torch.zeros(bits, dtype=torch.float64, device=device)

    def add(self, terms, h: torch.Tensor) -> None:
        n = h.shape[0]
        self.n += n
        self.loss += float(terms.total.detach()) * n
        self.main += float(terms.main.detach()) * n
        self.penalty += float(terms.penalty.detach()) * n
        h = h.detach()
        self.abs_h += float(h.abs().mean()) * n
        self.ones += (h >= 0).sum(0).double()

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        ones = (self.ones / n).cpu()
        return {"loss": self.loss / n, "main": self.main / n, "penalty": self.penalty / n,
                "mean_abs_h": self.abs_h / n, "bit_ones_min": float(ones.min()), "bit_ones_max": float(ones.max())}


def _extract_features(model: Encoder, source: DataSource, device, batch_size: int, workers: int,
                      autocast, progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen backbone over the whole source once (eval mode). Returns (features float32 on CPU, indices of
    the items that decoded); bad images are skipped with a warning."""
    if source.kind == "features":
        return torch.from_numpy(np.ascontiguousarray(source.features, dtype=np.float32)), np.arange(len(source))
    c = model.config
    dataset = ImageDataset(source, _Preprocess(c.image_size, c.mean, c.std), (3, c.image_size, c.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    feats, kept, bad = [], [], 0
    model.backbone.eval()
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
                    f = model.backbone(x[ok].to(device, non_blocking=True))
                feats.append(f.float().cpu())
                kept.append(idx[ok].numpy())
            bar.update(len(idx))
    if bad:
        logger.warning("skipped %d undecodable image(s) of %d", bad, len(source))
    if not feats:
        raise DataError(f"no decodable images in {source.description}")
    return torch.cat(feats), np.concatenate(kept)


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


def _reduce_stats(stats: "_EpochStats", skipped: int) -> tuple["_EpochStats", int]:
    """Sum the epoch's statistics over all processes (what the log and checkpoint of rank 0 report)."""
    head = torch.tensor([stats.n, stats.loss, stats.main, stats.penalty, stats.abs_h, skipped], dtype=torch.float64)
    total = distributed.all_reduce_sum(torch.cat([head, stats.ones.detach().cpu().double()]))
    stats.n, stats.loss, stats.main, stats.penalty, stats.abs_h = int(total[0]), *map(float, total[1:5])
    stats.ones = total[6:]
    return stats, int(total[5])


class _DDPForward(torch.nn.Module):
    """What DistributedDataParallel wraps: the encoder, with each step's forward passed in as a function
    (DDP hooks only `forward`; the steps differ: hash layer on cached features, or the whole model)."""

    def __init__(self, model: Encoder):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


def train(
    data,
    bits: int = 64,
    backbone: str | None = None,
    weights: str = "none",
    out: str | os.PathLike | None = None,
    *,
    root: str | os.PathLike | None = None,
    unsupervised: bool = False,
    multi_label: bool = False,
    protocol: str | None = None,
    seed: int = 0,
    freeze_backbone: bool | None = None,
    epochs: int = 50,
    lr: float | None = None,
    lr_step: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 32,
    alpha: float = 0.1,
    image_size: int = 224,
    center: bool = True,
    augment: bool = True,
    device: str = "auto",
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Encoder:
    """Train a GreedyHash encoder and return it (in eval mode, on `device`).

    data: image folder, list file (with `root`), `.npz`/`.h5` feature array (identity backbone), a
        `DataSource`, or with `protocol` a CIFAR-style folder (train/<class>/, test/<class>/) whose
        training split is used (`seed` fixes the split).
    backbone: a name from `ghindex.backbones.BACKBONES`; default ``identity`` for feature arrays and
        ``alexnet`` (the paper's) for images. weights: ``none``, ``imagenet`` or a state-dict file.
    unsupervised: cosine-preservation objective (backbone frozen, labels unused); otherwise
        cross-entropy of a bias-free classifier on the codes, or BCE with `multi_label`.
    freeze_backbone: default False for supervised, always True for unsupervised.
    lr: default 1e-3 supervised / 1e-4 unsupervised; multiplied by 0.1 every `lr_step` epochs
        (default: once, after 60% of `epochs`; 0: never). SGD with `momentum`, `weight_decay`.
    alpha: weight of the quantization penalty mean(|H - sgn(H)|^3).
    center: unsupervised only: subtract the mean training feature before taking cosines, and
        project centred features (hash-layer bias tied to -W mean, so bits stay balanced).
    augment: random horizontal flips while fine-tuning (never applied to cached frozen features).
    out: model path; also writes MODEL.ckpt, MODEL.log.jsonl and (protocol) MODEL.splits.npz.
    resume: continue from MODEL.ckpt (same arguments; `epochs` may grow).
    overwrite: start over even if `out` or its checkpoint exists (otherwise that is an error, so an
        interrupted run is never replaced by accident).
    """
    _check_args(bits, epochs, lr, lr_step, momentum, weight_decay, batch_size, alpha, image_size, workers)
    if resume and out is None:
        raise ConfigError("resume needs out, the model path whose checkpoint to continue")
    if out is not None and not resume and not overwrite:
        paths = output_paths(out)
        existing = [paths[k] for k in ("checkpoint", "model") if os.path.exists(paths[k])]
        if existing:
            raise ConfigError(f"{existing[0]} exists: resume=True (--resume) continues that training, "
                              "overwrite=True (--overwrite) starts over")
    kind = "unsupervised" if unsupervised else ("multi-label" if multi_label else "supervised")
    if unsupervised and multi_label:
        raise ConfigError("multi_label applies to supervised training; unsupervised uses no labels")
    if unsupervised and freeze_backbone is False:
        raise ConfigError("unsupervised training keeps the backbone frozen: its features are the similarity target")
    if kind == "unsupervised" and batch_size < 2:
        raise ConfigError("unsupervised training compares pairs: batch_size must be at least 2")
    torch_device = _resolve_device(device)
    world = distributed.world_size()
    if world > 1:  # launched by torchrun: data parallel, `batch_size` is the batch of all processes together
        if batch_size % world or (kind == "unsupervised" and batch_size // world < 2):
            raise ConfigError(f"batch_size {batch_size} is split over {world} processes: use a multiple of {world}"
                              + (" with at least 2 items per process" if kind == "unsupervised" else ""))
        torch_device = distributed.device_for_rank(torch_device)
        distributed.setup(torch_device)
        progress = progress and distributed.is_main()
    lr = float(lr if lr is not None else DEFAULT_LR[kind])
    lr_step = int(lr_step if lr_step is not None else max(1, round(0.6 * epochs)))
    workers = int(workers if workers is not None else min(4, os.cpu_count() or 1))
    paths = output_paths(out) if out is not None else None
    weights = "none" if weights is None else weights

    source, splits = _load_source(data, protocol, seed, root)
    if backbone is None:
        backbone = "identity" if source.kind == "features" else "alexnet"
    if source.kind == "features" and backbone != "identity":
        raise ConfigError(f"{source.description} holds feature vectors: use backbone 'identity', not {backbone!r}")
    if source.kind == "images" and backbone == "identity":
        raise ConfigError(f"{source.description} holds images: the identity backbone takes feature arrays")
    frozen = bool(unsupervised or backbone == "identity" or freeze_backbone)
    labels = _labels_tensor(source, kind)
    num_classes = 0 if kind == "unsupervised" else source.num_classes
    if kind != "unsupervised" and num_classes < 2:
        raise DataError(f"{source.description}: supervised training needs at least 2 classes, found {num_classes}")
    if len(source) < 2:
        raise DataError(f"{source.description}: need at least 2 training items, found {len(source)}")

    # Everything that determines the result; resuming with different values would not continue the run.
    signature = {
        "objective": kind, "bits": int(bits), "backbone": backbone, "weights": os.fspath(weights),
        "data": source.description, "items": len(source), "protocol": protocol, "seed": int(seed),
        "freeze_backbone": frozen, "lr": lr, "lr_step": lr_step, "momentum": float(momentum),
        "weight_decay": float(weight_decay), "batch_size": int(batch_size), "alpha": float(alpha),
        "image_size": int(image_size), "center": bool(center) if kind == "unsupervised" else None,
        "augment": bool(augment) and not frozen,
    }
    weights_info: dict[str, Any] = {"weights": os.fspath(weights)}
    if weights not in ("none", "imagenet", None) and os.path.isfile(os.fspath(weights)):
        weights_info["weights_sha256"] = file_fingerprint(weights)

    start_epoch, history = 0, []
    if resume:
        state = _load_checkpoint(paths["checkpoint"])
        saved = json.loads(state["signature"])
        diff = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(
                f"cannot resume {paths['checkpoint']}: {k} was {saved.get(k)!r}, now {signature.get(k)!r}"
                + (f" (and {len(diff) - 1} more difference(s))" if len(diff) > 1 else "")
            )

    torch.manual_seed(seed)
    model = Encoder(backbone, bits, weights=weights,
                    feature_dim=source.features.shape[1] if source.kind == "features" else None,
                    image_size=image_size, num_classes=num_classes,
                    extra={"class_names": list(source.class_names)} if source.class_names and kind != "unsupervised" else None)
    if frozen:
        model.backbone.requires_grad_(False)
    model.to(torch_device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # lr_step 0 = constant learning rate; a huge step keeps StepLR's (primitive-only) state format.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step or 10**9, gamma=0.1)
    use_amp = torch_device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    if resume:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]), json.loads(state["history"])
        if start_epoch > epochs:
            raise ConfigError(f"{paths['checkpoint']} already has {start_epoch} epochs, more than epochs={epochs}")
        logger.info("resuming %s after epoch %d of %d", paths["checkpoint"], start_epoch, epochs)
    if paths and splits is not None and distributed.is_main():
        _write_splits(paths["splits"], splits, protocol, seed, source.description)

    # -- inputs: cached frozen features, or a loader over images ----------------------------------
    objective = Objective(kind, alpha=alpha)
    cached = labels_cached = tie_bias = None
    if frozen and start_epoch < epochs:
        cached, kept = _extract_features_sharded(model, source, torch_device, max(batch_size, 64), workers, autocast, progress)
        labels_cached = labels[torch.from_numpy(kept)] if labels is not None else None
        if kind == "unsupervised" and center:
            # Centred projection H = W (f - mean): with a free bias, the penalty's easiest minimum is a
            # constant bit (W_k = 0, bias = +-1); tying the bias to -W mean keeps every bit split
            # around the mean feature. The bias is folded in after each step, so checkpoints and the
            # saved encoder compute W f + b as usual.
            objective.center = tie_bias = cached.double().mean(0).float().to(torch_device)
            model.hash_layer.bias.requires_grad_(False)  # no gradient, momentum or decay
            with torch.no_grad():
                model.hash_layer.bias.copy_(-model.hash_layer.weight @ tie_bias)
        if torch_device.type == "cuda" and cached.numel() * 4 < 4 << 30:
            cached = cached.to(torch_device)
            labels_cached = labels_cached.to(torch_device) if labels_cached is not None else None
    elif not frozen:
        c = model.config
        dataset = ImageDataset(source, _Preprocess(c.image_size, c.mean, c.std), (3, c.image_size, c.image_size))

    # One call per step's forward: plain, or through DistributedDataParallel (gradients all-reduced).
    forward = lambda fn, *args: fn(*args)  # noqa: E731
    loss_weight = 1.0
    if world > 1 and start_epoch < epochs:
        forward = torch.nn.parallel.DistributedDataParallel(
            _DDPForward(model), device_ids=[torch_device.index] if torch_device.type == "cuda" else None)
        batch_size //= world  # from here on: each process's share of a step's batch

    for epoch in range(start_epoch, epochs):
        rng_seed = _epoch_seed(seed, epoch)
        gen = torch.Generator().manual_seed(rng_seed)
        torch.manual_seed(rng_seed)  # dropout and anything else drawing from the global generators
        stats = _EpochStats(bits, torch_device)
        skipped = 0
        t0 = time.perf_counter()
        n_items = len(cached) if cached is not None else len(source)
        order = torch.randperm(n_items, generator=gen)
        if world > 1:  # this process's share of the same permutation (padded to a multiple of world)
            order = torch.tensor(list(torch.utils.data.DistributedSampler(
                range(n_items), world, distributed.rank(), shuffle=True, seed=rng_seed)), dtype=torch.long)
            n_items = len(order)
        bar = tqdm(total=n_items, unit="img", desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr,
                   disable=not progress, leave=False)
        model.train(not frozen)
        model.backbone.train(not frozen)

        def step(h_raw, features, y):
            h = h_raw.float()
            b = greedy_sign(h)
            terms = objective(h, b, features=features, classifier=model.classifier, labels=y)
            if not torch.isfinite(terms.total):
                raise ConfigError(f"training diverged (loss {float(terms.total.detach())} in epoch {epoch + 1}): lower lr or alpha")
            if loss_weight != 1.0:  # a placeholder step (see below): takes part in the all-reduce only
                terms = terms._replace(total=terms.total * loss_weight)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(terms.total).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                terms.total.backward()
                optimizer.step()
            if tie_bias is not None:
                with torch.no_grad():
                    model.hash_layer.bias.copy_(-model.hash_layer.weight @ tie_bias)
            if loss_weight:
                stats.add(terms, h)

        if cached is not None:
            for start in range(0, n_items, batch_size):
                idx = order[start:start + batch_size].to(cached.device)
                if kind == "unsupervised" and len(idx) < 2:
                    continue  # a lone leftover item has no pair
                f = cached[idx]
                y = labels_cached[idx] if labels_cached is not None else None
                if tie_bias is None:
                    h = forward(model.hash_layer, f)
                else:  # centred projection W (f - mean); the bias is folded in after the step
                    h = forward(lambda v: torch.nn.functional.linear(v - tie_bias, model.hash_layer.weight), f)
                step(h, f, y)
                bar.update(len(idx))
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                                                 num_workers=workers, collate_fn=collate,
                                                 pin_memory=torch_device.type == "cuda")
            for idx, x, errors in loader:
                ok = torch.tensor([not e for e in errors], dtype=torch.bool)
                flips = torch.rand(len(idx), generator=gen) < 0.5  # drawn for every batch: same stream on resume
                whole, loss_weight = (x, idx, flips), 1.0
                if not ok.all():
                    skipped += int((~ok).sum())
                    for e in errors:
                        if e and skipped <= MAX_WARNED_IMAGES:
                            logger.warning("skipping %s", e)
                    x, idx, flips = x[ok], idx[ok], flips[ok]
                if len(idx) < (2 if kind == "unsupervised" else 1):
                    if world == 1 or len(whole[1]) < (2 if kind == "unsupervised" else 1):
                        bar.update(len(errors))
                        continue
                    # bad images left this process too few: every process must take part in every step's
                    # all-reduce, so step on the placeholders with weight 0
                    (x, idx, flips), loss_weight = whole, 0.0
                if augment:
                    x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
                x = x.to(torch_device, non_blocking=True)
                y = labels[idx].to(torch_device) if labels is not None else None
                with autocast():
                    out_ = forward(model, x)
                step(out_.h, out_.features, y)
                bar.update(len(errors))
        bar.close()
        if world > 1:
            stats, skipped = _reduce_stats(stats, skipped)
        if stats.n == 0:
            raise DataError(f"no usable training items in {source.description}")
        current_lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "epochs": epochs, "objective": kind, **stats.summary(), "lr": current_lr,
               "items": stats.n, "skipped": skipped, "seconds": round(seconds, 3),
               "images_per_s": round(stats.n / seconds, 1) if seconds > 0 else None}
        history.append(row)
        logger.info(
            "epoch %d/%d  loss %.4f  %s %.4f  penalty %.4f  mean|H| %.3f  +1 per bit %.2f-%.2f  lr %.2g  %.1f s (%.0f img/s)",
            epoch + 1, epochs, row["loss"], kind, row["main"], row["penalty"], row["mean_abs_h"],
            row["bit_ones_min"], row["bit_ones_max"], current_lr, seconds, row["images_per_s"] or 0,
        )
        if paths and distributed.is_main():
            state = {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "signature": json.dumps(signature, sort_keys=True),
                     "history": json.dumps(history), "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            _save_checkpoint(paths["checkpoint"], state)
            _write_log(paths["log"], history)

    model.eval()
    model.config.extra["training"] = {
        **signature, **weights_info, "epochs": epochs, "selection": "last epoch (query labels never used)",
        "final": history[-1] if history else None, "device": str(torch_device), "amp": str(amp_dtype) if use_amp else None,
        "torch": torch.__version__, "python": platform.python_version(), "processes": world,
        "splits_file": os.path.basename(paths["splits"]) if paths and splits is not None else None,
        "log_file": os.path.basename(paths["log"]) if paths else None,
    }
    if paths and distributed.is_main():
        model.save(paths["model"])
        logger.info("wrote %s", paths["model"])
    return model
