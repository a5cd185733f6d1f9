"""GreedyHash training objectives: small pieces that each take tensors and return a scalar loss.

- `classification_loss`: cross-entropy of a bias-free linear classifier applied to the codes B.
- `multilabel_loss`: binary cross-entropy of the same classifier against multi-hot targets.
- `cosine_preservation_loss`: mean over the pairs of a batch of (t_ij - cos(b_i, b_j))^2, between
  the cosines t of (frozen) backbone features f, optionally shifted, and those of the codes b.
- `quantization_penalty` (from `ghindex.hashing`): mean(|H - sgn(H)|^p), weighted by `alpha`.
- `bit_balance_penalty`: mean over bits of (mean of a bit over the batch)^2, weighted by `balance`.
- `view_consistency_loss`: mean over images of 1 - cos(b, b') between the codes of two edited views.
- `nt_xent_loss`: SimCLR's contrastive loss between the codes of two edited views of each image;
  `neighbour_pairs`: the pairs of a batch it may spare (each item's most similar others).

The ``views`` objective weighs three terms: `cosine_preservation_loss` on the un-edited images (their codes
keep the features' similarities, as ``unsupervised``), `view_consistency_loss` (an image's edited copies
agree) and `nt_xent_loss` (and differ from other images' codes, except, with `contrast_spare`, from those
of the images whose features are most like its own).

`Objective` combines one main term with the penalty; `objective(...)` returns a `LossTerms` so the
training loop can log each part. Codes B come from `greedy_sign(H)`, so every gradient reaching B
goes straight through to H and the projection that produced it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .hashing import quantization_penalty

OBJECTIVES = ("supervised", "multi-label", "unsupervised", "views")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for single-label class indices (N,) against logits (N, C)."""
    return F.cross_entropy(logits.float(), labels.long())


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (mean over items and classes) for multi-hot targets (N, C) of 0/1."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def cosine_preservation_loss(features: torch.Tensor, codes: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """mean over pairs i < j of (t_ij - cos(b_i, b_j))^2, t_ij = (cos(f_i, f_j) - shift) / (1 - shift).

    `features` are the similarity target and get no gradient. `shift` (< 1) is the cosine that maps to 0,
    keeping 1 at 1: post-ReLU CNN features have cosines that are all positive (0.35 on average for
    MobileNetV2 on CIFAR-10), which codes in {-1, +1} can only imitate with correlated, unbalanced bits,
    while balanced, independent bits give an average cosine of 0. Shifting by the average cosine of the
    training features asks for that and keeps the features' own ranking of pairs, which centring them
    does not (at 64 px the raw cosines ranked neighbours better: 0.438 vs 0.422 mAP@1000, RESULTS.md).
    """
    n = features.shape[0]
    if n < 2:
        raise ConfigError("the unsupervised objective needs batches of at least 2 items (pairs)")
    if not shift < 1:
        raise ConfigError(f"the cosine shift must be below 1, got {shift}")
    f = F.normalize(features.detach().float(), dim=1)
    b = F.normalize(codes.float(), dim=1)
    i, j = torch.triu_indices(n, n, offset=1, device=f.device)
    target = ((f @ f.T)[i, j] - shift) / (1 - shift)
    achieved = (b @ b.T)[i, j]
    return (target - achieved).pow(2).mean()


def bit_balance_penalty(codes: torch.Tensor) -> torch.Tensor:
    """mean over bits of (mean of the bit over the batch)^2: 0 when every bit is +1 for half the items,
    1 when every bit is constant. A constant bit is a wasted one; without this term, a ReLU layer before
    the hash layer left some bits constant in 7 of 10 CIFAR-10 cells (RESULTS.md)."""
    return codes.float().mean(0).pow(2).mean()


def view_consistency_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """mean over the B rows of 1 - cos(first_i, second_i) for the codes of two views (B, bits) of B images: 0
    when each image's two codes agree, 2 when they are opposite. Alone it is met by giving every image the same
    code; the other terms keep codes apart."""
    if second.shape != first.shape or first.shape[0] < 1:
        raise ConfigError(f"view consistency needs two views of the same items, got {tuple(first.shape)} and "
                          f"{tuple(second.shape)}")
    return (1 - F.cosine_similarity(first.float(), second.float(), dim=1)).mean()


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.1,
                 spared: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2B rows of two views (B, bits) each: row i of `first` has row i of `second`
    as its positive and the other 2B - 2 rows as negatives; similarity = cosine / temperature; mean
    cross-entropy over the 2B rows. On codes from `greedy_sign` the gradient reaches H straight through.

    spared: (B, B) bool, True where items i and j are not each other's negatives (`neighbour_pairs`): both
    views of j leave the denominators of both views of i. The diagonal is ignored (an item's positive stays)."""
    n = first.shape[0]
    if n < 2 or second.shape != first.shape:
        raise ConfigError(f"NT-Xent needs two views of the same >= 2 items, got {tuple(first.shape)} and "
                          f"{tuple(second.shape)}")
    if not temperature > 0:
        raise ConfigError(f"the NT-Xent temperature must be > 0, got {temperature}")
    z = F.normalize(torch.cat([first, second]).float(), dim=1)
    similarity = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # a row is not its own negative
    if spared is not None:
        if spared.shape != (n, n):
            raise ConfigError(f"NT-Xent's spared pairs must be ({n}, {n}), got {tuple(spared.shape)}")
        spared = spared.to(device=z.device, dtype=torch.bool) & ~torch.eye(n, dtype=torch.bool, device=z.device)
        similarity = similarity.masked_fill(spared.repeat(2, 2), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, positive)


