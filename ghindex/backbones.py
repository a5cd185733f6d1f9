"""Feature extractors by name: torchvision CNNs cut at the layer GreedyHash uses, or `identity`.

Names: ``smallcnn``, ``identity`` (precomputed feature vectors) and every image classification model of
torchvision (`backbone_names()`). The paper's AlexNet and VGG16 end at fc7 (4096-d, after its ReLU);
every other torchvision model loses its ImageNet head and gives the vector that fed it (the penultimate
layer: pooled features for CNNs, the class token for ViTs), its size found by a dry forward pass on the
meta device (`probe_backbone`). alexnet, vgg16, resnet18/34/50/101 and mobilenet_v2 keep the
`nn.Sequential` key layout of earlier ghindex versions, so their model files still load.

Weights: ``none`` (random init), ``imagenet`` (torchvision's DEFAULT weights: read from the torch hub
cache, downloaded there when missing; `fetch_imagenet_weights` raises a one-line WeightsError when
neither works) or a path to a local state dict in torchvision's key layout (``.pt``/``.pth`` read with
``weights_only=True``, or ``.safetensors``). Keys of the ImageNet classifier head may be absent. Cached
ImageNet files are read the same way: nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

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


# Detail features (`WithDetail`): per backbone, the intermediate layer whose output, average-pooled to
# a DETAIL_GRID x DETAIL_GRID grid, joins the pooled features; `detail_layer="auto"` reads this table.
# mobilenet_v2 "0.13": the last 96-channel block (1/16 of the input; 8 x 8 at 128 px). Chosen on a
# validation split of CIFAR-10 training images (benchmarks/RESULTS.md, "Copies"): with it, view-LDA codes
# found 0.96 of edited copies at 64 bits against 0.83 without; the last 160- and 320-channel blocks and
# a 2 x 2 grid of the final 1280 channels helped far less.
DETAIL_LAYERS = {"mobilenet_v2": "0.13"}
DETAIL_GRID = 2


class WithDetail(nn.Module):
    """A CNN feature extractor whose pooled features come with a detail block: the output of an
    intermediate layer (`layer`, a qualified submodule name) average-pooled to a 2 x 2 grid.

    Pooled features of a late layer say what an image shows, and images that show the same thing
    look alike to them; an edited copy of an image keeps its layout and textures, which a mid-level
    layer's grid still holds. Each block is scaled to unit length, so neither drowns the other
    whatever the layers' magnitudes (unscaled, the 1280-d block's norm is ~6x the detail block's, and
    codes learned from the two found 0.87 of the copies instead of 0.96).
    """

    def __init__(self, body: nn.Module, layer: str, pooled_width: int | None = None):
        super().__init__()
        self.body = body
        self.layer = layer
        self.pooled_width = pooled_width  # columns of the pooled block (the body's feature width)
        body.get_submodule(layer)  # AttributeError now, not at the first forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        # a hook for this call only: the module tree (and so the state-dict keys) stays the body's
        handle = self.body.get_submodule(self.layer).register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            pooled = self.body(x)
        finally:
            handle.remove()
        if captured[-1].ndim != 4:
            raise ValueError(f"layer {self.layer!r} gives a {captured[-1].ndim}-d output, not an (N, C, H, W) map")
        detail = torch.nn.functional.adaptive_avg_pool2d(captured[-1], DETAIL_GRID).flatten(1)
        return torch.cat([torch.nn.functional.normalize(pooled, dim=1),
                          torch.nn.functional.normalize(detail, dim=1)], 1)


def resolve_detail_layer(backbone: str, detail_layer: str | None) -> str | None:
    """``auto``: the backbone's `DETAIL_LAYERS` entry (None where it has none); ``none``/None: None;
    anything else: that layer name (checked when the backbone is built)."""
    if detail_layer is None or str(detail_layer).strip().lower() in ("", "none"):
        return None
    if str(detail_layer).strip().lower() == "auto":
        return DETAIL_LAYERS.get(backbone)
    return str(detail_layer)


def _with_detail(extractor: nn.Module, name: str, layer: str, pooled_width: int) -> tuple[nn.Module, int]:
    """(`WithDetail` of the extractor, whose own features are `pooled_width` wide, and its feature width);
    ConfigError for a layer it cannot use."""
    try:
        wrapped = WithDetail(extractor, layer, pooled_width)
    except AttributeError:
        layers = [n for n, m in extractor.named_modules() if n and not list(m.children())][:8]
        raise ConfigError(f"{name} has no layer {layer!r} for detail features (layers are named like "
                          f"{', '.join(repr(n) for n in layers)}, ...)") from None
    was_training = wrapped.training
    try:  # its width: one forward of a small blank image (in eval mode: BatchNorm statistics untouched)
        wrapped.eval()
        with torch.no_grad():
            width = int(wrapped(torch.zeros(1, 3, 64, 64)).shape[1])
    except (RuntimeError, ValueError) as exc:  # e.g. a layer whose output is not an (N, C, H, W) map
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"layer {layer!r} of {name} cannot be pooled to a grid for detail features "
                          f"({first[:200]})") from None
    finally:
        wrapped.train(was_training)
    return wrapped, width


# torchvision builders whose keyword arguments change with the weights: ghindex builds them the same way
# with and without weights, so a model file trained from ImageNet weights reloads with weights="none".
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # googlenet / inception_v3 auxiliary heads (dropped)


def torchvision_names() -> list[str]:
    """The image classification models of torchvision (`list_models(module=torchvision.models)`)."""
    from torchvision import models

    return sorted(models.list_models(module=models))


def backbone_names() -> list[str]:
    """Every backbone name `build_backbone` accepts: ghindex's own plus every torchvision classifier."""
    return sorted(set(BACKBONES) | set(torchvision_names()))


