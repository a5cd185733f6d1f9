"""`ghindex remove`: a thin wrapper over `ghindex.lifecycle.remove`."""
from __future__ import annotations

import json

import click

from .output import echo_rows


@click.command("remove")
@click.option("--index", "index", required=True, type=click.Path(file_okay=False),
              help="Index directory to remove codes from; its code store marks them deleted.")
@click.option("--ids", multiple=True, metavar="ID[,ID...]", help="Ids to remove (repeatable, comma-separated).")
@click.option("--ids-file", type=click.Path(dir_okay=False), default=None,
              help="Text file of ids to remove (one per line, or separated by commas or spaces; # comments).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format of the summary on stdout.")
def remove(index, ids, ids_file, fmt):
    """Remove ids from an index and mark them deleted in its code store.

    No search returns them again; `ghindex build` leaves them out, `ghindex eval` ignores them and
    `ghindex info` counts them. Their ids are never reused. Flat and IVF indexes drop the codes in place;
    HNSW and hash indexes (FAISS cannot remove from them) are rebuilt from the store. Crash-safe: after a
    kill the old or the new index is there, and rerunning the command completes the removal.
    """
    from ghindex.lifecycle import remove as remove_fn

    summary = remove_fn(index, ids=list(ids) or None, ids_file=ids_file)
    if fmt == "json":
        click.echo(json.dumps(summary, sort_keys=True))
        return
    rows = [
        ("index", summary["index"]),
        ("status", summary["status"]),
        ("removed", f"{summary['removed']:,} of {summary['requested']:,} ids "
                    f"({summary['already_deleted']:,} were already deleted)"),
        ("ntotal", f"{summary['ntotal']:,}"),
        ("rebuilt", "yes (FAISS cannot remove from this index kind)" if summary["rebuilt"] else "no"),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    echo_rows(rows)
