"""Edited views (augment.py), their cached features and view-LDA start (train_views.py), the `views`
objective (losses.py, train.py), the copy radius and the held-out copy recall of unsupervised image runs.

Small: smallcnn with random weights at 32 px on a few of the CIFAR-10 demo images (32 px JPEGs).
"""
import glob
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ghindex
from ghindex import Encoder
from ghindex.augment import edited_views, inscribed_size
from ghindex.data import DataSource, load_data
from ghindex.errors import ConfigError
from ghindex.hashing import greedy_sign
from ghindex.info import info
from ghindex.losses import (Objective, bit_balance_penalty, cosine_preservation_loss, neighbour_pairs, nt_xent_loss,
                            view_consistency_loss)
from ghindex.train_views import copy_recall, extract_views, lda_init
from ghindex_cli.main import cli

DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "data", "cifar10-demo", "database")
SMALL = dict(bits=16, backbone="smallcnn", weights="none", image_size=32, workers=0, progress=False)


def demo_folder(folder, classes=("cat",), per_class=30):
    """Class sub-folders of CIFAR-10 demo JPEGs (32 px); one class by default, as an unlabelled collection."""
    paths = sorted(glob.glob(os.path.join(DEMO, "*", "*.jpg")))
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i, path in enumerate(paths[c * per_class:(c + 1) * per_class]):
            shutil.copy(path, os.path.join(folder, name, f"{i:03d}.jpg"))
    return str(folder)


# -- the objective --------------------------------------------------------------------------------
def test_nt_xent_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / 0.5
    expected = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        others = [sim[i, j] for j in range(6) if j != i]
        expected += -(sim[i, positive] - torch.logsumexp(torch.stack(others), 0))
    assert torch.allclose(nt_xent_loss(a, b, 0.5), expected / 6, atol=1e-5)


def test_spared_nt_xent_leaves_the_spared_pairs_out_of_both_views_denominators():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    spared = torch.zeros(4, 4, dtype=torch.bool)
    spared[0, 2] = spared[2, 0] = True
    spared[1, 1] = True  # the diagonal is ignored: an item's positive always stays
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / 0.1
    expected = 0.0
    for i in range(8):
        positive = (i + 4) % 8
        others = [sim[i, j] for j in range(8) if j != i and not (i % 4, j % 4) in {(0, 2), (2, 0)}]
        expected += -(sim[i, positive] - torch.logsumexp(torch.stack(others), 0))
    assert torch.allclose(nt_xent_loss(a, b, 0.1, spared), expected / 8, atol=1e-5)
    assert torch.equal(nt_xent_loss(a, b, 0.1, torch.zeros(4, 4, dtype=torch.bool)), nt_xent_loss(a, b, 0.1))
    assert nt_xent_loss(a, b, 0.1, spared) != nt_xent_loss(a, b, 0.1)
    with pytest.raises(ConfigError, match="spared pairs"):
        nt_xent_loss(a, b, 0.1, spared[:3])


def test_neighbour_pairs_are_each_items_most_similar_others_both_ways():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.1]])
    pairs = neighbour_pairs(features, 0.25)  # round(0.25 * 4) = 1 neighbour each
    expected = {(0, 1), (1, 0), (2, 3), (3, 2), (4, 2), (2, 4)}  # 4: nearest 2 (cosine 0.10)
    assert {(i, j) for i, j in torch.nonzero(pairs).tolist()} == expected  # and 2 spares 4 back
    assert not pairs.diagonal().any()
    assert not neighbour_pairs(features, 0.0).any() and not neighbour_pairs(features, 0.1).any()  # rounds to 0
    assert neighbour_pairs(features, 0.99).sum() == 5 * 4  # every other item
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="spared share"):
            neighbour_pairs(features, bad)


def test_views_objective_passes_the_spared_pairs_to_nt_xent():
    torch.manual_seed(3)
    h = torch.randn(2 * 5, 16)
    b = greedy_sign(h)
    spared = neighbour_pairs(torch.randn(5, 4), 0.5)
    objective = Objective("views", alpha=0.0, balance=0.0, contrast=0.1, consistency=0.7)
    assert torch.allclose(objective(h, b, spared=spared).main, 0.1 * nt_xent_loss(b[:5], b[5:], 0.1, spared)
                          + 0.7 * view_consistency_loss(b[:5], b[5:]))


