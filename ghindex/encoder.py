"""`Encoder`: backbone -> [ReLU layer] -> linear projection to `bits` -> GreedyHash sign, in one
self-describing file.

Model file: a safetensors file whose metadata holds ``{"ghindex_config": <JSON EncoderConfig>}``.
safetensors stores raw tensors only, so loading a model can never execute code from the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .allocator import keep_freed_memory
from .backbones import build_backbone
from .errors import ConfigError, ModelFileError
from .hashing import check_bits, greedy_sign, pack_signs
from .images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor, load_image, normalize
from .io import atomic_path

FORMAT_VERSION = 4  # the newest version this module reads and writes (1: linear head; 2: with `hash_hidden`; 3: with `detail_layer`; 4: with `reduced_decode`)
CONFIG_KEY = "ghindex_config"


@dataclass
class EncoderConfig:
    """Everything needed to rebuild an Encoder and preprocess its inputs."""

    backbone: str
    bits: int
    feature_dim: int | None = None  # filled from the backbone; required for `identity`
    image_size: int = 224  # inputs are resized to image_size x image_size (no crop)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 0  # size of the bias-free classifier on codes (0: none)
    hash_hidden: int = 0  # width of a ReLU layer between the features and the hash layer (0: none, the paper's)
    detail_layer: str | None = None  # backbone layer whose 2x2-pooled output joins the features (backbones.WithDetail)
    copy_radius: int | None = None  # Hamming radius within which codes are copies (`ghindex dedup --radius auto`); None: not measured
    # Large JPEGs decode at a reduced scale for the resize to image_size (`images.load_image`'s size): part of
    # the model's preprocessing, so every code of one model decodes alike. False in files saved before it.
    reduced_decode: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: training run, protocol, seed...

    @property
    def decode_size(self) -> int | None:
        """The `size` to decode images with for this model (`images.load_image`): None decodes in full."""
        return self.image_size if self.reduced_decode else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("config is not a JSON object")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"model format version {data['format_version']} is newer than this ghindex supports ({FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _sniff(path: str) -> str | None:
    """'pickle' for a pickle stream (protocol 2+) or a zip archive (torch.save), 'safetensors' for a file
    that starts like one; None otherwise. Only the first bytes are looked at: nothing is loaded."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def check_hash_hidden(hash_hidden) -> None:
    """ConfigError unless `hash_hidden` is a usable hidden-layer width (an integer >= 0; 0: none)."""
    if isinstance(hash_hidden, bool) or not isinstance(hash_hidden, (int, np.integer)) or hash_hidden < 0:
        raise ConfigError(f"hash_hidden must be an integer >= 0 (0: no hidden layer), got {hash_hidden!r}")


class HashOutput(NamedTuple):
    features: torch.Tensor  # backbone output (N, feature_dim)
    h: torch.Tensor  # continuous hash-layer output (N, bits)
    b: torch.Tensor  # codes in {-1, +1} with straight-through gradient (N, bits)


