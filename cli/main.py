"""The `ghindex` group: lazy subcommands, logging to stderr, and the one place errors become `Error: ...`."""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import click

from ghindex.errors import GhindexError

# name -> "module:attribute" inside this package. Imported on use, so `ghindex info` does not pay
# for importing torch-heavy training code.
COMMANDS: dict[str, str] = {
    "backbones": "backbones:backbones",
    "encode": "encode:encode",
    "info": "info:info",
    "build": "build:build",
    "train": "train:train",
    "query": "query:query",
    "eval": "eval:eval_",
    "demo": "demo:demo",
    "serve": "serve:serve",
    "add": "add:add",
    "remove": "remove:remove",
    "dedup": "dedup:dedup",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        if name in COMMANDS:
            module_name, attr = COMMANDS[name].split(":")
            return getattr(importlib.import_module(f"{__package__}.{module_name}"), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        # The message is made inside the handler and printed after it, so that nothing keeps the failed
        # call's frames alive while `fail` exits.
        message = None
        try:
            return super().invoke(ctx)
        except GhindexError as exc:
            message = str(exc)
        except OSError as exc:
            message = _os_error_message(exc)
            if message is None:
                raise
        except MemoryError:
            message = "out of memory; use smaller batches or chunks"
        fail(cli_message(message, self.get_command(ctx, ctx.invoked_subcommand or "")))


def _os_error_message(exc: OSError) -> str | None:
    """`PATH: no space left on device` (read-only file system, permission denied, I/O error) for an
    output problem no write site turned into OutputError; `strerror: PATH` for a missing file or folder."""
    from ghindex.io import output_reason

    reason = output_reason(exc)
    if reason is not None:
        return f"{exc.filename}: {reason}" if exc.filename else reason
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
    return None


def cli_message(message: str, command: click.Command | None) -> str:
    """A library message in the command's terms: `NAME=True` (a parameter of the Python function, with
    an optional ` (--flag)` after it) becomes the command's option for that parameter, e.g.
    `overwrite=True` -> `--overwrite`. Names the command has no option for stay as they are."""
    options = {p.name: max(p.opts, key=len) for p in getattr(command, "params", ())
               if isinstance(p, click.Option) and p.name}

    def option(match: re.Match) -> str:
        return options.get(match.group(1), match.group(0))

    return _PARAMETER.sub(option, message)


_PARAMETER = re.compile(r"\b([a-z][a-z0-9_]*)=True\b(?: \(--[a-z0-9-]+\))?")


def fail(message: str) -> None:
    """Print `Error: message` (one line) to stderr and exit with status 1."""
    click.echo(f"Error: {' '.join(str(message).split())}", err=True)
    store = sys.modules.get("ghindex.store")
    if store is not None and store.hdf5_failed:
        # HDF5 failed to write a file (a full disk...) and can no longer close it; its own clean-up at
        # exit would try again and may crash the process. Everything to keep is on disk: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(1)


def _tolerate_undecodable_names() -> None:
    """File names that are not valid UTF-8 reach Python as surrogate escapes; printing one to a strict
    UTF-8 stream would crash. stdout writes their original bytes back (the name as the file system has
    it), stderr a visible escape."""
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ghindex", prog_name="ghindex")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """Image retrieval with learned binary codes: GreedyHash encoders, HDF5 code stores, FAISS search.

    Typical flow: train -> encode -> build -> query / eval. Results go to stdout; progress and logs
    go to stderr.
    """
    _tolerate_undecodable_names()
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if int(os.environ.get("RANK", "0")) > 0 and not verbose:  # under torchrun, rank 0 tells the story
        level = logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s", force=True)
    # FAISS logs at INFO which CPU build it loads (and a failed AVX2 attempt that reads like an error);
    # stderr is for ghindex's own progress (-vv shows it). Set here, before any command imports faiss.
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
