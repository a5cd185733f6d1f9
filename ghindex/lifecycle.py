"""Growing and shrinking a built index in place: `add` new images (or codes) and `remove` ids, crash-safely.

An index directory DIR and the code store STORE it was built from (meta.json `store_path`) change
together: DIR's meta.json records STORE's fingerprint, and `query`/`eval` refuse a pair that does not
match. Neither file can be replaced together with the other in one atomic step, so every change goes
through STORE.pending, a complete new version of the store, in this order:

1. lock: ``.DIR.lock`` next to DIR (`fcntl.lockf`; a second add/remove on DIR fails at once);
2. `_recover`: finish or undo what a killed add/remove left (below);
3. add: encode the new images into the side store ``DIR.add.h5`` with `ghindex.encode.encode`
   (``--resume`` semantics: its journal makes this step resumable after any kill; `codes=` skips it);
4. write STORE.pending: a copy of STORE with the new rows appended, or with the removed rows marked
   deleted (temporary file, fsync, rename);
5. write the new index directory: the old index plus the new codes (IVF: into the trained lists), or
   without the removed ids, and meta.json recording STORE.pending's fingerprint (temp dir, renames);
6. rename STORE.pending onto STORE;
7. add: delete the side store.

A kill anywhere leaves DIR as either the old or the new index. `_recover` (run first by every add and
remove) sees which: if DIR's recorded fingerprint is STORE's, any STORE.pending is a leftover of
step 4 and is deleted; if it is STORE.pending's, the kill came between 5 and 6 and the rename is
done now. So rerunning the command that was killed completes it: the side store holds the encoded
codes, and an add whose codes the index already holds (its data and model, or its codes store, match
the last add in meta.json `lifecycle`) reports "already complete". Between 5 and 6 (a moment) a
reader sees a changed store and is told so.

Ids: new codes get ids after the largest id in STORE (deleted rows included: ids are never reused),
or the ids of a list-file column (`ids_from`) or of a codes store (`keep_ids`), which must not be in
STORE. Removed ids stay in STORE, marked in its `deleted` dataset: builds, searches and metrics leave
them out, `ghindex info` counts them.

Drift (IVF): an IVF index's lists were trained on the codes it was built from. Build records the mean
Hamming distance of a sample of those codes to their nearest centroid (meta `drift`); each add
measures the same for a sample of the new codes. When the new codes sit more than
DRIFT_REBUILD_RATIO times as far from the centroids as the build's, their lists no longer describe
them well (searches visit the wrong lists, recall at a given nprobe falls): a rebuild is recommended.

This module holds `add` and `remove`; the steps they share (lock, `_recover`, STORE.pending, commit) are
`ghindex.index.transaction`'s, the drift measurements `ghindex.index.drift`'s.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from .encode_state import (
    _append_base,
    _check_ids,
    _check_source,
    _existing_ids_clash,
    _is_result_of,
    _journal_header,
    _max_id,
    load_source,
    source_fingerprint,
    store_views,
)
from .errors import ConfigError, DataError, ModelFileError, StoreError
from .hashing import surest_confidences
from .ids import StoreLookup, parse_ids
from .index.builder import _IndexBuilder
from .index.core import Index
from .index.drift import (  # noqa: F401 - DRIFT_REBUILD_RATIO, drift_reference: imported from here
    _READ_ROWS,
    DRIFT_REBUILD_RATIO,
    _drift_report,
    _drift_sample_positions,
    centroid_distances,
    drift_reference,
)
from .index.sampling import live_chunks
from .index.structures import _inner
from .index.transaction import (  # noqa: F401 - KILL_ENV: imported from here
    KILL_ENV,
    _commit,
    _kill_point,
    _lifecycle,
    _locked,
    _now,
    _pending,
    _recover,
    _write_pending,
)
from .io import file_fingerprint
from .journal import Journal
from .store import CodeStore

log = logging.getLogger(__name__)


def side_store_path(index: str | os.PathLike) -> Path:
    """Where `add` encodes new images before they join the index: DIR.add.h5 next to the index."""
    index = Path(index)
    return index.with_name(index.name + ".add.h5")


# ------------------------------------------------------------------------------------------ add
def _joinable(base, side, side_name: str, keep_ids: bool) -> None:
    """Can the rows of code store `side` join `base`? Same bits, encoder, labels, class names; paths
    when base keeps them; with `keep_ids`, unique ids not already in base."""
    where = f"cannot add {side_name} to {base.path}"
    if side.bits != base.bits:
        raise StoreError(f"{where}: its codes have {side.bits} bits, the index's {base.bits}")
    if base.encoder_fingerprint != side.encoder_fingerprint:
        raise StoreError(f"{where}: its codes come from another encoder (fingerprints differ)")
    if side.label_shape != base.label_shape:
        raise StoreError(f"{where}: its labels ({side.label_shape}) differ from the store's ({base.label_shape})")
    if base.label_shape == () and base.class_names and side.class_names and base.class_names != side.class_names:
        raise StoreError(f"{where}: its class names differ from the store's")
    if base.has_paths and not side.has_paths:
        raise StoreError(f"{where}: the store keeps image paths and it has none")
    if keep_ids:
        ids = side.ids()[~side.deleted()]
        _check_ids(ids, side_name)
        clash = _existing_ids_clash(base, ids)
        if clash is not None:
            raise DataError(f"{where}: id {clash} is already in the store (ids are never reused; drop keep_ids)")


def _side_rows(side, id_offset: int, with_paths: bool, with_confidences: bool):
    """The live rows of the side store in chunks: (codes, ids + id_offset, labels, paths, confidences).
    With `with_confidences` and a side store without them (codes made elsewhere), each bit is given the
    highest level: as sure as the store's surest bits, so their ranking is what it was without confidences."""
    deleted = side.deleted()
    start = 0
    for batch in side.iter_chunks(rows=_READ_ROWS, paths=with_paths):
        keep = ~deleted[start:start + len(batch.ids)]
        start += len(batch.ids)
        paths = [p for p, k in zip(batch.paths, keep) if k] if with_paths else None
        labels = None if batch.labels is None else batch.labels[keep]
        confidences = None
        if with_confidences:
            confidences = (batch.confidences[keep] if batch.confidences is not None
                           else surest_confidences(int(keep.sum()), side.bits))
        yield batch.codes[keep], batch.ids[keep].astype(np.int64) + id_offset, labels, paths, confidences


