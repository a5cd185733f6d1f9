"""`ghindex build`: a thin wrapper over `ghindex.index.build`."""
from __future__ import annotations

import json

import click

from ghindex.index.tuning import TUNE_QUERIES

from .output import echo_rows


@click.command("build")
@click.option("--codes", required=True, type=click.Path(dir_okay=False),
              help="HDF5 code store to index (from `ghindex encode`).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Index directory to write (index.faiss + meta.json).")
@click.option("--index-key", default="auto", show_default=True,
              help="FAISS binary factory string: auto (BFlat up to 1M codes, else BIVF with lists chosen "
                   "from N), BFlat, BIVF<nlist>, BIVF (nlist from N), BIVF<nlist>_HNSW<M>, BHNSW<M>, "
                   "BHash<b>, BHash<nhash>x<b>.")
@click.option("--index-param", multiple=True, metavar="NAME=VALUE",
              help="Index parameter, repeatable: nprobe, train_size, kmeans_iters (IVF); efSearch, "
                   "efConstruction (HNSW); nflip (hash). [default: nprobe = nlist/32]")
@click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run IVF k-means on GPU when FAISS has one; 'on' fails without one.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Stop before building if the index needs more memory than this (e.g. 8G, 512M; "
                   "powers of 1024). [default: no limit]")
@click.option("--overwrite", is_flag=True, help="Replace an existing index directory at --out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the IVF training sample and k-means.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None,
              help="Codes read from the store per chunk. [default: the store's, about 32 MiB]")
@click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="R",
              help="IVF / HNSW: choose the smallest nprobe / efSearch whose tie-aware recall@K, measured on "
                   "database codes sampled as queries against exact search, reaches R (e.g. 0.95).")
@click.option("--target-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="K of the recall target.")
@click.option("--tune-queries", type=click.IntRange(min=1), default=TUNE_QUERIES, show_default=True,
              help="Database codes sampled (seeded by --seed) as queries for --target-recall.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format of the summary on stdout.")
def build(codes, out, index_key, index_param, gpu, max_memory, overwrite, seed, chunk_rows, target_recall, target_k,
          tune_queries, fmt):
    """Build a FAISS binary index from a code store.

    Reads the store in chunks and keeps its ids. The memory the index needs is estimated and logged
    (stderr) before any code is read. Codes of a width without a fast FAISS kernel (e.g. 48 bits) are
    zero-padded inside the index (distances are unchanged). Prints the index's metadata to stdout.
    """
    from ghindex.index import build as build_fn

    meta = build_fn(codes, out, index_key=index_key, index_param=index_param, gpu=gpu,
                    max_memory=max_memory, overwrite=overwrite, seed=seed, chunk_rows=chunk_rows,
                    target_recall=target_recall, target_k=target_k, tune_queries=tune_queries)
    if fmt == "json":
        click.echo(json.dumps(meta, sort_keys=True))
        return
    rows = [
        ("index", meta["path"]),
        ("index_key", meta["index_key"]),
        ("ntotal", f"{meta['ntotal']:,}"),
        ("bits", f"{meta['bits']} (searched as {meta['padded_bytes'] * 8})"),
        ("params", ", ".join(f"{k}={v}" for k, v in sorted(meta["params"].items())) or "-"),
        ("store", meta["store_path"]),
        ("store_fingerprint", meta["store_fingerprint"]),
        ("encoder_fingerprint", meta["encoder_fingerprint"] or "-"),
        ("build_seconds", meta["build_seconds"]),
    ]
    if meta.get("tuning"):
        rows.insert(5, ("tuning", _tuning_text(meta["tuning"])))
    echo_rows(rows)


def _tuning_text(tuning: dict) -> str:
    met = "" if tuning["target_met"] else " (target NOT reached)"
    return (f"{tuning['param']}={tuning['value']}: recall@{tuning['k']} {tuning['recall']:.4f} "
            f"(target {tuning['target_recall']}){met}, {tuning['queries_per_second']:,.0f} queries/s "
            f"on {tuning['queries']:,} sampled codes")
