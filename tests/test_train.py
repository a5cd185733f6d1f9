"""Objectives (losses.py), the training loop (train.py) and `ghindex train`.

Small and fast: identity backbone on synthetic features, or the smallcnn backbone with random weights at 32 px
on a handful of generated images.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ghindex
from ghindex import Encoder
from ghindex.data import DataSource
from ghindex.errors import ConfigError, DataError, ModelFileError
from ghindex.hashing import greedy_sign, hamming_distances, unpack_signs
from ghindex.losses import (
    Objective,
    bit_balance_penalty,
    classification_loss,
    cosine_preservation_loss,
    multilabel_loss,
)
from ghindex_cli.main import cli

train_module = sys.modules["ghindex.train"]  # `ghindex.train` the attribute is the function


# -- fixtures ----------------------------------------------------------------------------------
def blobs(n_per_class=40, dim=12, classes=2, seed=0, spread=0.6):
    """Gaussian clusters around random centres: (features float32, labels int64)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    labels = np.repeat(np.arange(classes), n_per_class)
    feats = centres[labels] + rng.normal(scale=spread, size=(len(labels), dim))
    return feats.astype(np.float32), labels.astype(np.int64)


def feature_source(feats, labels=None):
    return DataSource("features", "synthetic blobs", features=feats, labels=labels)


