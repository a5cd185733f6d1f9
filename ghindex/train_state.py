"""The state of one `ghindex.train` run: its settings (defaults resolved by `train`), then what its steps
fill in. The steps are `ghindex.train._TrainingRun`'s methods; one epoch (`ghindex.train_epoch`) reads
this state, so the state sits below both."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import DataSource, ImageDataset
from .encoder import Encoder
from .losses import Objective


def _unset():
    return field(init=False, default=None, repr=False)


@dataclass(eq=False)
class TrainingState:
    """One call of `train`: its settings, then the state that its steps fill in, in this order:
    prepare_data, [read_checkpoint], build_model, make_optimizer, [resume], write_splits, prepare_inputs,
    run_epochs (per epoch: `train_epoch`, record_epoch), save."""

    kind: str  # "supervised", "multi-label" or "unsupervised"
    bits: int
    backbone: str | None  # None: chosen by prepare_data from the kind of data
    weights: str | None  # None: the backbone's default (imagenet where torchvision has weights)
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
    backbone_lr_scale: float | None = None  # backbone layers learn at lr * this (new layers at lr); None: preset
    val_fraction: float = 0.0  # held-out slice of the training items (0: none)
    val_every: int = 5  # held-out mAP every this many epochs, and after the last
    keep_best: bool = False  # keep the model of the best held-out mAP instead of the last
    preset: str = "default"
    init: str = "random"  # unsupervised, centred: "pca" starts the hash layer from rotated principal directions
    hash_hidden: int = 0  # width of a ReLU layer before the hash layer (0: none)
    balance: float = 0.0  # weight of the bit balance penalty
    runtime: str = "auto"  # where a frozen backbone extracts features (`ghindex.runtime`); then the one chosen
    unsupervised_objective: str | None = None  # unsupervised: "similarity" (cosine preservation) or "views"
    views: int = 8  # views objective: edited views per training image (plus the un-edited one)
    view_weights: dict[str, float] = field(default_factory=dict)  # views objective: its terms' weights ({} otherwise)
    detail_layer: str | None = "auto"  # backbone layer for detail features ("auto": per objective and backbone)
    max_grad_norm: float | None = None  # a step's gradients are scaled down to this norm (None: never)

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
    cached_rows: np.ndarray | None = _unset()  # frozen: which training items `cached` holds (those that decoded)
    feature_mean: torch.Tensor | None = _unset()  # unsupervised, centred: the head reads `centred_rows(f)`
    feature_scale: float | None = _unset()  # ... and `save` folds mean and this scale into its first layer
    target_shift: float = _unset()  # unsupervised: the feature cosine that the target maps to 0
    similarity_width: int | None = _unset()  # the feature columns a similarity target reads (None: all)
    dataset: ImageDataset | None = _unset()  # not frozen: the training images
    # held-out slice (prepare_data, prepare_inputs)
    val_source: DataSource | None = _unset()  # held-out training items (None: no held-out evaluation)
    val_labels: np.ndarray | None = _unset()
    val_cached: torch.Tensor | None = _unset()  # frozen: their backbone features
    val_db: np.ndarray | None = _unset()  # rows of the training items the held-out queries are ranked against
    best: dict[str, Any] | None = _unset()  # keep_best: {"epoch", "val_map" (the held-out score), "model"}
    # unsupervised on images: edited views that measure copies (`ghindex.train_views`), prepare_inputs
    view_cache: torch.Tensor | None = _unset()  # views objective: (N, 1+V, D) features, view 0 un-edited
    copy_originals: torch.Tensor | None = _unset()  # features of the images whose edited views measure copies
    copy_views: torch.Tensor | None = _unset()  # (n, COPY_VIEWS, D): their edited views' features
    copy_others: np.ndarray | None = _unset()  # rows of `cached` that held-out copies are also searched among
    copy_radius: dict[str, Any] | None = _unset()  # save: {"bits", "percentile", "views", "from"}
    # run_epochs
    forward: Any = _unset()  # forward(fn, *args): fn(*args), through DistributedDataParallel with several processes
    process_batch: int = _unset()  # this process's share of a step's batch
