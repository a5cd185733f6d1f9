"""The files a training run writes next to its model and reads back: where they go (`output_paths`),
the checkpoint, the epoch log and the split indices, and the hint an OutputError of `train` gets about
the checkpoint that is kept."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ModelFileError
from .errors import OutputError
from .io import atomic_path

CHECKPOINT_FORMAT = 1


def output_paths(out: str | os.PathLike) -> dict[str, str]:
    """Files written for a model path: model, checkpoint, log and split indices."""
    out = os.fspath(out)
    return {"model": out, "checkpoint": out + ".ckpt", "log": out + ".log.jsonl", "splits": out + ".splits.npz"}


def _check_outputs(out, resume: bool, overwrite: bool) -> None:
    """Resuming needs a model path; starting over must not replace an earlier run's files by accident."""
    if resume and out is None:
        raise ConfigError("resume needs out, the model path whose checkpoint to continue")
    if out is not None and not resume and not overwrite:
        paths = output_paths(out)
        existing = [paths[k] for k in ("checkpoint", "model") if os.path.exists(paths[k])]
        if existing:
            raise ConfigError(f"{existing[0]} exists: resume=True continues that training, "
                              "overwrite=True starts over")


def _write_splits(path: str, splits: dict[str, np.ndarray], protocol: str, seed: int, description: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, protocol=np.array(protocol), seed=np.array(seed, dtype=np.int64),
                 data=np.array(description), **{k: np.asarray(v, dtype=np.int64) for k, v in splits.items()})


def _write_log(path: str, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in history:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # through a Python file: a full disk is an OSError, not torch's "unexpected pos"


def _with_kept_checkpoint_hint(fn):
    """`train`: when an output cannot be written (OutputError), say which checkpoint is kept and how to go on."""
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OutputError as exc:
            out = inspect.signature(fn).bind(*args, **kwargs).arguments.get("out")
            if out is not None:
                exc.set_hint(_kept_checkpoint_hint(output_paths(out)["checkpoint"], exc))
            raise

    return wrapper


def _kept_checkpoint_hint(checkpoint: str, exc) -> str:
    try:
        epoch = int(_load_checkpoint(checkpoint)["epoch"]) if os.path.exists(checkpoint) else None
    except Exception:  # noqa: BLE001 - a damaged checkpoint is not one to resume from
        epoch = None
    if epoch is None:
        return f"no checkpoint is kept; {exc.remedy} and rerun"
    return f"the checkpoint of epoch {epoch} is kept; {exc.remedy} and rerun with resume=True"


def _load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ModelFileError(f"no checkpoint to resume from: {path} (train without resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path} is not a ghindex training checkpoint (format {CHECKPOINT_FORMAT})")
    return state
