"""`encode()`: run a model over a data source and write its codes to an HDF5 code store, crash-safely.

How a run survives being killed (even SIGKILL, at any moment)
-------------------------------------------------------------
An HDF5 file that is killed while HDF5 updates its metadata can be left unreadable, so the HDF5 file
is never the record of progress. Two files live next to OUT while a run is in progress:

- ``OUT.partial``: the code store being built (flushed at every checkpoint; `ghindex info` can show it);
- ``OUT.partial.journal``: an append-only log, fsync'ed at every checkpoint *before* the store is
  touched. Its first record describes the run (model and data fingerprints, settings); each later
  record holds the codes of one checkpoint and the inputs it skipped, framed with a CRC-32, so a
  record torn by a kill is detected and dropped.

`resume=True` reads the journal's valid records, rebuilds ``OUT.partial`` from them (ids, labels and
paths come from the data: the list of inputs, with their labels and ids, must be unchanged, and its
fingerprint in the journal is checked; image contents are not re-read), and continues with the next
input. When every input is done the store is marked complete, a final record is logged,
``OUT.partial`` is renamed onto OUT and the journal is removed. Appending (`append=True`) works on a
copy of OUT, so OUT itself changes only by that last atomic rename.

Codes are computed in fp32 on the CPU by default, which is exact and reproducible; `precision="bf16"`
is faster on CPUs with bf16 units but flips bits whose pre-sign value is near 0.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ConfigError, DataError, ImageError, StoreError
from .hashing import pack_signs
from .io import file_fingerprint
from .store import CodeStore

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SUMMARY_SKIPPED_LIMIT = 1000  # skipped inputs listed in the summary (the store records all of them)


# -- the journal --------------------------------------------------------------------------------
class Journal:
    """Append-only, CRC-framed records; holds an exclusive lock so two runs cannot share an output.

    The lock is a POSIX record lock (`lockf`), owned by this process only: DataLoader workers forked
    from it do not inherit it, so a killed run's orphaned workers cannot block `--resume`.

    Record: magic ``GHJ1``, kind (uint8), meta length (uint32), blob length (uint64), meta (JSON),
    blob (raw bytes), CRC-32 of everything before it (uint32), little-endian.
    """

    MAGIC = b"GHJ1"
    HEAD = struct.Struct("<4sBIQ")
    CRC = struct.Struct("<I")
    HEADER, CHUNK, DONE = 0, 1, 2

    def __init__(self, path: str, out: str):
        import fcntl

        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreError(f"another `ghindex encode` is writing {out} ({path} is locked)") from None
            raise
        self.file = open(fd, "r+b")

    def records(self) -> Iterator[tuple[int, dict, bytes, int]]:
        """Yield (kind, meta, blob, end offset) for each valid record; stop at the first damaged one."""
        f = self.file
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        offset = 0
        while offset + self.HEAD.size + self.CRC.size <= size:
            head = f.read(self.HEAD.size)
            magic, kind, meta_len, blob_len = self.HEAD.unpack(head)
            end = offset + self.HEAD.size + meta_len + blob_len + self.CRC.size
            if magic != self.MAGIC or end > size or kind not in (self.HEADER, self.CHUNK, self.DONE):
                return
            body = f.read(meta_len + blob_len)
            (crc,) = self.CRC.unpack(f.read(self.CRC.size))
            if zlib.crc32(body, zlib.crc32(head)) != crc:
                return
            try:
                meta = json.loads(body[:meta_len])
            except ValueError:
                return
            yield kind, meta, body[meta_len:], end
            offset = end

    def truncate(self, end: int) -> None:
        self.file.truncate(end)
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, kind: int, meta: dict, blob: bytes = b"") -> None:
        """Append one record and make it durable before returning."""
        body = json.dumps(meta, sort_keys=True).encode()
        head = self.HEAD.pack(self.MAGIC, kind, len(body), len(blob))
        crc = zlib.crc32(blob, zlib.crc32(body, zlib.crc32(head)))
        f = self.file
        f.seek(0, os.SEEK_END)
        f.write(head + body + blob + self.CRC.pack(crc))
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        self.file.close()  # also releases the lock


# -- helpers -------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
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
    from .data import load_data, load_split

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


def _reason(path: str, error: str) -> str:
    """Image errors start with the file name; the store keeps path and reason apart."""
    for prefix in (f"{path}: ", f"{os.fsdecode(path)}: "):
        if error.startswith(prefix):
            return error[len(prefix):]
    return error


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

    def rows_of(self, start: int, stop: int, skipped_idx) -> np.ndarray:
        idx = np.arange(start, stop, dtype=np.int64)
        if len(skipped_idx):
            idx = idx[~np.isin(idx, np.asarray(skipped_idx, dtype=np.int64))]
        return idx


def _apply_chunk(store: CodeStore, run: _Run, start: int, stop: int, codes: np.ndarray,
                 skipped: list[tuple[int, str]]) -> None:
    """Append inputs [start, stop) minus `skipped` to the store (used live and when replaying)."""
    src = run.source
    idx = run.rows_of(start, stop, [i for i, _ in skipped])
    if len(idx) != len(codes):
        raise StoreError(f"{store.path}: journal chunk {start}:{stop} has {len(codes)} codes for {len(idx)} rows")
    store.append(
        codes,
        run.ids[idx],
        None if run.label_shape is None else src.labels[idx],
        [src.paths[i] for i in idx] if run.with_paths else None,
    )
    if skipped:
        store.add_skipped(
            [int(src.positions[i]) for i, _ in skipped],
            [src.paths[i] if src.paths is not None else "" for i, _ in skipped],
            [reason for _, reason in skipped],
        )


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


# -- the library function ------------------------------------------------------------------------
def encode(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    protocol: str | None = None,
    split: str | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    ids_from: int | None = None,
    strict: bool = False,
    resume: bool = False,
    append: bool = False,
    overwrite: bool = False,
    with_paths: bool = True,
    checkpoint_seconds: float = 10.0,
    checkpoint_rows: int = 65536,
    progress: bool = True,
    _shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Encode every input of `data` with the model file `model` into the code store `out`.

    `data` is an image folder, a list file or an array file (`load_data`), or with `protocol` and
    `split` a protocol split (`load_split`). Ids are each input's position in `data` (in the pooled
    folder for protocol splits; after the store's largest id when appending), or column `ids_from`
    of a list file. Labels and paths (unless `with_paths=False`) are stored with the codes.

    Bad images are skipped and recorded in the store and the summary; `strict=True` raises
    ImageError at the first one instead (rows before it stay resumable). `resume=True` continues an
    interrupted run (or starts one if there is none); `append=True` adds to an existing store of
    the same bits and model; `overwrite=True` replaces OUT and discards any interrupted run.

    Returns a summary: count (rows this data contributed), skipped, skipped_items, store_rows,
    seconds, rate (inputs/s processed by this call), resumed_from, device, precision, out.

    Launched by torchrun with several processes, each encodes a contiguous range of the inputs
    into its own part and rank 0 merges them into `out` (`ghindex.sharded_encode`).
    """
    from . import distributed

    if _shard is None and distributed.is_distributed():
        from .sharded_encode import encode_sharded

        return encode_sharded(
            model, data, out, protocol=protocol, split=split, seed=seed, root=root, batch_size=batch_size,
            workers=workers, device=device, precision=precision, ids_from=ids_from, strict=strict, resume=resume,
            append=append, overwrite=overwrite, with_paths=with_paths, checkpoint_seconds=checkpoint_seconds,
            checkpoint_rows=checkpoint_rows, progress=progress,
        )
    t0 = time.perf_counter()
    out = os.fspath(out)
    model = os.fspath(model)
    partial, journal_path = out + ".partial", out + ".partial.journal"
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if checkpoint_rows <= 0 or checkpoint_seconds < 0:
        raise ConfigError("checkpoint_rows must be positive and checkpoint_seconds >= 0")
    if overwrite and (resume or append):
        raise ConfigError("overwrite cannot be combined with resume or append")
    if os.path.isdir(out):
        raise StoreError(f"{out} is a directory; --out must be a code store file")

    from .encoder import Encoder

    config = Encoder.read_config(model)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    source = load_source(data, protocol, split, seed, root, ids_from)
    if _shard is not None:  # one process's part of a sharded run: inputs [start, stop), ids unchanged
        source = source.subset(np.arange(*_shard), description=f"{source.description} inputs {_shard[0]}:{_shard[1]}")
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
    with_paths = bool(with_paths and source.paths is not None)
    label_shape = None if source.labels is None else tuple(source.labels.shape[1:])
    model_fingerprint = file_fingerprint(model)
    data_fingerprint = source_fingerprint(source)

    # Take the lock first: from here on no other run touches these files.
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    had_journal = os.path.exists(journal_path)
    journal = Journal(journal_path, out)
    try:
        if not resume and (had_journal or os.path.exists(partial)):
            if not overwrite:
                raise StoreError(
                    f"{partial} is left from an interrupted run: rerun with --resume to continue it, "
                    "or --overwrite to start over"
                )
            journal.truncate(0)
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
        saved = _journal_header(journal) if resume else None
        if saved is not None and [kind for kind, *_ in journal.records()][-1] == Journal.DONE:
            # That run had finished: its complete store is OUT.partial or, if the rename happened, OUT.
            if os.path.exists(partial):
                os.replace(partial, out)
                _fsync_dir(out)
            journal.truncate(0)
            saved = None
        if resume and saved is None:
            # Nothing to resume: nothing ran yet, or an earlier run finished and cleaned up.
            if os.path.exists(partial):
                raise StoreError(f"cannot resume: {partial} has no usable journal; rerun with --overwrite to start over")
            if os.path.exists(out) and _is_result_of(out, data_fingerprint, model_fingerprint):
                journal.truncate(0)
                return _finished_summary(out, t0, dev, precision, source)
            if os.path.exists(out) and not append:
                raise StoreError(f"{out} already exists and is not this run's result: use --append or --overwrite")
            journal.truncate(0)
            resume = False
        if os.path.exists(out) and not (append or overwrite or resume):
            raise StoreError(f"{out} already exists: use --append to add to it or --overwrite to replace it")
        if append and not os.path.exists(out):
            raise StoreError(f"cannot append: {out} does not exist")

        base_info: dict[str, Any] = {}
        id_offset = 0
        class_names = source.class_names
        if append:
            with CodeStore.open(out) as base:
                if base.bits != config.bits:
                    raise StoreError(f"cannot append {config.bits}-bit codes to {out}, which holds {base.bits}-bit codes")
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
                base_info = {"base_fingerprint": base.fingerprint, "base_rows": len(base)}
                if source.ids is None:
                    id_offset = _max_id(base) + 1
                else:
                    clash = _existing_ids_clash(base, source.ids)
                    if clash is not None:
                        raise DataError(f"cannot append: id {clash} from {data} is already in {out}")
                class_names = base.class_names or class_names
        ids = source.item_ids.astype(np.int64) + id_offset

        header = {
            "journal_version": JOURNAL_VERSION,
            "out": os.path.abspath(out),
            "model_fingerprint": model_fingerprint,
            "data_fingerprint": data_fingerprint,
            "inputs": len(source),
            "bits": config.bits,
            "precision": precision,
            "label_shape": None if label_shape is None else list(label_shape),
            "with_paths": with_paths,
            "append": bool(append),
            "id_offset": id_offset,
            **base_info,
        }
        store_attrs = {
            "model": os.path.abspath(model),
            "backbone": config.backbone,
            "image_size": config.image_size,
            "precision": precision,
        }
        if class_names:
            store_attrs["class_names"] = list(class_names)
        if protocol is not None:
            store_attrs.update(protocol=protocol, split=split, seed=seed)
        run = _Run(source, ids, config.bits, label_shape, with_paths, header, store_attrs)

        state = None
        if resume:
            state = _resume_state(journal, saved, run, out)
        return _run(journal, run, model, out, partial, dev, precision, batch_size, workers, strict,
                    checkpoint_seconds, checkpoint_rows, progress, state, t0, data_fingerprint, append)
    finally:
        if journal is not None and not journal.file.closed:
            if os.path.exists(journal.path) and os.path.getsize(journal.path) == 0:
                os.remove(journal.path)  # an empty journal records nothing: do not leave it behind
            journal.close()