def neighbour_pairs(features: torch.Tensor, share: float) -> torch.Tensor:
    """(B, B) bool: True where j is among the round(share * (B - 1)) items of the batch whose `features` have
    the highest cosine with i's, or i among j's (symmetric; the diagonal False). What `nt_xent_loss` spares:
    look-alikes, mostly of one class, that NT-Xent would otherwise push apart as if they were unrelated."""
    n = features.shape[0]
    if not 0 <= share < 1:
        raise ConfigError(f"the spared share must be in [0, 1), got {share}")
    pairs = torch.zeros(n, n, dtype=torch.bool, device=features.device)
    k = round(share * (n - 1))
    if k < 1:
        return pairs
    f = F.normalize(features.detach().float(), dim=1)
    cosine = (f @ f.T).fill_diagonal_(-2.0)  # below any cosine: an item is never its own neighbour
    pairs.scatter_(1, cosine.topk(k, dim=1).indices, True)
    return pairs | pairs.T


class LossTerms(NamedTuple):
    total: torch.Tensor  # main + alpha * penalty (+ balance * bit balance): what is minimised
    main: torch.Tensor  # the objective's own term (CE, BCE or cosine preservation)
    penalty: torch.Tensor  # quantization penalty before weighting


@dataclass
class Objective:
    """One of `OBJECTIVES` plus the quantization penalty `alpha * mean(|H - sgn(H)|^p)` and, with
    `balance`, the bit balance penalty."""

    kind: str = "supervised"
    alpha: float = 0.1
    p: float = 3.0
    shift: float = 0.0  # unsupervised only: the feature cosine that the target maps to 0
    balance: float = 0.0  # weight of `bit_balance_penalty`
    temperature: float = 0.1  # views only: NT-Xent's temperature
    similarity: float = 0.0  # views only: weight of `cosine_preservation_loss` on the un-edited images
    consistency: float = 0.0  # views only: weight of `view_consistency_loss`
    contrast: float = 1.0  # views only: weight of `nt_xent_loss`

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.kind!r}; known: {', '.join(OBJECTIVES)}")
        if not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        if not self.balance >= 0:
            raise ConfigError(f"balance must be >= 0, got {self.balance}")
        for name, weight in (("similarity", self.similarity), ("consistency", self.consistency),
                             ("contrast", self.contrast)):
            if not (weight >= 0 and math.isfinite(weight)):
                raise ConfigError(f"the {name} weight must be a number >= 0, got {weight}")

    def __call__(self, h: torch.Tensor, b: torch.Tensor, *, features: torch.Tensor | None = None,
                 classifier: torch.nn.Module | None = None, labels: torch.Tensor | None = None,
                 spared: torch.Tensor | None = None) -> LossTerms:
        """h: hash-layer outputs (N, bits); b: `greedy_sign(h)`; features: backbone outputs (unsupervised);
        classifier + labels: supervised objectives. views: h and b hold two views of B items, the first
        view's B rows, then the second's; with `similarity`, then the B un-edited items' rows, whose codes
        keep the cosines of `features` (B, D) and alone count for the bit balance; `spared`: (B, B) pairs of
        items that are not NT-Xent negatives (`neighbour_pairs`)."""
        balanced = b
        if self.kind == "views":
            pairs = b
            if self.similarity:
                if features is None or 3 * len(features) != len(b):
                    raise ConfigError("the views objective's similarity term needs the features of the B un-edited "
                                      "items and 3B rows (two views, then the un-edited items)")
                pairs, balanced = b[:2 * len(features)], b[2 * len(features):]
            if len(pairs) % 2:
                raise ConfigError("the views objective needs two views of each item (an even number of rows)")
            first, second = pairs[:len(pairs) // 2], pairs[len(pairs) // 2:]
            main = (self.contrast * nt_xent_loss(first, second, self.temperature, spared) if self.contrast
                    else b.new_zeros(()))
            if self.consistency:
                main = main + self.consistency * view_consistency_loss(first, second)
            if self.similarity:
                main = main + self.similarity * cosine_preservation_loss(features, balanced, self.shift)
        elif self.kind == "unsupervised":
            if features is None:
                raise ConfigError("the unsupervised objective needs the backbone features")
            main = cosine_preservation_loss(features, b, self.shift)
        else:
            if classifier is None or labels is None:
                raise ConfigError(f"the {self.kind} objective needs a classifier and labels")
            logits = classifier(b.to(classifier.weight.dtype))
            main = classification_loss(logits, labels) if self.kind == "supervised" else multilabel_loss(logits, labels)
        penalty = quantization_penalty(h.float(), self.p)
        total = main + self.alpha * penalty
        if self.balance:
            total = total + self.balance * bit_balance_penalty(balanced)
        return LossTerms(total, main, penalty)
