"""What `train` makes of its arguments before a run starts: the presets that fill in settings left as
None, the checks of every argument, the kind of objective and of run, and this process's device and
share of the work (torchrun)."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from . import distributed
from .data import ARRAY_EXTENSIONS, DataSource
from .device import resolve_device
from .errors import ConfigError
from .hashing import check_bits

# What `train` fills in for settings left as None, per preset and kind of run ("unsupervised",
# "frozen": supervised on a frozen backbone, "finetune": supervised through the whole network).
# "default": chosen on a validation split of CIFAR-10's training set (benchmarks/bench_defaults.py,
# RESULTS.md "Training: ..." sections); "paper": GreedyHash's CIFAR settings as its authors' code runs them
# (Su et al. 2018; cifar1.py: 50 epochs, lr x0.1 after 30; unsupervised_vgg.py: 60 epochs, constant lr).
# lr_step, where a preset names it, replaces the usual single drop after 60% of the epochs.
_SGD = dict(alpha=0.1, center=True, init="random", hash_hidden=0, balance=0.0, batch_size=32,
            backbone_lr_scale=1.0)  # the paper's base
# Gradients of a step are scaled down to this norm. Only the default unsupervised recipes need it: at 16
# bits its lr of 0.3 met the cubic penalty's growing gradient and diverged within a dozen steps (norms 1-7,
# then 20, 950, 7e12: "training diverged") on CIFAR-10 features; at 32 and 64 bits no step's gradient
# came near it (largest 2.7 and 1.0), so those runs are unchanged, bit for bit.
MAX_GRAD_NORM = 5.0
# The default unsupervised recipe: a ReLU layer of 1,024 before the hash layer, which needs the larger lr, and
# the bit balance penalty, without which that layer left bits constant (RESULTS.md, "Training: unsupervised").
# Codes of 16 bits or fewer learn at lr 0.1: on the validation split (mAP@1000, 128 px) lr 0.3 gave
# 0.333 / 0.329 at 8 / 16 bits and 0.1 gave 0.374 / 0.402 (ITQ 0.358 / 0.371), while from 24 bits on
# 0.3 stayed ahead (0.433 / 0.448 / 0.480 vs 0.419 / 0.435 / 0.463 at 24 / 32 / 64 bits).
_UNSUPERVISED = {**_SGD, "lr": 0.3, "alpha": 0.3, "hash_hidden": 1024, "balance": 1.0, "epochs": 20,
                 "batch_size": 256, "max_grad_norm": MAX_GRAD_NORM, "small_codes_bits": 16, "small_codes_lr": 0.1}
# The views objective: `_UNSUPERVISED` (hidden layer, SGD) on the views' features, its
# similarity target on the un-edited images (weight 3), plus view consistency 0.7 and NT-Xent 0.1. Chosen on a
# validation split (other CIFAR-10 training images, 64 bits, seeds 0 and 1, RESULTS.md "Copies"): semantic
# mAP@1000 0.520 / 0.514 (similarity objective 0.499 / 0.517) with copies found by image queries 0.968 / 0.959,
# every edit >= 0.90; similarity weight 1: 0.501 / 0.498, 5: copies 0.94; NT-Xent as the main term (Adam, a
# linear layer from view-LDA) levelled off at 0.47 semantic; consistency alone found no copies (0.34).
# Codes of 32 bits or fewer learn at lr 0.1: at 0.3 the cubic penalty swung up to 130 until the lr dropped
# (semantic 0.422, similarity 0.449); at 0.1: 0.456 / 0.466 (similarity 0.449 / 0.465), while at 64 bits
# 0.3 stayed ahead (0.520 vs 0.502).
# NT-Xent spares each image's 10% most similar images of the batch (`contrast_spare`, by their centred pooled
# features): pushed apart as if unrelated, look-alikes cost the semantic ranking once the training set grew.
# Validation split, 45,000 training images, mAP@1000 of 5,000 held-out ones at 64 bits, seeds 0 / 1: 0.602 /
# 0.601 (similarity objective 0.592 / 0.592, unspared 0.574); at 32 bits 0.558 (similarity 0.558); 5,000
# training images: 0.551 / 0.552 with copies by image query 0.918 / 0.924 (unspared 0.520 / 0.514 and 0.968 /
# 0.959; similarity 0.499 / 0.517 and 0.590 / 0.565); sparing 5%: 0.592 at scale, copies 0.924 / 0.936.
_VIEWS = {**_UNSUPERVISED, "small_codes_bits": 32,
          "similarity_weight": 3.0, "consistency_weight": 0.7, "contrast_weight": 0.1, "contrast_spare": 0.1}
VIEW_WEIGHTS = ("similarity_weight", "consistency_weight", "contrast_weight", "contrast_spare")
UNSUPERVISED_OBJECTIVES = ("similarity", "views")
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "unsupervised": _UNSUPERVISED,
        "frozen": {**_SGD, "lr": 1e-3, "epochs": 30},
        # one lr for every layer: backbone layers at lr x 0.1 lost 0.12 mAP (RESULTS.md, "Fine-tuned backbone on a GPU")
        "finetune": {**_SGD, "lr": 1e-3, "epochs": 50},
        "views": _VIEWS,
    },
    "paper": {
        "views": _VIEWS,  # not in the paper: the same as default's
        "unsupervised": {**_SGD, "lr": 1e-4, "center": False, "epochs": 60, "lr_step": 0},
        "frozen": {**_SGD, "lr": 1e-3, "epochs": 50},
        "finetune": {**_SGD, "lr": 1e-3, "epochs": 50},
    },
}


def _check_args(bits, epochs, lr, lr_step, momentum, weight_decay, batch_size, alpha, image_size, workers,
                backbone_lr_scale=1.0, val_fraction=0.0, val_every=1, preset="default", balance=0.0):
    check_bits(bits)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if backbone_lr_scale is not None and not (backbone_lr_scale >= 0 and math.isfinite(backbone_lr_scale)):
        raise ConfigError(f"backbone_lr_scale must be >= 0, got {backbone_lr_scale!r}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1) (0: no held-out slice), got {val_fraction!r}")
    if isinstance(val_every, bool) or not isinstance(val_every, (int, np.integer)) or val_every < 1:
        raise ConfigError(f"val_every must be a positive integer, got {val_every!r}")
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
    if not (balance >= 0 and math.isfinite(balance)):
        raise ConfigError(f"balance must be >= 0, got {balance!r}")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers!r}")


def _check_objective(objective, views, unsupervised: bool, init: str, hash_hidden: int, center: bool) -> str | None:
    """The unsupervised objective (as named: `_default_objective` fills it in before; None for supervised
    runs), after checking `views` and what the views objective needs."""
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ConfigError(f"views must be a positive integer (edited views per image), got {views!r}")
    if objective is not None and objective not in UNSUPERVISED_OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; known: {', '.join(UNSUPERVISED_OBJECTIVES)}")
    if not unsupervised:
        if objective is not None:
            raise ConfigError(f"objective {objective!r} applies to unsupervised training (unsupervised=True)")
        objective = None
    if init == "lda" and objective != "views":
        raise ConfigError("init 'lda' starts the hash layer from edited views: it needs objective 'views'")
    if objective == "views":
        if hash_hidden and init == "lda":
            raise ConfigError("init 'lda' starts a hash layer that reads the features: it needs hash_hidden=0")
        if not center:
            raise ConfigError("the views objective reads centred features: it needs center=True")
    return objective


def _check_view_weights(weights: dict[str, Any], objective: str | None, chosen: dict[str, Any]) -> dict[str, float]:
    """The views objective's term weights and NT-Xent's spared share (`VIEW_WEIGHTS`; the preset's where None);
    {} for other objectives, which have no such terms: naming one there is a ConfigError."""
    named = {k: v for k, v in weights.items() if v is not None}
    for name, weight in named.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) \
                or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {weight!r}")
    if objective != "views":
        if named:
            raise ConfigError(f"{next(iter(named))} sets a term of the views objective: it needs objective 'views'")
        return {}
    picked = {k: float(named.get(k, chosen[k])) for k in VIEW_WEIGHTS}
    if not picked["contrast_spare"] < 1:
        raise ConfigError(f"contrast_spare is the share of a batch spared as negatives: it must be below 1, got "
                          f"{picked['contrast_spare']!r}")
    if not picked["consistency_weight"] and not picked["contrast_weight"]:
        raise ConfigError("the views objective needs consistency_weight or contrast_weight above 0: without them "
                          "it does not use the views (objective 'similarity' trains without)")
    return picked


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


def _holds_features(data, backbone) -> bool:
    """Whether the run reads feature vectors (the identity backbone, a feature DataSource, an array file)
    rather than images, as far as can be told before loading the data."""
    if backbone == "identity":
        return True
    if isinstance(data, DataSource):
        return data.kind == "features"
    return os.path.splitext(os.fspath(data))[1].lower() in ARRAY_EXTENSIONS


def _default_objective(preset: str, data, backbone) -> str:
    """The unsupervised objective when none is named: ``views`` for images under the default preset, in one
    process; ``similarity`` for feature vectors (nothing to edit), under torchrun (views runs in one process)
    and for the paper preset (the paper's objective)."""
    if preset != "default" or distributed.world_size() > 1 or _holds_features(data, backbone):
        return "similarity"
    return "views"


def _run_group(kind: str, freeze_backbone, backbone, data) -> str:
    """Which PRESETS entry applies: "unsupervised", "frozen" or "finetune"."""
    if kind == "unsupervised":
        return "unsupervised"
    if freeze_backbone or backbone == "identity":
        return "frozen"
    if backbone is None and _holds_features(data, backbone):  # feature arrays get the frozen identity backbone
        return "frozen"
    return "finetune"