def test_views_objective_gradient_reaches_the_hash_layer_through_greedy_sign():
    torch.manual_seed(0)
    layer = torch.nn.Linear(10, 16, bias=False)
    rows = torch.randn(2 * 6, 10)  # two views of 6 images: first views, then second views
    h = layer(rows)
    h.retain_grad()
    b = greedy_sign(h)
    b.retain_grad()
    terms = Objective("views", alpha=0.0, balance=0.0)(h, b)
    terms.total.backward()
    assert torch.equal(h.grad, b.grad)  # straight through: sign's gradient is passed on unchanged
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="two views"):
        Objective("views")(h[:5].detach(), b[:5].detach())


def test_view_consistency_matches_its_definition():
    a = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1]])
    b = torch.tensor([[1.0, 1, 1, -1], [-1, 1, -1, 1]])  # cosines 0.5 and -1
    assert torch.allclose(view_consistency_loss(a, b), torch.tensor((0.5 + 2.0) / 2))
    with pytest.raises(ConfigError, match="two views"):
        view_consistency_loss(a, b[:1])


def test_views_objective_weighs_its_three_terms_and_balances_the_plain_rows():
    torch.manual_seed(1)
    layer = torch.nn.Linear(10, 16, bias=False)
    rows = torch.randn(3 * 6, 10)  # two views of 6 images, then the 6 un-edited images
    features = torch.rand(6, 7)
    h = layer(rows)
    h.retain_grad()
    b = greedy_sign(h)
    objective = Objective("views", alpha=0.0, balance=0.0, similarity=2.5, consistency=0.7, contrast=0.1, shift=0.2)
    terms = objective(h, b, features=features)
    expected = (0.1 * nt_xent_loss(b[:6], b[6:12]) + 0.7 * view_consistency_loss(b[:6], b[6:12])
                + 2.5 * cosine_preservation_loss(features, b[12:], 0.2))
    assert torch.allclose(terms.main, expected)
    terms.total.backward()
    assert h.grad[12:].abs().sum() > 0  # the plain rows get the similarity term's gradient, straight through
    assert torch.equal(Objective("views", alpha=0.0)(h[:12], b[:12]).main, nt_xent_loss(b[:6], b[6:12]))
    # the bit balance reads the un-edited images' codes only: views of one image would count it twice
    balanced = Objective("views", alpha=0.0, balance=3.0, similarity=2.5, consistency=0.7, contrast=0.1, shift=0.2)
    extra = balanced(h.detach(), b.detach(), features=features).total - terms.total.detach()
    assert torch.allclose(extra, 3.0 * bit_balance_penalty(b[12:].detach()))
    for bad in (None, features[:5]):  # no features, or not a third of the rows
        with pytest.raises(ConfigError, match="similarity term"):
            objective(h.detach(), b.detach(), features=bad)
    for name in ("similarity", "consistency", "contrast"):
        with pytest.raises(ConfigError, match=f"{name} weight"):
            Objective("views", **{name: -1.0})


