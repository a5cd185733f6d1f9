"""Schemathesis hooks for `ghindex serve`: uploads in the multipart field `image` are real images.

The schema can say that a part of `image` is an image file (`format: binary`, `encoding: image:
contentType: image/*`), not that its bytes decode; schemathesis would send random bytes or its
1-pixel samples there, which the server rightly answers 400 ("not an image"). Here every binary
string of a schema-valid request is a small PNG or JPEG of random size, mode and pixels (the only
binary strings in the schema are images); schema-violating requests still get random bytes.

(The registry of media types, `schemathesis.openapi.media_type`, would fit better, but with it
schemathesis 4.32 sends one file as a text part without a filename for an array of files.)

Loaded by tests/test_api_contract.py through the `hooks` setting; by hand:
    SCHEMATHESIS_HOOKS=tests/schemathesis_hooks.py st run http://127.0.0.1:8000/openapi.json --checks all
"""
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

MODES = {"PNG": ("RGB", "RGBA", "L", "P"), "JPEG": ("RGB", "L", "CMYK")}


@st.composite
def images(draw, fmt: str) -> bytes:
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(MODES[fmt]))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA")
    img = img.convert("RGB").quantize(16) if mode == "P" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


schemathesis.openapi.format("binary", st.one_of(images("PNG"), images("JPEG")))