def _describe_labels(shape) -> str:
    return "absent" if shape is None else ("single-label" if shape == () else f"multi-hot with {shape[0]} classes")


def _journal_header(journal: Journal) -> dict | None:
    first = next(journal.records(), None)
    return first[1] if first is not None and first[0] == Journal.HEADER else None


def _is_result_of(out: str, data_fingerprint: str, model_fingerprint: str) -> bool:
    """Is OUT a complete store whose last encode run read this data with this model?"""
    try:
        with CodeStore.open(out) as s:
            history = _history(s)
            return bool(history) and history[-1].get("data_fingerprint") == data_fingerprint \
                and s.encoder_fingerprint == model_fingerprint
    except StoreError:
        return False


def _resume_state(journal: Journal, saved: dict, run: _Run, out: str) -> dict:
    """Check the interrupted run matches this one; return its journal records to replay."""
    for key, value in run.header.items():
        if key == "out":
            continue
        if saved.get(key) != value:
            raise StoreError(
                f"cannot resume into {out}: {key.replace('_', ' ')} differs from the interrupted run "
                f"({saved.get(key)!r} then, {value!r} now); rerun with --overwrite to start over"
            )
    records = journal.records()
    _, _, _, header_end = next(records)
    return {"records": records, "header_end": header_end}