def _encode_side(index_dir: Path, meta: dict, store: Path, model, data, *, root, ids_from, discard_pending,
                 encode_options: dict) -> tuple[Path, dict | None, dict]:
    """Step 3: encode DATA into the side store (resumable). Returns (side store, encode summary or None
    when this add already completed, what identifies the input)."""
    # torch: only an add that encodes images needs it
    from . import distributed
    from .encode import encode
    from .encoder import Encoder

    if distributed.is_distributed():
        raise ConfigError("add runs in one process: launch it without torchrun")
    config = Encoder.read_config(model)
    if config.bits != int(meta["bits"]):
        raise ModelFileError(f"model {model} makes {config.bits}-bit codes but index {index_dir} holds {meta['bits']}-bit codes")
    model_fp = file_fingerprint(model)
    if meta.get("encoder_fingerprint") and model_fp != meta["encoder_fingerprint"]:
        raise ModelFileError(
            f"model {model} is not the model index {index_dir} was built with (fingerprints differ): "
            "its codes would not be comparable"
        )
    source = load_source(data, None, None, 0, root, ids_from)
    _check_source(source, config, model, data)
    ident = {"data_fingerprint": source_fingerprint(source), "model_fingerprint": model_fp,
             "source": source.description}
    with CodeStore.open(store) as base:
        views = store_views(base)  # new codes are made as the store's were
    side = side_store_path(index_dir)
    journal_path = Path(f"{side}.partial.journal")
    if discard_pending:
        for path in (side, Path(f"{side}.partial"), journal_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if _done_already(meta, ident):
        if side.exists() and _is_result_of(os.fspath(side), ident["data_fingerprint"], model_fp, views):
            side.unlink()  # the add completed but was killed before removing its side store
        return side, None, ident
    # A side store or interrupted encode of other data belongs to another add that has not finished.
    other = None
    if side.exists() and not _is_result_of(os.fspath(side), ident["data_fingerprint"], model_fp, views):
        other = side
    elif journal_path.exists():
        journal = Journal(os.fspath(journal_path), os.fspath(side))
        try:
            header = _journal_header(journal) or {}
        finally:
            journal.close()
        if header and (header.get("data_fingerprint"), header.get("model_fingerprint")) != (
                ident["data_fingerprint"], model_fp):
            other = journal_path
    if other is not None:
        raise StoreError(
            f"{other} belongs to an interrupted add of other data into {index_dir}: rerun that add to finish "
            "it, or discard it (--discard-pending)"
        )
    label_shape = None if source.labels is None else tuple(source.labels.shape[1:])
    with_paths, _, _, _ = _append_base(os.fspath(store), source, data, config, model_fp, label_shape,
                                       source.paths is not None, views)
    summary = encode(model, data, side, root=root, ids_from=ids_from, resume=True, with_paths=with_paths,
                     views=views, **encode_options)
    _kill_point("add:encoded")
    return side, summary, ident


def _done_already(meta: dict, ident: dict) -> bool:
    adds = [e for e in meta.get("lifecycle", {}).get("history", []) if e.get("op") == "add"]
    keys = ("data_fingerprint", "model_fingerprint", "codes_fingerprint")
    return bool(adds) and all(adds[-1].get(k) == ident.get(k) for k in keys)


def add(index: str | os.PathLike, data: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
        codes: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None,
        ids_from: int | None = None, keep_ids: bool = False, batch_size: int = 64, workers: int | None = None,
        device: str = "auto", precision: str = "auto", runtime: str = "auto", strict: bool = False,
        discard_pending: bool = False, checkpoint_seconds: float = 10.0, checkpoint_rows: int = 65536,
        progress: bool = True) -> dict:
    """Add new images (`data` encoded with `model`, the index's encoder) or the codes of a code store
    (`codes`) to the index directory `index` and to its code store, in place and crash-safely.

    New ids follow the store's largest id, unless `ids_from` (a list file's id column, as in `encode`)
    or `keep_ids` (a codes store's own ids) gives them; such ids must not be in the store. IVF indexes
    put the codes into their trained lists (no retraining) and report how far the new codes sit from
    the centroids against the build (`drift`, `rebuild_recommended`). Rerunning an add that was killed
    finishes it (encoding resumes from its journal); rerunning one that completed does nothing.
    `discard_pending` drops the encoded codes of an interrupted add that never reached the index.
    The other options are `encode`'s. Returns a summary (see the module docstring for the steps).
    """
    start_time = time.perf_counter()
    if (codes is None) == (data is None and model is None):
        raise ConfigError("give either new images (data and model) or a code store (codes), not both or neither")
    if codes is None and (data is None or model is None):
        raise ConfigError("adding images needs both the data and the model that encodes them")
    if codes is not None and (ids_from is not None or root is not None):
        raise ConfigError("ids_from and root apply to images (data); a code store brings its ids (keep_ids)")
    if codes is None and keep_ids:
        raise ConfigError("keep_ids applies to a code store (codes); images take ids_from or new ids")
    index_dir = Path(index)
    with _locked(index_dir):
        meta, store = _recover(index_dir)
        summary_encode = None
        if codes is None:
            options = dict(batch_size=batch_size, workers=workers, device=device, precision=precision,
                           runtime=runtime, strict=strict, checkpoint_seconds=checkpoint_seconds,
                           checkpoint_rows=checkpoint_rows, progress=progress)
            side, summary_encode, ident = _encode_side(
                index_dir, meta, store, model, data, root=root, ids_from=ids_from,
                discard_pending=discard_pending, encode_options=options)
            if summary_encode is None:
                return _already(index_dir, meta, start_time)
        else:
            side = Path(codes)
            with CodeStore.open(side) as s:
                ident = {"codes_fingerprint": s.fingerprint, "source": f"codes:{side.resolve()}"}
            if _done_already(meta, ident):
                return _already(index_dir, meta, start_time)
        result = _add_side(index_dir, meta, store, side, ident, keep_ids=codes is not None and keep_ids,
                           own_ids=codes is None and ids_from is not None)
        if codes is None:
            side.unlink()
        result.update(status="complete", seconds=round(time.perf_counter() - start_time, 3),
                      encode=None if summary_encode is None else {
                          k: summary_encode[k] for k in ("count", "skipped", "skipped_items", "inputs",
                                                         "resumed_from", "seconds", "rate", "status")})
    log.info("added %s codes to %s (now %s)%s", f"{result['added']:,}", index_dir, f"{result['ntotal']:,}",
             "; rebuild recommended (see drift)" if result["rebuild_recommended"] else "")
    return result


def _already(index_dir: Path, meta: dict, start_time: float) -> dict:
    last = [e for e in meta["lifecycle"]["history"] if e.get("op") == "add"][-1]
    drift = meta["lifecycle"].get("drift")
    return {"index": str(index_dir), "status": "already complete", "added": 0, "ids_min": last.get("ids_min"),
            "ids_max": last.get("ids_max"), "ntotal": int(meta["ntotal"]), "drift": drift,
            "rebuild_recommended": bool(drift and drift.get("rebuild_recommended")), "encode": None,
            "seconds": round(time.perf_counter() - start_time, 3)}


def _add_side(index_dir: Path, meta: dict, store: Path, side: Path, ident: dict, *, keep_ids: bool,
              own_ids: bool) -> dict:
    """Steps 4-6 of an add: the rows of the side store into STORE.pending, the index, then STORE."""
    with CodeStore.open(store) as base, CodeStore.open(side) as new_rows:
        _joinable(base, new_rows, os.fspath(side), keep_ids or own_ids)
        id_offset = 0 if (keep_ids or own_ids) else _max_id(base) + 1
        with_paths = base.has_paths
        count = len(new_rows) - new_rows.num_deleted
        if count == 0:
            raise DataError(f"{side} holds no codes to add")
        skipped = new_rows.skipped()
        id_range = [None, None]

        def append_rows(target) -> None:
            for codes, ids, labels, paths, sure in _side_rows(new_rows, id_offset, with_paths, base.has_confidences):
                target.append(codes, ids, labels if base.has_labels else None, paths, sure)
                id_range[0] = int(ids.min()) if id_range[0] is None else min(id_range[0], int(ids.min()))
                id_range[1] = int(ids.max()) if id_range[1] is None else max(id_range[1], int(ids.max()))
            if skipped:
                target.add_skipped([s["position"] for s in skipped], [s["path"] for s in skipped],
                                   [s["reason"] for s in skipped])

        store_entry = {"op": "add", "source": ident["source"], "rows": count, "skipped": len(skipped),
                       "id_offset": id_offset, "finished": _now(),
                       **{k: v for k, v in ident.items() if k.endswith("fingerprint")}}
        new_fingerprint = _write_pending(store, append_rows, store_entry)
        _kill_point("add:store-pending")

        index = Index.load(index_dir, gpu="off")
        life = _lifecycle(index.meta)
        drift_sample = _drift_sample_positions(index, count)
        distances = []
        position = 0
        for codes, ids, _, _, _ in _side_rows(new_rows, id_offset, False, False):
            if drift_sample is not None:
                lo, hi = np.searchsorted(drift_sample, [position, position + len(codes)])
                distances.append(centroid_distances(index, codes[drift_sample[lo:hi] - position]))
            index.add(codes, ids)
            position += len(codes)
        drift = _drift_report(index, base, meta, np.concatenate(distances) if distances else None, count)
    life["added"] += count
    if drift is not None:
        life["drift"] = drift
    entry = {"op": "add", "time": _now(), "count": count, "ids_min": id_range[0], "ids_max": id_range[1],
             "ntotal": index.ntotal, **ident}
    if drift is not None:
        entry.update(mean_distance=drift["last_add_mean_distance"], drift_ratio=drift["last_add_ratio"])
    _commit(index, index_dir, store, new_fingerprint, entry, "add")
    return {"index": str(index_dir), "added": count, "ids_min": id_range[0], "ids_max": id_range[1],
            "ntotal": index.ntotal, "store": str(store), "drift": drift,
            "rebuild_recommended": bool(drift and drift["rebuild_recommended"])}


# ------------------------------------------------------------------------------------------ remove
def read_ids_file(path: str | os.PathLike) -> list[int]:
    """Integer ids from a text file: separated by newlines, commas or spaces; '#' starts a comment."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file of ids") from None
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            try:
                ids.append(int(token))
            except ValueError:
                raise DataError(f"{path}:{number}: {token!r} is not an integer id") from None
    return ids


def remove(index: str | os.PathLike, ids=None, ids_file: str | os.PathLike | None = None) -> dict:
    """Remove codes by id from the index directory `index` and mark them deleted in its code store.

    `ids`: integers (or '3,17' strings); `ids_file`: a text file of ids (see `read_ids_file`); both may
    be given. Every id must be in the store; ids already deleted are skipped (rerunning a remove does
    nothing). Flat and IVF indexes drop the codes in place; HNSW and hash indexes, which FAISS cannot
    remove from, are rebuilt from the store without them. Crash-safe like `add`. Returns a summary.
    """
    start_time = time.perf_counter()
    wanted = parse_ids(ids) if ids is not None else []
    if ids_file is not None:
        wanted += read_ids_file(ids_file)
    if not wanted:
        raise ConfigError("no ids to remove: give ids or an ids file")
    wanted = np.unique(np.asarray(wanted, dtype=np.int64))
    index_dir = Path(index)
    with _locked(index_dir):
        meta, store = _recover(index_dir)
        with CodeStore.open(store) as base:
            rows = StoreLookup(base.ids()).rows(wanted)
            if (rows < 0).any():
                missing = wanted[rows < 0]
                more = f" (and {len(missing) - 5:,} more)" if len(missing) > 5 else ""
                raise ConfigError(f"ids not in the code store of index {index_dir}: "
                                  f"{', '.join(map(str, missing[:5].tolist()))}{more}")
            deleted = base.deleted()[rows]
        rows, gone = rows[~deleted], wanted[~deleted]
        summary = {"index": str(index_dir), "requested": len(wanted), "already_deleted": int(deleted.sum())}
        if not len(rows):
            return {**summary, "status": "already complete", "removed": 0, "ntotal": int(meta["ntotal"]),
                    "rebuilt": False, "seconds": round(time.perf_counter() - start_time, 3)}
        entry = {"op": "remove", "rows": len(rows), "finished": _now()}
        new_fingerprint = _write_pending(store, lambda s: s.mark_deleted(rows), entry)
        _kill_point("remove:store-pending")
        index = Index.load(index_dir, gpu="off")
        life = _lifecycle(index.meta)
        before = index.ntotal
        rebuilt = index.kind not in Index.REMOVABLE_KINDS
        if rebuilt:
            log.info("FAISS cannot remove codes from %s indexes: rebuilding it from the store without them",
                     index.index_key)
            index = _rebuilt(index, _pending(store))
        else:
            index.remove(gone)
        removed = before - index.ntotal
        if removed != len(gone):
            log.warning("warning: %d of the %d ids were not in index %s (removed from the store all the same)",
                        len(gone) - removed, len(gone), index_dir)
        life["removed"] += removed
        _commit(index, index_dir, store, new_fingerprint,
                {"op": "remove", "time": _now(), "count": removed, "ntotal": index.ntotal,
                 "ids_min": int(gone.min()), "ids_max": int(gone.max()), "rebuilt": rebuilt}, "remove")
    log.info("removed %s codes from %s (now %s)", f"{removed:,}", index_dir, f"{index.ntotal:,}")
    return {**summary, "status": "complete", "removed": removed, "ntotal": index.ntotal, "rebuilt": rebuilt,
            "seconds": round(time.perf_counter() - start_time, 3)}


def _rebuilt(index, store_path: Path):
    """The same kind of index (key, parameters) built from the store's live rows."""
    meta = index.meta
    params = {k: v for k, v in meta.get("params", {}).items()}
    with CodeStore.open(store_path) as store:
        n = len(store) - store.num_deleted
        if n == 0:
            raise ConfigError(f"cannot remove every code from a {index.index_key} index; delete the index instead")
        builder = _IndexBuilder(n, int(meta["bits"]), meta["index_key"], params, gpu="off")
        faiss_index = builder.build(live_chunks(store, store_path, store.default_iter_rows()))
    meta["faiss_class"] = type(_inner(faiss_index)).__name__
    return Index(faiss_index, meta, path=index.path)
