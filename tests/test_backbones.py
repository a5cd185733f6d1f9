"""Backbones by name (any torchvision classifier), ImageNet weights from the cache or a one-line error,
`ghindex backbones`, and the training defaults around them (presets, per-layer lr, held-out mAP).

Nothing here downloads: TORCH_HOME points at an empty temporary folder and the download function is
replaced by one that fails (or writes a locally made file), so no network is attempted.
"""
import json

import numpy as np
import pytest
import torch

import ghindex
from ghindex import backbones as bb
from ghindex.data import DataSource
from ghindex.errors import ConfigError, WeightsError
from ghindex_cli.main import cli

from test_train import blobs, make_images, state_of, train_module


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that fails like a machine without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    calls = []

    def no_network(url, path):
        calls.append(url)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(bb, "download_weights", no_network)
    return calls


# -- names, feature sizes, parameter counts --------------------------------------------------------
def test_every_torchvision_classifier_is_a_backbone():
    from torchvision import models

    names = bb.backbone_names()
    assert set(models.list_models(module=models)) <= set(names)
    assert {"smallcnn", "identity", "convnext_tiny", "vit_h_14", "regnet_y_128gf"} <= set(names)


@pytest.mark.parametrize("name, dim", [
    ("convnext_tiny", 768), ("vit_b_16", 768), ("squeezenet1_1", 512), ("googlenet", 1024),
    ("inception_v3", 2048), ("regnet_y_400mf", 440), ("mobilenet_v3_small", 1024), ("alexnet", 4096),
    ("swin_t", 768), ("maxvit_t", 512), ("efficientnet_b0", 1280), ("densenet121", 1024),
])
def test_probe_finds_penultimate_size_on_the_meta_device(name, dim):
    got, params = bb.probe_backbone(name)
    assert got == dim and params > 0


def test_big_models_are_described_without_memory():
    info = bb.describe_backbone("vit_h_14")  # 632M parameters: meta tensors only
    assert info.feature_dim == 1280 and info.parameters > 600e6 and info.image_size == 518
    assert info.weights == "vit_h_14_swag-80465313.pth" and info.acc1 > 80 and info.gflops > 100


@pytest.mark.slow
def test_all_backbones_probe():
    rows = bb.list_backbones()
    assert len(rows) == len(bb.backbone_names())
    assert all(r.feature_dim for r in rows if r.name != "identity")


@pytest.mark.parametrize("name, size", [("mobilenet_v3_small", 64), ("squeezenet1_1", 64), ("regnet_x_400mf", 32)])
def test_real_backbone_output_matches_probe(name, size):
    torch.manual_seed(0)
    model, dim = bb.build_backbone(name, "none")
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim) == (2, bb.probe_backbone(name)[0])


def test_fixed_size_architecture_says_which_size():
    with pytest.raises(ConfigError, match="vit_b_16 cannot take 64x64 inputs.*224 px"):
        bb.probe_backbone("vit_b_16", 64)


def test_default_weights():
    assert bb.default_weights("convnext_tiny") == "imagenet"
    assert bb.default_weights("smallcnn") == bb.default_weights("identity") == "none"


# -- ImageNet weights: cache, download, one-line error ----------------------------------------------
def test_missing_weights_are_one_clear_line(offline, tmp_path):
    with pytest.raises(WeightsError) as err:
        bb.build_backbone("mobilenet_v3_small", "imagenet")
    message = str(err.value)
    assert "\n" not in message and len(offline) == 1
    assert "mobilenet_v3_small-047dcff4.pth" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message and "TORCH_HOME=" in message
    assert "--weights FILE" in message and "--weights none" in message


def test_cached_weights_are_used_without_download(offline, tmp_path):
    from torchvision import models

    torch.manual_seed(5)
    reference = models.mobilenet_v3_small()
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "mobilenet_v3_small-047dcff4.pth")
    assert bb.cached_weights("mobilenet_v3_small") == str(cache / "mobilenet_v3_small-047dcff4.pth")
    model, dim = bb.build_backbone("mobilenet_v3_small", "imagenet")
    assert not offline  # nothing was downloaded
    reference.classifier[3] = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x)) and dim == 1024


def test_download_lands_in_the_cache(tmp_path, monkeypatch):
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    torch.manual_seed(1)
    state = models.squeezenet1_1().state_dict()

    def fake_download(url, path):
        assert url.endswith("/squeezenet1_1-b8a52dc0.pth")
        torch.save(state, path)

    monkeypatch.setattr(bb, "download_weights", fake_download)
    model, dim = bb.build_backbone("squeezenet1_1", "imagenet")
    assert dim == 512 and bb.cached_weights("squeezenet1_1")
    assert torch.equal(model.features[0].weight, state["features.0.weight"])


