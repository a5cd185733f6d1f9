"""`encode_local()`: one process runs a model over a data source and writes its codes to an HDF5 code
store, crash-safely. The public entry point is `ghindex.encode.encode`, which also runs under torchrun.

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
is faster on CPUs with bf16 units but flips bits whose pre-sign value is near 0. `runtime` says where
the backbone runs (`ghindex.runtime`): ONNX Runtime on the CPU by default when installed, PyTorch
otherwise.

This module is the single-process run and its loop; `ghindex.journal` holds the record format,
`ghindex.encode_state` what a run writes and the checks against existing stores, `ghindex.batching`
the DataLoader side. `ghindex.sharded_encode` runs `encode_local` once per torchrun process.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from .batching import BatchNormalizer, batches, normalize_batch
from .database_views import check_views, code_confidences, combine_outputs
from .device import autocast_context, exact_fp32, resolve_device, resolve_precision
from .encoder import Encoder
from .encode_state import (
    SUMMARY_SKIPPED_LIMIT,
    _append_base,
    _apply_chunk,
    _check_source,
    _finished_summary,
    _history,
    _is_result_of,
    _journal_header,
    _open_partial,
    _resume_state,
    _Run,
    _skip_item,
    load_source,
    source_fingerprint,
)
from .errors import ConfigError, ImageError, OutputError, StoreError
from .hashing import pack_confidences, pack_signs
from .io import file_fingerprint, writing
from .journal import JOURNAL_VERSION, Journal
from .runtime import resolve_runtime, use_runtime

log = logging.getLogger(__name__)


def _reason(path: str, error: str) -> str:
    """Image errors start with the file name; the store keeps path and reason apart."""
    for prefix in (f"{path}: ", f"{os.fsdecode(path)}: "):
        if error.startswith(prefix):
            return error[len(prefix):]
    return error


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


def encode_local(model, data, out, *, protocol, split, seed, root, batch_size, workers, device, precision, ids_from,
                 strict, resume, append, overwrite, with_paths, checkpoint_seconds, checkpoint_rows, progress,
                 shard: tuple[int, int] | None = None, runtime: str = "auto", views: int = 0,
                 pack: Callable[[torch.Tensor], np.ndarray] = pack_signs) -> dict[str, Any]:
    """Encode every input of `data` with the model file `model` into the code store `out`, in this
    process. The arguments (their types and defaults) and the summary are those of
    `ghindex.encode.encode`, which is the one place that states them, plus:

    `shard=(start, stop)`: encode only inputs [start, stop), ids unchanged (one process's part of a
    sharded run). `pack` turns a batch of pre-sign values into packed codes (`pack_signs`).
    """
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
    views = check_views(views)

    config = Encoder.read_config(model)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    resolve_runtime(runtime, dev, precision, backbone=config.backbone)  # a runtime that cannot run: now
    source = load_source(data, protocol, split, seed, root, ids_from)
    if shard is not None:  # one process's part of a sharded run: inputs [start, stop), ids unchanged
        source = source.subset(np.arange(*shard), description=f"{source.description} inputs {shard[0]}:{shard[1]}")
    _check_source(source, config, model, data)
    if views and source.kind != "images":
        raise ConfigError(f"views need images to edit; {data} holds {source.kind}")
    with_paths = bool(with_paths and source.paths is not None)
    label_shape = None if source.labels is None else tuple(source.labels.shape[1:])
    model_fingerprint = file_fingerprint(model)
    data_fingerprint = source_fingerprint(source)

    # Take the lock first: from here on no other run touches these files.
    with writing(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    had_journal = os.path.exists(journal_path)
    try:
        journal = Journal(journal_path, out)
    except OutputError as exc:
        raise exc.set_hint(f"nothing was written; {exc.remedy} and rerun")
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
            if os.path.exists(out) and _is_result_of(out, data_fingerprint, model_fingerprint, views):
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
            with_paths, base_info, id_offset, class_names = _append_base(
                out, source, data, config, model_fingerprint, label_shape, with_paths, views)
        ids = source.item_ids.astype(np.int64) + id_offset

        header = {
            "journal_version": JOURNAL_VERSION,
            "out": os.path.abspath(out),
            "model_fingerprint": model_fingerprint,
            "data_fingerprint": data_fingerprint,
            "inputs": len(source),
            "bits": config.bits,
            "precision": precision,
            "views": views,
            # each code's bit confidences go into the store (`hashing.pack_confidences`); an interrupted run
            # journaled before they existed resumes without them, an append does as its store (base_info)
            "confidences": saved.get("confidences", False) if saved is not None else True,
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
        if views:  # edited views per image in each code (`ghindex.database_views`): `add` and appends use the same
            store_attrs["views"] = views
        if class_names:
            store_attrs["class_names"] = list(class_names)
        if config.copy_radius is not None:  # the model's copy radius: `ghindex dedup --radius auto` reads it here
            store_attrs["copy_radius"] = int(config.copy_radius)
        if protocol is not None:
            store_attrs.update(protocol=protocol, split=split, seed=seed)
        run = _Run(source, ids, config.bits, label_shape, with_paths, header, store_attrs)

        state = None
        if resume:
            state = _resume_state(journal, saved, run, out)
        return _run(journal, run, model, out, partial, dev, precision, runtime, batch_size, workers, strict,
                    checkpoint_seconds, checkpoint_rows, progress, state, t0, data_fingerprint, append, pack, views)
    except OutputError as exc:
        exc.set_hint(_kept_hint(journal, len(source), exc))
        with contextlib.suppress(OSError):  # the journal holds its codes; --resume makes it again
            os.remove(partial)
        raise
    finally:
        if journal is not None and not journal.file.closed:
            if os.path.exists(journal.path) and os.path.getsize(journal.path) == 0:
                os.remove(journal.path)  # an empty journal records nothing: do not leave it behind
            journal.close()


def _kept_hint(journal: Journal, inputs: int, exc: OutputError) -> str:
    """What a failed write left for --resume: the inputs whose codes the journal holds."""
    kept = 0
    try:
        for kind, meta, _blob, _end in journal.records():
            if kind == Journal.CHUNK and meta.get("start") == kept:
                kept = int(meta["stop"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    what = f"inputs up to {kept:,} of {inputs:,} are kept" if kept else "no codes are kept yet"
    return f"{what}; {exc.remedy} and rerun with resume=True"


def _run(journal, run, model, out, partial, dev, precision, runtime, batch_size, workers, strict,
         checkpoint_seconds, checkpoint_rows, progress, state, t0, data_fingerprint, append, pack, views) -> dict:
    header = run.header
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
                codes = np.frombuffer(blob, dtype=np.uint8).reshape(-1, run.row_bytes)
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

        position, n_skipped, loop_start, runtime = _encode_loop(
            journal, store, run, model, dev, precision, runtime, batch_size, workers, strict,
            checkpoint_seconds, checkpoint_rows, progress, position, n_skipped, skipped_items, pack, views,
        )
        processed = position - resumed_from

        history = _history(store) if append else []
        history.append({
            "source": run.source.description,
            "data_fingerprint": data_fingerprint,
            "rows": len(run.source) - n_skipped,
            "skipped": n_skipped,
            "precision": precision,
            "runtime": runtime,
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
        "runtime": runtime,
        "status": "complete",
    }
    log.info(
        "encoded %d of %d inputs (%d skipped) into %s in %.1f s (%.1f inputs/s)",
        summary["count"], summary["inputs"], n_skipped, out, seconds, summary["rate"],
    )
    return summary


def _encode_loop(journal, store, run, model_path, dev, precision, runtime, batch_size, workers, strict,
                 checkpoint_seconds, checkpoint_rows, progress, position, n_skipped, skipped_items, pack, views):
    from tqdm import tqdm

    src = run.source
    n = len(src)
    if position >= n:
        backbone = Encoder.read_config(model_path).backbone
        return position, n_skipped, time.perf_counter(), resolve_runtime(runtime, dev, precision, backbone=backbone)
    encoder = Encoder.load(model_path, device="cpu").eval()
    cnn = encoder.config.backbone != "identity"
    encoder = encoder.to(dev)
    runtime = use_runtime(encoder, runtime, device=dev, precision=precision)  # may fall back to torch
    # PyTorch's CPU convolutions are faster on channels-last tensors; ONNX Runtime takes NCHW arrays
    channels_last = cnn and runtime == "torch"
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    c = encoder.config
    # on the CPU: one lookup pass into a kept buffer, the same floats as normalize_batch (see batching)
    normalizer = BatchNormalizer(c.mean, c.std, channels_last) if cnn and dev.type == "cpu" else None

    pending_codes: list[np.ndarray] = []
    pending_skipped: list[tuple[int, str]] = []
    pending_start = position
    pending_rows = 0
    last_commit = time.monotonic()

    def commit(stop: int) -> None:
        nonlocal pending_codes, pending_skipped, pending_start, pending_rows, last_commit
        if stop == pending_start:
            return
        codes = np.concatenate(pending_codes) if pending_codes else np.empty((0, run.row_bytes), np.uint8)
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
            for idx, x, errors in batches(src, position, batch_size, workers, c.image_size,
                                          pin=dev.type == "cuda", views=views, decode_size=c.decode_size):
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
                if bad:  # each image's 1 + views rows
                    keep = torch.as_tensor([j * (1 + views) + k for j in range(len(errors)) if not errors[j]
                                            for k in range(1 + views)], dtype=torch.long)
                    x = x.index_select(0, keep)
                if len(x):
                    x = x.to(dev, non_blocking=True)
                    if normalizer is not None:
                        x = normalizer(x)
                    elif channels_last:
                        x = normalize_batch(x, c.mean, c.std).contiguous(memory_format=torch.channels_last)
                    elif cnn:  # NCHW while still uint8: a quarter of the bytes to move
                        x = normalize_batch(x.contiguous(), c.mean, c.std)
                    else:
                        x = x.float()
                    with autocast_context(precision, dev):
                        h = combine_outputs(encoder.hash(x).float(), views)
                    rows = pack(h)
                    if run.confidences:
                        rows = np.concatenate([rows, pack_confidences(code_confidences(h, views))], axis=1)
                    pending_codes.append(rows)
                    pending_rows += len(h)
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
    return position, n_skipped, loop_start, runtime