class Encoder(nn.Module):
    """Backbone -> [Linear(feature_dim, hash_hidden) -> ReLU] -> Linear(., bits) -> sign.
    `encode()` returns packed uint8 codes."""

    def __init__(
        self,
        backbone: str,
        bits: int,
        weights: str = "none",
        feature_dim: int | None = None,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_classes: int = 0,
        extra: dict[str, Any] | None = None,
        hash_hidden: int = 0,
        detail_layer: str | None = None,
        reduced_decode: bool = True,
    ):
        super().__init__()
        keep_freed_memory()  # a CNN's per-layer tensors otherwise cost a page fault per 4 KiB (ghindex.allocator)
        check_bits(bits)
        if image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        if num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {num_classes}")
        check_hash_hidden(hash_hidden)
        self.backbone, feature_dim = build_backbone(backbone, weights, feature_dim, detail_layer)
        reduced_decode = bool(reduced_decode) and backbone != "identity"  # feature vectors decode nothing
        self.config = EncoderConfig(
            backbone=backbone,
            bits=int(bits),
            feature_dim=int(feature_dim),
            image_size=int(image_size),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            num_classes=int(num_classes),
            hash_hidden=int(hash_hidden),
            detail_layer=detail_layer,
            reduced_decode=reduced_decode,
            # the oldest version whose reader rebuilds the model exactly: an older reader refuses a file with a
            # hidden layer, detail features or reduced decoding ("newer than this ghindex supports") instead of
            # dropping them (a reader that decoded in full would make other codes for large JPEGs)
            format_version=4 if reduced_decode else 3 if detail_layer else 2 if hash_hidden else 1,
            extra=dict(extra or {}),
        )
        self.hidden_layer = nn.Linear(feature_dim, hash_hidden) if hash_hidden else None
        self.hash_layer = nn.Linear(hash_hidden or feature_dim, bits)
        self.classifier = nn.Linear(bits, num_classes, bias=False) if num_classes else None
        self._backbone_runner = None  # the frozen backbone's inference forward (`ghindex.runtime.use_runtime`)

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def code_bytes(self) -> int:
        return self.config.bits // 8

    def forward(self, x: torch.Tensor) -> HashOutput:
        """x: preprocessed input (images normalised, or feature vectors for `identity`)."""
        features = self.backbone(x)
        h = self.head(features)
        return HashOutput(features, h, greedy_sign(h))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Continuous hash outputs H for backbone features: the hash layer, after the hidden one if any."""
        if self.hidden_layer is not None:
            features = torch.relu(self.hidden_layer(features))
        return self.hash_layer(features)

    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous hash outputs H for a preprocessed batch; codes are H >= 0."""
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of a preprocessed batch, for inference: the one place a frozen backbone runs,
        through the runtime `ghindex.runtime.use_runtime` attached (ONNX Runtime on the CPU; it runs the
        PyTorch module itself wherever its export does not apply), else the PyTorch module. `forward`, which
        training differentiates, always runs the module."""
        runner = self._backbone_runner
        return runner(x) if runner is not None else self.backbone(x)

    @property
    def runtime(self) -> str:
        """Where `features` runs the backbone: ``torch`` or the attached runner's name (``onnx``)."""
        return "torch" if self._backbone_runner is None else self._backbone_runner.name

    def set_backbone_runner(self, runner) -> None:
        """Attach a callable that replaces `self.backbone(x)` in `features` (None: the module again).
        `ghindex.runtime.use_runtime` chooses and builds it."""
        self._backbone_runner = runner

    def __getstate__(self):
        # A runner holds an ONNX Runtime session, which cannot be copied or pickled: copies run PyTorch.
        state = dict(super().__getstate__())
        state["_backbone_runner"] = None
        return state

    # -- preprocessing -------------------------------------------------------------------------
    def preprocess(self, item) -> torch.Tensor:
        """One PIL image or image path -> a normalised (3, S, S) tensor per this encoder's config. A path is
        decoded as the config says (`decode_size`: large JPEGs at a reduced scale), as `ghindex encode` decodes
        it; a PIL image is taken as it was decoded."""
        c = self.config
        return image_to_tensor(load_image(item, c.decode_size), c.image_size, c.mean, c.std)

    def _prepare_batch(self, batch) -> torch.Tensor:
        c = self.config
        if isinstance(batch, np.ndarray):
            if batch.dtype == np.uint8:
                if batch.ndim != 4 or batch.shape[-1] != 3:
                    raise ConfigError(f"uint8 image batches must be (N, H, W, 3), got {batch.shape}")
                batch = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
            else:
                batch = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if isinstance(batch, torch.Tensor):
            if c.backbone == "identity":
                if batch.ndim != 2 or batch.shape[1] != c.feature_dim:
                    raise ConfigError(f"expected feature vectors of shape (N, {c.feature_dim}), got {tuple(batch.shape)}")
                if not torch.isfinite(batch).all():
                    raise ConfigError("feature vectors contain NaN or inf")
                return batch.float()
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise ConfigError(f"image tensors must be (N, 3, H, W) in [0, 1], got {tuple(batch.shape)}")
            batch = batch.float()
            if batch.shape[-2:] != (c.image_size, c.image_size):
                batch = torch.nn.functional.interpolate(
                    batch, size=(c.image_size, c.image_size), mode="bilinear", antialias=True, align_corners=False
                )
            return normalize(batch, c.mean, c.std)
        items = list(batch)
        if c.backbone == "identity":
            raise ConfigError("the identity backbone encodes feature arrays, not images")
        return torch.stack([self.preprocess(item) for item in items]) if items else torch.empty(0, 3, c.image_size, c.image_size)

    @torch.inference_mode()
    def encode(self, x, batch_size: int = 256, device: str | torch.device | None = None) -> np.ndarray:
        """Encode inputs to packed codes, shape (N, bits/8) uint8, LSB-first (FAISS's order).

        `x` is a float tensor batch ((N, 3, H, W) in [0, 1], or (N, D) features for `identity`), a
        uint8 numpy batch (N, H, W, 3), or a sequence of PIL images / image paths. Works in batches
        of `batch_size` so memory stays bounded.
        """
        n = self._count(x)
        out = np.empty((n, self.code_bytes), dtype=np.uint8)
        for start, h in self._hash_batches(x, batch_size, device):
            out[start : start + len(h)] = pack_signs(h)
        return out

    @torch.inference_mode()
    def hash_outputs(self, x, batch_size: int = 256, device: str | torch.device | None = None) -> np.ndarray:
        """The continuous hash outputs H of inputs (as `encode` takes them), (N, bits) float32: their
        codes are H >= 0, and |H| says how sure each bit is (`ghindex.hashing.weighted_hamming`)."""
        out = np.empty((self._count(x), self.bits), dtype=np.float32)
        for start, h in self._hash_batches(x, batch_size, device):
            out[start : start + len(h)] = h.float().cpu().numpy()
        return out

    @staticmethod
    def _count(x) -> int:
        return 1 if isinstance(x, (Image.Image, str, os.PathLike)) else len(x)

    def _hash_batches(self, x, batch_size: int, device):
        """(start, H of inputs start...) per batch of `batch_size`, in eval mode (restored after)."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        device = torch.device(device) if device is not None else next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            if isinstance(x, (Image.Image, str, os.PathLike)):
                x = [x]
            for start in range(0, len(x), batch_size):
                batch = self._prepare_batch(x[start : start + batch_size]).to(device)
                yield start, self.hash(batch)
        finally:
            self.train(was_training)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write weights and config to one safetensors file, atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, os.fspath(tmp), metadata={CONFIG_KEY: self.config.to_json()})

    @classmethod
    def read_config(cls, path: str | os.PathLike) -> EncoderConfig:
        """Read only the config of a model file (cheap: the header)."""
        from safetensors import safe_open

        name = os.fspath(path)
        if not os.path.isfile(name):
            raise ModelFileError(f"model file not found: {name}")
        try:
            with safe_open(name, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            kind = _sniff(name)
            if kind == "pickle":
                raise ModelFileError(
                    f"{name} is a pickle or zip file (e.g. from torch.save), not a ghindex model (safetensors); "
                    "refusing to unpickle it, which could run code from the file"
                ) from None
            if kind == "safetensors":
                raise ModelFileError(
                    f"{name} is a damaged or truncated model file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                ) from None
            raise ModelFileError(
                f"{name} is not a ghindex model file (not safetensors: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        if CONFIG_KEY not in meta:
            raise ModelFileError(f"{name} is a safetensors file but not a ghindex model (no {CONFIG_KEY} metadata)")
        try:
            return EncoderConfig.from_json(meta[CONFIG_KEY])
        except (ValueError, TypeError) as exc:
            raise ModelFileError(f"{name}: invalid model config ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Encoder":
        """Rebuild an Encoder from a file written by `save` (no other argument needed)."""
        from safetensors.torch import load_file

        name = os.fspath(path)
        config = cls.read_config(name)
        try:
            model = cls(
                config.backbone,
                config.bits,
                weights="none",
                feature_dim=config.feature_dim,
                image_size=config.image_size,
                mean=config.mean,
                std=config.std,
                num_classes=config.num_classes,
                extra=config.extra,
                hash_hidden=config.hash_hidden,
                detail_layer=config.detail_layer,
                reduced_decode=config.reduced_decode,
            )
        except ConfigError as exc:
            raise ModelFileError(f"{name}: {exc}") from None
        model.config.copy_radius = config.copy_radius  # measured after training, not a constructor argument
        try:
            state = load_file(name, device="cpu")
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ModelFileError(f"{name}: weights do not match the config ({str(exc).splitlines()[0]})") from None
        return model.to(device)