def test_views_weights_default_to_the_preset_train_differently_and_read_the_pooled_block(tmp_path, monkeypatch):
    losses = sys.modules["ghindex.losses"]
    widths = []
    real = losses.cosine_preservation_loss
    monkeypatch.setattr(losses, "cosine_preservation_loss",
                        lambda features, codes, shift=0.0: widths.append(features.shape[1]) or real(features, codes, shift))
    folder = demo_folder(tmp_path / "imgs", per_class=24)
    common = dict(unsupervised=True, objective="views", views=2, epochs=2, batch_size=16, val_fraction=0.0,
                  detail_layer="features.6", seed=3, **SMALL)
    default = ghindex.train(folder, **common)
    assert widths and set(widths) == {256}  # smallcnn's pooled block, not the 256 + 256 with the grid
    training = default.config.extra["training"]
    assert {k: training[k] for k in ("similarity_weight", "consistency_weight", "contrast_weight")} == \
        {"similarity_weight": 3.0, "consistency_weight": 0.7, "contrast_weight": 0.1}  # the preset's
    widths.clear()
    alone = ghindex.train(folder, similarity_weight=0, **common)
    assert not widths and alone.config.extra["training"]["similarity_weight"] == 0.0
    assert not torch.equal(default.hash_layer.weight, alone.hash_layer.weight)
    contrast = ghindex.train(folder, consistency_weight=0, **common)
    assert not torch.equal(default.hash_layer.weight, contrast.hash_layer.weight)
    spared_batches = []
    real_pairs = sys.modules["ghindex.train_epoch"].neighbour_pairs
    monkeypatch.setattr(sys.modules["ghindex.train_epoch"], "neighbour_pairs",
                        lambda features, share: spared_batches.append(features.shape) or real_pairs(features, share))
    spared = ghindex.train(folder, contrast_spare=0.2, **common)
    assert spared_batches and {shape[1] for shape in spared_batches} == {256}  # the pooled block
    assert spared.config.extra["training"]["contrast_spare"] == 0.2
    assert not torch.equal(spared.hash_layer.weight, ghindex.train(folder, contrast_spare=0.0, **common).hash_layer.weight)


def test_lda_init_finds_the_direction_that_tells_images_apart():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(200, 1)) * np.array([[1.0, 0, 0, 0]])  # images differ along axis 0
    views = images[:, None, :] + rng.normal(size=(200, 5, 4)) * np.array([0.05, 3.0, 0.05, 0.05])  # views along 1
    w = lda_init(torch.from_numpy(views - views.reshape(-1, 4).mean(0)).float(), 8)
    assert w.shape == (8, 4)
    first = w[0] / w[0].norm()
    assert abs(float(first[0])) > 0.99  # not axis 1, where rows spread the most
    projected = torch.from_numpy(views.reshape(-1, 4)).float() @ w.T
    assert torch.allclose(projected.std(0), torch.ones(8), atol=1e-3)


def test_copy_recall_is_tie_averaged():
    originals = np.array([[0], [255]], dtype=np.uint8)
    others = np.array([[1]], dtype=np.uint8)
    views = np.array([[[0]], [[3]]], dtype=np.uint8)  # first: exact; second: 0b11, nearest is `others` (0b1)
    assert copy_recall(views, originals, others) == 0.5
    tied = np.array([[[0]], [[255]]], dtype=np.uint8)
    assert copy_recall(tied, originals, np.array([[0]], dtype=np.uint8)) == pytest.approx((0.5 + 1) / 2)


# -- views and their cache ------------------------------------------------------------------------
def test_edited_views_are_reproducible_from_the_seed():
    img = Image.open(sorted(glob.glob(os.path.join(DEMO, "*", "*.jpg")))[0]).convert("RGB")
    first, again = edited_views(img, 6, seed=3, item=7), edited_views(img, 6, seed=3, item=7)
    other = edited_views(img, 6, seed=4, item=7)
    same = lambda a, b: a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
    assert all(same(a, b) for a, b in zip(first, again))
    assert not all(same(a, b) for a, b in zip(first, other))
    assert not any(same(v, img) for v in first)  # every view is edited
    assert inscribed_size(128, 128, 0) == (128, 128) and inscribed_size(128, 128, 8)[0] < 128


def test_views_run_starts_from_view_lda_when_asked(tmp_path, monkeypatch):
    train_module = sys.modules["ghindex.train"]
    calls = []
    monkeypatch.setattr(train_module, "lda_init", lambda rows, bits: calls.append(tuple(rows.shape)) or lda_init(rows, bits))
    folder = demo_folder(tmp_path / "imgs", per_class=20)
    common = dict(unsupervised=True, objective="views", views=2, epochs=1, hash_hidden=0, val_fraction=0.0, **SMALL)
    lda = ghindex.train(folder, init="lda", **common)
    assert calls == [(20, 3, 256)]  # every image's un-edited view and 2 edits, smallcnn's 256 features
    assert lda.config.extra["training"]["init"] == "lda"
    with pytest.raises(ConfigError, match="hash_hidden=0"):
        ghindex.train(folder, init="lda", **{**common, "hash_hidden": 64})


