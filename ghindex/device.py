"""Where torch work runs: the device (`auto`, `cpu`, `cuda[:N]`) and the numeric precision, for every command."""
from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` is the GPU when CUDA sees one, else the CPU; `cpu`, `cuda` and `cuda:N` as torch reads them."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    return dev


def _cpu_bf16_supported() -> bool:
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: exact fp32 on the CPU; automatic mixed precision on CUDA (bf16 where supported)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("precision fp16 is for CUDA; on the CPU use fp32 (exact) or bf16")
        if precision == "bf16" and not _cpu_bf16_supported():
            raise ConfigError("this CPU has no native bf16 support; use precision fp32")
    return precision


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """fp32 means fp32 on CUDA too: no TF32 convolutions or matmuls (PyTorch allows TF32 convs by default)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
