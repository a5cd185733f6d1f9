"""Frozen backbones on the CPU through ONNX Runtime: the same features as PyTorch, several times faster.

`use_runtime(encoder, runtime)` decides where an Encoder's frozen backbone runs its inference forward
(`Encoder.features`, which `Encoder.hash`, `Encoder.encode`, `ghindex encode`, train's feature cache and
`serve` uploads all go through) and attaches the runner:

- ``torch``: the PyTorch module, as always;
- ``onnx``: the backbone exported once with `torch.onnx.export` (fp32, dynamic batch, the model's input
  size) and run by ONNX Runtime's CPU provider with PyTorch's thread count (`OnnxBackbone`);
- ``auto``: ``onnx`` on the CPU in fp32 when onnxruntime and onnx are installed (the `cpu` extra), else
  ``torch``; always ``torch`` on a GPU, with reduced precision and for a backbone that trains.

Why ONNX Runtime: side by side in one process on the 2-core machine (MobileNetV2, 224 px, batch 64, fp32,
2 threads; the machine was loaded, so ratios only) it ran 4.6-5.8x PyTorch eager, OpenVINO 4.4-5.0x,
torch.compile 1.5x after a 70 s compile, channels-last eager 1.0-1.1x. Much of that lead was page faults
of PyTorch's per-layer tensors, which `ghindex.allocator` removed: since then ONNX Runtime runs 1.2-2.0x
PyTorch's bare forward at 224 px and the whole command 1.2-1.6x. benchmarks/bench_encode.py measures the
bare forward and the whole `ghindex encode` per runtime.

The cache. The export depends only on the backbone's architecture and weights, so it is written once to
``$GHINDEX_CACHE/onnx`` (default ``~/.cache/ghindex/onnx``; ``$XDG_CACHE_HOME`` is honoured) under a
name holding the SHA-256 of the weights, the architecture, the input size and the torch version
(`backbone_fingerprint`), written to a temporary file and renamed. The model file stays the one source
of truth: the cache holds nothing that is not derived from it, can be deleted at any time, and nothing
in it is unpickled (an ONNX file is a protobuf). A cached file is never trusted blindly: it must carry
the fingerprint in its metadata and give PyTorch's features on a probe batch (`_check`) every time it is
loaded; a file that fails either is exported again. An unwritable cache folder means an export in memory.

The same codes. fp32 in both; the probe's features agree to 1e-4 of their range (measured: about 1e-6),
so a code bit flips only where the hash layer's output is within that distance of 0 (the benchmark and
tests/test_runtime.py count the flips). A backbone that cannot be exported, or whose export disagrees
with PyTorch, runs in PyTorch with one warning line (`auto`) or is an error (`onnx`).

The runner falls back to the PyTorch module, call by call, for anything it was not exported for: another
input size or dtype, a GPU tensor, autocast, the module in training mode, gradients wanted by a backbone
that trains; and for good once a weight or buffer of the backbone changes after the export (an optimizer
step, `load_state_dict`, BatchNorm statistics moving in training mode, a swapped `.data`), so it does not
give old weights' features. (A replaced submodule is not noticed: call `use_runtime` again after that.)
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, OutputError
from .io import atomic_path

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
EXPORT_FORMAT = 1  # bump when the export changes: older cache files then get other names and are not read
OPSET = 17
FINGERPRINT_KEY = "ghindex_backbone_fingerprint"  # ONNX metadata entry that names the weights exported
INPUT_NAME, OUTPUT_NAME = "images", "features"
PROBE_ROWS = 2  # probe batch: not the export's batch of 1, so a batch size baked into the graph shows
TOLERANCE = 1e-4  # largest |ONNX - PyTorch| on the probe, relative to the largest |feature|
# Rows per session run: a batch runs in slices of this many images. Whole batches of 64 spill a CNN's early
# activations out of the caches (MobileNetV2 at 224 px: 100 MB for its first layer's output); slices of 4 ran
# 12-18% faster at 224 px and 128 px on the 2-core machine, with bit-identical features (issue 27's notes).
ROWS_PER_RUN = 4


class _ExportFailed(Exception):
    """The backbone could not be exported, loaded or checked: the reason, one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def missing_packages() -> list[str]:
    """The packages the ``onnx`` runtime needs that are not installed: onnxruntime runs the backbone (imported
    here: it is quick), onnx exports it (only looked for: importing it takes a second or more)."""
    import importlib.util

    missing = []
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        missing.append("onnxruntime")
    try:
        found = importlib.util.find_spec("onnx") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (no import possible)
        found = False
    if not found:
        missing.append("onnx")
    return missing


