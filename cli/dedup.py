"""`ghindex dedup`: a thin wrapper over `ghindex.dedup.dedup`."""
from __future__ import annotations

import click

from .output import echo_rows


class RadiusType(click.ParamType):
    """An integer number of bits (at least 0) or `auto`; the library checks the upper end (the code width)."""

    name = "R|auto"

    def convert(self, value, param, ctx):
        if not isinstance(value, int) and str(value).strip().lower() == "auto":
            return "auto"
        try:
            radius = int(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an integer number of bits or 'auto'", param, ctx)
        if radius < 0:  # a usage error (exit 2), as every other range option of the CLI
            self.fail(f"radius must be at least 0, got {radius}", param, ctx)
        return radius


@click.command("dedup")
@click.option("--codes", type=click.Path(dir_okay=False), default=None,
              help="Code store (.h5) to deduplicate (its live rows).")
@click.option("--index", type=click.Path(file_okay=False), default=None,
              help="Index directory: deduplicate the code store it was built from (instead of --codes).")
@click.option("--radius", type=RadiusType(), required=True,
              help="Hamming distance (bits, inclusive) within which two codes are copies; auto: the copy "
                   "radius the store's model recorded.")
@click.option("--against", type=click.Path(), default=None,
              help="Code store or index directory: report the items that have a near-copy there "
                   "(new uploads against an index) instead of groups within one collection.")
@click.option("--keep", type=click.Choice(["first", "last"]), default="first", show_default=True,
              help="Which member of a group stays: the smallest id (first) or the largest (last); in a "
                   "chain, any member further than the radius from every kept one stays too, so what is "
                   "left has no pairs. With --against, OTHER keeps everything and each item with a copy "
                   "there goes.")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="Write every pair to this CSV (id_a,id_b,distance; id_a < id_b, each pair once).")
@click.option("--remove-list", type=click.Path(dir_okay=False), default=None,
              help="Write the ids to remove, one per line (for `ghindex remove --ids-file`).")
@click.option("--grid", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the largest groups, a row each, with ids and distances (needs image paths).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the groups (in --format) to this file instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl", "csv"]), default="table",
              show_default=True, help="table for people; json = one document; jsonl = one group per line "
                                      "(ids, kept, pairs with distances; what `ghindex serve --duplicates` "
                                      "reads); csv = one row per member.")
@click.option("--method", type=click.Choice(["auto", "mih", "scan"]), default="auto", show_default=True,
              help="mih: multi-index hashing (small radii); scan: every pair; auto: the cheaper by an "
                   "estimate. Same pairs either way.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads. [default: all CPUs]")
@click.option("--force", is_flag=True, help="Compare with --against codes from another model.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder the store's image paths are relative to, when the images moved without it.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def dedup(codes, index, radius, against, keep, pairs, remove_list, grid, out, fmt, method, threads, force,
          root, progress):
    """Find every group of near-copies among the codes of a store or index, exactly.

    Two items are a pair when their codes are within --radius bits; groups are the connected
    components of the pairs, so a chain can join items further apart than the radius (the diameter
    column shows it). Groups go to stdout (or --out), largest first; a summary to stderr.
    """
    from ghindex.dedup import dedup as dedup_fn
    from ghindex.dedup_output import format_lines

    result = dedup_fn(codes, index, radius, against=against, keep=keep, pairs=pairs, remove_list=remove_list,
                      grid=grid, out=out, fmt=fmt, method=method, threads=threads, force=force, root=root,
                      progress=progress)
    if out is None:
        for line in format_lines(result, fmt):
            click.echo(line)
    s = result.summary
    rows = [("items", f"{s['items']:,}" + (f" (against {s['other_items']:,})" if s["other_items"] is not None else "")),
            ("radius", f"{s['radius']} bits ({s['method']}"
                       + (f", {s['substrings']} substring{'s' if s['substrings'] > 1 else ''})" if s["substrings"] else ")")),
            ("groups", f"{s['groups']:,} (largest {s['largest_group']:,}; {s['chained_groups']:,} joined by chains)"),
            ("items in groups", f"{s['items_in_groups']:,}"),
            ("pairs", f"{s['pairs']:,}"),
            ("to remove", f"{s['removed']:,}"),
            ("time", f"{s['seconds']:.1f} s (pairs {s['join_seconds']:.1f} s)")]
    rows += [(name.replace("_", " "), s[key]) for key, name in
             (("pairs_file", "pairs_file"), ("remove_list", "remove_list"), ("out", "out"), ("grid", "grid"))
             if s.get(key)]
    echo_rows(rows, err=True)
