"""How the commands print a summary on stdout: one `name  value` line per row, the values aligned."""
from __future__ import annotations

from typing import Iterable

import click


def echo_rows(rows: list[tuple[str, str]], more: Iterable[tuple[str, str]] = (), err: bool = False) -> None:
    """Print `rows` with their values aligned after the longest name; `more` rows follow at the same
    column without widening it (long repeated sections such as a history). `err`: to stderr."""
    width = max(len(name) for name, _ in rows)
    for name, value in [*rows, *more]:
        click.echo(f"{name:<{width}}  {value}", err=err)
