"""`ghindex eval`: a thin wrapper over `ghindex.evaluate.evaluate`."""
from __future__ import annotations

import json

import click


class TopK(click.ParamType):
    name = "all|K"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).lower() == "all":
            return value if isinstance(value, int) else "all"
        try:
            k = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'all' nor a positive integer", param, ctx)
        if k <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return k


@click.command("eval")
@click.option("--queries", required=True, type=click.Path(dir_okay=False),
              help="Query code store (.h5) with labels.")
@click.option("--index", type=click.Path(), default=None,
              help="Index directory; its code store is the database unless --database is given.")
@click.option("--database", type=click.Path(dir_okay=False), default=None,
              help="Database code store (.h5) with labels. [default: the index's store]")
@click.option("--topk", type=TopK(), default="all", show_default=True,
              help="K of mAP@K: 'all' (whole database) or a number (e.g. 1000).")
@click.option("--radius", type=click.IntRange(min=0), default=2, show_default=True,
              help="Hamming radius (bits) for precision/recall within it.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the full result (metrics, curves, provenance) as JSON here.")
@click.option("--plot", type=click.Path(), default=None, metavar="PREFIX",
              help="Write PREFIX-pr.png (precision-recall over radius) and PREFIX-pn.png (precision@N).")
@click.option("--recall", "recall", type=click.IntRange(min=1), default=None, is_flag=False, flag_value=10,
              metavar="[K]",
              help="Also the index's tie-aware recall@K (default K 10) against exact search, and its "
                   "queries/s. Alone when the stores have no labels or the index is approximate and "
                   "--topk is all.")
@click.option("--engine", type=click.Choice(["ghindex", "faiss"]), default="ghindex", show_default=True,
              help="Who scans a flat index on the CPU when the index is searched (--recall): ghindex "
                   "(faster) or FAISS's own scan. Exact metrics never search the index.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output on stdout: a table for people or the result as JSON.")
def eval_(queries, index, database, topk, radius, report, plot, recall, engine, fmt):
    """Retrieval metrics of query codes against database codes, directly or through an index.

    mAP@K (ties by database position, and tie-averaged), precision/recall@1,10,100,1000,
    precision/recall within the radius, PR curve over radius 0..bits and the P@N curve. Exact
    (all pairs) without an index or with a flat one; an approximate index is evaluated on its own
    top-K lists.
    """
    from ghindex.evaluate import evaluate, format_table

    result = evaluate(queries, database=database, index=index, topk=topk, radius=radius, report=report, plot=plot,
                      recall=recall, engine=engine)
    if fmt == "json":
        click.echo(json.dumps(result))
    else:
        click.echo(format_table(result))
