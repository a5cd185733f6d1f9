"""Feature extractors by name: torchvision CNNs cut at the layer GreedyHash uses, or `identity`.

Weights: ``none`` (random init), ``imagenet`` (torchvision's weights enum; downloads on first use) or a
path to a local state dict in torchvision's key layout (``.pt``/``.pth`` read with
``weights_only=True``, or ``.safetensors``). Keys of the ImageNet classifier head may be absent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError, WeightsError


@dataclass(frozen=True)
class BackboneSpec:
    torchvision_name: str | None  # None: not from torchvision (identity, smallcnn)
    feature_dim: int | None  # None: given by the user (identity)
    head_prefixes: tuple[str, ...]  # state-dict keys that may be missing from a weights file
    cut: Callable[[nn.Module], nn.Module] | None  # full model -> feature extractor; None: identity
    make: Callable[[], nn.Module] | None = None  # builds the full model when not from torchvision


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-maxpool blocks (32-64-128-256 channels) and global pooling: 256-d features.

    Not from the paper: a backbone small enough to train from scratch on a CPU in minutes on
    32-64 px images (the demo uses it). Random init only, or a local file of its own weights.
    """

    def __init__(self, channels=(32, 64, 128, 256)):
        super().__init__()
        layers, cin = [], 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    def forward(self, x):
        return self.pool(self.features(x))


def _alexnet_fc7(m: nn.Module) -> nn.Module:
    # conv features + fc6 + fc7 with their dropout/ReLU, as GreedyHash's AlexNet model.
    return nn.Sequential(m.features, m.avgpool, nn.Flatten(1), *list(m.classifier.children())[:6])


def _vgg_fc7(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.features, m.avgpool, nn.Flatten(1), *list(m.classifier.children())[:6])


def _resnet_pool(m: nn.Module) -> nn.Module:
    return nn.Sequential(*list(m.children())[:-1], nn.Flatten(1))


def _mobilenet_pool(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


BACKBONES: dict[str, BackboneSpec] = {
    "alexnet": BackboneSpec("alexnet", 4096, ("classifier.6.",), _alexnet_fc7),
    "vgg16": BackboneSpec("vgg16", 4096, ("classifier.6.",), _vgg_fc7),
    "resnet18": BackboneSpec("resnet18", 512, ("fc.",), _resnet_pool),
    "resnet34": BackboneSpec("resnet34", 512, ("fc.",), _resnet_pool),
    "resnet50": BackboneSpec("resnet50", 2048, ("fc.",), _resnet_pool),
    "resnet101": BackboneSpec("resnet101", 2048, ("fc.",), _resnet_pool),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", 1280, ("classifier.",), _mobilenet_pool),
    "smallcnn": BackboneSpec(None, 256, (), lambda m: m, SmallCNN),
    "identity": BackboneSpec(None, None, (), None),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}"
        ) from None


def imagenet_weights(name: str):
    """torchvision's default ImageNet weights enum member for a backbone (no download)."""
    from torchvision import models

    spec = backbone_spec(name)
    if spec.torchvision_name is None:
        raise ConfigError(f"the {name} backbone has no ImageNet weights (use weights='none' or a local file)")
    return models.get_model_weights(spec.torchvision_name).DEFAULT


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure is the file's fault, never a crash
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if text.startswith("Weights only load failed"):
            # torch's message goes on to suggest weights_only=False, i.e. running the file's code: never.
            raise WeightsError(
                f"weights file {path} holds pickled objects other than tensors; refusing to unpickle them, "
                "which could run code from the file (save a plain state dict, or use .safetensors)"
            ) from None
        raise WeightsError(f"cannot read weights file {path}: {text}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _load_local(model: nn.Module, name: str, spec: BackboneSpec, path: str) -> None:
    state = read_state_dict(path)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(spec.head_prefixes))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        parts = []
        for label, keys in (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsError(
            f"weights file {path} does not fit {name} (torchvision's key layout): "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)


def build_backbone(name: str, weights: str = "none", feature_dim: int | None = None) -> tuple[nn.Module, int]:
    """Return (feature extractor, feature dimension) for a backbone name.

    `weights` is ``none``, ``imagenet`` or a path to a state-dict file. `feature_dim` is required for
    ``identity`` (the size of the precomputed feature vectors) and must not contradict the others.
    """
    spec = backbone_spec(name)
    if spec.cut is None:
        if not feature_dim or feature_dim <= 0:
            raise ConfigError("the identity backbone needs feature_dim, the length of the feature vectors")
        if weights not in (None, "none"):
            raise ConfigError("the identity backbone takes no weights (use weights='none')")
        return nn.Identity(), int(feature_dim)
    if feature_dim is not None and feature_dim != spec.feature_dim:
        raise ConfigError(f"{name} produces {spec.feature_dim}-d features, not {feature_dim}")

    from torchvision import models

    def random_init() -> nn.Module:
        return spec.make() if spec.make else models.get_model(spec.torchvision_name, weights=None)

    if weights in (None, "none"):
        model = random_init()
    elif weights == "imagenet":
        model = models.get_model(spec.torchvision_name, weights=imagenet_weights(name))
    else:
        model = random_init()
        _load_local(model, name, spec, weights)
    return spec.cut(model), spec.feature_dim