def _history(store: CodeStore) -> list:
    raw = store.attrs.get("history")
    try:
        value = json.loads(raw) if raw else []
    except (TypeError, ValueError):
        return []
    return value if isinstance(value, list) else []


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
    )


def _run(journal, run, model, out, partial, dev, precision, batch_size, workers, strict,
         checkpoint_seconds, checkpoint_rows, progress, state, t0, data_fingerprint, append) -> dict:
    header = run.header
    code_bytes = run.bits // 8
    skipped_items: list[dict] = []
    n_skipped = 0
    position = 0

    store = _open_partial(run, out, partial, header["model_fingerprint"])
    try:
        if state is None:
            journal.truncate(0)
            journal.write(Journal.HEADER, header)
        else:
            end = state["header_end"]
            for kind, meta, blob, rec_end in state["records"]:
                if kind != Journal.CHUNK or meta.get("start") != position:
                    break
                codes = np.frombuffer(blob, dtype=np.uint8).reshape(-1, code_bytes)
                skipped = [(int(i), str(r)) for i, r in meta["skipped"]]
                _apply_chunk(store, run, meta["start"], meta["stop"], codes, skipped)
                for i, reason in skipped:
                    n_skipped += 1
                    if len(skipped_items) < SUMMARY_SKIPPED_LIMIT:
                        skipped_items.append(_skip_item(run, i, reason))
                position = meta["stop"]
                end = rec_end
            journal.truncate(end)  # drop a torn tail so new records follow valid ones
            store.flush()
            if position:
                log.info("resuming %s after %d of %d inputs", out, position, len(run.source))
        resumed_from = position

        position, n_skipped, loop_start = _encode_loop(
            journal, store, run, model, dev, precision, batch_size, workers, strict,
            checkpoint_seconds, checkpoint_rows, progress, position, n_skipped, skipped_items,
        )
        processed = position - resumed_from

        history = _history(store) if append else []
        history.append({
            "source": run.source.description,
            "data_fingerprint": data_fingerprint,
            "rows": len(run.source) - n_skipped,
            "skipped": n_skipped,
            "precision": precision,
            "device": dev.type,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        store.set_attrs(history=history)
        store.mark_complete()
        store_rows = len(store)
        store.close()
        journal.write(Journal.DONE, {"rows": store_rows})
        os.replace(partial, out)
        _fsync_dir(out)
        os.remove(journal.path)
    finally:
        store.close()

    end = time.perf_counter()
    seconds = end - t0
    summary = {
        "out": out,
        "count": len(run.source) - n_skipped,
        "skipped": n_skipped,
        "skipped_items": skipped_items,
        "inputs": len(run.source),
        "store_rows": store_rows,
        "bits": run.bits,
        "resumed_from": resumed_from,
        "processed": processed,
        "seconds": round(seconds, 3),
        "rate": round(processed / seconds, 1) if seconds > 0 else 0.0,
        # setup: listing and fingerprinting the data, loading the model, starting the device
        "setup_seconds": round(loop_start - t0, 3),
        "loop_rate": round(processed / (end - loop_start), 1) if end > loop_start else 0.0,
        "device": str(dev),
        "precision": precision,
        "status": "complete",
    }
    log.info(
        "encoded %d of %d inputs (%d skipped) into %s in %.1f s (%.1f inputs/s)",
        summary["count"], summary["inputs"], n_skipped, out, seconds, summary["rate"],
    )
    return summary


def _skip_item(run: _Run, i: int, reason: str) -> dict:
    src = run.source
    return {"position": int(src.positions[i]), "path": src.paths[i] if src.paths is not None else "", "reason": reason}


def resized_uint8(img, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (S, S, 3) uint8 tensor (pixel order as decoded), resized exactly as
    `images.image_to_tensor` does.

    Workers hand over uint8 (4x less to move between processes than float32); the float conversion
    and normalisation happen on the batch in the main process (`normalize_batch`) with the same
    elementwise operations, so codes are identical to `Encoder.encode`'s.
    """
    from PIL import Image

    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def normalize_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float32, the same operations as `images.image_to_tensor`."""
    from .images import normalize

    return normalize(x.float().div_(255.0), mean, std)


def collate_uint8(items):
    """Collate `(i, (S, S, 3) uint8 image, error)` items into (indices, (N, 3, S, S) uint8, errors).

    Images are stacked as they are laid out (N, S, S, 3) and returned as an NCHW view of that memory,
    i.e. channels-last, which is what the model runs on. (Stacking (3, S, S) views of HWC images
    instead takes torch's slow strided uint8 copy: ~100x slower.) A bad image's placeholder
    becomes zeros.
    """
    idx, tensors, errors = zip(*items)
    shape = next((t.shape for t, e in zip(tensors, errors) if not e), None)
    if shape is None:  # every image of the batch is bad: shapes do not matter
        s = tensors[0].shape[-1]
        shape = (s, s, 3)
    stacked = torch.stack([t if not e else torch.zeros(shape, dtype=torch.uint8) for t, e in zip(tensors, errors)])
    return torch.as_tensor(idx, dtype=torch.long), stacked.permute(0, 3, 1, 2), list(errors)


def _batches(run: _Run, start: int, batch_size: int, workers: int | None, image_size: int, pin: bool):
    """Yield (indices, inputs, errors) from input `start` on, in order: uint8 images or float features."""
    src = run.source
    n = len(src)
    if src.kind == "features":
        for s in range(start, n, batch_size):
            e = min(s + batch_size, n)
            yield np.arange(s, e), torch.from_numpy(np.ascontiguousarray(src.features[s:e])), [""] * (e - s)
        return
    from .data import ImageDataset

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    transform = functools.partial(resized_uint8, image_size=image_size)
    dataset = ImageDataset(src, transform, image_shape=(3, image_size, image_size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(start, n),
        num_workers=workers,
        collate_fn=collate_uint8,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )
    for idx, x, errors in loader:
        yield idx.numpy(), x, errors


def _encode_loop(journal, store, run, model_path, dev, precision, batch_size, workers, strict,
                 checkpoint_seconds, checkpoint_rows, progress, position, n_skipped, skipped_items):
    from tqdm import tqdm

    from .encoder import Encoder

    src = run.source
    n = len(src)
    if position >= n:
        return position, n_skipped, time.perf_counter()
    encoder = Encoder.load(model_path, device="cpu").eval()
    cnn = encoder.config.backbone != "identity"
    encoder = encoder.to(dev)
    if cnn:
        encoder = encoder.to(memory_format=torch.channels_last)
    c = encoder.config

    pending_codes: list[np.ndarray] = []
    pending_skipped: list[tuple[int, str]] = []
    pending_start = position
    pending_rows = 0
    last_commit = time.monotonic()

    def commit(stop: int) -> None:
        nonlocal pending_codes, pending_skipped, pending_start, pending_rows, last_commit
        if stop == pending_start:
            return
        codes = np.concatenate(pending_codes) if pending_codes else np.empty((0, run.bits // 8), np.uint8)
        start, skipped = pending_start, pending_skipped
        # Journal first (durable), then the store: a kill between the two loses nothing, and the
        # store is rebuilt from the journal on resume anyway.
        journal.write(Journal.CHUNK, {"start": start, "stop": stop, "skipped": skipped}, codes.tobytes())
        pending_codes, pending_skipped, pending_start, pending_rows = [], [], stop, 0
        last_commit = time.monotonic()
        _apply_chunk(store, run, start, stop, codes, skipped)
        store.flush()

    bar = tqdm(total=n, initial=position, unit="img", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, smoothing=0.1, desc="encode")
    exact = exact_fp32(dev) if precision == "fp32" else contextlib.nullcontext()
    loop_start = time.perf_counter()  # model loaded; from here on: reading, decoding, encoding, writing
    try:
        with torch.inference_mode(), exact:
            for idx, x, errors in _batches(run, position, batch_size, workers, c.image_size,
                                           pin=dev.type == "cuda"):
                bad = [j for j, e in enumerate(errors) if e]
                for j in bad:
                    i = int(idx[j])
                    path = src.paths[i] if src.paths is not None else ""
                    if strict:
                        commit(position)
                        raise ImageError(
                            f"{errors[j]} (strict: stopped after {position} of {n} inputs; fix or remove the file "
                            "and rerun with --resume)"
                        )
                    reason = _reason(path, errors[j])
                    log.warning("skipping %s: %s", path, reason)
                    pending_skipped.append((i, reason))
                    n_skipped += 1
                    if len(skipped_items) < SUMMARY_SKIPPED_LIMIT:
                        skipped_items.append(_skip_item(run, i, reason))
                if bad:
                    keep = torch.as_tensor([j for j in range(len(errors)) if not errors[j]], dtype=torch.long)
                    x = x.index_select(0, keep)
                if len(x):
                    x = x.to(dev, non_blocking=True)
                    if cnn:
                        x = normalize_batch(x, c.mean, c.std).contiguous(memory_format=torch.channels_last)
                    else:
                        x = x.float()
                    with autocast_context(precision, dev):
                        h = encoder.hash(x)
                    pending_codes.append(pack_signs(h.float()))
                    pending_rows += len(x)
                position = int(idx[-1]) + 1
                bar.update(len(idx))
                if n_skipped:
                    bar.set_postfix(skipped=n_skipped, refresh=False)
                if pending_rows >= checkpoint_rows or time.monotonic() - last_commit >= checkpoint_seconds:
                    commit(position)
            commit(position)
    except BaseException:
        # Rows of whole batches already computed are valid: keep them for --resume.
        with contextlib.suppress(Exception):
            commit(position)
        raise
    finally:
        bar.close()
    return position, n_skipped, loop_start
