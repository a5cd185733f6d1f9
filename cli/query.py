"""`ghindex query`: a thin wrapper over `ghindex.query.query`."""
from __future__ import annotations

import csv
import sys

import click

from .dedup import RadiusType  # the same R|auto option as `ghindex dedup --radius`


@click.command("query")
@click.option("--index", required=True, type=click.Path(), help="Index directory (from `ghindex build`).")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="Model file (.ghm) that encodes the query IMAGEs; must be the index's encoder "
                   "(same file fingerprint) unless --force.")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--codes", type=click.Path(dir_okay=False), default=None,
              help="Query with every code of this code store (.h5) instead of images.")
@click.option("--ids", default=None, metavar="ID,ID,...",
              help="Query with these ids of the index's code store, e.g. 3,17.")
@click.option("--exclude-self", is_flag=True,
              help="Leave each --ids query's own item out of its neighbours (by default it comes first "
                   "among its ties, before exact copies stored earlier).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("--radius", type=RadiusType(), default=None,
              help="Keep only neighbours within this Hamming distance (bits), still at most k; auto: the copy "
                   "radius the index's code store recorded from its model. [default: no limit]")
@click.option("--force", is_flag=True,
              help="Accept a model/query store from another encoder than the index's, or a code store "
                   "changed since the index was built.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: each query image with its neighbours, framed green (relevant) / red.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder the index's code store's image paths are relative to, when the images moved "
                   "without the store. [default: the folder the store records, found next to it]")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images encoded per batch.")
@click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Search a flat index on all GPUs FAISS sees (auto: when there are any; on: fail without).")
@click.option("--gpu-shard", is_flag=True,
              help="Split a flat index over the GPUs (each holds N/G codes) instead of a full replica on each.")
@click.option("--engine", type=click.Choice(["ghindex", "faiss"]), default="ghindex", show_default=True,
              help="Who scans a flat index on the CPU: ghindex (faster; ties at the k-th distance cut by "
                   "database position) or FAISS's own scan. Other indexes and GPUs always use FAISS.")
@click.option("--rerank", type=click.IntRange(min=0), default=None, metavar="N",
              help="Image queries: rank the N nearest codes again by the weighted Hamming distance (each bit "
                   "weighed by how sure the query image is of it, times how sure the stored code is where the "
                   "store keeps bit confidences); 0: Hamming only. [default: 100 when the index's code store "
                   "is found]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="table for people; json = one JSON object per query per line; "
                                      "csv = one row per neighbour.")
def query(index, model, images, codes, ids, exclude_self, k, radius, force, grid, root, batch_size, gpu, gpu_shard,
          engine, rerank, fmt):
    """Find the nearest codes in INDEX for query IMAGES (with --model), --codes or --ids.

    Neighbours are ranked by Hamming distance, ties by database position (a queried id's own item
    first), with their id, distance, and path and label when the index's code store has them. Image
    queries re-rank their nearest codes by weighted Hamming distance (--rerank).
    """
    from ghindex.query import CSV_FIELDS, csv_rows, format_table, json_lines
    from ghindex.query import query as query_fn

    results = query_fn(index, model=model, images=images, codes=codes, ids=ids or (), k=k, radius=radius,
                       force=force, grid=grid, batch_size=batch_size, gpu=gpu, gpu_shard=gpu_shard, root=root,
                       engine=engine, exclude_self=exclude_self, rerank=rerank)
    if fmt == "json":
        if results:
            click.echo(json_lines(results))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(csv_rows(results))
    else:
        click.echo(format_table(results))
    if grid:
        click.echo(f"grid: {grid}", err=True)