def resolve_runtime(runtime: str, device: str | torch.device = "cpu", precision: str = "fp32", *,
                    backbone: str | None = None, trains_backbone: bool = False) -> str:
    """``torch`` or ``onnx`` for a runtime option (`RUNTIMES`), the device and precision the backbone runs
    at (precision resolved: fp32, bf16, fp16), and whether the backbone trains. ``onnx`` asked for where
    it cannot run is a ConfigError; ``auto`` then means ``torch``. The ``identity`` backbone runs nothing:
    always ``torch``."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "torch" or backbone == "identity":
        return "torch"
    dev = torch.device(device)
    reason = None
    if trains_backbone:
        reason = "the backbone is fine-tuned, which PyTorch does"
    elif dev.type != "cpu":
        reason = f"it runs on the CPU, not on {dev}"
    elif precision != "fp32":
        reason = f"it computes in fp32, not {precision}"
    else:
        missing = missing_packages()
        if missing:
            reason = f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed " \
                     "(pip install 'ghindex[cpu]')"
    if reason is None:
        return "onnx"
    if runtime == "onnx":
        raise ConfigError(f"runtime onnx cannot be used here: {reason}; use runtime torch or auto")
    return "torch"


def use_runtime(encoder, runtime: str = "auto", *, device: str | torch.device | None = None,
                precision: str = "fp32", trains_backbone: bool = False) -> str:
    """Run `encoder`'s backbone in `runtime` from now on (`Encoder.features`); returns the runtime chosen,
    ``torch`` or ``onnx`` (see `resolve_runtime`; `device` defaults to the encoder's). With ``onnx`` the
    backbone is exported, or read from the cache, now. A backbone that cannot be exported runs in
    PyTorch after one warning line with ``auto``, and is a ConfigError with ``onnx``."""
    c = encoder.config
    if device is None:
        device = next(encoder.parameters()).device
    chosen = resolve_runtime(runtime, device, precision, backbone=c.backbone, trains_backbone=trains_backbone)
    encoder.set_backbone_runner(None)
    if chosen == "torch":
        return chosen
    try:
        runner = OnnxBackbone.build(encoder.backbone, c.backbone, c.image_size)
    except _ExportFailed as exc:
        if runtime == "onnx":
            raise ConfigError(f"{c.backbone} cannot run in ONNX Runtime ({exc}); use runtime torch") from None
        log.warning("%s cannot run in ONNX Runtime (%s): running it in PyTorch", c.backbone, exc)
        return "torch"
    encoder.set_backbone_runner(runner)
    return chosen


def cache_dir() -> Path:
    """Where exported backbones are kept: $GHINDEX_CACHE/onnx, else $XDG_CACHE_HOME (~/.cache)/ghindex/onnx."""
    root = os.environ.get("GHINDEX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ghindex")
    return Path(root) / "onnx"


def backbone_fingerprint(module: torch.nn.Module, name: str, image_size: int) -> str:
    """SHA-256 of what an export depends on: the export format, the backbone's name, architecture (its
    repr) and every tensor of its state (names, dtypes, shapes, bytes), the input size, torch's version."""
    import torchvision

    h = hashlib.sha256()
    h.update(json.dumps({"format": EXPORT_FORMAT, "opset": OPSET, "backbone": name, "image_size": int(image_size),
                         "torch": torch.__version__, "torchvision": torchvision.__version__},
                        sort_keys=True).encode())
    h.update(repr(module).encode())
    for key, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"\n{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _state_marks(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(storage address, version counter) of each tensor: an in-place change or a swapped `.data` shows."""
    marks = []
    for t in tensors:
        try:
            marks.append((t.data_ptr(), t._version))
        except RuntimeError:  # an inference tensor has no version counter; its storage is still compared
            marks.append((t.data_ptr(), -1))
    return marks


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _probe_batch(image_size: int, rows: int) -> torch.Tensor:
    """A fixed batch of normalised-image-like inputs (mean 0, variance 1)."""
    g = torch.Generator().manual_seed(27)
    return torch.randn(rows, 3, image_size, image_size, generator=g)