def test_views_is_the_unsupervised_default_for_images_only(tmp_path, monkeypatch):
    from ghindex import distributed
    from ghindex.train_settings import _default_objective

    folder = demo_folder(tmp_path / "imgs", per_class=12)
    feats = DataSource("features", "synthetic", features=np.zeros((4, 8), np.float32))
    assert _default_objective("default", folder, None) == "views"
    assert _default_objective("default", load_data(folder), "mobilenet_v2") == "views"
    assert _default_objective("paper", folder, None) == "similarity"  # the paper's objective
    assert _default_objective("default", feats, None) == "similarity"  # nothing to edit
    assert _default_objective("default", str(tmp_path / "f.npz"), None) == "similarity"
    assert _default_objective("default", folder, "identity") == "similarity"
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # torchrun: views runs in one process
    assert _default_objective("default", folder, None) == "similarity"
    monkeypatch.undo()
    model = ghindex.train(folder, unsupervised=True, views=2, epochs=1, val_fraction=0.0, out=tmp_path / "m.ghm",
                          **SMALL)
    training = model.config.extra["training"]
    assert training["unsupervised_objective"] == "views"
    assert training["contrast_weight"] == 0.1 and training["contrast_spare"] == 0.1
    assert info(tmp_path / "m.ghm")["objective"] == "unsupervised (views)"
    array = tmp_path / "f.npz"
    np.savez(array, features=np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    plain = ghindex.train(str(array), unsupervised=True, bits=8, epochs=1, val_fraction=0.0, progress=False)
    assert plain.config.extra["training"]["unsupervised_objective"] == "similarity"


def test_filled_rows_keep_the_added_batches_in_order():
    from ghindex.train_inputs import FilledRows

    filled = FilledRows(5)  # 5 items, of which 4 decoded, in two batches
    filled.add(torch.ones(3, 2, 4), np.array([0, 1, 3]))
    filled.add(torch.full((1, 2, 4), 2.0), np.array([4]))
    rows, items = filled.result()
    assert rows.shape == (4, 2, 4) and rows.dtype == torch.float32 and rows.is_contiguous()
    assert torch.equal(rows[3], torch.full((2, 4), 2.0)) and rows[:3].eq(1).all()
    assert items.tolist() == [0, 1, 3, 4]


def test_views_cache_shape_and_determinism(tmp_path):
    source = load_data(demo_folder(tmp_path / "imgs", per_class=5))
    model = Encoder("smallcnn", 16, weights="none", image_size=32)
    args = (torch.device("cpu"), 8, 0, lambda: torch.autocast("cpu", enabled=False), False)
    views, kept = extract_views(model, source, 3, 0, *args)
    assert views.shape == (5, 4, model.config.feature_dim) and views.dtype == torch.float32
    assert np.array_equal(kept, np.arange(5))
    again, _ = extract_views(model, source, 3, 0, *args)
    assert torch.equal(views, again)
    with torch.inference_mode():  # view 0 is the un-edited image, as encoding it gives
        plain = model.features(torch.stack([model.preprocess(p) for p in source.paths]))
    assert torch.allclose(views[:, 0], plain, atol=1e-5)
    assert not torch.allclose(views[:, 1:], views[:, :1].expand(-1, 3, -1), atol=1e-3)
    only_edits, _ = extract_views(model, source, 3, 0, *args, original=False)
    assert torch.equal(only_edits, views[:, 1:])


# -- training runs ---------------------------------------------------------------------------------
def test_copy_radius_recorded_saved_reloaded_and_shown(tmp_path, runner):
    folder = demo_folder(tmp_path / "imgs", per_class=40)
    out = tmp_path / "m.ghm"
    model = ghindex.train(folder, unsupervised=True, objective="views", views=2, epochs=2, val_fraction=0.25,
                          out=out, **SMALL)
    radius = model.config.copy_radius
    training = model.config.extra["training"]
    assert isinstance(radius, int) and 0 <= radius <= 16
    measured = training["copy_radius"]
    assert {k: measured[k] for k in ("bits", "percentile", "views", "from")} == \
        {"bits": radius, "percentile": 99.0, "views": 40, "from": "held-out images"}
    assert radius <= measured["copies_p99"]
    # at most 1e-5 of different-image pairs within it, unless even identical codes exceed that (radius 0)
    assert measured["false_match_rate"] <= 1e-5 or radius == 0
    assert 0 <= measured["copy_recall"] <= 1
    assert training["unsupervised_objective"] == "views" and training["views"] == 2 and training["init"] == "random"
    assert training["hash_hidden"] == 1024  # the preset's: the similarity objective's recipe
    assert Encoder.load(out).config.copy_radius == radius
    described = info(out)
    assert described["copy_radius"] == radius and described["objective"] == "unsupervised (views)"
    result = runner.invoke(cli, ["info", str(out)])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ["copy_radius", str(radius)] for line in lines), result.output
    assert any("unsupervised (views)" in line for line in lines)


