"""`info(path)`: describe a code store, a model file or an index directory without loading it whole.

Links are described with where they resolve: a store's `images_link` (the folder its relative image
paths hang from, `CodeStore.images_link`) and an index's `store_link` (its code store,
`ghindex.index.files.store_link`), each {"recorded", "absolute", "resolved", "exists"}.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from typing import Any

from .errors import StoreError
from .encoder import Encoder
from .io import file_fingerprint
from .store import CodeStore, is_hdf5

SKIPPED_EXAMPLES = 5


def _is_safetensors(path: str) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= os.path.getsize(path) - 8


def describe_store(path: str) -> dict[str, Any]:
    """Rows, bits, labels, paths, skipped inputs, provenance and id range of a code store.

    Incomplete stores (an interrupted or running `ghindex encode`) are described too, with
    complete = False. Reads ids in chunks for their range; codes are not read.
    """
    with CodeStore.open(path, allow_incomplete=True) as s:
        attrs = s.attrs
        ids_min = ids_max = None
        for batch in s.iter_chunks(paths=False):
            if len(batch.ids):
                lo, hi = int(batch.ids.min()), int(batch.ids.max())
                ids_min = lo if ids_min is None else min(ids_min, lo)
                ids_max = hi if ids_max is None else max(ids_max, hi)
        shape = s.label_shape
        if shape is None:
            labels = "none"
        elif shape == ():
            names = s.class_names
            labels = f"single-label ({len(names)} classes)" if names else "single-label"
        else:
            labels = f"multi-hot ({shape[0]} classes)"
        skipped = s.skipped() if s.num_skipped <= 10_000 else s.skipped()[:SKIPPED_EXAMPLES]
        try:
            history = json.loads(attrs.get("history") or "[]")
        except ValueError:
            history = []
        reserved = {"format_version", "bits", "bit_order", "encoder_fingerprint", "source", "created", "complete",
                    "class_names", "history", "paths_root", "paths_root_absolute"}
        result = {
            "kind": "codes",
            "path": os.path.abspath(path),
            "file_bytes": os.path.getsize(path),
            "format_version": attrs.get("format_version"),
            "complete": s.complete,
            "rows": len(s),
            "bits": s.bits,
            "code_bytes": s.code_bytes,
            "bit_order": attrs.get("bit_order"),
            "ids_min": ids_min,
            "ids_max": ids_max,
            "labels": labels,
            "class_names": s.class_names,
            "paths": s.has_paths,
            "paths_relative": s.has_paths and s.relative_paths,
            "images_link": s.images_link(),
            "bit_confidences": s.has_confidences,
            "skipped": s.num_skipped,
            "deleted": s.num_deleted,
            "skipped_examples": skipped[:SKIPPED_EXAMPLES],
            "encoder_fingerprint": s.encoder_fingerprint or None,
            "source": attrs.get("source") or None,
            "created": attrs.get("created"),
            "history": history,
            "attrs": {k: v for k, v in attrs.items() if k not in reserved},
        }
    journal = path + ".journal" if path.endswith(".partial") else None
    if not result["complete"] and journal and os.path.exists(journal):
        result["note"] = "interrupted or running `ghindex encode`: finish it with --resume"
    return result


def _objective(training: dict) -> str | None:
    """'supervised', 'multi-label', 'unsupervised (similarity)' or 'unsupervised (views)'; None: untrained."""
    kind = training.get("objective")
    if kind == "unsupervised":
        return f"unsupervised ({training.get('unsupervised_objective') or 'similarity'})"
    return kind


def describe_model(path: str) -> dict[str, Any]:
    """The config of a model file (read from its header) and the file's fingerprint."""
    config = Encoder.read_config(path)
    return {
        "kind": "model",
        "path": os.path.abspath(path),
        "file_bytes": os.path.getsize(path),
        "fingerprint": file_fingerprint(path),
        "backbone": config.backbone,
        "bits": config.bits,
        "feature_dim": config.feature_dim,
        "image_size": config.image_size,
        "mean": list(config.mean),
        "std": list(config.std),
        "num_classes": config.num_classes,
        "hash_hidden": config.hash_hidden,
        "detail_layer": config.detail_layer,
        "reduced_decode": config.reduced_decode,
        "format_version": config.format_version,
        # how it was trained and the Hamming radius of copies (`query`/`dedup --radius auto`), when recorded
        "objective": _objective(config.extra.get("training") or {}),
        "copy_radius": config.copy_radius,
        "extra": config.extra,
    }


def info(path: str | os.PathLike) -> dict[str, Any]:
    """Describe `path`: a code store (HDF5), a model file (.ghm) or an index directory.

    The result's `kind` is "codes", "model" or "index"; the other keys depend on it. Raises a
    GhindexError naming the file if it is none of these or is damaged.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        from .index import describe_index

        return {"kind": "index", **describe_index(name)}
    if not os.path.exists(name):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
    if is_hdf5(name):
        return describe_store(name)
    if _is_safetensors(name) or name.endswith((".ghm", ".safetensors")):
        return describe_model(name)
    raise StoreError(f"{name} is not a code store (HDF5), a model file (.ghm) or an index directory")
