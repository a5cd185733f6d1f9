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

Layout: `train` checks its arguments, then runs the steps of a `_TrainingRun` in order (prepare_data,
read_checkpoint, build_model, make_optimizer, resume, write_splits, prepare_inputs, run_epochs, save);
one epoch's pass over the data is `ghindex.train_epoch.train_epoch`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .data import DataSource, ImageDataset, cifar_pool, collate, load_data, protocol_splits
from .device import resolve_device
from .encoder import Encoder
from .errors import ConfigError, DataError, ModelFileError
from .hashing import check_bits
from .images import image_to_tensor
from .io import atomic_path, file_fingerprint
from .losses import Objective
from .train_epoch import MAX_WARNED_IMAGES, DDPForward, train_epoch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
DEFAULT_LR = {"supervised": 1e-3, "multi-label": 1e-3, "unsupervised": 1e-4}


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


def _check_outputs(out, resume: bool, overwrite: bool) -> None:
    """Resuming needs a model path; starting over must not replace an earlier run's files by accident."""
    if resume and out is None:
        raise ConfigError("resume needs out, the model path whose checkpoint to continue")
    if out is not None and not resume and not overwrite:
        paths = output_paths(out)
        existing = [paths[k] for k in ("checkpoint", "model") if os.path.exists(paths[k])]
        if existing:
            raise ConfigError(f"{existing[0]} exists: resume=True (--resume) continues that training, "
                              "overwrite=True (--overwrite) starts over")


def _objective_kind(unsupervised: bool, multi_label: bool, freeze_backbone, batch_size) -> str:
    kind = "unsupervised" if unsupervised else ("multi-label" if multi_label else "supervised")
    if unsupervised and multi_label:
        raise ConfigError("multi_label applies to supervised training; unsupervised uses no labels")
    if unsupervised and freeze_backbone is False:
        raise ConfigError("unsupervised training keeps the backbone frozen: its features are the similarity target")
    if kind == "unsupervised" and batch_size < 2:
        raise ConfigError("unsupervised training compares pairs: batch_size must be at least 2")
    return kind


