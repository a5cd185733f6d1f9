"""`evaluate`: retrieval metrics of query codes against database codes, directly or through an index.

Two ways to rank, one set of definitions (ghindex.metrics):

- **exact** (no index, or an exhaustive `BFlat` index): every query against every database code,
  computed by the metric kernel from the code stores. This is exactly what a flat index returns,
  with ties ranked by database position, so the numbers do not depend on the index, the machine or
  FAISS's tie order.
- **index** (IVF, HNSW, hash indexes): the index's own top-K lists (`topk` must be a number), re-ranked
  by (distance, database position); precision/recall within the radius come from its range search
  (None for HNSW, which has none) and there is no PR curve over all radii.

The database is the code store the index was built from (`ghindex.index.files.store_path_of`: next
to the index, as recorded, or at its recorded absolute path) unless given; its
fingerprint must match the one the index recorded. The JSON report carries the protocol, split,
seed, bits and the fingerprints of both stores, the index and the encoder.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from datetime import datetime, timezone

import numpy as np

from . import metrics
from .errors import ConfigError, DataError, IndexFileError, SearchError, StoreError
from .ids import StoreLookup
from .io import atomic_path
from .store import CodeStore
from .version import __version__

log = logging.getLogger(__name__)

#: Queries per index search call in index mode (bounds the (queries x K) result arrays).
SEARCH_CHUNK = 1024


def _open_store(path, what: str):
    if path is None:
        raise ConfigError(f"no {what} code store given")
    return CodeStore.open(path)


def _store_info(store) -> dict:
    attrs = store.attrs
    return {
        "path": os.path.abspath(store.path),
        "count": len(store),
        "bits": store.bits,
        "fingerprint": store.fingerprint,
        "encoder_fingerprint": store.encoder_fingerprint or None,
        "protocol": attrs.get("protocol"),
        "split": attrs.get("split"),
        "seed": attrs.get("seed"),
        "source": attrs.get("source") or None,
        "model": attrs.get("model"),
    }


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _check_labels(store, what: str) -> np.ndarray:
    labels = store.labels()
    if labels is None:
        raise DataError(f"{store.path}: the {what} code store has no labels; metrics need them")
    return labels


def evaluate(queries, database=None, index=None, topk="all", radius: int = 2, report=None, plot=None,
             progress: bool | None = None, recall: int | None = None, engine: str = "ghindex") -> dict:
    """Retrieval metrics of the query store against the database store (see the module docstring).

    queries, database: code store paths (both with labels). index: an index directory (or a loaded
    `ghindex.index.Index`); without `database`, its store is the database. topk: "all" or K for
    mAP@K. radius: Hamming radius for precision/recall within it. report: write the result as JSON
    there. plot: path prefix for PNG plots (`PREFIX-pr.png`, `PREFIX-pn.png`). Returns the result dict.
    Database rows marked deleted (`ghindex remove`) are left out.

    recall=K (with an index): also the index's tie-aware recall@K against exact search and its
    queries/s (result["recall"]); stores without labels then give that alone (metrics None), as does
    an approximate index with topk="all".

    engine: who scans a flat index on the CPU when the index is searched ('ghindex' or 'faiss', as
    `Index.load`): for recall=K. Exact metrics never search the index.
    """
    start = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ConfigError(f"radius must be a non-negative integer, got {radius!r}")
    if not (isinstance(topk, str) and topk.lower() == "all"):
        if isinstance(topk, str) and topk.isdigit():
            topk = int(topk)
        if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk <= 0:
            raise ConfigError(f"topk must be 'all' or a positive integer, got {topk!r}")
    from .index.core import check_engine  # faiss: loaded only when an index is used (here and below)

    check_engine(engine)
    warnings: list[str] = []
    index_obj, meta, index_path = None, None, None
    if index is not None:
        from .index import Index, read_meta

        if isinstance(index, Index):
            index_obj, meta, index_path = index, index.meta, (str(index.path) if index.path else None)
        else:
            meta, index_path = read_meta(index), os.path.abspath(index)
    if database is None:
        if meta is None:
            raise ConfigError("give database codes (--database) or an index built from a code store (--index)")
        from .index.files import store_path_of

        database = store_path_of(index_path, meta)
        if not database:
            raise ConfigError(f"index {index_path} records no code store; give the database codes (--database)")
        if not os.path.exists(database):
            raise StoreError(f"code store {database} (recorded in index {index_path}) not found; give --database")

    with _open_store(queries, "query") as q_store, _open_store(database, "database") as db_store:
        q_info, db_info = _store_info(q_store), _store_info(db_store)
        if q_store.bits != db_store.bits:
            raise ConfigError(
                f"query codes in {q_store.path} have {q_store.bits} bits but database codes in {db_store.path} "
                f"have {db_store.bits} bits"
            )
        if meta is not None:
            if int(meta["bits"]) != db_store.bits:
                raise ConfigError(f"index {index_path} holds {meta['bits']}-bit codes, the stores {db_store.bits}-bit")
            recorded = meta.get("store_fingerprint")
            if recorded and recorded != db_info["fingerprint"]:
                raise IndexFileError(
                    f"index {index_path} was built from a code store with another fingerprint than {database} "
                    "(a different or changed store): rebuild the index or give the store it was built from"
                )
        q_enc, db_enc = q_info["encoder_fingerprint"], db_info["encoder_fingerprint"]
        if q_enc and db_enc and q_enc != db_enc:
            warnings.append("query and database codes come from different encoders (fingerprints differ)")
            log.warning("warning: %s", warnings[-1])
        if len(q_store) == 0:
            raise DataError(f"{q_store.path} holds no codes")
        if len(db_store) == 0:
            raise DataError(f"{db_store.path} holds no codes")
        exhaustive = meta is None or meta.get("index_kind", "flat") == "flat"
        recall_only = _recall_only(recall, index, q_store, db_store, exhaustive, topk)
        q_labels, db_labels = (None, None) if recall_only else (
            _check_labels(q_store, "query"), _check_labels(db_store, "database"))
        q_codes, db_codes = q_store.codes(), db_store.codes()
        live = _live_rows(db_store)
        if live is not None:
            db_codes, db_labels = db_codes[live], (None if db_labels is None else db_labels[live])
            db_info["deleted"] = int(len(live) - live.sum())
        if recall_only:
            mode, summary = "recall", None
        elif exhaustive:
            mode = "exact"
            if index_obj is None and index is not None:
                # Exact metrics come from the stores, but a damaged index must not pass unnoticed:
                # open it (memory-mapped, so cheap) to check that it reads.
                from .index import Index

                Index.load(index, mmap=True, gpu="off")
            stats = metrics.query_stats(q_codes, db_codes, q_labels, db_labels,
                                        topk=None if topk == "all" else topk, progress=progress)
            summary = metrics.summarize(stats, radius=radius)
        else:
            mode = "index"
            if topk == "all":
                raise ConfigError(
                    f"index {index_path} is approximate ({meta['index_key']}): give --topk K to evaluate its "
                    "top-K lists, or evaluate the codes without the index for exact mAP@all"
                )
            if index_obj is None:
                from .index import Index

                index_obj = Index.load(index, gpu="off", engine=engine)
            summary = _evaluate_with_index(index_obj, q_codes, q_labels, db_store, db_labels, int(topk),
                                           radius, progress, live)
        recall_result = None
        if recall is not None:
            recall_result = _recall_of_index(index_obj if index_obj is not None else index, q_codes, db_codes, recall,
                                             engine)
        del db_codes

    result = {
        "metrics": summary,
        "mode": mode,
        "protocol": q_info["protocol"] or db_info["protocol"],
        "seed": q_info["seed"] if q_info["seed"] is not None else db_info["seed"],
        "bits": db_info["bits"],
        "queries": q_info,
        "database": db_info,
        "index": None if meta is None else {
            "path": index_path,
            "index_key": meta.get("index_key"),
            "params": meta.get("params", {}),
            "ntotal": meta.get("ntotal"),
            "store_fingerprint": meta.get("store_fingerprint"),
            "encoder_fingerprint": meta.get("encoder_fingerprint"),
        },
        "encoder_fingerprint": db_info["encoder_fingerprint"] or q_info["encoder_fingerprint"],
        "warnings": warnings,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_mib": _peak_rss_mib(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ghindex_version": __version__,
        "plots": {},
    }
    if recall_result is not None:
        result["recall"] = recall_result
    if plot is not None and summary is not None:
        result["plots"] = plot_curves(summary, plot)
    if report is not None:
        with atomic_path(report) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        result["report"] = os.path.abspath(report)
    return result


def _evaluate_with_index(index, q_codes, q_labels, db_store, db_labels, k, radius, progress, live=None) -> dict:
    """Metrics from an approximate index's result lists, queries in chunks (`live`: rows not deleted)."""
    lookup = StoreLookup(db_store.ids() if live is None else db_store.ids()[live])
    n_db, bits = (len(db_store) if live is None else int(live.sum())), int(db_store.bits)
    total = metrics.relevant_counts(q_labels, db_labels)
    parts, retrieved, relevant = [], [], []
    radius_ok = True
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(q_codes), unit="query", file=sys.stderr, desc="searching")
    for s in range(0, len(q_codes), SEARCH_CHUNK):
        e = min(s + SEARCH_CHUNK, len(q_codes))
        dist, ids = index.search(q_codes[s:e], k)
        rows = lookup.rows(ids)
        if ((rows < 0) & (ids >= 0)).any():
            raise IndexFileError("the index returned ids that are not in the database code store")
        parts.append(metrics.ranked_list_stats(rows, dist, q_labels[s:e], db_labels, bits, n_db,
                                               relevant_total=total[s:e]))
        if radius_ok:
            try:
                lims, _d, r_ids = index.range_search(q_codes[s:e], radius)
            except SearchError as exc:
                radius_ok = False
                log.info("no radius metrics: %s", exc)
            else:
                r_rows = lookup.rows(r_ids)
                if (r_rows < 0).any():
                    raise IndexFileError("the index returned ids that are not in the database code store")
                owner = np.repeat(np.arange(e - s), np.diff(lims))
                hits = _pair_relevance(q_labels[s:e], db_labels, owner, r_rows)
                retrieved.append(np.diff(lims))
                relevant.append(np.bincount(owner, weights=hits, minlength=e - s).astype(np.int64))
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()
    stats = metrics.QueryStats(
        bits, n_db, parts[0].topk, parts[0].cutoffs,
        np.concatenate([p.ap for p in parts]), np.concatenate([p.ap_tie_avg for p in parts]),
        total, np.concatenate([p.relevant_at for p in parts]),
    )
    radius_counts = (np.concatenate(retrieved), np.concatenate(relevant)) if radius_ok else None
    summary = metrics.summarize(stats, radius=radius, radius_counts=radius_counts)
    summary["index_search"] = {"k": k, "ties_at_k": "chosen by the index"}
    return summary


