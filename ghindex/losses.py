"""GreedyHash training objectives: small pieces that each take tensors and return a scalar loss.

- `classification_loss`: cross-entropy of a bias-free linear classifier applied to the codes B.
- `multilabel_loss`: binary cross-entropy of the same classifier against multi-hot targets.
- `cosine_preservation_loss`: mean over the pairs of a batch of (cos(f_i, f_j) - cos(b_i, b_j))^2,
  between (frozen) backbone features f and codes b.
- `quantization_penalty` (from `ghindex.hashing`): mean(|H - sgn(H)|^p), weighted by `alpha`.

`Objective` combines one main term with the penalty; `objective(...)` returns a `LossTerms` so the
training loop can log each part. Codes B come from `greedy_sign(H)`, so every gradient reaching B
goes straight through to H and the projection that produced it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .hashing import quantization_penalty

OBJECTIVES = ("supervised", "multi-label", "unsupervised")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for single-label class indices (N,) against logits (N, C)."""
    return F.cross_entropy(logits.float(), labels.long())


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (mean over items and classes) for multi-hot targets (N, C) of 0/1."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def cosine_preservation_loss(features: torch.Tensor, codes: torch.Tensor,
                             center: torch.Tensor | None = None) -> torch.Tensor:
    """mean over pairs i < j of (cos(f_i, f_j) - cos(b_i, b_j))^2.

    `features` are the similarity target and get no gradient. `center`, when given, is subtracted from
    the features first: post-ReLU CNN features are all non-negative, so their raw cosines are all
    positive and high, which codes in {-1, +1} can only imitate with unbalanced, correlated bits;
    centred features have cosines spread over [-1, 1] like codes do.
    """
    n = features.shape[0]
    if n < 2:
        raise ConfigError("the unsupervised objective needs batches of at least 2 items (pairs)")
    f = features.detach().float()
    if center is not None:
        f = f - center.to(f)
    f = F.normalize(f, dim=1)
    b = F.normalize(codes.float(), dim=1)
    i, j = torch.triu_indices(n, n, offset=1, device=f.device)
    target = (f @ f.T)[i, j]
    achieved = (b @ b.T)[i, j]
    return (target - achieved).pow(2).mean()


class LossTerms(NamedTuple):
    total: torch.Tensor  # main + alpha * penalty: what is minimised
    main: torch.Tensor  # the objective's own term (CE, BCE or cosine preservation)
    penalty: torch.Tensor  # quantization penalty before weighting


@dataclass
class Objective:
    """One of `OBJECTIVES` plus the quantization penalty `alpha * mean(|H - sgn(H)|^p)`."""

    kind: str = "supervised"
    alpha: float = 0.1
    p: float = 3.0
    center: torch.Tensor | None = None  # unsupervised only: feature mean subtracted from the target

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.kind!r}; known: {', '.join(OBJECTIVES)}")
        if not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")

    def __call__(self, h: torch.Tensor, b: torch.Tensor, *, features: torch.Tensor | None = None,
                 classifier: torch.nn.Module | None = None, labels: torch.Tensor | None = None) -> LossTerms:
        """h: hash-layer outputs (N, bits); b: `greedy_sign(h)`; features: backbone outputs (unsupervised);
        classifier + labels: supervised objectives."""
        if self.kind == "unsupervised":
            if features is None:
                raise ConfigError("the unsupervised objective needs the backbone features")
            main = cosine_preservation_loss(features, b, self.center)
        else:
            if classifier is None or labels is None:
                raise ConfigError(f"the {self.kind} objective needs a classifier and labels")
            logits = classifier(b.to(classifier.weight.dtype))
            main = classification_loss(logits, labels) if self.kind == "supervised" else multilabel_loss(logits, labels)
        penalty = quantization_penalty(h.float(), self.p)
        return LossTerms(main + self.alpha * penalty, main, penalty)
