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
(and classifier), which is why flips are not applied then.

Defaults: every setting left as None comes from `PRESETS[preset]` for the kind of run (unsupervised,
supervised with a frozen backbone, supervised fine-tuning): ``default`` holds the settings chosen by
measurement on CIFAR-10 (benchmarks/RESULTS.md, "Training: ..." sections), ``paper`` GreedyHash's published
ones. Images default to the efficientnet_b0 backbone with its ImageNet weights.

Held-out progress and model selection (the copy measures of unsupervised image runs: `ghindex.train_views`):
a seeded slice of the training items (`val_fraction`, at most
`MAX_VAL_ITEMS`; never query or test data) is set aside; every `val_every` epochs and after the last
one, its codes are ranked against those of (at most `MAX_VAL_DATABASE` of) the other training items and
the mAP goes into the epoch's log row (``val_map``). The model of the last epoch is kept, or with
`keep_best` the one with the best held-out mAP; query labels are never looked at (protocols only
contribute their training split).

Layout: `train` checks its arguments, then runs the steps of a `_TrainingRun` in order (prepare_data,
read_checkpoint, build_model, make_optimizer, resume, write_splits, prepare_inputs, run_epochs, save);
one epoch's pass over the data is `ghindex.train_epoch.train_epoch`. What `train` makes of its arguments
is `ghindex.train_settings`'s; the training items, held-out slice and cached features
`ghindex.train_inputs`'s; the checkpoint, log and split files `ghindex.train_files`'s.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .backbones import backbone_names, default_weights, probe_backbone, resolve_detail_layer
from .data import ImageDataset
from .encoder import Encoder, check_hash_hidden
from .errors import ConfigError, DataError
from .hashing import pack_signs
from .io import file_fingerprint
from .losses import Objective
from .metrics import mean_average_precision
from .runtime import resolve_runtime, use_runtime
from .train_epoch import DDPForward, epoch_line, train_epoch

# Steps of a run call these through this module's namespace (tests replace `_write_log` here), and
# `output_paths`, `_Preprocess` and `PRESETS` are imported from here.
from .train_files import (
    CHECKPOINT_FORMAT,
    _check_outputs,
    _load_checkpoint,
    _save_checkpoint,
    _with_kept_checkpoint_hint,
    _write_log,
    _write_splits,
    output_paths,
)
from .train_inputs import (  # noqa: F401 - MIN_VAL_ITEMS: with MAX_VAL_ITEMS, the held-out slice's bounds
    MAX_VAL_ITEMS,
    MIN_VAL_ITEMS,
    _extract_features,
    _extract_features_sharded,
    _feature_stats,
    _held_out_split,
    _labels_tensor,
    _load_source,
    _pca_init,
    _Preprocess,
)
from .train_state import TrainingState
from .train_views import (
    extract_views,
    held_out_copy_recall,
    lda_init,
    measure_copy_radius,
    measures_copies,
    prepare_copy_views,
)
from .train_settings import (
    PRESETS,
    _check_args,
    _check_objective,
    _check_view_weights,
    _default_objective,
    _objective_kind,
    _run_group,
    _setup_processes,
)

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_BACKBONE = "efficientnet_b0"  # ImageNet acc@1 77.7% at 0.39 GFLOPS: see README, "Backbones"
MAX_VAL_DATABASE = 10_000  # the held-out queries are ranked against at most this many training items
MAX_TARGET_SHIFT = 1 - 1e-5  # unsupervised: above this mean cosine, float32 cosines cannot tell items apart