def _live_rows(store) -> np.ndarray | None:
    """Mask of the rows not deleted by `ghindex remove`; None when none is."""
    return ~store.deleted() if store.num_deleted else None


def _recall_only(recall, index, q_store, db_store, exhaustive, topk) -> bool:
    """With recall=K: are label metrics impossible (no labels; approximate index with topk='all')?"""
    if recall is None:
        return False
    if index is None:
        raise ConfigError("recall compares an index with exact search: give the index (--index)")
    if isinstance(recall, bool) or not isinstance(recall, (int, np.integer)) or recall < 1:
        raise ConfigError(f"recall K must be a positive integer, got {recall!r}")
    return not (q_store.has_labels and db_store.has_labels) or (not exhaustive and topk == "all")


def _recall_of_index(index, q_codes, db_codes, k, engine: str = "ghindex") -> dict:
    """Tie-aware recall@k of the index against exact search over the (live) database codes, and q/s."""
    from .index import Index
    from .index.tuning import measure_recall

    if not isinstance(index, Index):
        index = Index.load(index, gpu="off", engine=engine)
    chunk = 1 << 20
    return measure_recall(index, q_codes, lambda: (db_codes[s:s + chunk] for s in range(0, len(db_codes), chunk)),
                          int(k))


def _pair_relevance(q_labels, db_labels, owner, rows) -> np.ndarray:
    """Relevance of (query owner[i], database row rows[i]) pairs, as 0/1."""
    if not len(rows):
        return np.zeros(0)
    ql, dl = np.asarray(q_labels)[owner], np.asarray(db_labels)[rows]
    if ql.ndim == 1 and dl.ndim == 1:
        return (ql == dl).astype(np.float64)
    if ql.ndim == 1:
        ql = np.eye(dl.shape[1], dtype=bool)[ql]
    if dl.ndim == 1:
        dl = np.eye(ql.shape[1], dtype=bool)[dl]
    return ((ql != 0) & (dl != 0)).any(axis=1).astype(np.float64)


