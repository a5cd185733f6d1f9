"""Database codes from edited views: `encode --views V` stores, for each image, the sign of
0.5 x tanh(H(image)) + 0.5 x the mean of tanh(H(view)) over V edited views of it (`ghindex.augment`'s edits,
the ones training draws), instead of the sign of H(image) alone.

Why: an edited copy of an image (a query) lands among the image's edited views, not on the un-edited image,
so a code nearer the middle of those views is nearer its copies. Measured with the default unsupervised model
(benchmarks/RESULTS.md, "Copies", runs 10 and 11): image queries found 0.908 of the copy set's edited copies
against un-edited codes, 0.938 / 0.940 / 0.946 with V = 4 / 8 / 16 (the mix edit 0.84 -> 0.89-0.91); with
the re-ranking weighing the stored bit confidences (`code_confidences`) 0.962 against un-edited codes, 0.978 /
0.980 with V = 4 / 8; cifar10-II mAP@1000 0.565 with V = 8 against 0.562 (semantic neighbours rank as well). The price: 1 + V backbone forwards per
encoded image. Queries (`query`, `serve`) stay one forward.

The views of an image are drawn from a generator seeded by its resized pixels (`view_key`), so an image gets
the same code whatever its position, run, shard or store (`add`, `--resume`, a re-encode). The encode loop
gets them through `ghindex.batching.view_stack` and turns its hash outputs into codes with `combine_outputs`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .augment import edited_views
from .errors import ConfigError
from .images import resized

UNEDITED_WEIGHT = 0.5  # the un-edited image's share; the views' mean has the rest (chosen on validation)
STREAM = "encode"  # `ghindex.augment.view_rng`'s stream: views apart from training's and the copy measures'
MAX_VIEWS = 64


def check_views(views) -> int:
    """`views` as an int in [0, MAX_VIEWS] (0: codes of the un-edited images alone)."""
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or not 0 <= views <= MAX_VIEWS:
        raise ConfigError(f"views must be a whole number from 0 to {MAX_VIEWS}, got {views!r}")
    return int(views)


def view_key(pixels: np.ndarray) -> int:
    """A 64-bit number from an image's pixels: the item number its views are drawn with."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).digest(), "little")


def view_images(img, views: int, image_size: int) -> list:
    """RGB PIL image -> [the image resized as the encoder resizes it, then its `views` edited views] (edited at
    that size, as training edits them; `batching.view_stack` turns them into the encoder's input)."""
    base = resized(img, image_size)
    return [base] + edited_views(base, views, 0, view_key(np.asarray(base, dtype=np.uint8)), STREAM)


def code_confidences(values: torch.Tensor, views: int) -> torch.Tensor:
    """`combine_outputs`' values -> how sure each bit of the codes they give is, in [0, 1]: |tanh(H)| of the
    un-edited image (views = 0), or the magnitude of the views' combination (already of tanh values), so a bit
    the image's edited views disagree on is unsure. Stored with the codes (`hashing.pack_confidences`)."""
    values = values.float()
    return (torch.tanh(values) if views == 0 else values).abs()


def combine_outputs(h: torch.Tensor, views: int) -> torch.Tensor:
    """Hash outputs of (N x (1 + views), bits) rows, each image's un-edited row first, -> (N, bits) values
    whose signs are the images' codes."""
    if views == 0:
        return h
    squashed = torch.tanh(h.float()).reshape(-1, 1 + views, h.shape[1])
    return UNEDITED_WEIGHT * squashed[:, 0] + (1 - UNEDITED_WEIGHT) * squashed[:, 1:].mean(1)