def _setup_processes(device, kind: str, batch_size, progress) -> tuple[torch.device, int, bool]:
    """This process's device and the number of processes (with torchrun: joins the process group);
    progress bars only on the main process."""
    torch_device = resolve_device(device)
    world = distributed.world_size()
    if world > 1:  # launched by torchrun: data parallel, `batch_size` is the batch of all processes together
        if batch_size % world or (kind == "unsupervised" and batch_size // world < 2):
            raise ConfigError(f"batch_size {batch_size} is split over {world} processes: use a multiple of {world}"
                              + (" with at least 2 items per process" if kind == "unsupervised" else ""))
        torch_device = distributed.device_for_rank(torch_device)
        distributed.setup(torch_device)
        progress = progress and distributed.is_main()
    return torch_device, world, progress


def _unset():
    return field(init=False, default=None, repr=False)


@dataclass(eq=False)
class _TrainingRun:
    """One call of `train`: its settings (defaults resolved by `train`), then the state that its steps
    fill in, in this order: prepare_data, [read_checkpoint], build_model, make_optimizer, [resume],
    write_splits, prepare_inputs, run_epochs (per epoch: `train_epoch`, record_epoch), save."""

    kind: str  # "supervised", "multi-label" or "unsupervised"
    bits: int
    backbone: str | None  # None: chosen by prepare_data from the kind of data
    weights: str
    image_size: int
    freeze_backbone: bool | None
    protocol: str | None
    seed: int
    epochs: int
    lr: float
    lr_step: int
    momentum: float
    weight_decay: float
    batch_size: int  # a step's batch, all processes together
    alpha: float
    center: bool
    augment: bool
    device: torch.device
    world: int  # number of processes (torchrun); 1 without
    workers: int
    progress: bool
    paths: dict[str, str] | None  # `output_paths(out)`; None: nothing written

    # prepare_data
    source: DataSource = _unset()
    splits: dict[str, np.ndarray] | None = _unset()  # with a protocol: its split indices
    frozen: bool = _unset()  # backbone not trained: its features are cached once
    labels: torch.Tensor | None = _unset()
    num_classes: int = _unset()
    signature: dict[str, Any] = _unset()  # everything that determines the result (checked on resume)
    weights_info: dict[str, Any] = _unset()
    # build_model, make_optimizer
    model: Encoder = _unset()
    optimizer: torch.optim.Optimizer = _unset()
    scheduler: torch.optim.lr_scheduler.LRScheduler = _unset()
    use_amp: bool = _unset()
    amp_dtype: torch.dtype = _unset()
    scaler: torch.amp.GradScaler | None = _unset()
    # resume
    start_epoch: int = field(init=False, default=0)
    history: list[dict] = field(init=False, default_factory=list, repr=False)  # one log row per epoch
    # prepare_inputs
    objective: Objective = _unset()
    cached: torch.Tensor | None = _unset()  # frozen: the backbone's features of the training items
    labels_cached: torch.Tensor | None = _unset()  # their labels
    tie_bias: torch.Tensor | None = _unset()  # unsupervised, centred: the mean feature the bias is tied to
    dataset: ImageDataset | None = _unset()  # not frozen: the training images
    # run_epochs
    forward: Any = _unset()  # forward(fn, *args): fn(*args), through DistributedDataParallel with several processes
    process_batch: int = _unset()  # this process's share of a step's batch

    def prepare_data(self, data, root) -> None:
        """Training items and labels; the backbone for them; the run's signature."""
        source, self.splits = _load_source(data, self.protocol, self.seed, root)
        self.source = source
        if self.backbone is None:
            self.backbone = "identity" if source.kind == "features" else "alexnet"
        if source.kind == "features" and self.backbone != "identity":
            raise ConfigError(f"{source.description} holds feature vectors: use backbone 'identity', "
                              f"not {self.backbone!r}")
        if source.kind == "images" and self.backbone == "identity":
            raise ConfigError(f"{source.description} holds images: the identity backbone takes feature arrays")
        kind = self.kind
        self.frozen = bool(kind == "unsupervised" or self.backbone == "identity" or self.freeze_backbone)
        self.labels = _labels_tensor(source, kind)
        self.num_classes = 0 if kind == "unsupervised" else source.num_classes
        if kind != "unsupervised" and self.num_classes < 2:
            raise DataError(f"{source.description}: supervised training needs at least 2 classes, "
                            f"found {self.num_classes}")
        if len(source) < 2:
            raise DataError(f"{source.description}: need at least 2 training items, found {len(source)}")

        # Everything that determines the result; resuming with different values would not continue the run.
        self.signature = {
            "objective": kind, "bits": int(self.bits), "backbone": self.backbone, "weights": os.fspath(self.weights),
            "data": source.description, "items": len(source), "protocol": self.protocol, "seed": int(self.seed),
            "freeze_backbone": self.frozen, "lr": self.lr, "lr_step": self.lr_step, "momentum": float(self.momentum),
            "weight_decay": float(self.weight_decay), "batch_size": int(self.batch_size), "alpha": float(self.alpha),
            "image_size": int(self.image_size), "center": bool(self.center) if kind == "unsupervised" else None,
            "augment": bool(self.augment) and not self.frozen,
        }
        self.weights_info = {"weights": os.fspath(self.weights)}
        if self.weights not in ("none", "imagenet", None) and os.path.isfile(os.fspath(self.weights)):
            self.weights_info["weights_sha256"] = file_fingerprint(self.weights)

    def read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint to resume from, after checking it continues this run (same signature)."""
        state = _load_checkpoint(self.paths["checkpoint"])
        saved, signature = json.loads(state["signature"]), self.signature
        diff = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(
                f"cannot resume {self.paths['checkpoint']}: {k} was {saved.get(k)!r}, now {signature.get(k)!r}"
                + (f" (and {len(diff) - 1} more difference(s))" if len(diff) > 1 else "")
            )
        return state

    def build_model(self) -> None:
        """The encoder, seeded, on the device; a frozen backbone gets no gradients."""
        torch.manual_seed(self.seed)
        source = self.source
        class_names = source.class_names if self.kind != "unsupervised" else None
        self.model = model = Encoder(
            self.backbone, self.bits, weights=self.weights,
            feature_dim=source.features.shape[1] if source.kind == "features" else None,
            image_size=self.image_size, num_classes=self.num_classes,
            extra={"class_names": list(class_names)} if class_names else None)
        if self.frozen:
            model.backbone.requires_grad_(False)
        model.to(self.device)

    def make_optimizer(self) -> None:
        """SGD over the trained parameters, the step schedule, and mixed precision on CUDA."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        # lr_step 0 = constant learning rate; a huge step keeps StepLR's (primitive-only) state format.
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=self.lr_step or 10**9, gamma=0.1)
        self.use_amp = use_amp = self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_amp and self.amp_dtype == torch.float16 else None

    def autocast(self):
        """Mixed precision on CUDA, nothing on the CPU."""
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()

    def resume(self, state: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, RNG and history as the checkpoint left them."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.start_epoch, self.history = int(state["epoch"]), json.loads(state["history"])
        if self.start_epoch > self.epochs:
            raise ConfigError(f"{self.paths['checkpoint']} already has {self.start_epoch} epochs, "
                              f"more than epochs={self.epochs}")
        logger.info("resuming %s after epoch %d of %d", self.paths["checkpoint"], self.start_epoch, self.epochs)

    def write_splits(self) -> None:
        """With a protocol and out: its split indices, for evaluating on the same query and database."""
        if self.paths and self.splits is not None and distributed.is_main():
            _write_splits(self.paths["splits"], self.splits, self.protocol, self.seed, self.source.description)

    def prepare_inputs(self) -> None:
        """What the epochs read: cached frozen features (once), or a dataset of images; and the objective."""
        self.objective = Objective(self.kind, alpha=self.alpha)
        model, device = self.model, self.device
        if self.frozen and self.start_epoch < self.epochs:
            cached, kept = _extract_features_sharded(model, self.source, device, max(self.batch_size, 64), self.workers,
                                                     self.autocast, self.progress)
            labels_cached = self.labels[torch.from_numpy(kept)] if self.labels is not None else None
            if self.kind == "unsupervised" and self.center:
                # Centred projection H = W (f - mean): with a free bias, the penalty's easiest minimum is a
                # constant bit (W_k = 0, bias = +-1); tying the bias to -W mean keeps every bit split
                # around the mean feature. The bias is folded in after each step, so checkpoints and the
                # saved encoder compute W f + b as usual.
                self.objective.center = self.tie_bias = cached.double().mean(0).float().to(device)
                model.hash_layer.bias.requires_grad_(False)  # no gradient, momentum or decay
                with torch.no_grad():
                    model.hash_layer.bias.copy_(-model.hash_layer.weight @ self.tie_bias)
            if device.type == "cuda" and cached.numel() * 4 < 4 << 30:
                cached = cached.to(device)
                labels_cached = labels_cached.to(device) if labels_cached is not None else None
            self.cached, self.labels_cached = cached, labels_cached
        elif not self.frozen:
            c = model.config
            self.dataset = ImageDataset(self.source, _Preprocess(c.image_size, c.mean, c.std),
                                        (3, c.image_size, c.image_size))

    def run_epochs(self) -> None:
        """Epochs start_epoch+1..epochs, each recorded (checkpointed) as it ends."""
        # One call per step's forward: plain, or through DistributedDataParallel (gradients all-reduced).
        self.forward = lambda fn, *args: fn(*args)  # noqa: E731
        self.process_batch = self.batch_size
        if self.world > 1 and self.start_epoch < self.epochs:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                DDPForward(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.process_batch = self.batch_size // self.world
        for epoch in range(self.start_epoch, self.epochs):
            row = train_epoch(self, epoch)
            self.record_epoch(row)

    def record_epoch(self, row: dict[str, Any]) -> None:
        """The epoch's row joins the history; with out, the main process writes the checkpoint and the log."""
        self.history.append(row)
        if self.paths and distributed.is_main():
            state = {"format": CHECKPOINT_FORMAT, "epoch": row["epoch"],
                     "signature": json.dumps(self.signature, sort_keys=True), "history": json.dumps(self.history),
                     "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": torch.get_rng_state()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            _save_checkpoint(self.paths["checkpoint"], state)
            _write_log(self.paths["log"], self.history)

    def save(self) -> Encoder:
        """The final model (eval mode) with its provenance; written to `out` by the main process."""
        model, paths = self.model, self.paths
        model.eval()
        model.config.extra["training"] = {
            **self.signature, **self.weights_info, "epochs": self.epochs,
            "selection": "last epoch (query labels never used)", "final": self.history[-1] if self.history else None,
            "device": str(self.device), "amp": str(self.amp_dtype) if self.use_amp else None,
            "torch": torch.__version__, "python": platform.python_version(), "processes": self.world,
            "splits_file": os.path.basename(paths["splits"]) if paths and self.splits is not None else None,
            "log_file": os.path.basename(paths["log"]) if paths else None,
        }
        if paths and distributed.is_main():
            model.save(paths["model"])
            logger.info("wrote %s", paths["model"])
        return model


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
    _check_outputs(out, resume, overwrite)
    kind = _objective_kind(unsupervised, multi_label, freeze_backbone, batch_size)
    torch_device, world, progress = _setup_processes(device, kind, batch_size, progress)
    run = _TrainingRun(
        kind=kind, bits=bits, backbone=backbone, weights="none" if weights is None else weights,
        image_size=image_size, freeze_backbone=freeze_backbone, protocol=protocol, seed=seed, epochs=epochs,
        lr=float(lr if lr is not None else DEFAULT_LR[kind]),
        lr_step=int(lr_step if lr_step is not None else max(1, round(0.6 * epochs))),
        momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, alpha=alpha, center=center,
        augment=augment, device=torch_device, world=world, progress=progress,
        workers=int(workers if workers is not None else min(4, os.cpu_count() or 1)),
        paths=output_paths(out) if out is not None else None,
    )
    run.prepare_data(data, root)
    checkpoint = run.read_checkpoint() if resume else None
    run.build_model()
    run.make_optimizer()
    if checkpoint is not None:
        run.resume(checkpoint)
    run.write_splits()
    run.prepare_inputs()
    run.run_epochs()
    return run.save()
