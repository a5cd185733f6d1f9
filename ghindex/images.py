"""Decoding images safely and turning them into normalised tensors, the same way everywhere."""
from __future__ import annotations

import os
import warnings
from typing import IO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

# Decompression-bomb guard: refuse images whose header claims more pixels than this (about 8k x 8k).
MAX_PIXELS = 64_000_000

# A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) where both sides stay at least this
# many times the size its caller resizes it to: the resize then still averages 2 x 2 or more decoded pixels into
# each pixel it makes, as from the full image (0.14-0.16 of 255 on average, at most 2, after the resize to 224 px;
# benchmarks/bench_decode.py), while a 12-megapixel photo decodes 3.1x faster. Smaller JPEGs decode as before.
DECODE_MARGIN = 2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/32-bit greyscale: scale to 8 bits instead of letting PIL clip everything to white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA", "LA") :
        img = img.convert("RGBA")
    return img.convert("RGB")


def _size(path) -> int | None:
    try:
        return os.path.getsize(path)
    except (OSError, TypeError, ValueError):
        return None


def load_image(path: str | os.PathLike | Image.Image | IO[bytes], size: int | None = None) -> Image.Image:
    """Open an image file (or take a PIL image, or read a binary file object such as an upload held in
    `io.BytesIO`, named in messages by its `name` attribute) and return it as 8-bit RGB.

    `size`: the side the caller resizes the image to next (the model's input size, a thumbnail's). A JPEG
    whose sides are both at least 2 x DECODE_MARGIN x `size` is then decoded at a reduced scale that keeps
    both at least DECODE_MARGIN x `size` (its aspect ratio kept): a few times less work for a photo, about
    the same pixels once resized. Without `size`, and for every other image, the full image.

    Raises ImageError naming the file for anything that is not a decodable, reasonably sized image:
    missing or unreadable files, zero bytes, non-image content, truncation, decompression bombs.
    Animated images give their first frame; greyscale, palette, RGBA, CMYK and 16-bit become RGB.
    """
    if isinstance(path, Image.Image):
        return _to_rgb(path)
    name = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(getattr(path, "name", "<stream>"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{name}: image too large ({w}x{h} pixels > {MAX_PIXELS:,}), refusing to decode")
                img.seek(0)
                if size:  # after seek: a multi-picture JPEG's seek would undo it
                    img.draft(None, (DECODE_MARGIN * size, DECODE_MARGIN * size))
                img.load()
                return _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except UnidentifiedImageError:
        if _size(path) == 0:
            raise ImageError(f"{name}: empty file (0 bytes), not an image") from None
        raise ImageError(f"{name}: not an image file (content of an unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refusing a possible decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{name}: cannot decode image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def resized(img: Image.Image, image_size: int) -> Image.Image:
    """The image at the model's input size, resized bilinearly (itself when already that size): the one resize
    that encoding, training's edited views and the database views all go through."""
    return img if img.size == (image_size, image_size) else img.resize((image_size, image_size), Image.BILINEAR)


def image_to_tensor(img: Image.Image, image_size: int, mean, std) -> torch.Tensor:
    """RGB PIL image -> (3, image_size, image_size) float tensor, resized bilinearly and normalised."""
    x = torch.from_numpy(np.array(resized(img, image_size), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalise (..., 3, H, W) tensors in [0, 1] with per-channel mean and std."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s