def test_copy_radius_without_held_out_slice_reads_as_the_saved_model_encodes(tmp_path):
    folder = demo_folder(tmp_path / "imgs", per_class=30)
    model = ghindex.train(folder, unsupervised=True, objective="similarity", epochs=1, val_fraction=0.0, **SMALL)
    training = model.config.extra["training"]
    assert training["unsupervised_objective"] == "similarity"
    assert training["copy_radius"]["from"] == "training images" and training["copy_radius"]["views"] == 4 * 30
    # the saved model (mean and scale folded into its layer) gives the codes the radius was measured on
    paths = load_data(folder).paths
    distances = []
    for item, path in enumerate(paths):
        img = Image.open(path).convert("RGB").resize((32, 32))
        codes = model.encode([img, *edited_views(img, 4, 0, item, stream="copies")])
        distances += [int(np.bitwise_count(codes[0] ^ c).sum()) for c in codes[1:]]
    measured = training["copy_radius"]
    assert measured["copies_p99"] == int(np.ceil(np.percentile(distances, 99)))
    assert model.config.copy_radius == measured["bits"] <= measured["copies_p99"]
    assert measured["copy_recall"] == round(float(np.mean(np.array(distances) <= measured["bits"])), 4)


def test_copy_radius_stops_where_different_images_start():
    """Views at most 2 bits from their originals, different images far apart: the radius is the views' 99th
    percentile (2). Add other images 1 bit from the originals: it falls to 0, where no pair of different
    images is."""
    from ghindex.train_views import copy_radius

    rng = np.random.default_rng(0)
    originals = rng.integers(0, 256, (60, 8), dtype=np.uint8)
    apart = np.bitwise_count(originals[:, None] ^ originals[None]).sum(2) + 64 * np.eye(60, dtype=np.int64)
    assert apart.min() > 4
    views = np.repeat(originals[:, None, :], 4, 1)
    views[:, :, 0] ^= rng.integers(0, 4, (60, 4), dtype=np.uint8)  # bits 0 and 1 of byte 0 at random
    measured = copy_radius(views, originals, np.zeros((0, 8), np.uint8))
    assert measured["copies_p99"] == 2 and measured["bits"] == 2 and measured["copy_recall"] == 1.0
    near = originals.copy()
    near[:, 7] ^= 0x80  # 60 other images, each 1 bit from an original: far more than 1e-5 of the pairs
    measured = copy_radius(views, originals, near)
    assert measured["copies_p99"] == 2 and measured["bits"] == 0 and measured["false_match_rate"] == 0
    assert 0 < measured["copy_recall"] < 1


def test_one_class_held_out_line_shows_copy_recall_not_map(tmp_path, caplog):
    folder = demo_folder(tmp_path / "imgs", per_class=40)
    with caplog.at_level(logging.INFO, logger="ghindex.train"):
        ghindex.train(folder, unsupervised=True, epochs=2, val_fraction=0.25, val_every=1, out=tmp_path / "m.ghm",
                      **SMALL)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 2
    assert all("held-out copy recall@1" in line and "held-out mAP" not in line for line in epochs)
    rows = [json.loads(line) for line in open(tmp_path / "m.ghm.log.jsonl")]
    assert all("val_map" not in row and 0 <= row["val_copy_recall"] <= 1 for row in rows)
    assert any("copy radius" in r.getMessage() for r in caplog.records)


