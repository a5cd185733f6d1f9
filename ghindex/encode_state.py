"""What an encode run is, apart from the loop: the data it reads and its fingerprint, the rows it
writes (`_Run`), the checks against an existing store (append, resume) and the summary of a run
found already complete. Shared by `ghindex.local_encode` and `ghindex.sharded_encode`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, DataError, StoreError
from .data import load_data, load_split
from .journal import Journal
from .store import CodeStore
from .store_format import parse_history

SUMMARY_SKIPPED_LIMIT = 1000  # skipped inputs listed in the summary (the store records all of them)


def source_fingerprint(source) -> str:
    """sha256 over what decides the rows of a data source: kind, paths or features, labels, ids."""
    h = hashlib.sha256()
    h.update(f"{source.kind}:{len(source)}\n".encode())
    if source.paths is not None:
        for p in source.paths:
            h.update(os.fsencode(p) + b"\0")
    if source.features is not None:
        h.update(np.ascontiguousarray(source.features).data)
    for name, arr in (("labels", source.labels), ("ids", source.item_ids)):
        if arr is not None:
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
            h.update(arr.data)
    return h.hexdigest()


def load_source(data, protocol=None, split=None, seed=0, root=None, ids_from=None):
    """The data source `encode` reads: `load_split` for a protocol, else `load_data`."""
    if protocol is not None:
        if split is None:
            raise ConfigError("a protocol needs a split (train, query or database)")
        if root is not None:
            raise ConfigError("root applies to list files, not to protocols")
        if ids_from is not None:
            raise ConfigError("ids_from takes ids from a list file column; protocol splits use pool positions as ids")
        return load_split(data, protocol, split, seed)
    if split is not None:
        raise ConfigError(f"split {split!r} needs a protocol (e.g. cifar10-I)")
    return load_data(data, root, ids_column=ids_from)


@dataclass
class _Run:
    """What a run writes, derived from the model, the data and the options (and checked on resume)."""

    source: Any
    ids: np.ndarray
    bits: int
    label_shape: tuple | None
    with_paths: bool
    header: dict
    store_attrs: dict

    @property
    def confidences(self) -> bool:
        """Does the store keep each code's bit confidences (`hashing.pack_confidences`)? Then every journaled
        and appended row is its code followed by its confidences (`row_bytes`)."""
        return bool(self.header.get("confidences", HEADER_DEFAULTS["confidences"]))

    @property
    def row_bytes(self) -> int:
        return self.bits // 8 * (3 if self.confidences else 1)

    def rows_of(self, start: int, stop: int, skipped_idx) -> np.ndarray:
        idx = np.arange(start, stop, dtype=np.int64)
        if len(skipped_idx):
            idx = idx[~np.isin(idx, np.asarray(skipped_idx, dtype=np.int64))]
        return idx


def _apply_chunk(store: CodeStore, run: _Run, start: int, stop: int, rows: np.ndarray,
                 skipped: list[tuple[int, str]]) -> None:
    """Append inputs [start, stop) minus `skipped` to the store (used live and when replaying); `rows`: their
    codes, each followed by its confidences when the run keeps them (`_Run.row_bytes`)."""
    src = run.source
    idx = run.rows_of(start, stop, [i for i, _ in skipped])
    if len(idx) != len(rows):
        raise StoreError(f"{store.path}: journal chunk {start}:{stop} has {len(rows)} codes for {len(idx)} rows")
    code_bytes = run.bits // 8
    store.append(
        rows[:, :code_bytes],
        run.ids[idx],
        None if run.label_shape is None else src.labels[idx],
        [src.paths[i] for i in idx] if run.with_paths else None,
        rows[:, code_bytes:] if run.confidences else None,
    )
    if skipped:
        store.add_skipped(
            [int(src.positions[i]) for i, _ in skipped],
            [src.paths[i] if src.paths is not None else "" for i, _ in skipped],
            [reason for _, reason in skipped],
        )


def _check_ids(ids: np.ndarray, what: str) -> None:
    if len(ids) and len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise DataError(f"{what}: id {int(values[counts > 1][0])} appears more than once; ids must be unique")


def _existing_ids_clash(store: CodeStore, ids: np.ndarray) -> int | None:
    if not len(ids) or not len(store):
        return None
    new = np.sort(ids)
    for batch in store.iter_chunks(paths=False):
        hit = np.isin(batch.ids, new, assume_unique=False)
        if hit.any():
            return int(batch.ids[hit][0])
    return None


def _max_id(store: CodeStore) -> int:
    top = -1
    for batch in store.iter_chunks(paths=False):
        if len(batch.ids):
            top = max(top, int(batch.ids.max()))
    return top


def store_views(store: CodeStore) -> int:
    """Edited views per image in a store's codes (`ghindex.database_views`; 0 for stores without the attribute)."""
    return int(store.attrs.get("views", 0))


def _describe_labels(shape) -> str:
    return "absent" if shape is None else ("single-label" if shape == () else f"multi-hot with {shape[0]} classes")


def _journal_header(journal: Journal) -> dict | None:
    first = next(journal.records(), None)
    return first[1] if first is not None and first[0] == Journal.HEADER else None


def _is_result_of(out: str, data_fingerprint: str, model_fingerprint: str, views: int = 0) -> bool:
    """Is OUT a complete store whose last encode run read this data with this model (and `views`)?"""
    try:
        with CodeStore.open(out) as s:
            history = _history(s)
            return bool(history) and history[-1].get("data_fingerprint") == data_fingerprint \
                and s.encoder_fingerprint == model_fingerprint and store_views(s) == views
    except StoreError:
        return False


