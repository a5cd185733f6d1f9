"""Index directories on disk: INDEX/index.faiss and INDEX/meta.json, written atomically, read and described.

The code store an index was built from is recorded twice in meta.json: `store_relpath`, relative to
the index directory (so a folder holding both can be copied or moved), and `store_path`, absolute
(the fallback when only the index moved; all that indexes written before had). `store_path_of` is the
one place that turns them into the store to open.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import IndexFileError, OutputError
from ..io import remove_stale_temps, unchanged_hint, writing

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
FORMAT = "ghindex-index"
FORMAT_VERSION = 1


def _is_index_dir(path: Path) -> bool:
    try:
        return json.loads((path / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not (out.is_dir() and _is_index_dir(out)):
        raise IndexFileError(f"{out} exists and is not a ghindex index directory; refusing to replace it")
    if not overwrite:
        raise IndexFileError(f"index {out} already exists; use overwrite=True to replace it")


@contextlib.contextmanager
def _atomic_dir(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temp directory next to `final`; on success it replaces `final` by renames.

    Failing to write (no space, read-only...) raises OutputError(final) and leaves no temp directory.
    """
    _check_out(final, overwrite)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    try:
        with writing(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                yield tmp
                for child in tmp.iterdir():
                    with open(child, "rb+") as f:
                        os.fsync(f.fileno())
                if final.exists():
                    os.replace(final, old)  # the old index survives under `old` if the next rename fails
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OutputError as exc:
        exc.set_hint(unchanged_hint(exc), replace=False)
        raise
    remove_stale_temps(final, (".tmp", ".old"))  # left by builds that were killed


def _faiss_reason(exc: Exception) -> str:
    """The useful part of a FAISS C++ error: without its function signature, source line and assertion."""
    text = str(exc).strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    text = re.sub(r"^Error: '.*?' failed: ", "", text)
    if text.startswith("read error"):
        text = f"the file ends too early: truncated? {text}"
    return text[:200]


def store_path_of(index_dir: str | os.PathLike | None, meta: dict) -> str | None:
    """The code store an index was built from, as a path to open: `store_relpath` against the index
    directory when that file exists (a copied or moved folder), else the recorded absolute
    `store_path` when that exists (only the index moved), else the first of them recorded (for the
    error message). None when the index records no store (built from arrays)."""
    relative, absolute = meta.get("store_relpath"), meta.get("store_path")
    near = None
    if relative and index_dir is not None:
        near = os.path.normpath(os.path.join(os.path.abspath(os.fspath(index_dir)), relative))
        if os.path.isfile(near):
            return near
    if absolute and os.path.isfile(absolute):
        return absolute
    return near or absolute or None


def store_link(index_dir: str | os.PathLike | None, meta: dict) -> dict | None:
    """How the index's link to its code store resolves: {"recorded" (relative to the index),
    "absolute", "resolved", "exists"}; None when it records no store."""
    resolved = store_path_of(index_dir, meta)
    if resolved is None:
        return None
    return {"recorded": meta.get("store_relpath"), "absolute": meta.get("store_path"), "resolved": resolved,
            "exists": os.path.isfile(resolved)}


def link_store(meta: dict, target: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> dict:
    """Point `meta`'s store link at the index directory `target` it is about to be written to: the
    store (resolved from `source_dir`, where this index was loaded from, if any) recorded relative to
    `target` and absolute. Changes and returns `meta`."""
    store = store_path_of(source_dir, meta)
    if store is None:
        return meta
    store = os.path.abspath(store)
    meta["store_path"] = store
    try:
        meta["store_relpath"] = os.path.relpath(store, os.path.abspath(os.fspath(target)))
    except ValueError:  # another drive (Windows): the absolute path is all there is
        meta.pop("store_relpath", None)
    return meta


def write_meta(folder: Path, meta: dict, target: str | os.PathLike,
               source_dir: str | os.PathLike | None = None) -> None:
    """Write meta.json into `folder` (the temp directory of `target`), its store link relative to `target`."""
    link_store(meta, target, source_dir)
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of an index directory, checked to be a ghindex index."""
    path = Path(path)
    if not path.exists():
        raise IndexFileError(f"index {path} does not exist")
    if not path.is_dir():
        raise IndexFileError(f"{path} is not an index directory (expected {INDEX_FILE} and {META_FILE} inside)")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise IndexFileError(f"{path} has no {META_FILE}: not a ghindex index directory") from None
    except ValueError as exc:
        raise IndexFileError(f"{path / META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{path / META_FILE} is not ghindex index metadata")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise IndexFileError(
            f"index {path} has format version {meta['format_version']}; this ghindex reads up to {FORMAT_VERSION}"
        )
    for field in ("bits", "code_bytes", "padded_bytes", "index_key", "ntotal"):
        if field not in meta:
            raise IndexFileError(f"{path / META_FILE} lacks {field!r}")
    return meta


def _lifecycle_fields(meta: dict) -> dict:
    """Recall tuning and add/remove counts, when the index has them."""
    fields = {}
    tuning = meta.get("tuning")
    if tuning:
        fields["tuning"] = {k: tuning[k] for k in ("param", "value", "recall", "k", "target_recall", "target_met",
                                                   "queries_per_second", "queries")}
    life = describe_lifecycle(meta)
    if life:
        fields["lifecycle"] = life
    return fields


def describe_index(path: str | os.PathLike) -> dict:
    """What an index directory holds, from meta.json and the file size (the index is not loaded)."""
    path = Path(path)
    meta = read_meta(path)
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise IndexFileError(f"index {path} lacks {INDEX_FILE}")
    return {
        "kind": "index",
        "path": str(path),
        "index_key": meta["index_key"],
        "faiss_class": meta.get("faiss_class"),
        "bits": meta["bits"],
        "code_bytes": meta["code_bytes"],
        "padded_bytes": meta["padded_bytes"],
        "ntotal": meta["ntotal"],
        "params": meta.get("params", {}),
        "id_map": meta.get("id_map"),
        "store_path": store_path_of(path, meta),
        "store_link": store_link(path, meta),
        "store_fingerprint": meta.get("store_fingerprint"),
        "encoder_fingerprint": meta.get("encoder_fingerprint"),
        "index_file_bytes": index_file.stat().st_size,
        **_lifecycle_fields(meta),
        "created": meta.get("created"),
        "faiss_version": meta.get("faiss_version"),
        "ghindex_version": meta.get("ghindex_version"),
    }


def describe_lifecycle(meta: dict) -> dict | None:
    """What `ghindex info` shows of an index's adds, removes and drift (None before any)."""
    life = meta.get("lifecycle")
    if not life:
        return None
    drift = life.get("drift") or {}
    return {
        "added": life.get("added", 0),
        "removed": life.get("removed", 0),
        "ntotal_at_build": life.get("ntotal_at_build"),
        "operations": len(life.get("history", [])),
        "drift_ratio": drift.get("added_ratio"),
        "rebuild_recommended": bool(drift.get("rebuild_recommended")),
    }