def _generic_cut(model: nn.Module) -> nn.Module:
    """Remove the ImageNet classification head in place: its input, the penultimate layer, is the
    feature vector. torchvision's own forward (pooling, flattening, norms before the head) is kept."""
    name = _head_name(model)
    if name is None:  # squeezenet: the head is a 1x1 conv + ReLU + pooling; keep only the pooling
        model.classifier = nn.AdaptiveAvgPool2d(1)
        return model
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model


def _head_name(model: nn.Module) -> str | None:
    """Qualified name of the last Linear layer with 1,000 outputs (the ImageNet head); None if none."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000 and not name.startswith(_AUX_PREFIXES):
            found = name
    return found


def backbone_spec(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    if name in torchvision_names():
        return BackboneSpec(name, None, (), _generic_cut)
    close = difflib.get_close_matches(str(name), backbone_names(), n=3)
    raise ConfigError(
        f"unknown backbone {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
        + "; known: smallcnn, identity and every torchvision classification model (`ghindex backbones` lists them)"
    )


def _build_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments that make a torchvision builder produce the architecture of its DEFAULT weights."""
    if name.startswith("vit_"):
        return {"image_size": imagenet_weights(name).meta["min_size"][0]}
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "transform_input": True, "init_weights": True}
    return {}


def _torchvision_model(name: str) -> nn.Module:
    from torchvision import models

    return models.get_model(name, weights=None, **_build_kwargs(name))


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every parameter and buffer on the meta device while other tensors stay real (some
    builders compute layer widths with tensor ops and `.tolist()`, which the meta device cannot do)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def _meta_backbone(name: str) -> nn.Module:
    """The feature extractor of `name` with every tensor on the meta device: no memory, no init cost."""
    spec = backbone_spec(name)
    if spec.cut is None:
        raise ConfigError("the identity backbone has no architecture to build")
    make = spec.make or (lambda: _torchvision_model(name))
    try:
        with torch.device("meta"):
            model = make()
    except (NotImplementedError, RuntimeError):
        with _parameters_on_meta():
            model = make()
    return spec.cut(model).eval()