def plot_curves(summary: dict, prefix) -> dict:
    """PR curve (over Hamming radius) and P@N curve as PNGs at `PREFIX-pr.png`, `PREFIX-pn.png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    prefix = os.fspath(prefix)
    written = {}
    title = f"{summary['bits']} bits, {summary['queries']:,} queries x {summary['database']:,} items"
    pr = summary.get("pr_curve")
    if pr:
        fig = Figure(figsize=(5, 4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(pr["recall"], pr["precision"], marker="o", markersize=3)
        r = summary["radius"]
        if r < len(pr["recall"]):
            ax.annotate(f"r<={r}", (pr["recall"][r], pr["precision"][r]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
        ax.set_title(f"Precision-recall over Hamming radius 0..{summary['bits']}\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written["pr"] = _save_png(fig, f"{prefix}-pr.png")
    pn = summary.get("pn_curve")
    if pn and pn["n"]:
        fig = Figure(figsize=(5, 4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(pn["n"], pn["precision"], marker="o", markersize=3)
        ax.set(xlabel="N (top retrieved)", ylabel="precision@N", ylim=(0, 1.02))
        ax.set_title(f"Precision@N (ties by database position)\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written["pn"] = _save_png(fig, f"{prefix}-pn.png")
    return written


def _save_png(fig, path: str) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return os.path.abspath(path)


def format_table(result: dict) -> str:
    """A readable summary of an `evaluate` result."""
    if result["metrics"] is None:
        return _recall_table(result)
    return _metrics_table(result) + ("\n" + _recall_lines(result["recall"]) if result.get("recall") else "")


def _recall_lines(r: dict) -> str:
    return (f"recall@{r['k']}  {r['recall']:.4f}   (tie-aware, against exact search; {r['index_key']} "
            f"{', '.join(f'{k}={v}' for k, v in sorted(r['params'].items())) or ''})\n"
            f"queries/s  {r['queries_per_second']:,.0f} (exact search: {r['exact_queries_per_second']:,.0f})")


def _recall_table(result: dict) -> str:
    lines = [f"queries    {result['queries']['path']} ({result['recall']['queries']:,})",
             f"database   {result['database']['path']} ({result['database']['count']:,}, {result['bits']} bits)"]
    if result.get("index"):
        lines.append(f"index      {result['index']['path']} ({result['index']['index_key']}, mode {result['mode']})")
    lines += ["", _recall_lines(result["recall"])]
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return "\n".join(lines)


def _metrics_table(result: dict) -> str:
    m = result["metrics"]
    k = m["topk"]
    lines = [
        f"queries    {result['queries']['path']} ({m['queries']:,})",
        f"database   {result['database']['path']} ({m['database']:,}, {m['bits']} bits)",
    ]
    if result.get("index"):
        lines.append(f"index      {result['index']['path']} ({result['index']['index_key']}, mode {result['mode']})")
    if result.get("protocol"):
        lines.append(f"protocol   {result['protocol']} (seed {result['seed']})")
    lines += [
        "",
        f"mAP@{k:<7}  {m['map']:.4f}   (ties by database position)",
        f"mAP@{k:<7}  {m['map_tie_avg']:.4f}   (tie-averaged: expected over random tie orders)",
    ]
    if m["precision_at"]:
        lines.append("")
        lines.append(f"{'K':>6}  {'P@K':>7}  {'R@K':>7}")
        for n in m["precision_at"]:
            lines.append(f"{n:>6}  {m['precision_at'][n]:7.4f}  {m['recall_at'][n]:7.4f}")
    if m["precision_within_radius"] is not None:
        lines += [
            "",
            f"within Hamming radius {m['radius']}: precision {m['precision_within_radius']:.4f}, "
            f"recall {m['recall_within_radius']:.4f}, {m['retrieved_within_radius']:.1f} items/query, "
            f"{m['queries_retrieving_nothing_within_radius']:,} queries retrieve nothing",
        ]
    if m["queries_without_relevant"]:
        lines.append(f"{m['queries_without_relevant']:,} queries have no relevant item (they count as 0)")
    for w in result.get("warnings", []):
        lines.append(f"warning: {w}")
    lines.append("")
    lines.append(f"{result['seconds']:.2f} s, peak memory {result['peak_rss_mib']:.0f} MiB")
    for name, path in result.get("plots", {}).items():
        lines.append(f"plot ({name}): {path}")
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return "\n".join(lines)