def test_two_classes_show_both_held_out_measures(tmp_path, caplog):
    folder = demo_folder(tmp_path / "imgs", classes=("a", "b"), per_class=20)
    with caplog.at_level(logging.INFO, logger="ghindex.train"):
        ghindex.train(folder, unsupervised=True, epochs=1, val_fraction=0.25, **SMALL)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")][-1]
    assert "held-out mAP" in line and "held-out copy recall@1" in line


def test_bad_options_are_clear_errors(tmp_path, runner):
    feats = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    source = DataSource("features", "synthetic", features=feats)
    with pytest.raises(ConfigError, match="cannot be edited"):
        ghindex.train(source, bits=8, unsupervised=True, objective="views", epochs=1, progress=False)
    with pytest.raises(ConfigError, match="unknown objective"):
        ghindex.train(source, bits=8, unsupervised=True, objective="contrastive", progress=False)
    for views in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="views must be a positive integer"):
            ghindex.train(source, bits=8, unsupervised=True, objective="views", views=views, progress=False)
    with pytest.raises(ConfigError, match="applies to unsupervised"):
        ghindex.train(source, bits=8, objective="views", progress=False)
    with pytest.raises(ConfigError, match="lda"):
        ghindex.train(source, bits=8, unsupervised=True, init="lda", progress=False)
    for name in ("similarity_weight", "consistency_weight", "contrast_weight", "contrast_spare"):
        for weight in (-1, float("nan"), "3", True):
            with pytest.raises(ConfigError, match=f"{name} must be"):
                ghindex.train(source, bits=8, unsupervised=True, objective="views", progress=False, **{name: weight})
        with pytest.raises(ConfigError, match="needs objective 'views'"):
            ghindex.train(source, bits=8, unsupervised=True, progress=False, **{name: 1.0})
    with pytest.raises(ConfigError, match="consistency_weight or contrast_weight"):
        ghindex.train(source, bits=8, unsupervised=True, objective="views", consistency_weight=0, contrast_weight=0,
                      progress=False)
    with pytest.raises(ConfigError, match="contrast_spare .* below 1"):
        ghindex.train(source, bits=8, unsupervised=True, objective="views", contrast_spare=1.0, progress=False)
    array = tmp_path / "f.npz"
    np.savez(array, features=feats)
    for args in (["--objective", "views"], ["--objective", "views", "--views", "0"],
                 ["--objective", "views", "--similarity-weight", "-1"], ["--similarity-weight", "2"],
                 ["--objective", "views", "--consistency-weight", "nan"], ["--contrast-weight", "1"],
                 ["--objective", "views", "--consistency-weight", "0", "--contrast-weight", "0"],
                 ["--objective", "views", "--contrast-spare", "1.5"], ["--contrast-spare", "0.1"]):
        result = runner.invoke(cli, ["train", str(array), "--unsupervised", "--bits", "8", "--out",
                                     str(tmp_path / "m.ghm"), "--no-progress", *args])
        assert result.exit_code != 0
        assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert not os.path.exists(tmp_path / "m.ghm")


class Crash(Exception):
    pass


def test_views_run_resumes_to_the_same_weights_and_radius(tmp_path, monkeypatch):
    train_module = sys.modules["ghindex.train"]  # `ghindex.train` the attribute is the function
    folder = demo_folder(tmp_path / "imgs", per_class=30)
    common = dict(unsupervised=True, objective="views", views=2, epochs=3, lr_step=2, batch_size=8, seed=5,
                  val_fraction=0.0, **SMALL)
    full = ghindex.train(folder, out=tmp_path / "full.ghm", **common)
    real_write_log = train_module._write_log

    def crash_after(path, history):
        real_write_log(path, history)
        if len(history) == 2:
            raise Crash()

    monkeypatch.setattr(train_module, "_write_log", crash_after)
    with pytest.raises(Crash):
        ghindex.train(folder, out=tmp_path / "part.ghm", **common)
    monkeypatch.setattr(train_module, "_write_log", real_write_log)
    with pytest.raises(ConfigError, match="views"):
        ghindex.train(folder, out=tmp_path / "part.ghm", resume=True, **{**common, "views": 3})
    part = ghindex.train(folder, out=tmp_path / "part.ghm", resume=True, **common)
    for (name, a), (_, b) in zip(full.state_dict().items(), part.state_dict().items()):
        assert torch.equal(a, b), name
    assert part.config.copy_radius == full.config.copy_radius