def default_image_size(name: str) -> int | None:
    """The input size the DEFAULT ImageNet weights were evaluated at (crop size); None without weights."""
    if name in BACKBONES and BACKBONES[name].torchvision_name is None:
        return None
    w = imagenet_weights(name)
    return int(w.transforms.keywords.get("crop_size", 224))


@functools.lru_cache(maxsize=None)
def probe_backbone(name: str, image_size: int | None = None) -> tuple[int, int]:
    """(feature dimension, parameter count) of a backbone's feature extractor, by a dry forward pass of
    one `image_size` image (default: its weights' size, else 224) on the meta device: nothing is
    allocated or computed, so even the 600M-parameter models are cheap to describe. Raises ConfigError
    when the architecture cannot take that input size."""
    model = _meta_backbone(name)
    size = image_size or default_image_size(name) or 224
    try:
        with torch.no_grad():
            out = model(torch.empty(1, 3, size, size, device="meta"))
    except Exception as exc:  # shape errors of a fixed-size architecture (ViT) or a too small input
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{name} cannot take {size}x{size} inputs ({text}); "
                          f"its ImageNet weights use {default_image_size(name) or 224} px") from None
    if out.ndim != 2:
        raise ConfigError(f"{name} gives features of shape {tuple(out.shape[1:])}, not a vector")
    return int(out.shape[1]), int(sum(p.numel() for p in model.parameters()))


def imagenet_weights(name: str):
    """torchvision's default ImageNet weights enum member for a backbone (no download)."""
    from torchvision import models

    spec = BACKBONES.get(name)
    if spec is not None and spec.torchvision_name is None:
        raise ConfigError(f"the {name} backbone has no ImageNet weights (use weights='none' or a local file)")
    backbone_spec(name)  # unknown names: the usual error
    return models.get_model_weights(spec.torchvision_name if spec else name).DEFAULT


def default_weights(name: str) -> str:
    """``imagenet`` for every backbone that has ImageNet weights, ``none`` for smallcnn and identity."""
    spec = BACKBONES.get(name)
    return "none" if spec is not None and spec.torchvision_name is None else "imagenet"


def weights_cache_dir() -> str:
    """Where torchvision keeps downloaded weights: `torch.hub.get_dir()`/checkpoints ($TORCH_HOME/hub/...)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def weights_file_name(name: str) -> str:
    return os.path.basename(urllib.parse.urlparse(imagenet_weights(name).url).path)


def cached_weights(name: str) -> str | None:
    """Path of the backbone's ImageNet weights in the local torch hub cache, or None."""
    path = os.path.join(weights_cache_dir(), weights_file_name(name))
    return path if os.path.isfile(path) else None


