"""The encode loop's input: batches of uint8 images decoded and resized in DataLoader workers, or of
feature vectors, and their normalisation on the device.

Images travel between processes as uint8 and are normalised per batch (`normalize_batch`) with the
same operations as `images.image_to_tensor`, so codes equal `Encoder.encode`'s.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .data import ImageDataset
from .database_views import view_images
from .images import normalize, resized


def resized_uint8(img, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (S, S, 3) uint8 tensor (pixel order as decoded), resized exactly as
    `images.image_to_tensor` does.

    Workers hand over uint8 (4x less to move between processes than float32); the float conversion
    and normalisation happen on the batch in the main process (`normalize_batch`) with the same
    elementwise operations, so codes are identical to `Encoder.encode`'s.
    """
    return torch.from_numpy(np.array(resized(img, image_size), dtype=np.uint8))


def view_stack(img, views: int, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (1 + views, S, S, 3) uint8: the image and its edited views
    (`ghindex.database_views.view_images`), each resized as `resized_uint8` resizes."""
    return torch.stack([resized_uint8(v, image_size) for v in view_images(img, views, image_size)])


def normalize_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float32, the same operations as `images.image_to_tensor`."""
    return normalize(x.float().div_(255.0), mean, std)


def normalize_table(mean, std) -> np.ndarray:
    """(3, 256) float32: every uint8 value of each channel normalised by `normalize_batch` itself, so a
    lookup in it gives the same float32 bits."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256).contiguous()
    return np.ascontiguousarray(normalize_batch(values, mean, std).reshape(3, 256).numpy())


class BatchNormalizer:
    """uint8 image batches (`collate_uint8`'s NCHW view of NHWC pixels) -> the backbone's float input on
    the CPU, bit-identical to `normalize_batch`, as NCHW (``channels_last=False``: ONNX Runtime) or a
    channels-last tensor (PyTorch's convolutions).

    One pass through a lookup table (`ghindex.pixel_kernels`) into a buffer kept from batch to batch:
    0.04-0.07 ms per image at 224 px on 2 threads, against 0.55 ms for the elementwise route, in the
    main process while the backbone waits. The returned tensor is that buffer: use it before the next
    call.
    """

    def __init__(self, mean, std, channels_last: bool):
        self.table = normalize_table(mean, std)
        self.channels_last = channels_last
        self._out: np.ndarray | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .pixel_kernels import normalize_into  # deferred: numba compiles or loads its kernels

        pixels = x.permute(0, 2, 3, 1)
        if not pixels.is_contiguous():  # after dropping a bad image, say: one copy of the uint8 pixels
            pixels = pixels.contiguous()
        n, h, w, c = pixels.shape
        shape = (n, h, w, c) if self.channels_last else (n, c, h, w)
        if self._out is None or self._out.shape != shape:
            self._out = np.empty(shape, np.float32)
        out = torch.from_numpy(normalize_into(pixels.numpy(), self.table, self._out))
        return out.permute(0, 3, 1, 2) if self.channels_last else out


def collate_uint8(items, item_shape: tuple[int, ...] | None = None):
    """Collate `(i, (S, S, 3) uint8 image, error)` items into (indices, (N, 3, S, S) uint8, errors); items
    of K images each, (K, S, S, 3) (`view_stack`), give (N x K, 3, S, S), each item's
    rows together.

    Images are stacked as they are laid out (N, S, S, 3) and returned as an NCHW view of that memory,
    i.e. channels-last, which is what the model runs on. (Stacking (3, S, S) views of HWC images
    instead takes torch's slow strided uint8 copy: ~100x slower.) A bad image's placeholder
    becomes zeros (of `item_shape` when every item of the batch is bad).
    """
    idx, tensors, errors = zip(*items)
    shape = next((t.shape for t, e in zip(tensors, errors) if not e), None)
    if shape is None:  # every image of the batch is bad: shapes do not matter
        s = tensors[0].shape[-1]
        shape = item_shape or (s, s, 3)
    stacked = torch.stack([t if not e else torch.zeros(shape, dtype=torch.uint8) for t, e in zip(tensors, errors)])
    stacked = stacked.reshape(-1, *stacked.shape[-3:])  # K images per item: their rows one after another
    return torch.as_tensor(idx, dtype=torch.long), stacked.permute(0, 3, 1, 2), list(errors)


def batches(src, start: int, batch_size: int, workers: int | None, image_size: int, pin: bool, views: int = 0,
            decode_size: int | None = None):
    """Yield (indices, inputs, errors) of the data source `src` from input `start` on, in order:
    uint8 images (`collate_uint8`, decoded with `decode_size`: the model's `EncoderConfig.decode_size`) or
    float features. With `views`, each image comes with that many edited views (`view_stack`): 1 + views
    rows per index, and batch_size // (1 + views) images per batch (at least one), so a forward pass holds
    about batch_size rows either way."""
    n = len(src)
    if src.kind == "features":
        for s in range(start, n, batch_size):
            e = min(s + batch_size, n)
            yield np.arange(s, e), torch.from_numpy(np.ascontiguousarray(src.features[s:e])), [""] * (e - s)
        return
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    collate = collate_uint8
    if views:
        transform = functools.partial(view_stack, views=views, image_size=image_size)
        collate = functools.partial(collate_uint8, item_shape=(1 + views, image_size, image_size, 3))
        batch_size = max(1, batch_size // (1 + views))
    else:
        transform = functools.partial(resized_uint8, image_size=image_size)
    dataset = ImageDataset(src, transform, image_shape=(3, image_size, image_size), decode_size=decode_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(start, n),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )
    for idx, x, errors in loader:
        yield idx.numpy(), x, errors