def make_images(folder, per_class=6, size=(20, 24), classes=("dark", "light"), seed=0):
    """Class folders of small PNGs whose brightness differs by class (grey, palette and RGBA mixed in)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        lo, hi = (0, 110) if c == 0 else (140, 255)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(lo, hi, (*size, 3), dtype=np.uint8))
            if i == 1:
                img = img.convert("L")
            elif i == 2:
                img = img.convert("P")
            elif i == 3:
                img = img.convert("RGBA")
            img.save(os.path.join(folder, name, f"{i:03d}.png"))
    return folder


def state_of(path):
    from safetensors.torch import load_file

    return load_file(path)


# -- objectives: gradients ----------------------------------------------------------------------
def test_supervised_gradient_reaches_projection_and_classifier():
    torch.manual_seed(0)
    model = Encoder("identity", 16, feature_dim=8, num_classes=3)
    x, y = torch.randn(10, 8), torch.arange(10) % 3
    out = model(x)
    terms = Objective("supervised", alpha=0.1)(out.h, out.b, classifier=model.classifier, labels=y)
    terms.total.backward()
    assert model.hash_layer.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.classifier.bias is None  # bias-free classifier, as the paper
    expected = classification_loss(model.classifier(out.b), y) + 0.1 * terms.penalty
    assert torch.allclose(terms.total, expected)


def test_multilabel_gradient_reaches_projection():
    torch.manual_seed(0)
    model = Encoder("identity", 8, feature_dim=5, num_classes=4)
    x = torch.randn(6, 5)
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 1, 0]])
    out = model(x)
    terms = Objective("multi-label", alpha=0.0)(out.h, out.b, classifier=model.classifier, labels=targets)
    terms.total.backward()
    assert model.hash_layer.weight.grad.abs().sum() > 0
    logits = model.classifier(out.b)
    assert torch.allclose(terms.main, multilabel_loss(logits, targets))
    # BCE by hand
    p = torch.sigmoid(logits)
    manual = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert torch.allclose(terms.main, manual, atol=1e-6)


def test_unsupervised_gradient_reaches_projection_not_frozen_backbone():
    torch.manual_seed(0)
    model = Encoder("smallcnn", 16, image_size=32)
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    out = model(torch.randn(4, 3, 32, 32))
    terms = Objective("unsupervised", alpha=0.1)(out.h, out.b, features=out.features)
    terms.total.backward()
    assert model.hash_layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_supervised_gradient_does_not_enter_frozen_backbone():
    torch.manual_seed(0)
    model = Encoder("smallcnn", 8, image_size=32, num_classes=2)
    model.backbone.requires_grad_(False)
    out = model(torch.randn(3, 3, 32, 32))
    Objective("supervised")(out.h, out.b, classifier=model.classifier, labels=torch.tensor([0, 1, 1])).total.backward()
    assert model.hash_layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_cosine_preservation_matches_pairwise_definition():
    torch.manual_seed(1)
    f, h = torch.randn(7, 5).abs(), torch.randn(7, 16)
    b = greedy_sign(h)
    for shift in (0.0, 0.3, -0.2):
        expected = np.mean([
            ((torch.cosine_similarity(f[i], f[j], dim=0).item() - shift) / (1 - shift)
             - torch.cosine_similarity(b[i], b[j], dim=0).item()) ** 2
            for i in range(7) for j in range(i + 1, 7)
        ])
        assert cosine_preservation_loss(f, b, shift).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="below 1"):
        cosine_preservation_loss(f, b, 1.0)
    # features are a target: no gradient flows into them
    f.requires_grad_(True)
    h.requires_grad_(True)
    cosine_preservation_loss(f, greedy_sign(h)).backward()
    assert f.grad is None and h.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        cosine_preservation_loss(f[:1], b[:1])


def test_bit_balance_penalty_is_zero_for_balanced_bits_and_one_for_constant_ones():
    balanced = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    assert bit_balance_penalty(balanced).item() == 0
    assert bit_balance_penalty(-torch.ones(5, 3)).item() == 1
    one_constant = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # bit 0 constant, bit 1 balanced
    assert bit_balance_penalty(one_constant).item() == pytest.approx(0.5)
    h = torch.randn(6, 4, requires_grad=True)
    terms = Objective("unsupervised", alpha=0.0, balance=2.0)(h, greedy_sign(h), features=torch.randn(6, 5))
    plain = Objective("unsupervised", alpha=0.0)(h, greedy_sign(h), features=torch.randn(6, 5).abs())
    assert terms.total.item() == pytest.approx(terms.main.item() + 2.0 * bit_balance_penalty(greedy_sign(h)).item())
    assert plain.total.item() == pytest.approx(plain.main.item())
    with pytest.raises(ConfigError, match="balance must be"):
        Objective("unsupervised", balance=-1.0)


def test_objective_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="unknown objective"):
        Objective("contrastive")
    with pytest.raises(ConfigError, match="alpha"):
        Objective("supervised", alpha=-1)
    with pytest.raises(ConfigError, match="features"):
        Objective("unsupervised")(torch.zeros(2, 8), torch.ones(2, 8))


# -- training on synthetic features -------------------------------------------------------------
def test_supervised_training_separates_two_classes(tmp_path):
    feats, labels = blobs()
    out = tmp_path / "sup.ghm"
    model = ghindex.train(feature_source(feats, labels), bits=16, out=out, epochs=8, lr=0.01,
                          batch_size=8, device="cpu", progress=False)
    log = [json.loads(line) for line in open(str(out) + ".log.jsonl")]
    assert len(log) == 8 and log[-1]["loss"] < 0.5 * log[0]["loss"]
    codes = model.encode(torch.from_numpy(feats))
    d = hamming_distances(codes, codes)
    same = labels[:, None] == labels[None, :]
    assert d[same].mean() + 4 < d[~same].mean()
    # nearest neighbour (excluding itself) has the same class for every item
    np.fill_diagonal(d, 999)
    assert (labels[d.argmin(1)] == labels).mean() == 1.0
    loaded = Encoder.load(out)
    assert np.array_equal(loaded.encode(torch.from_numpy(feats)), codes)
    info = loaded.config.extra["training"]
    assert info["objective"] == "supervised" and info["seed"] == 0 and info["epochs"] == 8
    assert info["data"] == "synthetic blobs" and "query" in info["selection"]


def test_unsupervised_training_reduces_loss_and_keeps_neighbours():
    feats, labels = blobs(n_per_class=30, dim=16, classes=3, seed=3)
    feats = np.abs(feats)  # non-negative like post-ReLU CNN features
    model = ghindex.train(feature_source(feats), bits=16, unsupervised=True, epochs=6, lr=0.01,
                          batch_size=16, device="cpu", progress=False)
    info = model.config.extra["training"]
    assert info["objective"] == "unsupervised" and info["center"] is True
    # centred projection: the first layer's bias is tied to -W mean, so the mean feature sits on every
    # bit's boundary (its hidden layer's output is 0)
    mean = torch.from_numpy(feats.astype(np.float64).mean(0).astype(np.float32))[None]
    assert model.hidden_layer is not None and model.hash(mean).abs().max() < 1e-4
    # the target's shift is the mean cosine between distinct training items
    unit = feats.astype(np.float64) / np.linalg.norm(feats.astype(np.float64), axis=1, keepdims=True)
    cosines = unit @ unit.T
    n = len(feats)
    assert info["target_shift"] == pytest.approx((cosines.sum() - np.trace(cosines)) / (n * (n - 1)), rel=1e-9)
    codes = model.encode(torch.from_numpy(feats))
    d = hamming_distances(codes, codes)
    np.fill_diagonal(d, 999)
    assert (labels[d.argmin(1)] == labels).mean() > 0.9
    # the loss goes down from the random projection's
    torch.manual_seed(0)
    untrained = Encoder("identity", 16, feature_dim=16)
    f = torch.from_numpy(feats)
    shift = info["target_shift"]
    before = cosine_preservation_loss(f, torch.from_numpy(unpack_signs(untrained.encode(f))), shift)
    after = cosine_preservation_loss(f, torch.from_numpy(unpack_signs(codes)), shift)
    assert after < 0.7 * before


def test_default_unsupervised_steps_clip_their_gradients_and_leave_small_ones_alone(monkeypatch):
    from types import SimpleNamespace

    import ghindex.train_epoch as train_epoch
    from ghindex.train_settings import MAX_GRAD_NORM

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    run = SimpleNamespace(optimizer=torch.optim.SGD([a, b], lr=0.1), max_grad_norm=MAX_GRAD_NORM)
    a.grad, b.grad = torch.full((3,), 30.0), torch.full((4,), -40.0)
    train_epoch._clip(run)
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(MAX_GRAD_NORM, rel=1e-5)
    small = torch.tensor([0.3, -1.7, 2.2])
    a.grad, b.grad = small.clone(), None
    train_epoch._clip(run)
    assert torch.equal(a.grad, small)  # below the norm: untouched, bit for bit

    clipped = []
    monkeypatch.setattr(train_epoch, "_clip", lambda r: clipped.append(r.max_grad_norm))
    feats, _ = blobs(n_per_class=20, dim=16, classes=3, seed=4)
    common = dict(bits=16, unsupervised=True, epochs=1, batch_size=16, device="cpu", progress=False)
    ghindex.train(feature_source(np.abs(feats)), **common)
    assert clipped and set(clipped) == {MAX_GRAD_NORM}  # every step of the default preset
    clipped.clear()
    ghindex.train(feature_source(np.abs(feats)), preset="paper", **common)
    assert clipped == []  # the paper's settings do not clip


def test_short_unsupervised_codes_default_to_their_own_lr():
    feats, _ = blobs(n_per_class=10, dim=16, classes=3, seed=5)
    common = dict(unsupervised=True, epochs=1, batch_size=16, device="cpu", progress=False)
    lr = lambda **kw: ghindex.train(feature_source(np.abs(feats)), **common, **kw).config.extra["training"]["lr"]  # noqa: E731
    assert lr(bits=16) == 0.1 and lr(bits=8) == 0.1  # the preset's small_codes_lr
    assert lr(bits=24) == 0.3 and lr(bits=64) == 0.3
    assert lr(bits=16, lr=0.02) == 0.02  # an explicit lr always wins
    assert lr(bits=16, preset="paper") == 1e-4  # the paper's preset has no such rule


def test_hash_hidden_layer_reads_raw_features_after_training_on_centred_rows(tmp_path):
    feats, _ = blobs(n_per_class=30, dim=16, classes=3, seed=3)
    feats = np.abs(feats)
    out = tmp_path / "m.ghm"
    model = ghindex.train(feature_source(feats), bits=16, unsupervised=True, epochs=2, hash_hidden=24, out=out,
                          device="cpu", progress=False)
    info = model.config.extra["training"]
    assert model.config.hash_hidden == 24 and info["hash_hidden"] == 24
    # training read each row less the mean, scaled to length sqrt(dim), through bias-free layers; the
    # saved first layer folds in the mean and the average scale s: (W s) x - (W s) mean
    w1 = model.hidden_layer.weight.detach().double() / info["feature_scale"]
    w2 = model.hash_layer.weight.detach().double()
    assert model.hash_layer.bias.abs().max() == 0
    x = torch.from_numpy(feats).double()
    rows = torch.nn.functional.normalize(x - x.mean(0), dim=1) * 4.0
    trained = (torch.relu(rows @ w1.T) @ w2.T >= 0).numpy()
    saved = unpack_signs(model.encode(torch.from_numpy(feats))) > 0
    assert (trained == saved).mean() > 0.99  # the same codes up to float rounding
    loaded = Encoder.load(out)
    assert loaded.config.hash_hidden == 24
    assert np.array_equal(loaded.encode(torch.from_numpy(feats)), model.encode(torch.from_numpy(feats)))


def test_hash_hidden_zero_is_the_papers_linear_layer(tmp_path, runner):
    feats, _ = blobs(n_per_class=20, dim=8, classes=2, seed=2)
    path = tmp_path / "f.npz"
    np.savez(path, features=np.abs(feats))
    out = tmp_path / "m.ghm"
    result = runner.invoke(cli, ["train", str(path), "--unsupervised", "--bits", "8", "--epochs", "1",
                                 "--hash-hidden", "0", "--init", "pca", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    model = Encoder.load(out)
    assert model.hidden_layer is None and model.config.hash_hidden == 0
    assert model.config.extra["training"]["init"] == "pca"
    # the PCA start needs the linear layer: with the default hidden layer it is one clear line
    result = runner.invoke(cli, ["train", str(path), "--unsupervised", "--bits", "8", "--epochs", "1",
                                 "--init", "pca", "--out", str(tmp_path / "n.ghm"), "--no-progress"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: init 'pca' starts a hash layer that reads the features: it needs hash_hidden=0")
    with pytest.raises(ConfigError, match="hash_hidden must be"):
        ghindex.train(feature_source(feats), bits=8, unsupervised=True, epochs=1, hash_hidden=-1, progress=False)
    with pytest.raises(ConfigError, match="hash_hidden must be"):
        Encoder("identity", 8, feature_dim=8, hash_hidden=True)


def test_unsupervised_held_out_map_reads_rows_as_training_does():
    # the held-out slice goes through the same centring and row scaling as the training rows: on
    # well-separated blobs far from the origin its codes find their class (read raw, all would be alike)
    feats, labels = blobs(n_per_class=100, dim=16, classes=3, seed=8)
    model = ghindex.train(feature_source(np.abs(feats) + 50, labels), bits=16, unsupervised=True, epochs=4,
                          val_fraction=0.1, val_every=2, device="cpu", progress=False)
    final = model.config.extra["training"]["final"]
    assert final["epoch"] == 4 and final["val_map"] > 0.9


def test_unsupervised_features_pointing_one_way_are_one_clear_error():
    feats = np.tile(np.array([[1.0, 2.0, 3.0]], dtype=np.float32), (20, 1))
    feats[:, 0] += np.linspace(0, 1e-4, 20, dtype=np.float32)  # all but identical directions
    with pytest.raises(DataError, match="point the same way"):
        ghindex.train(feature_source(feats), bits=8, unsupervised=True, epochs=1, device="cpu", progress=False)


def test_multilabel_training_from_array_file(tmp_path, runner):
    feats, labels = blobs(n_per_class=20, dim=8, classes=3, seed=5)
    multi = np.eye(3, dtype=np.uint8)[labels]
    multi[::4, (labels[::4] + 1) % 3] = 1  # some items carry two labels
    path = tmp_path / "multi.npz"
    np.savez(path, features=feats, labels=multi)
    out = tmp_path / "ml.ghm"
    result = runner.invoke(cli, ["train", str(path), "--bits", "8", "--multi-label", "--epochs", "3",
                                 "--lr", "0.01", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["objective"] == "multi-label" and summary["bits"] == 8
    model = Encoder.load(out)
    assert model.config.num_classes == 3 and model.config.backbone == "identity"
    log = [json.loads(line) for line in open(str(out) + ".log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[-1]["loss"] < log[0]["loss"]
    # multi-hot labels without --multi-label: a clear error, not a crash
    result = runner.invoke(cli, ["train", str(path), "--bits", "8", "--epochs", "1", "--out", str(tmp_path / "x.ghm")])
    assert result.exit_code == 1 and "Error:" in result.output and "--multi-label" in result.output
    assert not (tmp_path / "x.ghm").exists()


def test_bad_arguments_are_clear_errors(tmp_path, runner):
    feats, labels = blobs(n_per_class=4)
    src = feature_source(feats, labels)
    with pytest.raises(ConfigError, match="bits"):
        ghindex.train(src, bits=12)
    with pytest.raises(ConfigError, match="frozen"):
        ghindex.train(src, unsupervised=True, freeze_backbone=False)
    with pytest.raises(ConfigError, match="identity"):
        ghindex.train(src, backbone="resnet18")
    with pytest.raises(DataError, match="no labels"):
        ghindex.train(feature_source(feats), bits=8, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="diverged"):
        ghindex.train(src, bits=8, epochs=5, batch_size=2, lr=1e4, alpha=10.0, device="cpu", progress=False)
    with pytest.raises(ModelFileError, match="no checkpoint"):
        ghindex.train(src, bits=8, out=tmp_path / "none.ghm", resume=True)
    result = runner.invoke(cli, ["train", str(tmp_path), "--bits", "64", "--out", str(tmp_path / "m.ghm")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output


# -- images, CLI, protocol, resume --------------------------------------------------------------
def test_cli_train_image_folder_finetunes_and_writes_model_and_log(tmp_path, runner):
    folder = make_images(str(tmp_path / "imgs"), per_class=4)
    out = tmp_path / "m.ghm"
    result = runner.invoke(cli, ["train", folder, "--bits", "16", "--backbone", "smallcnn", "--weights", "none",
                                 "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0",
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.stderr and "loss" in result.stderr
    assert json.loads(result.stdout)["files"]["log"] == str(out) + ".log.jsonl"
    model = Encoder.load(out)
    assert model.config.image_size == 32 and model.config.num_classes == 2
    assert model.config.extra["class_names"] == ["dark", "light"]
    assert model.config.extra["training"]["freeze_backbone"] is False
    log = [json.loads(line) for line in open(str(out) + ".log.jsonl")]
    assert len(log) == 2 and all(r["items"] == 8 and 0 <= r["bit_ones_min"] <= r["bit_ones_max"] <= 1 for r in log)
    assert {"loss", "penalty", "mean_abs_h", "seconds", "images_per_s"} <= set(log[0])
    # checkpoint readable without unpickling code
    ckpt = torch.load(str(out) + ".ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and "optimizer" in ckpt and "rng" in ckpt
    paths = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.png"))
    assert model.encode(paths).shape == (8, 2)


def test_protocol_split_saved_and_frozen_features_cached(tmp_path):
    root = tmp_path / "cifar"
    make_images(str(root / "train"), per_class=5, seed=1)
    make_images(str(root / "test"), per_class=2, seed=2)
    out = tmp_path / "p.ghm"
    model = ghindex.train(str(root), bits=8, backbone="smallcnn", image_size=32, protocol="cifar10-II",
                          freeze_backbone=True, epochs=2, batch_size=4, workers=0, out=out, device="cpu",
                          progress=False)
    with np.load(str(out) + ".splits.npz") as s:
        assert str(s["protocol"]) == "cifar10-II"
        assert np.array_equal(s["train"], np.arange(10)) and np.array_equal(s["query"], np.arange(10, 14))
        assert np.array_equal(s["database"], s["train"])
    info = model.config.extra["training"]
    assert info["protocol"] == "cifar10-II" and info["freeze_backbone"] is True and info["items"] == 10
    assert info["splits_file"] == "p.ghm.splits.npz"
    # frozen: backbone weights are untouched by training
    torch.manual_seed(0)
    fresh = Encoder("smallcnn", 8, image_size=32, num_classes=2)
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(v, model.backbone.state_dict()[k]), k


class Crash(Exception):
    pass


def train_until_crash(monkeypatch, data, out, epochs_done, **kwargs):
    """`ghindex.train(data, out=out, **kwargs)` killed right after writing the log of epoch `epochs_done`."""
    real_write_log = train_module._write_log

    def crash_after(path, history):
        real_write_log(path, history)
        if len(history) == epochs_done:
            raise Crash()

    monkeypatch.setattr(train_module, "_write_log", crash_after)
    with pytest.raises(Crash):
        ghindex.train(data, out=out, **kwargs)
    monkeypatch.setattr(train_module, "_write_log", real_write_log)


@pytest.mark.parametrize("case", ["finetune-images", "unsupervised-features"])
def test_resume_reaches_the_same_weights(tmp_path, monkeypatch, case):
    if case == "finetune-images":
        data = make_images(str(tmp_path / "imgs"), per_class=3)
        kwargs = dict(bits=8, backbone="smallcnn", image_size=32, batch_size=3, workers=0)
    else:
        feats, _ = blobs(n_per_class=25, dim=10)
        data = feature_source(np.abs(feats))
        kwargs = dict(bits=16, unsupervised=True, batch_size=8, lr=0.01)
    common = dict(epochs=3, lr_step=2, seed=7, device="cpu", progress=False, **kwargs)
    full = tmp_path / "full.ghm"
    ghindex.train(data, out=full, **common)

    part = tmp_path / "part.ghm"
    train_until_crash(monkeypatch, data, part, 2, **common)
    assert not part.exists() and torch.load(str(part) + ".ckpt", weights_only=True)["epoch"] == 2

    with pytest.raises(ConfigError, match="seed"):
        ghindex.train(data, out=part, resume=True, **{**common, "seed": 8})
    ghindex.train(data, out=part, resume=True, **common)
    a, b = state_of(full), state_of(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_full = [json.loads(line) for line in open(str(full) + ".log.jsonl")]
    log_part = [json.loads(line) for line in open(str(part) + ".log.jsonl")]
    assert [r["loss"] for r in log_full] == [r["loss"] for r in log_part]
    assert [r["lr"] for r in log_full] == pytest.approx([common.get("lr", 1e-3 if case == "finetune-images" else 1e-4)] * 2
                                                       + [0.1 * common.get("lr", 1e-3 if case == "finetune-images" else 1e-4)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("freeze", [False, True])
def test_cuda_mixed_precision_training(tmp_path, freeze):
    folder = make_images(str(tmp_path / "imgs"), per_class=8)
    out = tmp_path / "gpu.ghm"
    model = ghindex.train(folder, bits=16, backbone="smallcnn", image_size=32, epochs=2, lr_step=1, batch_size=4,
                          workers=2, freeze_backbone=freeze, device="cuda", out=out, progress=False)
    info = model.config.extra["training"]
    assert info["device"].startswith("cuda") and info["amp"] in ("torch.bfloat16", "torch.float16")
    assert np.isfinite(info["final"]["loss"])
    loaded = Encoder.load(out)
    paths = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.png"))
    # the model trained on the GPU encodes the same on the CPU (fp32) up to a few bits near zero
    a, b = loaded.encode(paths), model.encode(paths)
    assert (np.unpackbits(a ^ b).mean()) < 0.05
    ghindex.train(folder, bits=16, backbone="smallcnn", image_size=32, epochs=3, batch_size=4, workers=2,
                  freeze_backbone=freeze, device="cuda", out=out, progress=False, resume=True, lr_step=1)


def test_existing_model_is_not_replaced_without_resume_or_overwrite(runner, tmp_path):
    from ghindex_cli.main import cli

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", features=rng.standard_normal((40, 6)).astype(np.float32),
             labels=np.arange(40) % 2)
    args = ["train", str(tmp_path / "f.npz"), "--bits", "8", "--epochs", "1", "--out", str(tmp_path / "m.ghm"),
            "--no-progress"]
    assert runner.invoke(cli, args).exit_code == 0
    before = (tmp_path / "m.ghm").read_bytes()
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "m.ghm.ckpt exists" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output and (tmp_path / "m.ghm").read_bytes() == before
    assert runner.invoke(cli, args + ["--overwrite"]).exit_code == 0
