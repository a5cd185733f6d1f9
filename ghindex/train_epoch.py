"""One epoch of `ghindex.train`: a seeded pass over the training items, one optimizer step per batch.

`train_epoch(run, epoch)` reads the state of a run (`ghindex.train_state.TrainingState`: model, optimizer,
schedule, inputs: cached frozen features or an image dataset) and returns the epoch's summary row. All of its
randomness (order, flips, dropout) comes from generators seeded with (seed, epoch), which is what makes
a resumed run reach the same weights. With several processes (torchrun), each takes its share of the
same permutation and DistributedDataParallel all-reduces the gradients.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from . import distributed
from .data import collate
from .encoder import Encoder
from .errors import ConfigError, DataError
from .hashing import greedy_sign
from .losses import neighbour_pairs
from .train_state import TrainingState

logger = logging.getLogger("ghindex.train")  # one logger for all of training

MAX_WARNED_IMAGES = 5


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of all randomness in `epoch` (0-based) of a run with `seed`."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1)


class EpochStats:
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


def reduce_stats(stats: EpochStats, skipped: int) -> tuple[EpochStats, int]:
    """Sum the epoch's statistics over all processes (what the log and checkpoint of rank 0 report)."""
    head = torch.tensor([stats.n, stats.loss, stats.main, stats.penalty, stats.abs_h, skipped], dtype=torch.float64)
    total = distributed.all_reduce_sum(torch.cat([head, stats.ones.detach().cpu().double()]))
    stats.n, stats.loss, stats.main, stats.penalty, stats.abs_h = int(total[0]), *map(float, total[1:5])
    stats.ones = total[6:]
    return stats, int(total[5])


class DDPForward(torch.nn.Module):
    """What DistributedDataParallel wraps: the encoder, with each step's forward passed in as a function
    (DDP hooks only `forward`; the steps differ: hash layer on cached features, or the whole model)."""

    def __init__(self, model: Encoder):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


def train_epoch(run: TrainingState, epoch: int) -> dict[str, Any]:
    """One pass over the training items in this epoch's seeded order; logs and returns its summary row."""
    rng_seed = epoch_seed(run.seed, epoch)
    gen = torch.Generator().manual_seed(rng_seed)
    torch.manual_seed(rng_seed)  # dropout and anything else drawing from the global generators
    stats = EpochStats(run.bits, run.device)
    t0 = time.perf_counter()
    n_items = len(run.cached) if run.cached is not None else len(run.source)
    order = torch.randperm(n_items, generator=gen)
    if run.world > 1:  # this process's share of the same permutation (padded to a multiple of world)
        order = torch.tensor(list(torch.utils.data.DistributedSampler(
            range(n_items), run.world, distributed.rank(), shuffle=True, seed=rng_seed)), dtype=torch.long)
        n_items = len(order)
    bar = tqdm(total=n_items, unit="img", desc=f"epoch {epoch + 1}/{run.epochs}", file=sys.stderr,
               disable=not run.progress, leave=False)
    run.model.train(not run.frozen)
    run.model.backbone.train(not run.frozen)
    if run.view_cache is not None:
        skipped = _view_steps(run, epoch, order, gen, stats, bar)
    elif run.cached is not None:
        skipped = _cached_steps(run, epoch, order, stats, bar)
    else:
        skipped = _image_steps(run, epoch, order, gen, stats, bar)
    bar.close()
    if run.world > 1:
        stats, skipped = reduce_stats(stats, skipped)
    if stats.n == 0:
        raise DataError(f"no usable training items in {run.source.description}")
    current_lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    seconds = time.perf_counter() - t0
    items = stats.n // 2 if run.view_cache is not None else stats.n  # views: two rows per image
    row = {"epoch": epoch + 1, "epochs": run.epochs, "objective": "views" if run.view_cache is not None else run.kind,
           **stats.summary(), "lr": current_lr, "items": items, "skipped": skipped, "seconds": round(seconds, 3),
           "images_per_s": round(items / seconds, 1) if seconds > 0 else None}
    return row


def epoch_line(row: dict[str, Any]) -> str:
    """The one-line summary of an epoch's log row (with its held-out mAP when it has one)."""
    line = (f"epoch {row['epoch']}/{row['epochs']}  loss {row['loss']:.4f}  {row['objective']} {row['main']:.4f}  "
            f"penalty {row['penalty']:.4f}  mean|H| {row['mean_abs_h']:.3f}  "
            f"+1 per bit {row['bit_ones_min']:.2f}-{row['bit_ones_max']:.2f}  lr {row['lr']:.2g}  "
            f"{row['seconds']:.1f} s ({row['images_per_s'] or 0:.0f} img/s)")
    if row.get("val_map") is not None:
        line += f"  held-out mAP {row['val_map']:.4f}"
    if row.get("val_copy_recall") is not None:
        line += f"  held-out copy recall@1 {row['val_copy_recall']:.4f}"
    return line


