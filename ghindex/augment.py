"""Edit-like views of an image: what a copy of it looks like after a re-upload, a crop or a re-encode.

`edit_view(img, rng)` applies 1-3 distinct edits drawn with weights (crop 3, colour 3, JPEG 3, rotate 2,
flip 1, blur 1, overlay 1, greyscale 0.5), in a random order except JPEG, which always goes last (a
re-encode is the last thing a copy goes through). `edited_views(img, count, seed, item)` draws `count`
of them from a generator seeded with (seed, item, stream), so a training run, its copy radius and its
held-out copy recall are reproducible view for view, whatever the order the items are loaded in.

Why edit-like views, not SimCLR's chain of everything at once: measured on CIFAR-10 at 128 px (issue 24's
research notes), the chain left a view as far from its image as a different image is (centred cosine
0.40 on average), so codes learnt a near-semantic invariance instead of copy identity; 1-3 edits per view
gave +0.12 copy recall@1.

Why PIL, not torchvision.transforms.v2 or a library such as augly or albumentations: every edit here is
a single PIL call, driven by one `random.Random` (v2 draws from torch's global generator, which a
DataLoader worker would have to re-seed per item); PIL's GaussianBlur is ~10x faster than v2's on a PIL
image (0.7 vs 6.9 ms at 128 px); a JPEG round trip needs PIL's codec anyway; augly's overlay and JPEG would
add a heavy dependency tree and albumentations works on numpy arrays, duplicating what PIL does here.

Sizes scale with the image: crops and overlays are fractions of its sides, so the same edits suit any
input size (training edits the image at the model's input size).
"""
from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

_WORDS = ("sample", "(c) 2024", "photo", "ghindex", "SALE", "@user", "news", "copy", "logo", "#tag", "HD")

# how often each edit is drawn (relative weights) for a view
EDIT_WEIGHTS = {"crop": 3.0, "flip": 1.0, "rotate": 2.0, "color": 3.0, "grey": 0.5, "blur": 1.0, "overlay": 1.0,
                "jpeg": 3.0}
EDITS_PER_VIEW = (1, 2, 2, 3)  # drawn uniformly: one edit a quarter of the time, three a quarter


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """A real JPEG round trip at `quality`."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def overlay(img: Image.Image, rng: random.Random) -> Image.Image:
    """A text caption (60%) or a filled logo shape (ellipse or rectangle) at a random place, size, colour
    and opacity (PIL's default font)."""
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    colour = tuple(rng.randrange(256) for _ in range(3)) + (rng.randrange(140, 256),)
    w, h = base.size
    side = min(w, h)
    if rng.random() < 0.6:
        size = max(4, round(side * rng.uniform(0.08, 0.22)))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            font = ImageFont.load_default()
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 3)))
        draw.text((rng.randrange(0, max(1, w // 2)), rng.randrange(0, max(1, h - size))), text, fill=colour, font=font)
    else:
        s = max(2, round(side * rng.uniform(0.09, 0.25)))
        x, y = rng.randrange(0, max(1, w - s)), rng.randrange(0, max(1, h - s))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + s, y + s), fill=colour)
    return Image.alpha_composite(base, layer).convert("RGB")


def inscribed_size(w: int, h: int, degrees: float) -> tuple[int, int]:
    """The largest axis-aligned rectangle inside a w x h rectangle rotated by `degrees` (as AugLy's rotate
    crops): a rotated copy then has no black corners."""
    a = math.radians(abs(degrees)) % math.pi
    if a > math.pi / 2:
        a = math.pi - a
    sin, cos = math.sin(a), math.cos(a)
    long, short = max(w, h), min(w, h)
    if short <= 2 * sin * cos * long or abs(sin - cos) < 1e-10:
        # half constrained: two corners of the rectangle touch the longer side
        x = 0.5 * short
        wr, hr = (x / sin, x / cos) if w >= h else (x / cos, x / sin)
    else:
        cos2 = cos * cos - sin * sin
        wr, hr = (w * cos - h * sin) / cos2, (h * cos - w * sin) / cos2
    return max(1, int(wr)), max(1, int(hr))


def _crop(img, rng):
    s = rng.uniform(0.55, 0.95)
    w, h = img.size
    cw, ch = min(w, max(1, round(w * s * rng.uniform(0.9, 1.1)))), max(1, round(h * s))
    left, top = rng.randrange(0, w - cw + 1), rng.randrange(0, h - ch + 1)
    return img.crop((left, top, left + cw, top + ch))


def _rotate(img, rng):
    degrees = rng.uniform(-12, 12)
    w, h = img.size
    rotated = img.rotate(degrees, resample=Image.BILINEAR)
    cw, ch = inscribed_size(w, h, degrees)
    left, top = (w - cw) // 2, (h - ch) // 2
    return rotated.crop((left, top, left + cw, top + ch))


def _colour(img, rng):
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))


EDITS = {
    "crop": _crop,
    "flip": lambda img, rng: img.transpose(Image.FLIP_LEFT_RIGHT),
    "rotate": _rotate,
    "color": _colour,
    "grey": lambda img, rng: img.convert("L").convert("RGB"),
    "blur": lambda img, rng: img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5))),
    "overlay": overlay,
    "jpeg": lambda img, rng: jpeg(img, rng.randrange(10, 90)),
}


def edit_view(img: Image.Image, rng: random.Random) -> Image.Image:
    """One edited view of an RGB image: 1-3 distinct edits (weighted draw), JPEG last."""
    names = list(EDIT_WEIGHTS)
    count = rng.choice(EDITS_PER_VIEW)
    chosen: set[str] = set()
    while len(chosen) < count:
        chosen.add(rng.choices(names, weights=[EDIT_WEIGHTS[n] for n in names])[0])
    order = [n for n in names if n in chosen and n != "jpeg"]
    rng.shuffle(order)
    out = img.convert("RGB")
    for name in order + (["jpeg"] if "jpeg" in chosen else []):
        out = EDITS[name](out, rng)
    return out


def view_rng(seed: int, item: int, stream: str = "train") -> random.Random:
    """The generator of item `item`'s views in a run with `seed`; `stream` keeps the training views apart
    from the views that measure copies (held-out recall, copy radius)."""
    return random.Random(f"ghindex-views:{stream}:{int(seed)}:{int(item)}")  # str seeds hash stably (SHA-512)


def edited_views(img: Image.Image, count: int, seed: int, item: int, stream: str = "train") -> list[Image.Image]:
    """`count` edited views of `img`, the same ones for the same (seed, item, stream)."""
    rng = view_rng(seed, item, stream)
    return [edit_view(img, rng) for _ in range(count)]
