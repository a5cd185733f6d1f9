"""Large JPEGs are decoded at a reduced scale for the resize that follows (`images.load_image`'s `size`),
and every path that turns a file into a model input decodes it the same way.

A smallcnn at 16 px keeps it quick: a JPEG with both sides at least 2 x DECODE_MARGIN x 16 = 64 px is
decoded smaller (at most 1/8), so 200 x 150 photos exercise the rule as 4,032 x 3,024 ones do at 224 px.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ghindex.batching import batches
from ghindex.data import ImageDataset, load_data
from ghindex.encoder import Encoder, EncoderConfig
from ghindex.images import DECODE_MARGIN, image_to_tensor, load_image, resized
from ghindex.serve.parsing import _decode_upload
from ghindex.store import CodeStore
from ghindex.train_inputs import _Preprocess
from ghindex.train_views import ViewDataset
from ghindex_cli.main import cli

SIZE = 16


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with grain: a photo's low frequencies and its sensor noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def save(img: Image.Image, path, fmt: str = "JPEG"):
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("w, h, size, decoded", [
    (1000, 900, 224, (500, 450)),     # both sides >= 2 x 448: half scale
    (4032, 3024, 224, (1008, 756)),   # 6x the margin: 1/4 (libjpeg scales by 1/2, 1/4 or 1/8 only)
    (4000, 3000, 64, (500, 375)),     # far larger still: 1/8 at most
    (895, 2000, 224, (895, 2000)),    # one side under 2 x 448: in full
])
def test_a_jpeg_decodes_at_the_smallest_scale_that_keeps_the_margin(tmp_path, w, h, size, decoded):
    path = save(photo(w, h), tmp_path / "p.jpg")
    img = load_image(path, size)
    assert img.size == decoded and img.mode == "RGB"
    assert min(img.size) >= DECODE_MARGIN * size or img.size == (w, h)
    assert load_image(path).size == (w, h)  # without a size: the full image


def test_small_jpegs_and_other_formats_decode_exactly_as_without_a_size(tmp_path):
    small = save(photo(800, 800), tmp_path / "small.jpg")  # under 2 x 2 x 224 on both sides
    png = save(photo(1200, 1000), tmp_path / "big.png", "PNG")  # no DCT scaling outside JPEG
    for path in (small, png):
        a, b = load_image(path, 224), load_image(path)
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_the_reduced_decode_resizes_to_nearly_the_pixels_of_the_full_one(tmp_path):
    path = save(photo(1600, 1200, seed=3), tmp_path / "p.jpg")
    fast = np.asarray(resized(load_image(path, 224), 224), dtype=np.float64)
    full = np.asarray(resized(load_image(path), 224), dtype=np.float64)
    diff = np.abs(fast - full)
    assert 0 < diff.mean() < 1.0 and diff.max() <= 32  # not the same decode, but the same picture


def test_a_multi_picture_jpeg_decodes_its_first_picture_at_the_reduced_scale(tmp_path):
    first, second = photo(400, 300, seed=1), photo(400, 300, seed=2)
    path = tmp_path / "camera.mpo"
    first.save(path, "MPO", save_all=True, append_images=[second], quality=90)
    img = load_image(path, SIZE)
    assert img.size == (50, 38)  # min(400, 300) // (2 x 16) = 9: an eighth, the most libjpeg scales
    reference = np.asarray(resized(load_image(save(first, tmp_path / "first.jpg"), SIZE), SIZE), dtype=float)
    assert np.abs(np.asarray(resized(img, SIZE), dtype=float) - reference).mean() < 3


def test_a_truncated_large_jpeg_is_still_one_clear_error(tmp_path):
    data = (tmp_path / "p.jpg")
    save(photo(1000, 800), data)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    from ghindex.errors import ImageError

    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(cut, 224)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(3):
            save(photo(200 + 40 * i, 150 + 30 * i, seed=10 * i + ord(c)), root / c / f"{i}.jpg")
    return root


def make_model(path, reduced_decode: bool):
    torch.manual_seed(0)
    Encoder("smallcnn", 32, image_size=SIZE, reduced_decode=reduced_decode).save(path)
    return path


def test_the_model_file_says_how_it_decodes_and_older_files_decode_in_full(tmp_path):
    new = Encoder.load(make_model(tmp_path / "new.ghm", True)).config
    assert new.reduced_decode and new.decode_size == SIZE and new.format_version == 4  # older readers refuse it
    old = json.loads(new.to_json())
    del old["reduced_decode"]
    old["format_version"] = 1
    before = EncoderConfig.from_json(json.dumps(old))  # a file saved before the field
    assert not before.reduced_decode and before.decode_size is None
    kept = Encoder.load(make_model(tmp_path / "full.ghm", False)).config
    assert not kept.reduced_decode and kept.format_version == 1
    assert Encoder("identity", 8, feature_dim=4).config.reduced_decode is False  # features decode nothing


@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "model-decodes-in-full"])
def test_every_path_to_the_model_decodes_a_large_jpeg_as_its_model_says(photos, runner, tmp_path, reduced):
    model = make_model(tmp_path / "cnn.ghm", reduced)
    source = load_data(str(photos))
    encoder = Encoder.load(model).eval()
    size = SIZE if reduced else None
    expected = np.stack([np.asarray(resized(load_image(p, size), SIZE)) for p in source.paths])
    other = np.stack([np.asarray(resized(load_image(p, None if reduced else SIZE), SIZE)) for p in source.paths])
    assert not np.array_equal(expected, other)  # the two decodes differ on these photos: the checks below can fail

    # the encode loop's data loader (encode, add) and train's feature cache (with and without views)
    _, x, errors = next(batches(source, 0, 64, 0, SIZE, pin=False, decode_size=encoder.config.decode_size))
    assert not any(errors)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), expected)
    c = encoder.config
    preprocess = _Preprocess(c.image_size, c.mean, c.std)
    views = ViewDataset(source, 1, 0, preprocess, "train", True, c.decode_size)
    features = ImageDataset(source, preprocess, (3, SIZE, SIZE), c.decode_size)
    for i, pixels in enumerate(expected):
        want = image_to_tensor(Image.fromarray(pixels), SIZE, c.mean, c.std)
        assert torch.equal(views[i][1][0], want) and torch.equal(features[i][1], want)

    # Encoder.preprocess (query by image file, Encoder.encode of paths) and a serve upload
    for path, pixels in zip(source.paths, expected):
        want = image_to_tensor(Image.fromarray(pixels), SIZE, c.mean, c.std)
        assert torch.equal(encoder.preprocess(path), want)
        with open(path, "rb") as f:
            upload = _decode_upload(f.read(), "x.jpg", c.decode_size)
        assert np.array_equal(np.asarray(resized(upload, SIZE)), pixels)

    # and the whole command's codes are Encoder.encode's
    out = tmp_path / "codes.h5"
    result = runner.invoke(cli, ["-q", "encode", "--model", str(model), str(photos), "--out", str(out),
                                 "--device", "cpu", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    with CodeStore.open(out) as store:
        stored = store.read().codes
    assert np.array_equal(stored, encoder.encode(list(source.paths)))
