"""`ghindex info`: a thin wrapper over `ghindex.info.info`."""
from __future__ import annotations

import json

import click

from .output import echo_rows


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in sorted(value.items())) if value else "-"
    return str(value)


def _link(link: dict) -> str:
    """'RECORDED -> RESOLVED (found)' or '... (missing)': where a recorded link leads from here."""
    recorded = link.get("recorded") or link.get("absolute")
    shown = recorded if recorded == link["resolved"] else f"{recorded} -> {link['resolved']}"
    if link.get("override"):
        shown += " (--root)"
    return f"{shown} ({'found' if link['exists'] else 'missing'})"


@click.command("info")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text for people, json for programs.")
def info(path, fmt):
    """Describe PATH: a code store (.h5), a model file (.ghm) or an index directory.

    Code stores: rows, bits, labels, paths, skipped inputs, provenance, and whether the store is
    complete (an interrupted `ghindex encode` leaves an incomplete OUT.partial). Links (an index's
    code store, a store's image folder) are shown as recorded, where they resolve from here, and
    whether that exists.
    """
    from ghindex.info import info as info_fn

    result = info_fn(path)
    if fmt == "json":
        click.echo(json.dumps(result, sort_keys=True, default=str))
        return
    skipped = result.pop("skipped_examples", None) or []
    history = result.pop("history", None) or []
    attrs = result.pop("attrs", None) or {}
    links = {name: result.pop(key, None) for name, key in (("store", "store_link"), ("images", "images_link"))}
    rows = [(k, _text(v)) for k, v in result.items()]
    rows += [(f"link.{name}", _link(link)) for name, link in links.items() if link]
    rows += [(f"attr.{k}", _text(v)) for k, v in sorted(attrs.items())]
    echo_rows(rows, [("run", _text(entry)) for entry in history]
              + [("skipped", f"{item['path']}: {item['reason']}") for item in skipped])