# -- ghindex backbones -----------------------------------------------------------------------------
def test_cli_backbones_table_and_json(runner, offline):
    result = runner.invoke(cli, ["backbones", "smallcnn", "resnet18", "convnext_tiny"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "features", "params"]
    assert lines[2].split()[:3] == ["resnet18", "512", "11.2M"] and lines[2].split()[-1] == "no"
    assert "convnext_tiny-983f1562.pth" in lines[3]
    result = runner.invoke(cli, ["backbones", "--format", "json", "resnet18"])
    row = json.loads(result.stdout)
    assert row["feature_dim"] == 512 and row["cached"] is False and row["weights"] == "resnet18-f37072fd.pth"
    result = runner.invoke(cli, ["backbones", "nope"])
    assert result.exit_code == 1 and result.output.startswith("Error: unknown backbone 'nope'")


# -- training: any backbone, default weights, presets, held-out mAP ---------------------------------
@pytest.mark.parametrize("name, dim", [
    ("mobilenet_v3_small", 1024),
    pytest.param("convnext_tiny", 768, marks=pytest.mark.slow),  # 28M parameters: ~30 s on a busy CPU
])
def test_train_any_torchvision_backbone(tmp_path, runner, name, dim):
    folder = make_images(str(tmp_path / "imgs"), per_class=3)
    out = tmp_path / "c.ghm"
    result = runner.invoke(cli, ["train", folder, "--backbone", name, "--weights", "none", "--bits", "8",
                                 "--image-size", "32", "--epochs", "1", "--batch-size", "6", "--workers", "0",
                                 "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    model = ghindex.Encoder.load(out)
    assert model.config.backbone == name and model.config.feature_dim == dim
    assert model.config.extra["training"]["backbone_lr_scale"] == 1.0  # random weights: one learning rate


def test_default_is_pretrained_and_offline_error_is_one_line(tmp_path, runner, offline):
    folder = make_images(str(tmp_path / "imgs"), per_class=2)
    result = runner.invoke(cli, ["train", folder, "--bits", "8", "--out", str(tmp_path / "m.ghm")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ImageNet weights for efficientnet_b0")
    assert "--weights none" in lines[0] and not (tmp_path / "m.ghm").exists()


def test_presets_fill_unset_settings_only():
    feats, labels = blobs(n_per_class=20, dim=8)
    src = DataSource("features", "blobs", features=np.abs(feats))
    run = dict(bits=32, unsupervised=True, epochs=1, device="cpu", progress=False)  # (16 bits or fewer: small_codes_lr)
    info = ghindex.train(src, **run).config.extra["training"]
    default = train_module.PRESETS["default"]["unsupervised"]
    assert (info["lr"], info["alpha"], info["center"], info["batch_size"]) == (
        default["lr"], default["alpha"], default["center"], default["batch_size"])
    info = ghindex.train(src, preset="paper", **run).config.extra["training"]
    assert (info["lr"], info["alpha"], info["center"], info["preset"]) == (1e-4, 0.1, False, "paper")
    assert info["lr_step"] == 0  # the authors' unsupervised code never lowers the lr
    info = ghindex.train(src, preset="paper", lr=0.02, **run).config.extra["training"]
    assert info["lr"] == 0.02 and info["alpha"] == 0.1
    info = ghindex.train(src, preset="paper", lr_step=7, **run).config.extra["training"]
    assert info["lr_step"] == 7
    labelled = DataSource("features", "blobs", features=feats, labels=labels)
    info = ghindex.train(labelled, bits=8, preset="paper", device="cpu", progress=False, epochs=2,
                         val_fraction=0).config.extra["training"]
    assert info["lr_step"] == 1  # 60% of the epochs given, as without a preset step
    assert train_module.PRESETS["paper"]["finetune"]["epochs"] == 50  # cifar1.py: 50 epochs, x0.1 after 30
    with pytest.raises(ConfigError, match="unknown preset"):
        ghindex.train(src, preset="fast", **run)


def test_backbone_layers_learn_at_lr_times_backbone_lr_scale(tmp_path):
    folder = make_images(str(tmp_path / "imgs"), per_class=3)
    torch.manual_seed(0)
    weights = tmp_path / "s.pt"
    torch.save(bb.build_backbone("smallcnn")[0].state_dict(), weights)
    common = dict(bits=8, backbone="smallcnn", image_size=32, epochs=1, batch_size=6, workers=0, device="cpu",
                  progress=False, lr=0.01, val_fraction=0)
    run = train_module._TrainingRun
    seen = {}
    real = run.make_optimizer

    def spy(self):
        real(self)
        seen["lrs"] = [g["lr"] for g in self.optimizer.param_groups]

    run.make_optimizer = spy
    try:
        ghindex.train(folder, weights=str(weights), **common)  # pretrained (a file): one lr (measured best)
        assert train_module.PRESETS["default"]["finetune"]["backbone_lr_scale"] == 1.0
        assert seen["lrs"] == pytest.approx([0.01, 0.01])
        ghindex.train(folder, weights=str(weights), backbone_lr_scale=0.5, **common)
        assert seen["lrs"] == pytest.approx([0.01, 0.005])
        ghindex.train(folder, weights="none", backbone_lr_scale=0.5, **common)  # an explicit scale always wins
        assert seen["lrs"] == pytest.approx([0.01, 0.005])
    finally:
        run.make_optimizer = real


def test_held_out_map_in_log_and_keep_best(tmp_path, runner):
    feats, labels = blobs(n_per_class=100, dim=16, classes=4, seed=2, spread=1.5)
    path = tmp_path / "f.npz"
    np.savez(path, features=feats, labels=labels)
    out = tmp_path / "m.ghm"
    result = runner.invoke(cli, ["train", str(path), "--bits", "16", "--epochs", "4", "--val-every", "2",
                                 "--val-fraction", "0.1", "--lr", "0.01", "--out", str(out), "--device", "cpu",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("held-out mAP") == 2
    log = [json.loads(line) for line in open(str(out) + ".log.jsonl")]
    assert [("val_map" in r) for r in log] == [False, True, False, True]
    assert all(r["items"] == 360 for r in log) and 0.5 < log[-1]["val_map"] <= 1
    info = ghindex.Encoder.load(out).config.extra["training"]
    assert info["val_items"] == 40 and info["items"] == 360 and info["selection"].startswith("last epoch")

    best = tmp_path / "best.ghm"
    model = ghindex.train(str(path), bits=16, epochs=4, val_every=1, val_fraction=0.1, lr=0.01, keep_best=True,
                          out=best, device="cpu", progress=False)
    log = [json.loads(line) for line in open(str(best) + ".log.jsonl")]
    top = max(range(4), key=lambda i: (log[i]["val_map"], -i))
    assert model.config.extra["training"]["selection"].startswith(f"best held-out mAP {log[top]['val_map']:.4f}, epoch {top + 1}")
    # without labels there is nothing to rank: no held-out slice, every item trains
    model = ghindex.train(DataSource("features", "x", features=np.abs(feats)), bits=16, unsupervised=True, epochs=1,
                          device="cpu", progress=False)
    assert model.config.extra["training"]["val_items"] == 0 and model.config.extra["training"]["items"] == 400


def test_resume_with_held_out_and_keep_best_is_bit_identical(tmp_path, monkeypatch):
    from test_train import train_until_crash

    feats, labels = blobs(n_per_class=50, dim=10, classes=2, seed=4, spread=1.2)
    data = DataSource("features", "blobs", features=feats, labels=labels)
    common = dict(bits=16, epochs=3, lr=0.01, seed=3, val_fraction=0.2, val_every=1, keep_best=True,
                  device="cpu", progress=False)
    full = tmp_path / "full.ghm"
    ghindex.train(data, out=full, **common)
    part = tmp_path / "part.ghm"
    train_until_crash(monkeypatch, data, part, 2, **common)
    ghindex.train(data, out=part, resume=True, **common)
    a, b = state_of(full), state_of(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ghindex.Encoder.load(full).config.extra["training"]["selection"] == \
        ghindex.Encoder.load(part).config.extra["training"]["selection"]


def test_unsupervised_defaults_do_not_depend_on_the_feature_scale():
    feats, _ = blobs(n_per_class=40, dim=12, classes=3, seed=6)
    feats = np.abs(feats)
    run = dict(bits=16, unsupervised=True, epochs=2, device="cpu", progress=False)
    small = ghindex.train(DataSource("features", "x", features=feats), **run)
    big = ghindex.train(DataSource("features", "x", features=feats * 1000), **run)
    a, b = small.encode(torch.from_numpy(feats)), big.encode(torch.from_numpy(feats * 1000))
    assert np.unpackbits(a ^ b).mean() < 0.02  # the same codes up to float rounding
    assert small.config.extra["training"]["hash_hidden"] == train_module.PRESETS["default"]["unsupervised"]["hash_hidden"]
    assert big.config.extra["training"]["feature_scale"] == pytest.approx(
        small.config.extra["training"]["feature_scale"] / 1000, rel=1e-6)


def test_unsupervised_defaults_survive_outlier_rows():
    # Real 32 px MobileNetV2 features have rows up to 8x the median distance from the mean; with one
    # common scale their H values made the cubic penalty blow up (loss inf in epoch 1) at the default lr.
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2000, 256)) * np.linspace(3, 0.1, 256)  # anisotropic, like CNN features
    feats[rng.choice(2000, 20, replace=False)] *= 12  # one common scale: loss inf in epoch 2
    model = ghindex.train(DataSource("features", "x", features=feats.astype(np.float32)), bits=32,
                          unsupervised=True, epochs=3, device="cpu", progress=False)
    final = model.config.extra["training"]["final"]
    assert final["loss"] < 1 and 0.2 < final["bit_ones_min"] <= final["bit_ones_max"] < 0.8
    # codes from the saved layer, which reads raw features: outliers are coded like the rest
    codes = np.unpackbits(model.encode(torch.from_numpy(feats.astype(np.float32))), axis=1)
    assert 0.3 < codes.mean() < 0.7
