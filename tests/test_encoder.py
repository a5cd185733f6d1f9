import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import ghindex
from ghindex.backbones import BACKBONES, build_backbone, imagenet_weights
from ghindex.errors import ConfigError, ModelFileError, WeightsError


def small_encoder(**kw):
    torch.manual_seed(0)
    args = dict(backbone="resnet18", bits=32, image_size=32)
    args.update(kw)
    return ghindex.Encoder(**args)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    paths = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "P", "CMYK"]):
        arr = rng.integers(0, 255, size=(40, 30, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode)
        p = d / f"img{i}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}"
        img.save(p)
        paths.append(str(p))
    return paths


def test_import_api():
    assert ghindex.Encoder is not None and hasattr(ghindex.Encoder, "encode")


def test_encode_paths_shapes_and_all_modes(image_dir):
    enc = small_encoder()
    codes = enc.encode(image_dir, batch_size=2)
    assert codes.shape == (5, 4) and codes.dtype == np.uint8


def test_encode_input_kinds_agree(image_dir):
    enc = small_encoder()
    pil = [Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR) for p in image_dir]
    arr = np.stack([np.asarray(im) for im in pil])
    from_pil = enc.encode(pil)
    from_uint8 = enc.encode(arr)
    from_tensor = enc.encode(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255)
    assert np.array_equal(from_pil, from_uint8)
    assert np.array_equal(from_uint8, from_tensor)


def test_save_load_gives_identical_codes(tmp_path, image_dir):
    enc = small_encoder(num_classes=10, extra={"note": "x"})
    path = tmp_path / "m.ghm"
    enc.save(path)
    loaded = ghindex.Encoder.load(path)
    assert loaded.config == enc.config
    assert np.array_equal(enc.encode(image_dir), loaded.encode(image_dir))
    assert not list(tmp_path.glob(".*tmp"))


def test_identity_backbone_encodes_features():
    enc = small_encoder(backbone="identity", feature_dim=20, bits=16)
    feats = np.random.default_rng(0).standard_normal((7, 20)).astype(np.float32)
    codes = enc.encode(feats, batch_size=3)
    h = enc.hash_layer(torch.from_numpy(feats)).detach().numpy()
    assert np.array_equal(codes, ghindex.pack_signs(h))
    with pytest.raises(ConfigError, match="NaN"):
        enc.encode(np.full((2, 20), np.nan, dtype=np.float32))


def test_unknown_backbone_lists_known():
    with pytest.raises(ConfigError, match="did you mean alexnet.*known: .*torchvision"):
        ghindex.Encoder("alexnett", 64)


@pytest.mark.parametrize("bits", [0, 12, 63])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="multiple of 8"):
        ghindex.Encoder("identity", bits, feature_dim=4)


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "smallcnn"])
def test_backbone_feature_dims(name):
    model, dim = build_backbone(name)
    assert dim == BACKBONES[name].feature_dim
    with torch.no_grad():
        size = 64 if name != "alexnet" else 96
        out = model.eval()(torch.zeros(1, 3, size, size))
    assert out.shape == (1, dim)


def test_imagenet_weights_resolve_to_torchvision_enum():
    w = imagenet_weights("alexnet")
    assert type(w).__name__ == "AlexNet_Weights"
    assert imagenet_weights("mobilenet_v2").url.startswith("https://")


def test_local_weights_file_without_head(tmp_path):
    from torchvision import models

    torch.manual_seed(3)
    full = models.mobilenet_v2(weights=None)
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}
    torch.save(state, tmp_path / "w.pt")
    model, _ = build_backbone("mobilenet_v2", str(tmp_path / "w.pt"))
    assert torch.equal(model[0][0][0].weight, full.features[0][0].weight)


def test_local_weights_file_that_does_not_fit(tmp_path):
    from torchvision import models

    torch.save(models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="does not fit mobilenet_v2"):
        build_backbone("mobilenet_v2", str(tmp_path / "r18.pt"))
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "nope.pt"))


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_payload_model_is_refused_and_not_executed(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ghm"
    with open(evil, "wb") as f:
        pickle.dump({"state": _Payload(str(target))}, f)
    with pytest.raises(ModelFileError, match="not a ghindex model"):
        ghindex.Encoder.load(evil)
    assert not target.exists()
    # the same payload as a .pt weights file is refused by weights_only loading
    evil_pt = tmp_path / "evil.pt"
    evil_pt.write_bytes(evil.read_bytes())
    with pytest.raises(WeightsError):
        build_backbone("resnet18", str(evil_pt))
    assert not target.exists()


def test_truncated_model_file(tmp_path):
    enc = small_encoder(backbone="identity", feature_dim=8, bits=8)
    enc.save(tmp_path / "m.ghm")
    data = (tmp_path / "m.ghm").read_bytes()
    (tmp_path / "t.ghm").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        ghindex.Encoder.load(tmp_path / "t.ghm")


def test_smallcnn_has_no_imagenet_weights_but_reloads_local(tmp_path):
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_backbone("smallcnn", "imagenet")
    torch.manual_seed(0)
    model, dim = build_backbone("smallcnn")
    torch.save(model.state_dict(), tmp_path / "s.pt")
    again, _ = build_backbone("smallcnn", str(tmp_path / "s.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert dim == 256 and torch.equal(model.eval()(x), again.eval()(x))


def test_config_of_a_model_file_from_before_hash_hidden_reads_as_no_hidden_layer():
    from ghindex.encoder import EncoderConfig

    old = json.loads(EncoderConfig(backbone="identity", bits=8, feature_dim=4).to_json())
    del old["hash_hidden"]
    config = EncoderConfig.from_json(json.dumps(old))
    assert config.hash_hidden == 0
    model = ghindex.Encoder("identity", 8, feature_dim=4)
    assert model.hidden_layer is None and set(model.state_dict()) == {"hash_layer.weight", "hash_layer.bias"}
    # a linear head stays format 1 (older ghindex reads it); a hidden layer is format 2 (older ones refuse it)
    assert model.config.format_version == 1
    assert ghindex.Encoder("identity", 8, feature_dim=4, hash_hidden=5).config.format_version == 2