# -- detail features --------------------------------------------------------------------------------
def test_detail_features_join_a_grid_of_a_mid_layer_and_reload(tmp_path):
    from ghindex.backbones import DETAIL_LAYERS, WithDetail, resolve_detail_layer

    torch.manual_seed(0)
    plain = Encoder("smallcnn", 16, image_size=32)
    model = Encoder("smallcnn", 16, image_size=32, detail_layer="features.6")  # 2nd block's ReLU: 64 channels
    assert isinstance(model.backbone, WithDetail) and model.config.feature_dim == 256 + 64 * 4
    assert model.config.format_version == 4 and plain.config.format_version == 4  # they decode reduced (images)
    kept = Encoder("smallcnn", 16, image_size=32, detail_layer="features.6", reduced_decode=False)
    assert kept.config.format_version == 3  # decoding in full, detail features alone need version 3
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        f = model.backbone(x)
        body = model.backbone.body
        pooled = body(x)
        mid = body.features[:7](x)  # the layer's own output, pooled to 2 x 2 by hand
        grid = mid.reshape(3, 64, 2, 8, 2, 8).mean((3, 5)).flatten(1)
    torch.testing.assert_close(f[:, :256], torch.nn.functional.normalize(pooled, dim=1))
    torch.testing.assert_close(f[:, 256:], torch.nn.functional.normalize(grid, dim=1))
    assert not body.features[6]._forward_hooks  # the hook lives for one call only
    assert set(model.state_dict()) == {k.replace("backbone.", "backbone.body.", 1) if k.startswith("backbone.") else k
                                       for k in plain.state_dict()}
    model.save(tmp_path / "d.ghm")
    again = Encoder.load(tmp_path / "d.ghm")
    assert again.config.detail_layer == "features.6"
    np.testing.assert_array_equal(again.encode(x), model.encode(x))
    assert info(tmp_path / "d.ghm")["detail_layer"] == "features.6"
    assert resolve_detail_layer("mobilenet_v2", "auto") == DETAIL_LAYERS["mobilenet_v2"] == "0.13"
    assert resolve_detail_layer("smallcnn", "auto") is None and resolve_detail_layer("mobilenet_v2", "none") is None
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        Encoder("smallcnn", 16, image_size=32, detail_layer="nope")
    with pytest.raises(ConfigError, match="identity"):
        Encoder("identity", 16, feature_dim=8, detail_layer="features.6")
    with pytest.raises(ConfigError, match="cannot be pooled to a grid"):
        Encoder("smallcnn", 16, image_size=32, detail_layer="pool.1")  # (N, 256): no map to pool


def test_views_training_with_a_detail_layer(tmp_path):
    folder = demo_folder(tmp_path / "imgs", per_class=24)
    model = ghindex.train(folder, unsupervised=True, objective="views", views=2, epochs=1, val_fraction=0.25,
                          detail_layer="features.6", **SMALL)
    assert model.config.detail_layer == "features.6" and model.config.feature_dim == 512
    paths = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))[:4]
    with torch.inference_mode():  # the saved model's codes come from its own features, detail included
        h = model.head(model.features(torch.stack([model.preprocess(p) for p in paths])))
    np.testing.assert_array_equal(model.encode(paths), ghindex.pack_signs(h))
    similarity = ghindex.train(folder, unsupervised=True, objective="similarity", epochs=1, val_fraction=0.0, **SMALL)
    assert similarity.config.detail_layer is None  # auto: only the views objective gets detail features