@dataclass(eq=False)
class _TrainingRun(TrainingState):
    """One call of `train`: the steps, in order (the state they fill in is `TrainingState`'s)."""

    def prepare_data(self, data, root) -> None:
        """Training items and labels; the backbone for them; the run's signature."""
        source, self.splits = _load_source(data, self.protocol, self.seed, root)
        if self.backbone is None:
            self.backbone = "identity" if source.kind == "features" else DEFAULT_IMAGE_BACKBONE
        if self.backbone not in backbone_names():
            probe_backbone(self.backbone)  # the usual unknown-backbone error
        if self.weights is None:
            self.weights = default_weights(self.backbone)
        if self.backbone_lr_scale is None:  # the preset's, for pretrained layers; random ones learn at lr
            self.backbone_lr_scale = (PRESETS[self.preset]["finetune"]["backbone_lr_scale"]
                                      if self.weights != "none" else 1.0)
        if self.backbone != "identity" and source.kind == "images":
            probe_backbone(self.backbone, self.image_size)  # e.g. ViTs take one input size only: say so now
        # detail features: "auto" adds them where they were measured to help, the views objective's copies
        auto = isinstance(self.detail_layer, str) and self.detail_layer.strip().lower() == "auto"
        self.detail_layer = (resolve_detail_layer(self.backbone, self.detail_layer)
                             if not auto or self.unsupervised_objective == "views" else None)
        # held out: labelled items (their mAP), and unsupervised images (their copies' recall) with or without labels
        measured = source.labels is not None or (self.kind == "unsupervised" and source.kind == "images")
        split = _held_out_split(len(source), self.val_fraction, self.seed) if self.val_fraction and measured else None
        self.val_source = self.val_labels = None
        if split is not None:
            rows, held = split
            self.val_source = source.subset(held)
            self.val_labels = source.labels[held] if source.labels is not None else None
            source = source.subset(rows)
        self.source = source
        if source.kind == "features" and self.backbone != "identity":
            raise ConfigError(f"{source.description} holds feature vectors: use backbone 'identity', "
                              f"not {self.backbone!r}")
        if source.kind == "images" and self.backbone == "identity":
            raise ConfigError(f"{source.description} holds images: the identity backbone takes feature arrays")
        if self.unsupervised_objective == "views" and source.kind != "images":
            raise ConfigError(f"{source.description} holds feature vectors, which cannot be edited: the views "
                              "objective needs images (objective 'similarity' trains on features)")
        if self.unsupervised_objective == "views" and self.world > 1:
            raise ConfigError("the views objective runs in one process (torchrun: use objective 'similarity')")
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
            "init": self.init if kind == "unsupervised" and self.center else "random",
            "hash_hidden": int(self.hash_hidden), "balance": float(self.balance),
            "augment": bool(self.augment) and not self.frozen,
            "backbone_lr_scale": float(self.backbone_lr_scale) if not self.frozen else None,
            "val_items": len(self.val_source) if self.val_source is not None else 0,
            "val_every": int(self.val_every), "keep_best": bool(self.keep_best),
        }
        if self.detail_layer is not None:  # (absent otherwise: older checkpoints still resume)
            self.signature["detail_layer"] = self.detail_layer
        if self.unsupervised_objective == "views":  # (absent otherwise: older checkpoints still resume)
            # (contrast_spare only where set: checkpoints from before it existed still resume)
            self.signature.update(unsupervised_objective="views", views=int(self.views),
                                  **{k: v for k, v in self.view_weights.items() if k != "contrast_spare" or v})
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
            image_size=self.image_size, num_classes=self.num_classes, hash_hidden=self.hash_hidden,
            extra={"class_names": list(class_names)} if class_names else None, detail_layer=self.detail_layer)
        if self.frozen:
            model.backbone.requires_grad_(False)
        model.to(self.device)

    def make_optimizer(self) -> None:
        """SGD over the trained parameters, the step schedule, and mixed precision on CUDA."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not n.startswith("backbone.")], "lr": self.lr}]
        backbone = [p for n, p in named if n.startswith("backbone.")]
        if backbone:  # pretrained layers move slower than the new hash layer and classifier
            groups.append({"params": backbone, "lr": self.lr * self.backbone_lr_scale})
        self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
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
        if "best_model" in state:
            self.best = {"epoch": int(state["best_epoch"]), "val_map": float(state["best_val_map"]),
                         "model": state["best_model"]}
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
        model, device = self.model, self.device
        self.target_shift, self.similarity_width = 0.0, None
        # (unsupervised, centred: the saved layer needs the cache's mean and scale even with no epoch left)
        if self.frozen and (self.start_epoch < self.epochs or (self.kind == "unsupervised" and self.center)):
            self.runtime = use_runtime(model, self.runtime, device=device)  # model.features: ONNX Runtime on CPUs
            extract_args = (device, max(self.batch_size, 64), self.workers, self.autocast, self.progress)
            if self.unsupervised_objective == "views":  # the un-edited image is view 0: the plain cache
                self.view_cache, kept = extract_views(model, self.source, self.views, self.seed, *extract_args)
                cached = self.view_cache[:, 0].contiguous()
            else:
                cached, kept = _extract_features_sharded(model, self.source, *extract_args)
            self.cached_rows = kept
            labels_cached = self.labels[torch.from_numpy(kept)] if self.labels is not None else None
            if self.kind == "unsupervised" and self.center:
                # The head reads centred rows of one length; the target is the raw features' cosine, shifted.
                # Centred: with a free bias, the penalty's easiest minimum is a constant bit (W_k = 0,
                # bias = +-1), so the biases stay 0 on centred rows and every bit splits around the mean
                # feature. One length: each centred row is scaled to length sqrt(dim) (a mean square of 1 per
                # coordinate), so the same lr and alpha suit features of any scale, and an outlier row (up to
                # 8x the median length in 32 px MobileNetV2 features) cannot give an H whose cubic penalty
                # blows training up (with one common scale it did: loss inf in epoch 1). The head has no
                # bias while it trains and ReLU keeps positive factors, so sgn(head(x)) does not change when
                # x is multiplied by a positive number: `save` folds the mean and the average scale s into
                # the first layer (W s, -W s mean), and the saved model reads raw features like any other
                # and gives the codes training saw. The target: raw cosines shifted so that the average
                # pair's is 0 (`cosine_preservation_loss`); on CIFAR-10 it did at least as well as the centred
                # features' cosines wherever both ran (+0.000 to +0.022; RESULTS.md, "Training:
                # unsupervised").
                self.feature_mean, centred_square, self.target_shift = _feature_stats(cached)
                if self.unsupervised_objective == "views" and self.view_weights["similarity_weight"]:
                    # the similarity target of the views objective: the pooled block alone (with detail
                    # features, the grid block would ask codes to keep layouts' similarities, not contents')
                    self.similarity_width = getattr(model.backbone, "pooled_width", None)
                    if self.similarity_width is not None:
                        self.target_shift = _feature_stats(cached[:, :self.similarity_width])[2]
                self.feature_scale = math.sqrt(cached.shape[1] / max(centred_square, 1e-30))
                if self.target_shift > MAX_TARGET_SHIFT:
                    raise DataError(f"{self.source.description}: the features all point the same way (mean cosine "
                                    f"between items {self.target_shift:.7f}): nothing for codes to tell apart")
                layers = [layer for layer in (model.hidden_layer, model.hash_layer) if layer is not None]
                with torch.no_grad():
                    for layer in layers:
                        layer.bias.requires_grad_(False)  # no gradient, momentum or decay
                        layer.bias.zero_()
                    if self.init == "pca" and self.start_epoch == 0:
                        rows = self.centred_rows(cached)
                        model.hash_layer.weight.copy_(_pca_init(rows, self.bits, self.seed).to(device))
                    if self.init == "lda" and self.start_epoch == 0:
                        views = self.view_cache
                        rows = self.centred_rows(views.flatten(0, 1)).view(views.shape)
                        model.hash_layer.weight.copy_(lda_init(rows, self.bits).to(device))
            if device.type == "cuda" and cached.numel() * 4 < 4 << 30:
                cached = cached.to(device)
                labels_cached = labels_cached.to(device) if labels_cached is not None else None
            if self.feature_mean is not None:  # where `centred_rows` meets the cache, once, not per batch
                self.feature_mean = self.feature_mean.to(cached.device)
            self.cached, self.labels_cached = cached, labels_cached
            if measures_copies(self):  # also fills the held-out features
                prepare_copy_views(self, extract_args)
        elif not self.frozen:
            self.runtime = resolve_runtime(self.runtime, device, trains_backbone=True)  # torch (onnx: an error)
            c = model.config
            self.dataset = ImageDataset(self.source, _Preprocess(c.image_size, c.mean, c.std),
                                        (3, c.image_size, c.image_size), c.decode_size)
        if self.val_source is not None and self.start_epoch < self.epochs:
            n = len(self.cached) if self.cached is not None else len(self.source)
            rng = np.random.default_rng([int(self.seed), 15])
            self.val_db = np.sort(rng.choice(n, MAX_VAL_DATABASE, replace=False)) if n > MAX_VAL_DATABASE else np.arange(n)
            if self.frozen and self.val_cached is None:
                val, kept = _extract_features_sharded(model, self.val_source, device, max(self.batch_size, 64),
                                                      self.workers, self.autocast, False)
                self.val_cached, self.val_labels = val.to(self.cached.device), self.val_labels[kept]
        weights = self.view_weights  # ({} unless the views objective)
        kind = "views" if self.unsupervised_objective == "views" else self.kind
        self.objective = Objective(kind, alpha=self.alpha, shift=self.target_shift,
                                   balance=self.balance, similarity=weights.get("similarity_weight", 0.0),
                                   consistency=weights.get("consistency_weight", 0.0),
                                   contrast=weights.get("contrast_weight", 0.0))
        model.set_backbone_runner(None)  # the runtime served the feature cache; the returned model runs PyTorch

    def centred_rows(self, features: torch.Tensor) -> torch.Tensor:
        """What the head reads while it trains on cached features: unsupervised and centred, each row less
        the mean training feature, scaled to length sqrt(dim); otherwise the features themselves."""
        if self.feature_mean is None:
            return features
        return F.normalize(features.float() - self.feature_mean, dim=1) * math.sqrt(features.shape[1])

    def held_out_measures(self) -> dict[str, float]:
        """The held-out slice's label mAP (with labels of two classes or more: one class says nothing) and,
        unsupervised on images, its copy recall@1."""
        row = {}
        if self.val_labels is not None and (self.val_labels.ndim == 2 or self.source.num_classes >= 2):
            row["val_map"] = self.held_out_map()
        if self.copy_views is not None and self.val_source is not None:
            row["val_copy_recall"] = held_out_copy_recall(self)
        return row

    def held_out_map(self) -> float:
        """mAP@all of the held-out items' codes ranked against (a fixed sample of) the training items'."""
        model = self.model
        model.eval()
        with torch.inference_mode():
            if self.frozen:
                hash_rows = lambda f: np.concatenate([pack_signs(model.head(self.centred_rows(f[i:i + 8192])))  # noqa: E731
                                                      for i in range(0, len(f), 8192)])
                query = hash_rows(self.val_cached)
                database = hash_rows(self.cached[torch.from_numpy(self.val_db).to(self.cached.device)])
                db_labels = self.source.labels[self.cached_rows[self.val_db]]
                query_labels = self.val_labels
            else:
                fn = lambda x: model.hash(x)  # noqa: E731
                args = (self.device, max(self.batch_size, 64), self.workers, self.autocast, False)
                h, kept_q = _extract_features(model, self.val_source, *args, fn=fn)
                query, query_labels = pack_signs(h), self.val_labels[kept_q]
                h, kept_db = _extract_features(model, self.source.subset(self.val_db), *args, fn=fn)
                database, db_labels = pack_signs(h), self.source.labels[self.val_db[kept_db]]
        return mean_average_precision(query, database, query_labels, db_labels)

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
            if self.val_source is not None and ((epoch + 1) % self.val_every == 0 or epoch + 1 == self.epochs) \
                    and distributed.is_main():
                row.update(self.held_out_measures())
                score = row.get("val_map", row.get("val_copy_recall"))  # what keep_best keeps the best of
                if self.keep_best and score is not None and (self.best is None or score > self.best["val_map"]):
                    self.best = {"epoch": epoch + 1, "val_map": score,
                                 "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
            logger.info("%s", epoch_line(row))
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
            if self.best is not None:
                state.update(best_epoch=self.best["epoch"], best_val_map=self.best["val_map"],
                             best_model=self.best["model"])
            _save_checkpoint(self.paths["checkpoint"], state)
            _write_log(self.paths["log"], self.history)

    def save(self) -> Encoder:
        """The final model (eval mode) with its provenance; written to `out` by the main process."""
        model, paths = self.model, self.paths
        model.eval()
        selection = "last epoch (query labels never used)"
        if self.keep_best and self.best is not None:
            model.load_state_dict(self.best["model"])
            measure = "mAP" if any("val_map" in row for row in self.history) else "copy recall@1"
            selection = (f"best held-out {measure} {self.best['val_map']:.4f}, epoch {self.best['epoch']} "
                         "(query labels never used)")
        if self.copy_views is not None:  # measured on the head as it trained (centred rows), before the fold
            self.copy_radius = measure_copy_radius(self)
            model.config.copy_radius = self.copy_radius["bits"]
            logger.info("copy radius %d bits: %.1f%% of %d edited views of %s fall within it of their original "
                        "(their %gth percentile: %d bits), different images %.1e of pairs", self.copy_radius["bits"],
                        100 * self.copy_radius["copy_recall"], self.copy_radius["views"], self.copy_radius["from"],
                        self.copy_radius["percentile"], self.copy_radius["copies_p99"],
                        self.copy_radius["false_match_rate"])
        if self.feature_scale is not None:  # trained on centred rows: the saved first layer reads raw f
            layer = model.hidden_layer if model.hidden_layer is not None else model.hash_layer
            with torch.no_grad():
                layer.weight.mul_(self.feature_scale)
                layer.bias.copy_(-layer.weight @ self.feature_mean.to(layer.weight))
        model.config.extra["training"] = {
            **self.signature, **self.weights_info, "epochs": self.epochs, "preset": self.preset,
            "selection": selection, "final": self.history[-1] if self.history else None,
            "unsupervised_objective": self.unsupervised_objective, "copy_radius": self.copy_radius,
            "feature_scale": self.feature_scale, "target_shift": self.target_shift,
            "device": str(self.device), "amp": str(self.amp_dtype) if self.use_amp else None,
            "torch": torch.__version__, "python": platform.python_version(), "processes": self.world,
            "splits_file": os.path.basename(paths["splits"]) if paths and self.splits is not None else None,
            "log_file": os.path.basename(paths["log"]) if paths else None,
        }
        if paths and distributed.is_main():
            model.save(paths["model"])
            logger.info("wrote %s", paths["model"])
        return model


@_with_kept_checkpoint_hint
def train(
    data,
    bits: int = 64,
    backbone: str | None = None,
    weights: str | None = None,
    out: str | os.PathLike | None = None,
    *,
    root: str | os.PathLike | None = None,
    unsupervised: bool = False,
    multi_label: bool = False,
    protocol: str | None = None,
    seed: int = 0,
    freeze_backbone: bool | None = None,
    preset: str = "default",
    epochs: int | None = None,
    lr: float | None = None,
    lr_step: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int | None = None,
    alpha: float | None = None,
    image_size: int = 224,
    center: bool | None = None,
    init: str | None = None,
    hash_hidden: int | None = None,
    balance: float | None = None,
    augment: bool = True,
    backbone_lr_scale: float | None = None,
    val_fraction: float = 0.05,
    val_every: int = 5,
    keep_best: bool = False,
    device: str = "auto",
    runtime: str = "auto",
    objective: str | None = None,
    views: int = 8,
    similarity_weight: float | None = None,
    consistency_weight: float | None = None,
    contrast_weight: float | None = None,
    contrast_spare: float | None = None,
    detail_layer: str | None = "auto",
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Encoder:
    """Train a GreedyHash encoder and return it (in eval mode, on `device`).

    data: image folder, list file (with `root`), `.npz`/`.h5` feature array (identity backbone), a
        `DataSource`, or with `protocol` a CIFAR-style folder (train/<class>/, test/<class>/) whose
        training split is used (`seed` fixes the split).
    backbone: ``smallcnn``, ``identity`` or any torchvision classification model
        (`ghindex.backbones.backbone_names()`); default ``identity`` for feature arrays and
        ``efficientnet_b0`` for images. weights: ``imagenet`` (torchvision's DEFAULT weights, the
        default wherever they exist), ``none`` (random init) or a state-dict file.
    unsupervised: backbone frozen, labels unused, the `objective` below; otherwise
        cross-entropy of a bias-free classifier on the codes, or BCE with `multi_label`.
    freeze_backbone: default False for supervised, always True for unsupervised.
    preset: where the settings left as None come from: ``default`` (measured, see PRESETS) or
        ``paper`` (GreedyHash's published settings). Applies to epochs, lr, batch_size, alpha,
        center, init, hash_hidden, balance and backbone_lr_scale.
    lr: multiplied by 0.1 every `lr_step` epochs (default: once, after 60% of `epochs`, or the preset's
        own step; 0: never).
        SGD with `momentum`, `weight_decay`. backbone_lr_scale: fine-tuned backbone layers learn at
        lr * this (1 when the backbone starts from random weights).
    alpha: weight of the quantization penalty mean(|H - sgn(H)|^3).
    center: unsupervised only: the head reads centred features, each scaled to length sqrt(dim) (the
        first layer's bias is tied to -W mean, so bits stay balanced), and the cosine target is shifted
        so that the average pair of training items has target 0 (off: raw features and raw cosines,
        as the paper). init: unsupervised, centred, no hidden layer: ``pca`` starts the hash layer
        from the principal directions under a random rotation (as ITQ starts), ``random`` from
        PyTorch's default init.
    hash_hidden: width of a ReLU layer between the features and the hash layer (0: none, the paper's
        single linear layer).
    balance: weight of the bit balance penalty, mean over bits of (the bit's mean over the batch)^2,
        which keeps bits from going constant (0: none, the paper's).
    augment: random horizontal flips while fine-tuning (never applied to cached frozen features).
    val_fraction: held-out slice of the (labelled) training items, at most 1,000, whose mAP against
        the rest is logged every `val_every` epochs and after the last (0: none; slices under 10
        items are not made). keep_best: keep the model of the best held-out mAP, not the last.
    objective: unsupervised only: ``views`` (images only, their default: each image's un-edited view and
        `views` edits from `ghindex.augment`, their features extracted once; the codes of the un-edited images
        keep their pooled features' cosines, as ``similarity``, and the codes of two edited views of an image
        agree and differ from other images'; its own preset entry) or ``similarity`` (the codes keep the frozen
        features' cosines; the default for feature arrays, under torchrun and with the paper preset:
        `ghindex.train_settings._default_objective`). Measured at 64 bits on CIFAR-10 at 128 px
        (benchmarks/RESULTS.md, "Copies"): trained on all 50,000 training images (cifar10-II),
        views ranked semantic neighbours better (mAP@1000 0.603 vs 0.589 at 64 bits, 0.562 vs 0.552 at 32);
        trained on 5,000, its image queries found edited copies 0.918-0.924 of the time on a validation split
        (similarity 0.565-0.590).
    similarity_weight, consistency_weight, contrast_weight: the views objective's terms and their weights
        (default: the preset's, 3, 0.7 and 0.1, chosen on a validation split): `cosine_preservation_loss` on
        the un-edited images, `view_consistency_loss` (1 - cosine between two views' codes) and `nt_xent_loss`
        (temperature 0.1) between the codes of two views of each image; consistency or contrast must be > 0.
    contrast_spare: the views objective: the share of a batch, in [0, 1), that NT-Xent spares for each image: its
        most similar other images (cosine of their centred pooled features, `ghindex.losses.neighbour_pairs`)
        are not its negatives, so look-alikes are not pushed apart as unrelated images are (default: the
        preset's, 0.1; 0 finds more copies and ranks semantic neighbours worse).
    detail_layer: a backbone layer whose output, average-pooled to a 2 x 2 grid, joins the pooled features
        (`ghindex.backbones.WithDetail`; the model file records it): ``auto`` (the default) adds the
        backbone's `DETAIL_LAYERS` entry for the views objective and nothing otherwise; ``none``; or a layer
        name (e.g. ``0.13`` for mobilenet_v2: its `features[13]`). Image backbones only.
    Every unsupervised run on images records a copy radius (`config.copy_radius`, ``training["copy_radius"]``):
        the 99th percentile of the Hamming distance between 4 edited views of the held-out images (without
        a held-out slice: of up to 500 training images) and their originals, lowered until at most 1e-5 of
        the pairs of different images fall within it (`ghindex.train_views.copy_radius`); and its held-out slice
        (labelled or not) reports the copy recall@1 of those views (``val_copy_recall``). The held-out
        mAP needs labels of two classes or more.
    runtime: where a frozen backbone computes the cached features (`ghindex.runtime`): ``auto`` (ONNX
        Runtime on the CPU when installed, else PyTorch), ``torch`` or ``onnx``; fine-tuning runs PyTorch.
    out: model path; also writes MODEL.ckpt, MODEL.log.jsonl and (protocol) MODEL.splits.npz.
    resume: continue from MODEL.ckpt (same arguments; `epochs` may grow).
    overwrite: start over even if `out` or its checkpoint exists (otherwise that is an error, so an
        interrupted run is never replaced by accident).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    kind = "unsupervised" if unsupervised else ("multi-label" if multi_label else "supervised")
    if unsupervised and objective is None:
        objective = _default_objective(preset, data, backbone)
    group = "views" if unsupervised and objective == "views" else _run_group(kind, freeze_backbone, backbone, data)
    chosen = PRESETS[preset][group]
    pick = lambda value, key: chosen[key] if value is None else value  # noqa: E731
    # short codes have their own lr where the preset names one (`small_codes_lr`)
    small = chosen.get("small_codes_lr") if isinstance(bits, int) and bits <= chosen.get("small_codes_bits", 0) else None
    epochs, batch_size, alpha = pick(epochs, "epochs"), pick(batch_size, "batch_size"), pick(alpha, "alpha")
    lr = lr if lr is not None else small if small is not None else chosen["lr"]
    center, init, hash_hidden = pick(center, "center"), pick(init, "init"), pick(hash_hidden, "hash_hidden")
    if init not in ("random", "pca", "lda"):
        raise ConfigError(f"init must be 'random', 'pca' or 'lda', got {init!r}")
    check_hash_hidden(hash_hidden)
    balance = pick(balance, "balance")
    if init == "pca" and hash_hidden and unsupervised:
        raise ConfigError("init 'pca' starts a hash layer that reads the features: it needs hash_hidden=0")
    _check_args(bits, epochs, lr, lr_step, momentum, weight_decay, batch_size, alpha, image_size, workers,
                backbone_lr_scale, val_fraction, val_every, preset, balance)
    objective = _check_objective(objective, views, unsupervised, init, hash_hidden, center)
    view_weights = _check_view_weights(dict(similarity_weight=similarity_weight, consistency_weight=consistency_weight,
                                            contrast_weight=contrast_weight, contrast_spare=contrast_spare),
                                       objective, chosen)
    _check_outputs(out, resume, overwrite)
    kind = _objective_kind(unsupervised, multi_label, freeze_backbone, batch_size)
    torch_device, world, progress = _setup_processes(device, kind, batch_size, progress)
    run = _TrainingRun(
        kind=kind, bits=bits, backbone=backbone, weights=weights,
        image_size=image_size, freeze_backbone=freeze_backbone, protocol=protocol, seed=seed, epochs=epochs,
        lr=float(lr), lr_step=int(lr_step if lr_step is not None else chosen.get("lr_step", max(1, round(0.6 * epochs)))),
        momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, alpha=alpha, center=bool(center),
        augment=augment, device=torch_device, world=world, progress=progress,
        workers=int(workers if workers is not None else min(4, os.cpu_count() or 1)),
        paths=output_paths(out) if out is not None else None,
        backbone_lr_scale=backbone_lr_scale, val_fraction=float(val_fraction), val_every=int(val_every),
        keep_best=bool(keep_best), preset=preset, init=init, hash_hidden=int(hash_hidden),
        balance=float(balance), runtime=runtime, unsupervised_objective=objective, views=int(views),
        view_weights=view_weights,
        detail_layer=detail_layer, max_grad_norm=chosen.get("max_grad_norm"),
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
