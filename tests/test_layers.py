"""Imports point down: every import among ghindex's modules (module level and inside functions) goes to
the same or a lower layer of the table in ghindex's package docstring, and no import cycle exists."""
from __future__ import annotations

import ast
import fnmatch
import pathlib
import re

import ghindex

PACKAGE = pathlib.Path(ghindex.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def import_edges(mods) -> dict[str, dict[str, int]]:
    """module -> {imported ghindex module: line}, for every import statement anywhere in the module."""
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_resolve(a.name, mods) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = parent + ("." + node.module if node.module else "")
                for alias in node.names:  # `from . import x` imports the module x, `from .m import f` m
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else _resolve(base, mods))
            for target in targets:
                if target and target != mod and target.split(".")[0] == "ghindex":
                    edges[mod].setdefault(target, node.lineno)
    return edges


def declared_layers() -> list[tuple[int, str, list[str]]]:
    """(rank, name, module patterns) of each row of the package docstring's table."""
    rows = []
    for line in (ghindex.__doc__ or "").splitlines():
        m = re.match(r"^  (\d+) (\w+) +(.+)$", line)
        if m:
            patterns = [p.strip() for p in m.group(3).split("(")[0].split(",")]
            rows.append((int(m.group(1)), m.group(2), [p for p in patterns if p]))
    return rows


def layer_of(module: str, rows) -> int | None:
    short = module[len("ghindex."):] if module != "ghindex" else "ghindex"
    for rank, _, patterns in rows:
        if any(fnmatch.fnmatchcase(short, p) for p in patterns):
            return rank
    return None


def cycles(edges) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_docstring_declares_the_layers():
    rows = declared_layers()
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True) and len(rows) >= 8


def test_every_module_has_a_layer():
    rows = declared_layers()
    missing = [m for m in _modules() if layer_of(m, rows) is None]
    assert not missing, f"add these modules to the layer table in ghindex/__init__.py: {missing}"


def test_every_import_points_down():
    mods = _modules()
    rows = declared_layers()
    upward = [f"{mods[m].relative_to(PACKAGE.parent)}:{line}: {m} (layer {layer_of(m, rows)}) imports "
              f"{t} (layer {layer_of(t, rows)})"
              for m, targets in import_edges(mods).items() for t, line in targets.items()
              if layer_of(t, rows) is not None and layer_of(m, rows) is not None
              and layer_of(t, rows) > layer_of(m, rows)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    found = cycles(import_edges(_modules()))
    assert not found, f"import cycles: {found}"


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """The walk sees imports inside functions and relative imports (a check that cannot fail proves nothing)."""
    edges = {"ghindex.a": {"ghindex.b": 1}, "ghindex.b": {"ghindex.a": 3}, "ghindex.c": {}}
    assert cycles(edges) == [["ghindex.a", "ghindex.b"]]
    pkg = tmp_path / "ghindex"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .sub import high\n")
    (pkg / "sub" / "high.py").write_text("from .. import low\n")
    mods = {"ghindex": pkg / "__init__.py", "ghindex.sub": pkg / "sub" / "__init__.py",
            "ghindex.low": pkg / "low.py", "ghindex.sub.high": pkg / "sub" / "high.py"}
    edges = import_edges(mods)
    assert edges["ghindex.low"] == {"ghindex.sub.high": 2} and edges["ghindex.sub.high"] == {"ghindex.low": 1}
    assert cycles(edges) == [["ghindex.low", "ghindex.sub.high"]]


def test_no_module_replaces_its_class():
    """Tests patch names where they live; no module swaps its class to forward attribute writes."""
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if re.search(r"__class__\s*=", p.read_text())]
    assert not offenders, offenders
