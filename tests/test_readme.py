"""Every command in README.md is exercised: the workflow block runs for real (on a small copy of the
demo data, 1 epoch), and every other block's options are checked against the commands' parsers."""
import re
import shutil
import shlex
from pathlib import Path

import click
import pytest

from ghindex_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- readme-{name}:.*?-->\s*```(?:sh|python)\n(.*?)```", README, re.S)
    assert match, f"README block {name} not found"
    return match.group(1)


def commands(name: str) -> list[list[str]]:
    text = block(name).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("ghindex ")]


ALL_BLOCKS = ["workflow", "protocol", "paper", "scaling", "lifecycle"]


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    assert first_block.split("\n")[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("name", ALL_BLOCKS)
def test_readme_options_exist(name):
    cmds = commands(name)
    assert cmds
    ctx = click.Context(cli)
    for args in cmds:
        command = cli.get_command(ctx, args[0])
        assert command is not None, f"unknown command in README: {args[0]}"
        options = {o: p for p in command.params for o in p.opts + p.secondary_opts if isinstance(p, click.Option)}
        tokens = iter(args[1:])
        for token in tokens:
            if not token.startswith("-"):
                continue
            name_, _, inline = token.partition("=")
            assert name_ in options, f"README uses {name_} which `ghindex {args[0]}` does not have"
            param = options[name_]
            if param.is_flag:
                continue
            value = inline or next(tokens)
            if isinstance(param.type, click.Choice):
                assert value in param.type.choices, f"{name_} {value} is not one of {param.type.choices}"
            elif isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                param.type.convert(value, param, None)


@pytest.fixture
def small_demo_tree(tmp_path):
    """data/cifar10-demo with 20 database and 4 query images per class (incl. the README's files)."""
    src = ROOT / "data" / "cifar10-demo"
    named = {p for args in commands("workflow") for p in args if p.endswith(".jpg")}
    for split, n in (("database", 20), ("query", 4)):
        for class_dir in sorted((src / split).iterdir()):
            files = sorted(class_dir.glob("*.jpg"))[:n]
            files += [ROOT / p for p in named if Path(p).parent.name == class_dir.name and split in p]
            target = tmp_path / "data" / "cifar10-demo" / split / class_dir.name
            target.mkdir(parents=True)
            for f in set(files):
                (target / f.name).symlink_to(f)
    return tmp_path


def test_readme_workflow_runs(runner, small_demo_tree, monkeypatch):
    monkeypatch.chdir(small_demo_tree)
    for args in commands("workflow"):
        args = ["1" if prev == "--epochs" else a for prev, a in zip([None] + args, args)]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Traceback" not in result.output
    for produced in ("work/model.ghm", "work/database.h5", "work/query.h5", "work/index/meta.json",
                     "work/grid.png", "work/report.json", "work/eval-pr.png"):
        assert (small_demo_tree / produced).exists(), produced
    # the Python API block, on its own (fresh work/), with the same shortened training
    shutil.rmtree("work")
    code = block("python-api").replace("epochs=8", "epochs=1")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["codes"].shape == (1, 4)
    assert namespace["ids"].shape == (1, 5)
    assert 0 <= namespace["result"]["metrics"]["map"] <= 1