def _cached_steps(run: TrainingState, epoch: int, order: torch.Tensor, stats: EpochStats, bar) -> int:
    """The epoch's steps on cached features (hash layer and classifier only); returns 0 (nothing skipped)."""
    cached, labels_cached, head = run.cached, run.labels_cached, run.model.head
    for start in range(0, len(order), run.process_batch):
        idx = order[start:start + run.process_batch].to(cached.device)
        if run.kind == "unsupervised" and len(idx) < 2:
            continue  # a lone leftover item has no pair
        f = cached[idx]
        y = labels_cached[idx] if labels_cached is not None else None
        h = run.forward(head, run.centred_rows(f))
        _step(run, epoch, stats, h, f, y)
        bar.update(len(idx))
    return 0


def _view_steps(run: TrainingState, epoch: int, order: torch.Tensor, gen: torch.Generator, stats: EpochStats,
                bar) -> int:
    """The views objective's steps on cached view features: for each image two different views out of its
    1+V (drawn from the epoch's generator), the first views' rows then the second's through the hash layer,
    and with a similarity term the un-edited images' rows (view 0) after them, whose target is their
    features' first `run.similarity_width` columns (the pooled block); with `contrast_spare`, each image's
    most similar images of the batch (`neighbour_pairs` of their centred pooled features) are not its NT-Xent
    negatives; returns 0 (nothing skipped)."""
    views, head = run.view_cache, run.model.head
    count = views.shape[1]
    similarity = bool(run.objective.similarity)
    spare = run.view_weights["contrast_spare"] if run.objective.contrast else 0.0
    pooled = getattr(run.model.backbone, "pooled_width", None)  # the pooled block (detail features after it)
    for start in range(0, len(order), run.process_batch):
        idx = order[start:start + run.process_batch]
        first = torch.randint(0, count, (len(idx),), generator=gen)
        second = (first + torch.randint(1, count, (len(idx),), generator=gen)) % count  # never the same view
        if len(idx) < 2:
            continue  # a lone leftover image has no negatives
        parts = [views[idx, first], views[idx, second]] + ([views[idx, 0]] if similarity else [])
        rows = torch.cat(parts).to(run.device, non_blocking=True)
        centred = run.centred_rows(rows)
        h = run.forward(head, centred)
        plain = rows[2 * len(idx):, :run.similarity_width] if similarity else None
        spared = None
        if spare:  # look-alikes by the un-edited images' centred pooled features
            original = centred[2 * len(idx):] if similarity else run.centred_rows(views[idx, 0].to(run.device))
            spared = neighbour_pairs(original[:, :pooled], spare)
        _step(run, epoch, stats, h, plain, None, counted=2 * len(idx), spared=spared)
        bar.update(len(idx))
    return 0


def _image_steps(run: TrainingState, epoch: int, order: torch.Tensor, gen: torch.Generator, stats: EpochStats,
                 bar) -> int:
    """The epoch's steps through the whole model on images (flipped at random); returns the number of
    undecodable images skipped."""
    device, kind, world, skipped = run.device, run.kind, run.world, 0
    loader = torch.utils.data.DataLoader(run.dataset, batch_size=run.process_batch, sampler=order.tolist(),
                                         num_workers=run.workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
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
        if run.augment:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        x = x.to(device, non_blocking=True)
        y = run.labels[idx].to(device) if run.labels is not None else None
        with run.autocast():
            out_ = run.forward(run.model, x)
        _step(run, epoch, stats, out_.h, out_.features, y, loss_weight)
        bar.update(len(errors))
    return skipped


def _clip(run: TrainingState) -> None:
    """Scale the step's gradients down to `run.max_grad_norm` when above it (multiplied by 1.0 otherwise:
    unchanged, bit for bit)."""
    params = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm)


def _step(run: TrainingState, epoch: int, stats: EpochStats, h_raw, features, y, loss_weight: float = 1.0,
          counted: int | None = None, spared: torch.Tensor | None = None) -> None:
    """Loss, backward and optimizer step on one batch's H; the statistics of its first `counted` rows (all by
    default) unless loss_weight is 0. spared: the views objective's pairs that are not NT-Xent negatives."""
    h = h_raw.float()
    b = greedy_sign(h)
    terms = run.objective(h, b, features=features, classifier=run.model.classifier, labels=y, spared=spared)
    if not torch.isfinite(terms.total):
        raise ConfigError(f"training diverged (loss {float(terms.total.detach())} in epoch {epoch + 1}): "
                          "lower lr or alpha")
    if loss_weight != 1.0:  # a placeholder step (see _image_steps): takes part in the all-reduce only
        terms = terms._replace(total=terms.total * loss_weight)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(terms.total).backward()
        if run.max_grad_norm is not None:
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            _clip(run)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        terms.total.backward()
        if run.max_grad_norm is not None:
            _clip(run)
        run.optimizer.step()
    if loss_weight:
        stats.add(terms, h if counted is None else h[:counted])
