"""`ghindex encode` launched by torchrun: each process encodes a contiguous range of the inputs into
its own part, then rank 0 merges the parts, in order, into the one code store OUT.

    OUT.part<r>-of-<N>    process r's part: an ordinary code store, written by the single-process
                          `encode_local` with its journal (OUT.part<r>-of-<N>.partial[.journal]), so a
                          process that dies loses only its unflushed chunk and `--resume` continues
                          every part where it stopped (parts that were complete are kept)
    OUT                   the merge: parts copied chunk by chunk into a temporary file next to OUT,
                          marked complete and renamed onto OUT; then the parts are removed

Readers therefore only ever see a complete OUT with every input exactly once, in input order, with
the same codes, ids, labels and paths as a single-process run (ranges split the inputs, ids are the
inputs' positions or explicit ids as usual). A resume must use the same number of processes (the
parts are named after it); `--overwrite` discards the parts of any earlier run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import time
from typing import Any

from . import distributed
from .device import resolve_device, resolve_precision
from .encode_state import SUMMARY_SKIPPED_LIMIT, _finished_summary, _is_result_of, load_source, source_fingerprint
from .errors import ConfigError, StoreError
from .io import atomic_path, file_fingerprint
from .local_encode import encode_local
from .store import _RESERVED_ATTRS, CodeStore

# Barriers wait for the slowest part (after a resume, parts can have very different amounts left);
# a process that dies is handled by torchrun, which stops the others.
GROUP_TIMEOUT = datetime.timedelta(days=7)


def part_path(out: str, index: int, count: int) -> str:
    return f"{out}.part{index}-of-{count}"


def _leftovers(out: str) -> dict[int, list[str]]:
    """Files of parts next to OUT: {number of processes of their run: [paths]}."""
    folder = os.path.dirname(os.path.abspath(out))
    pattern = re.compile(re.escape(os.path.basename(out)) + r"\.part(\d+)-of-(\d+)(\.partial(\.journal)?)?")
    found: dict[int, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        if match:
            found.setdefault(int(match.group(2)), []).append(os.path.join(folder, name))
    return found


def merge_parts(parts: list[str], out: str, description: str, data_fingerprint: str) -> int:
    """Copy the complete part stores, in order, into OUT (temporary file + rename). Returns its rows."""
    with CodeStore.open(parts[0]) as first:
        bits, encoder, label_shape, with_paths = first.bits, first.encoder_fingerprint, first.label_shape, first.has_paths
        confidences = first.has_confidences
        attrs = {k: v for k, v in first.attrs.items() if k not in _RESERVED_ATTRS and k != "history"}
        history = json.loads(first.attrs.get("history") or "[]")
        paths_root = first.images_root()  # paths stay relative to the same folder
    entry = dict(history[-1]) if history else {}
    rows = skipped = 0
    with atomic_path(out, suffix=".merging") as tmp:
        dst = CodeStore.create(tmp, bits, encoder_fingerprint=encoder, source=description, label_shape=label_shape,
                               with_paths=with_paths, attrs=attrs, overwrite=True, paths_root=paths_root,
                               confidences=confidences)
        try:
            for path in parts:
                with CodeStore.open(path) as part:
                    if (part.bits, part.encoder_fingerprint, part.label_shape, part.has_paths, part.has_confidences) != \
                            (bits, encoder, label_shape, with_paths, confidences):
                        raise StoreError(f"{path} does not match {parts[0]} (bits, model, labels, paths or bit "
                                         "confidences differ)")
                    for batch in part.iter_chunks():
                        dst.append(batch.codes, batch.ids, batch.labels, batch.paths, batch.confidences)
                    gone = part.skipped()
                    if gone:
                        dst.add_skipped([g["position"] for g in gone], [g["path"] for g in gone],
                                        [g["reason"] for g in gone])
                    rows += len(part)
                    skipped += len(gone)
            entry.update(source=description, data_fingerprint=data_fingerprint, rows=rows, skipped=skipped,
                         processes=len(parts),
                         finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            dst.set_attrs(history=[entry])
            dst.mark_complete()
        finally:
            dst.close()
    return rows


def encode_sharded(model, data, out, *, protocol=None, split=None, seed=0, root=None, ids_from=None,
                   device="auto", resume=False, append=False, overwrite=False, progress=True,
                   **options) -> dict[str, Any]:
    """`ghindex.encode.encode` with several processes (see the module docstring). Every process
    returns the same summary of the whole run; `options` go to each process's `encode_local`."""
    t0 = time.perf_counter()
    out, model = os.fspath(out), os.fspath(model)
    if append:
        raise ConfigError("append needs a single process: encode the new data into its own store under torchrun")
    if overwrite and resume:
        raise ConfigError("overwrite cannot be combined with resume or append")
    world, rank = distributed.world_size(), distributed.rank()
    dev = distributed.device_for_rank(resolve_device(device))
    distributed.setup(backend="gloo", timeout=GROUP_TIMEOUT)
    source = load_source(data, protocol, split, seed, root, ids_from)
    data_fingerprint = source_fingerprint(source)
    parts = [part_path(out, r, world) for r in range(world)]

    # Every process decides from the same files; nothing changes them before the barrier below.
    leftovers = _leftovers(out)
    if resume and os.path.exists(out) and _is_result_of(out, data_fingerprint, file_fingerprint(model),
                                                        options.get("views", 0)):
        # finished (perhaps killed after the merge's rename, before the parts were removed)
        for path in leftovers.get(world, []):
            if path in (os.path.abspath(parts[rank]) + suffix for suffix in ("", ".partial", ".partial.journal")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        return {**_finished_summary(out, t0, dev, resolve_precision(options.get("precision", "auto"), dev), source),
                "processes": world}
    if os.path.exists(out) and not (overwrite or resume):
        raise StoreError(f"{out} already exists: use --overwrite to replace it")
    if os.path.exists(out) and resume and not leftovers:
        raise StoreError(f"{out} already exists and is not this run's result: use --overwrite")
    other = sorted(n for n in leftovers if n != world)
    if leftovers and not (resume or overwrite):
        n = world if world in leftovers else other[0]
        raise StoreError(f"{leftovers[n][0]} is left from an interrupted run with {n} processes: rerun with "
                         "--resume to continue it, or --overwrite to start over")
    if other and not overwrite:
        raise StoreError(f"{leftovers[other[0]][0]} is left from a run with {other[0]} processes: resume with "
                         f"{other[0]} processes, or --overwrite to start over")
    distributed.barrier()
    if overwrite and rank == 0:
        for n in other:
            for path in leftovers[n]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    start, stop = distributed.shard_range(len(source))
    mine = encode_local(model, data, parts[rank], protocol=protocol, split=split, seed=seed, root=root,
                        ids_from=ids_from, device=str(dev), resume=resume, append=False, overwrite=overwrite,
                        progress=progress and rank == 0, shard=(start, stop), **options)
    summaries = distributed.all_gather_objects(mine)  # also a barrier: every part is complete
    if rank == 0:
        merge_parts(parts, out, source.description, data_fingerprint)
        for path in parts:
            os.remove(path)
    distributed.barrier()

    seconds = time.perf_counter() - t0
    processed = sum(s["processed"] for s in summaries)
    skipped_items = [item for s in summaries for item in s["skipped_items"]][:SUMMARY_SKIPPED_LIMIT]
    return {
        "out": out,
        "count": sum(s["count"] for s in summaries),
        "skipped": sum(s["skipped"] for s in summaries),
        "skipped_items": skipped_items,
        "inputs": len(source),
        "store_rows": sum(s["store_rows"] for s in summaries),
        "bits": mine["bits"],
        "resumed_from": sum(s["resumed_from"] for s in summaries),
        "processed": processed,
        "seconds": round(seconds, 3),
        "rate": round(processed / seconds, 1) if seconds > 0 else 0.0,
        "setup_seconds": max(s["setup_seconds"] for s in summaries),
        "loop_rate": round(sum(s["loop_rate"] for s in summaries), 1),  # all processes together
        "device": mine["device"],
        "precision": mine["precision"],
        "runtime": mine["runtime"],
        "status": "complete",
        "processes": world,
    }