def _export(module: torch.nn.Module, image_size: int, fingerprint: str) -> bytes:
    """The backbone in eval mode as an ONNX model (batch axis dynamic) with `fingerprint` in its metadata."""
    try:
        import onnx

        buf = io.BytesIO()
        with _eval_mode(module), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes: not the user's business
            # the TorchScript exporter: it needs only `onnx` (the dynamo one also needs onnxscript), exports a
            # torchvision CNN in about a second, and ONNX Runtime ran its graph at least as fast (issue 27)
            options = dict(opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                           dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5; default True from 2.9
                options["dynamo"] = False
            torch.onnx.export(module, (_probe_batch(image_size, 1),), buf, **options)
        model = onnx.load_model_from_string(buf.getvalue())
        entry = model.metadata_props.add()
        entry.key, entry.value = FINGERPRINT_KEY, fingerprint
        return model.SerializeToString()
    except Exception as exc:  # unsupported operators, models over protobuf's 2 GiB...: PyTorch runs it
        raise _ExportFailed(f"export failed: {_first_line(exc)}") from None


def _session(model: str | bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ONNX Runtime's notes on stderr would read like problems
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _ExportFailed(f"ONNX Runtime cannot load it: {_first_line(exc)}") from None


def _check(session, fingerprint: str, module: torch.nn.Module, image_size: int) -> float:
    """Raise _ExportFailed unless the session is this backbone's export (metadata) and gives PyTorch's
    features on the probe batch (within TOLERANCE of their range). Returns the relative difference."""
    found = session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)
    if found != fingerprint:
        raise _ExportFailed("it was exported from other weights (fingerprint differs)")
    x = _probe_batch(image_size, PROBE_ROWS)
    with _eval_mode(module), torch.inference_mode():
        expected = module(x).float()
    try:
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    except Exception as exc:
        raise _ExportFailed(f"ONNX Runtime cannot run it: {_first_line(exc)}") from None
    if got.shape != expected.shape or not torch.isfinite(got).all():
        raise _ExportFailed(f"it gives features of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    scale = float(expected.abs().max())
    difference = float((got - expected).abs().max()) / max(scale, 1e-12)
    if difference > TOLERANCE:
        raise _ExportFailed(f"its features differ from PyTorch's by {difference:.1e} of their range")
    return difference


class OnnxBackbone:
    """A frozen backbone's inference forward in ONNX Runtime: call it like the module, on a CPU float32
    batch (N, 3, S, S); it runs the PyTorch module instead where the export does not apply (see the module
    docstring). `build` exports the module or reads its export from the cache."""

    name = "onnx"

    def __init__(self, module: torch.nn.Module, session, image_size: int, path: str | None):
        self.module, self.session, self.image_size, self.path = module, session, int(image_size), path
        self._tensors = list(module.parameters()) + list(module.buffers())
        self._marks = _state_marks(self._tensors)
        self.stale = False  # the weights changed after the export: PyTorch from then on

    @classmethod
    def build(cls, module: torch.nn.Module, name: str, image_size: int, threads: int | None = None) -> "OnnxBackbone":
        """Export `module` (the backbone called `name`, inputs image_size x image_size) once per fingerprint
        into the cache folder, or load the cached export after checking it; _ExportFailed when neither works."""
        threads = int(threads or torch.get_num_threads())
        fingerprint = backbone_fingerprint(module, name, image_size)
        path = cache_dir() / f"{name}-{int(image_size)}px-{fingerprint[:32]}.onnx"
        if path.is_file():
            try:
                session = _session(os.fspath(path), threads)
                _check(session, fingerprint, module, image_size)
                with contextlib.suppress(OSError):
                    os.utime(path)  # last use: old files can be pruned by age
                log.debug("%s (%d px) runs in ONNX Runtime from %s", name, image_size, path)
                return cls(module, session, image_size, os.fspath(path))
            except _ExportFailed as exc:
                log.warning("exporting %s again: the cached %s is unusable (%s)", name, path, exc)
        t0 = time.perf_counter()
        data = _export(module, image_size, fingerprint)
        session = _session(data, threads)
        difference = _check(session, fingerprint, module, image_size)
        kept: str | None = os.fspath(path)
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        except (OutputError, OSError) as exc:  # the export is good; it just cannot be kept for the next run
            log.info("cannot keep the ONNX export of %s in %s (%s): it is made again next time",
                     name, path.parent, getattr(exc, "reason", None) or exc)
            kept = None
        log.info("exported %s (%d px) to ONNX in %.1f s (features within %.0e of PyTorch's)%s", name, image_size,
                 time.perf_counter() - t0, difference, f": {kept}" if kept else "")
        return cls(module, session, image_size, kept)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether ONNX Runtime runs this batch (else the PyTorch module does)."""
        module = self.module
        if self.stale or not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype != torch.float32 \
                or x.ndim != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size) or not len(x) \
                or module.training or _cpu_autocast():
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._tensors):
            return False  # a backbone that trains needs PyTorch's autograd
        if _state_marks(self._tensors) != self._marks:
            self.stale = True
            log.warning("the backbone's weights changed after its ONNX export: running it in PyTorch")
            return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.applies(x):
            return self.module(x)
        rows = x.detach().contiguous().numpy()
        parts = [self.session.run(None, {INPUT_NAME: rows[i:i + ROWS_PER_RUN]})[0]
                 for i in range(0, len(rows), ROWS_PER_RUN)]
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
