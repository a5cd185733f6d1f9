"""`encode --views`: database codes from an image and its edited views (`ghindex.database_views`)."""
import os

import numpy as np
import pytest
import torch

import ghindex
from ghindex.batching import normalize_batch, view_stack
from ghindex.data import load_data
from ghindex.database_views import check_views, combine_outputs
from ghindex.encode import encode
from ghindex.errors import ConfigError, StoreError
from ghindex.hashing import pack_signs
from ghindex.images import load_image
from ghindex.index import build
from ghindex.info import info
from ghindex.lifecycle import add
from ghindex.store import CodeStore
from ghindex_cli.main import cli

from test_encode import BAD, make_images, model  # noqa: F401 - model: test_encode's smallcnn fixture

RUN = dict(device="cpu", runtime="torch", workers=0, progress=False)  # torch: codes exactly as computed below


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "imgs", per_class=5)


def expected_codes(model_path, paths, views):
    """Each image's code computed directly: its view stack through the model, combined, packed."""
    enc = ghindex.Encoder.load(model_path).eval()
    c = enc.config
    out = []
    with torch.inference_mode():
        for p in paths:
            stack = view_stack(load_image(p), views, c.image_size)  # (1 + views, S, S, 3) uint8
            h = enc.hash(normalize_batch(stack.permute(0, 3, 1, 2).contiguous(), c.mean, c.std))
            out.append(pack_signs(combine_outputs(h.float(), views)))
    return np.concatenate(out)


def codes_by_path(store):
    with CodeStore.open(store) as s:
        return dict(zip(s.paths(), s.codes()))


def test_codes_are_the_combined_outputs_of_each_image_and_its_views(tmp_path, images, model):
    out = tmp_path / "codes.h5"
    summary = encode(model, images, out, views=2, batch_size=7, **RUN)  # 7 // 3 = 2 images a batch, bad ones among them
    good = [p for p in load_data(images).paths if os.path.basename(p) not in BAD]
    assert summary["count"] == len(good) == 10 and summary["skipped"] == 3
    with CodeStore.open(out) as s:
        np.testing.assert_array_equal(s.codes(), expected_codes(model, s.paths(), 2))
        assert s.attrs["views"] == 2
    plain = tmp_path / "plain.h5"
    encode(model, images, plain, **RUN)
    with CodeStore.open(plain) as s:
        assert "views" not in s.attrs
        differing = (s.codes() != expected_codes(model, s.paths(), 2)).any(axis=1)
    assert differing.any()  # the views change codes (not a no-op) ...
    assert info(out)["attrs"]["views"] == 2  # ... and `ghindex info` says how they were made


def test_an_image_gets_the_same_code_wherever_it_is_encoded(tmp_path, images, model):
    first = tmp_path / "a.h5"
    encode(model, images, first, views=3, batch_size=4, **RUN)
    paths = [p for p in load_data(images).paths if os.path.basename(p) not in BAD]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(reversed(paths)) + "\n")  # other positions, other batches, workers
    second = tmp_path / "b.h5"
    encode(model, listing, second, views=3, batch_size=64, device="cpu", runtime="torch", workers=2, progress=False)
    a, b = codes_by_path(first), codes_by_path(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)


def test_appends_and_resume_keep_the_stores_views(tmp_path, images, model, monkeypatch):
    import importlib

    out = tmp_path / "codes.h5"
    encode(model, images, out, views=2, **RUN)
    more = make_images(tmp_path / "more", per_class=2, seed=1, bad=False)
    with pytest.raises(StoreError, match="encoded with 2 edited views per image, these with 0"):
        encode(model, more, out, append=True, **RUN)
    encode(model, more, out, append=True, views=2, **RUN)
    with CodeStore.open(out) as s:
        np.testing.assert_array_equal(s.codes(), expected_codes(model, s.paths(), 2))

    # an interrupted run resumes only with the same views
    class Interrupt(Exception):
        pass

    encode_module = importlib.import_module("ghindex.encode")
    again = tmp_path / "again.h5"
    monkeypatch.setattr(encode_module, "pack_signs", lambda h: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        encode(model, images, again, views=2, **RUN)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="cannot resume.*views differs"):
        encode(model, images, again, views=0, resume=True, **RUN)
    encode(model, images, again, views=2, resume=True, **RUN)
    with CodeStore.open(again) as s:
        np.testing.assert_array_equal(s.codes(), expected_codes(model, s.paths(), 2))
    # a finished store of other views is not this run's result: --resume does not pass it off as done
    with pytest.raises(StoreError, match="already exists and is not this run's result"):
        encode(model, images, again, views=3, resume=True, **RUN)


def test_add_encodes_new_images_as_the_store_was(tmp_path, images, model):
    store = tmp_path / "db.h5"
    encode(model, images, store, views=2, **RUN)
    build(store, tmp_path / "index", index_key="BFlat", gpu="off")
    more = make_images(tmp_path / "more", per_class=2, seed=2, bad=False)
    summary = add(tmp_path / "index", more, model=model, **RUN)
    assert summary["added"] == 4
    with CodeStore.open(store) as s:
        np.testing.assert_array_equal(s.codes(), expected_codes(model, s.paths(), 2))


def test_bad_views(tmp_path, images, model, runner, rng):
    for bad in (-1, 65, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="views must be a whole number from 0 to 64"):
            check_views(bad)
    with pytest.raises(ConfigError, match="views must be"):
        encode(model, images, tmp_path / "x.h5", views=-1, **RUN)
    features = tmp_path / "f.npz"
    np.savez(features, features=rng.standard_normal((5, 8)).astype(np.float32))
    feature_model = tmp_path / "id.ghm"
    ghindex.Encoder("identity", 16, feature_dim=8).save(feature_model)
    with pytest.raises(ConfigError, match="views need images to edit"):
        encode(feature_model, features, tmp_path / "y.h5", views=2, **RUN)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()
    result = runner.invoke(cli, ["encode", "-m", str(model), str(images), "-o", str(tmp_path / "z.h5"), "--views", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--views'" in result.output
    result = runner.invoke(cli, ["encode", "-m", str(feature_model), str(features), "-o", str(tmp_path / "z.h5"),
                                 "--views", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: views need images")


def test_combine_outputs():
    h = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.1, -0.2], [1.0, 1.0]])
    assert combine_outputs(h, 0) is h
    combined = combine_outputs(h, 1)  # two images, each with one view
    expected = 0.5 * torch.tanh(h[0::2]) + 0.5 * torch.tanh(h[1::2])
    torch.testing.assert_close(combined, expected)
