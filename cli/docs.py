"""Generate the CLI reference (docs/CLI.md) from the commands' own --help, so it cannot drift.

    python -m ghindex_cli.docs > docs/CLI.md      (what `make docs` runs)
"""
from __future__ import annotations

import click

from .main import cli

WIDTH = 100


def _help(command: click.Command, name: str, parent: click.Context | None) -> str:
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return command.get_help(click.Context(command, info_name=name, parent=parent, **settings))


def cli_reference() -> str:
    """Markdown with the --help text of `ghindex` and of every subcommand, in name order."""
    settings = {**cli.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    root = click.Context(cli, info_name="ghindex", **settings)
    parts = [
        "# ghindex command reference",
        "",
        "Generated from `--help` by `make docs` (`python -m ghindex_cli.docs`); a test fails when it is stale.",
        "",
        "## ghindex",
        "",
        "```",
        cli.get_help(root),
        "```",
    ]
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        if command is None or command.hidden:
            continue
        parts += ["", f"## ghindex {name}", "", "```", _help(command, name, root), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    click.echo(cli_reference(), nl=False)