def download_weights(url: str, path: str) -> None:
    """Download `url` to `path` (torchvision's hash check from the file name). Tests replace this."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    torch.hub.download_url_to_file(url, path, match.group(1) if match else None, progress=True)


def fetch_imagenet_weights(name: str) -> str:
    """Path of the ImageNet weights file of a backbone: from the torch hub cache, downloaded there
    when missing. WeightsError (one line: the file, where torchvision looks, the alternatives) when
    it is neither cached nor downloadable."""
    w = imagenet_weights(name)
    path = cached_weights(name)
    if path:
        return path
    path = os.path.join(weights_cache_dir(), weights_file_name(name))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        download_weights(w.url, path)
    except Exception as exc:  # no network, proxy, disk full...: one actionable line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        home = os.environ.get("TORCH_HOME")
        raise WeightsError(
            f"ImageNet weights for {name} ({os.path.basename(path)}) are not in the torch hub cache and could not "
            f"be downloaded ({reason[:160]}); torchvision looks in {os.path.dirname(path)} "
            f"({'TORCH_HOME=' + home if home else 'set TORCH_HOME to change it'}): put the file there, or pass "
            "--weights FILE (a state dict in torchvision's key layout) or --weights none (random init)"
        ) from None
    if not os.path.isfile(path):
        raise WeightsError(f"downloading {w.url} did not produce {path}")
    return path


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
    state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIXES)}
    head = _head_name(model) if spec.cut is _generic_cut else None
    optional = spec.head_prefixes + ((head + ".",) if head else ()) + (("classifier.",) if name.startswith("squeezenet") else ())
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(optional))
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


def build_backbone(name: str, weights: str = "none", feature_dim: int | None = None,
                   detail_layer: str | None = None) -> tuple[nn.Module, int]:
    """Return (feature extractor, feature dimension) for a backbone name.

    `weights` is ``none``, ``imagenet`` (torchvision's DEFAULT weights, from the torch hub cache or
    downloaded into it) or a path to a state-dict file in torchvision's key layout. `feature_dim` is
    required for ``identity`` (the size of the precomputed feature vectors) and must not contradict
    the others. `detail_layer`: a layer whose grid-pooled output joins the features (`WithDetail`;
    a name, not ``auto``: see `resolve_detail_layer`).
    """
    spec = backbone_spec(name)
    if detail_layer is not None and spec.cut is None:
        raise ConfigError("the identity backbone has no layers: detail features need an image backbone")
    if spec.cut is None:
        if not feature_dim or feature_dim <= 0:
            raise ConfigError("the identity backbone needs feature_dim, the length of the feature vectors")
        if weights not in (None, "none"):
            raise ConfigError("the identity backbone takes no weights (use weights='none')")
        return nn.Identity(), int(feature_dim)
    dim = spec.feature_dim if spec.feature_dim is not None else probe_backbone(name)[0]
    if feature_dim is not None and feature_dim != dim and detail_layer is None:
        raise ConfigError(f"{name} produces {dim}-d features, not {feature_dim}")
    if weights == "imagenet":
        path = fetch_imagenet_weights(name)  # before building: a missing file fails fast
    model = spec.make() if spec.make else _torchvision_model(spec.torchvision_name or name)
    if weights == "imagenet":
        _load_local(model, name, spec, path)
    elif weights not in (None, "none"):
        _load_local(model, name, spec, os.fspath(weights))
    if detail_layer is not None:
        extractor, full = _with_detail(spec.cut(model), name, detail_layer, dim)
        if feature_dim is not None and feature_dim != full:
            raise ConfigError(f"{name} with detail layer {detail_layer!r} produces {full}-d features, not {feature_dim}")
        return extractor, full
    return spec.cut(model), dim


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    feature_dim: int | None  # None: identity (given by the data)
    parameters: int | None  # of the feature extractor (head removed)
    weights: str | None  # ImageNet weights file name; None: no ImageNet weights
    cached: bool  # that file is in the local torch hub cache
    image_size: int | None  # input size of the ImageNet weights
    acc1: float | None  # torchvision's ImageNet-1K top-1 accuracy of those weights
    gflops: float | None  # torchvision's GFLOPS per image of the whole classifier at image_size


def describe_backbone(name: str) -> BackboneInfo:
    """Everything `ghindex backbones` shows about one backbone, without downloading or allocating."""
    spec = backbone_spec(name)
    if spec.cut is None:
        return BackboneInfo(name, None, 0, None, False, None, None, None)
    dim, params = probe_backbone(name)
    if default_weights(name) == "none":
        return BackboneInfo(name, dim, params, None, False, None, None, None)
    w = imagenet_weights(name)
    return BackboneInfo(name, dim, params, weights_file_name(name), cached_weights(name) is not None,
                        default_image_size(name), float(w.meta["_metrics"]["ImageNet-1K"]["acc@1"]),
                        float(w.meta["_ops"]))


def list_backbones(names: list[str] | None = None) -> list[BackboneInfo]:
    """`describe_backbone` for the given names (default: `backbone_names()`), in that order."""
    return [describe_backbone(n) for n in (names or backbone_names())]
