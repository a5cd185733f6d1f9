from pathlib import Path

import click
import pytest

import ghindex
from ghindex.errors import ConfigError
from ghindex_cli.docs import cli_reference
from ghindex_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and ghindex.__version__ in result.output


def test_every_command_has_help(runner):
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        result = runner.invoke(cli, [name, "--help"], prog_name="ghindex")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: ghindex " + name in result.output


@pytest.mark.parametrize("exc, expected", [
    (ConfigError("bits must be\na multiple of 8"), "Error: bits must be a multiple of 8\n"),
    (FileNotFoundError(2, "No such file or directory", "x.h5"), "Error: No such file or directory: x.h5\n"),
])
def test_errors_become_one_line_and_exit_1(runner, exc, expected):
    @cli.command("raise-for-test", hidden=True)
    def raiser():
        raise exc

    try:
        result = runner.invoke(cli, ["raise-for-test"])
    finally:
        cli.commands.pop("raise-for-test")
    assert result.exit_code == 1
    assert result.output == expected
    assert "Traceback" not in result.output


def test_cli_reference_is_up_to_date():
    committed = (ROOT / "docs" / "CLI.md").read_text()
    assert committed == cli_reference(), "docs/CLI.md is stale: run `make docs`"


def test_stderr_carries_no_faiss_loader_lines(tmp_path):
    """FAISS logs at INFO which CPU build it loads (incl. a failed AVX2 attempt that reads like an
    error); a fresh `ghindex` process logging at INFO must show only ghindex's own lines."""
    import subprocess
    import sys

    import numpy as np

    from ghindex.index import build_from_arrays

    codes = np.random.default_rng(0).integers(0, 256, (100, 8), dtype=np.uint8)
    build_from_arrays(codes, index_key="BFlat").save(tmp_path / "index")
    result = subprocess.run([sys.executable, "-m", "ghindex_cli", "info", str(tmp_path / "index")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Loading faiss" not in result.stderr and "Could not load library" not in result.stderr