# Journal header entries that runs journaled before them did not write, with the value those runs had.
HEADER_DEFAULTS = {"views": 0, "confidences": False}


def _resume_state(journal: Journal, saved: dict, run: _Run, out: str) -> dict:
    """Check the interrupted run matches this one; return its journal records to replay."""
    for key, value in run.header.items():
        if key == "out":
            continue
        then = saved.get(key, HEADER_DEFAULTS.get(key))
        if then != value:
            raise StoreError(
                f"cannot resume into {out}: {key.replace('_', ' ')} differs from the interrupted run "
                f"({then!r} then, {value!r} now); rerun with --overwrite to start over"
            )
    records = journal.records()
    _, _, _, header_end = next(records)
    return {"records": records, "header_end": header_end}


def _history(store: CodeStore) -> list:
    return parse_history(store.attrs.get("history"))


def _finished_summary(out, t0, dev, precision, source) -> dict:
    with CodeStore.open(out) as s:
        entry = _history(s)[-1] if _history(s) else {}
        k = int(entry.get("skipped", 0))
        skipped = s.skipped()[len(s.skipped()) - k:] if k else []  # this data's are the last ones
        return {
            "out": out,
            "count": int(entry.get("rows", 0)),
            "skipped": k,
            "skipped_items": skipped[:SUMMARY_SKIPPED_LIMIT],
            "inputs": len(source),
            "store_rows": len(s),
            "bits": s.bits,
            "resumed_from": len(source),
            "processed": 0,
            "seconds": round(time.perf_counter() - t0, 3),
            "rate": 0.0,
            "setup_seconds": 0.0,
            "loop_rate": 0.0,
            "device": str(dev),
            "precision": precision,
            "runtime": entry.get("runtime"),  # the run that wrote it (None: before runtimes were recorded)
            "status": "already complete",
        }


def _open_partial(run: _Run, out: str, partial: str, model_fingerprint: str) -> CodeStore:
    if run.header["append"]:
        tmp = partial + ".copy"
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        shutil.copyfile(out, tmp)
        os.replace(tmp, partial)
        store = CodeStore.open(partial, mode="a")
        store._mark_incomplete()
        return store
    # A new file (new inode): a lock an orphaned worker of a killed run may still hold on the old one
    # does not matter.
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)
    return CodeStore.create(
        partial, run.bits, encoder_fingerprint=model_fingerprint, source=run.source.description,
        label_shape=run.label_shape, with_paths=run.with_paths, attrs=run.store_attrs, overwrite=True,
        paths_root=run.source.root, confidences=run.confidences,
    )


def _skip_item(run: _Run, i: int, reason: str) -> dict:
    src = run.source
    return {"position": int(src.positions[i]), "path": src.paths[i] if src.paths is not None else "", "reason": reason}


def _check_source(source, config, model, data) -> None:
    """The model reads this kind of input (images, or feature vectors of its width); ids are unique."""
    if config.backbone == "identity":
        if source.kind != "features":
            raise DataError(f"{model} encodes feature vectors (identity backbone); {data} holds images")
        if source.features.shape[1] != config.feature_dim:
            raise DataError(
                f"{data} has {source.features.shape[1]}-d features but {model} expects {config.feature_dim}-d"
            )
    elif source.kind != "images":
        raise DataError(f"{model} encodes images ({config.backbone}); {data} holds feature vectors")
    if source.ids is not None:
        _check_ids(source.ids, f"{data}")


def _append_base(out, source, data, config, model_fingerprint, label_shape, with_paths, views=0):
    """Check that this data and model (with `views` edited views per image) can be appended to the store OUT;
    return what the run takes from it: (with_paths, base_info for the journal header, id_offset, class_names).
    base_info says whether the store keeps bit confidences: the appended rows do as the store does."""
    class_names = source.class_names
    id_offset = 0
    with CodeStore.open(out) as base:
        if base.bits != config.bits:
            raise StoreError(f"cannot append {config.bits}-bit codes to {out}, which holds {base.bits}-bit codes")
        if store_views(base) != views:
            raise StoreError(f"cannot append to {out}: its codes were encoded with {store_views(base)} edited views "
                             f"per image, these with {views} (--views {store_views(base)})")
        if base.encoder_fingerprint != model_fingerprint:
            raise StoreError(
                f"cannot append to {out}: it was encoded by a different model "
                f"(encoder fingerprint {base.encoder_fingerprint[:12] or 'none'}..., this model {model_fingerprint[:12]}...)"
            )
        if base.label_shape != label_shape:
            raise StoreError(
                f"cannot append to {out}: its labels are {_describe_labels(base.label_shape)}, "
                f"the data's are {_describe_labels(label_shape)}"
            )
        if label_shape == () and base.class_names and class_names and base.class_names != class_names:
            raise StoreError(f"cannot append to {out}: its class names differ from the data's")
        if base.has_paths and not with_paths:
            raise StoreError(f"cannot append to {out}: it stores paths and this data has none (or with_paths=False)")
        with_paths = base.has_paths
        base_info = {"base_fingerprint": base.fingerprint, "base_rows": len(base), "confidences": base.has_confidences}
        if source.ids is None:
            id_offset = _max_id(base) + 1
        else:
            clash = _existing_ids_clash(base, source.ids)
            if clash is not None:
                raise DataError(f"cannot append: id {clash} from {data} is already in {out}")
        class_names = base.class_names or class_names
    return with_paths, base_info, id_offset, class_names
