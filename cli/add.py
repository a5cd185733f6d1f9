"""`ghindex add`: a thin wrapper over `ghindex.lifecycle.add`."""
from __future__ import annotations

import json

import click

from .output import echo_rows


#: Options `add` shares with `ghindex encode` (the same option objects, so the same names and help).
ENCODE_OPTIONS = ("batch_size", "workers", "device", "precision", "runtime", "strict", "checkpoint_seconds",
                  "checkpoint_rows", "progress")


def _with_encode_options(command: click.Command) -> click.Command:
    from .encode import encode

    command.params[-1:-1] = [p for p in encode.params if p.name in ENCODE_OPTIONS]  # before --format
    return command


@_with_encode_options
@click.command("add")
@click.option("--index", "index", required=True, type=click.Path(file_okay=False),
              help="Index directory to grow (built by `ghindex build --codes`); its code store grows with it.")
@click.argument("data", required=False, type=click.Path())
@click.option("--model", "-m", type=click.Path(dir_okay=False), default=None,
              help="Model file the index was built with; encodes DATA.")
@click.option("--codes", type=click.Path(dir_okay=False), default=None,
              help="Add the codes of this code store instead of encoding images.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder that list-file paths are relative to. [default: the list file's folder]")
@click.option("--ids-from", type=click.IntRange(min=1), default=None, metavar="COLUMN",
              help="Take the new ids from this column of a list file; they must be new to the store. "
                   "[default: after the store's largest id]")
@click.option("--keep-ids", is_flag=True,
              help="With --codes: keep that store's ids (they must be new to the store) instead of new ones.")
@click.option("--discard-pending", is_flag=True,
              help="Drop the encoded codes of an interrupted add of other data that never reached the index.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format of the summary on stdout.")
def add(index, data, model, codes, root, ids_from, keep_ids, discard_pending, fmt, **encode_options):
    """Add new images (DATA with --model) or codes (--codes) to an index and its code store, in place.

    The images are encoded into INDEX.add.h5 (crash-safe and resumable like `ghindex encode`), appended
    to the index's code store with new ids, and added to the index (IVF: into its trained lists, no
    retraining). After a kill the old or the new index is there, and rerunning the same command
    completes the add; rerunning a completed add does nothing. For IVF indexes the summary compares the
    new codes' distance to the centroids with the build's and recommends a rebuild when it has grown
    more than 1.25 times. The encoding options are `ghindex encode`'s; where their help says --resume,
    an add is simply rerun.
    """
    from ghindex.lifecycle import add as add_fn

    summary = add_fn(index, data, model=model, codes=codes, root=root, ids_from=ids_from, keep_ids=keep_ids,
                     discard_pending=discard_pending, **encode_options)
    if fmt == "json":
        click.echo(json.dumps(summary, sort_keys=True))
        return
    encoded = summary.get("encode") or {}
    rows = [
        ("index", summary["index"]),
        ("status", summary["status"]),
        ("added", f"{summary['added']:,}"),
        ("ids", f"{summary['ids_min']}..{summary['ids_max']}" if summary["ids_min"] is not None else "-"),
        ("ntotal", f"{summary['ntotal']:,}"),
    ]
    if encoded:
        rows.append(("skipped", f"{encoded['skipped']:,} of {encoded['inputs']:,} inputs"))
    drift = summary.get("drift")
    if drift:
        rows.append(("drift", f"new codes {drift['last_add_mean_distance']:.2f} bits from their centroids, "
                              f"build {drift['build_mean_distance']:.2f} (x{drift['last_add_ratio']:.2f}; all adds "
                              f"x{drift['added_ratio']:.2f}; rebuild above x{drift['rebuild_ratio']})"))
        rows.append(("rebuild", "recommended: the new codes sit far from the trained lists" if
                     summary["rebuild_recommended"] else "not needed"))
    rows.append(("seconds", f"{summary['seconds']:.1f}"))
    echo_rows(rows)
    for item in encoded.get("skipped_items", []):
        click.echo(f"skipped  {item['path']}: {item['reason']}")
