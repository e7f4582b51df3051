"""The layout's rules, checked on the source (fast, no model builds).

- no import cycles among vitdecomp's modules (every import statement, function-level ones included);
- nothing outside ``vitdecomp/cli/`` imports ``vitdecomp.cli`` or calls ``print``;
- ``import vitdecomp.engine`` loads no Ray, Lance or pyarrow; building the CLI parser loads no torch or Ray;
- configs are frozen dataclasses, and flags and config files give values of the same type.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vitdecomp"


# ------------------------------------------------------------------------------ the import graph
def module_name(path: Path) -> str:
    """``vitdecomp/fit/textspan.py`` → ``vitdecomp.fit.textspan``; a package's ``__init__.py`` → the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: Iterable[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of the module (any depth), relative
    imports resolved. ``from pkg import x`` imports ``pkg.x`` when that is a module, else ``pkg``.
    The parent packages an import loads implicitly are not listed."""
    modules = set(modules)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            for a in node.names:
                out.append((f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in modules else pkg, node.lineno))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """vitdecomp module → {vitdecomp module it imports: first line}."""
    mods = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, mods):
            if target in mods and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, Iterable[str]]) -> Optional[list[str]]:
    """One cycle ``[a, b, …, a]`` of a directed graph, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {v: WHITE for v in graph}
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour.get(child, BLACK) == GREY:
                return path[path.index(child):] + [child]
            elif colour.get(child) == WHITE:
                colour[child] = GREY
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


@pytest.mark.parametrize("graph,cycle", [
    ({"a": ["b"], "b": ["c"], "c": []}, None),
    ({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}, None),                 # a diamond is no cycle
    ({"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
    ({"a": ["a"]}, ["a", "a"]),
    ({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),
])
def test_cycle_finder_on_small_graphs(graph, cycle):
    assert find_cycle(graph) == cycle


def test_cycle_finder_catches_a_planted_cycle_in_the_real_graph():
    graph = {k: list(v) for k, v in import_graph().items()}
    assert find_cycle(graph) is None
    graph["vitdecomp.errors"].append("vitdecomp.engine.engine")     # engine.engine imports errors
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"vitdecomp.errors", "vitdecomp.engine.engine"} <= set(cycle)


def test_relative_imports_resolve(tmp_path):
    mods = {"vitdecomp.fit", "vitdecomp.fit.text", "vitdecomp.store", "vitdecomp.store.schema", "vitdecomp.errors"}
    src = ("from ..store import schema, Store\nfrom . import text\nfrom .text import encode\n"
           "def f():\n    from ..errors import InputError\n    import vitdecomp.store.schema as s\n")
    p = tmp_path / "textspan.py"
    p.write_text(src)
    got = {t for t, _ in imports_of("vitdecomp.fit.textspan", p, mods)}
    assert got == {"vitdecomp.store.schema", "vitdecomp.store", "vitdecomp.fit.text", "vitdecomp.errors"}
    init = tmp_path / "__init__.py"
    init.write_text("from .text import encode\nfrom .. import errors\n")
    assert {t for t, _ in imports_of("vitdecomp.fit", init, mods)} == {"vitdecomp.fit.text", "vitdecomp.errors"}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "vitdecomp.engine.rules.registry" in graph
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}: imports {b})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle:\n  " + "\n  ".join(steps) + "\nmove the shared piece into its own module")


def test_only_the_cli_imports_the_cli():
    mods = package_modules()
    bad = [f"{name} line {line}: imports {target}"
           for name, path in mods.items() if not name.startswith("vitdecomp.cli")
           for target, line in imports_of(name, path, mods)
           if target == "vitdecomp.cli" or target.startswith("vitdecomp.cli.")]
    assert not bad, "library modules import the CLI:\n" + "\n".join(bad)


def test_no_print_outside_the_cli():
    bad = []
    for name, path in package_modules().items():
        if name.startswith("vitdecomp.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "print() in library code (use logging.getLogger(__name__)):\n" + "\n".join(bad)


# ------------------------------------------------------------------------------ what imports load
def _loaded_after(code: str, modules: list[str]) -> list[str]:
    check = f"import sys\n{code}\nprint([m for m in {modules!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


def test_importing_the_engine_loads_no_ray_lance_or_pyarrow():
    assert _loaded_after("import vitdecomp.engine", ["ray", "lance", "pyarrow"]) == []


def test_importing_the_store_loads_no_torch_or_timm():
    # the store (and the explorer that reads it) names components; it needs no model code
    assert _loaded_after("import vitdecomp.store", ["torch", "timm", "open_clip", "ray"]) == []


def test_building_the_cli_parser_loads_no_torch_or_ray():
    assert _loaded_after("import vitdecomp.cli\nvitdecomp.cli.build_parser()", ["torch", "ray"]) == []


# ------------------------------------------------------------------------------ configs and flags
def config_classes() -> list[type]:
    from vitdecomp import config

    return [c for _, c in inspect.getmembers(config, inspect.isclass)
            if issubclass(c, config.Config) and c.__module__ == config.__name__]


def test_every_config_class_is_a_frozen_dataclass():
    classes = config_classes()
    assert len(classes) >= 15
    for cls in classes:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls.__name__
        cfg = cls()
        for f in dataclasses.fields(cfg)[:3] or [None]:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(cfg, f.name if f else "anything", None)


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaf_parsers(sub, path + (name,))


def test_flag_and_config_file_give_the_same_types(tmp_path):
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.options import config_from_args
    from vitdecomp.config import CompAlignConfig

    parser = build_parser()
    flag = config_from_args(parser.parse_args(["fit", "compalign", "--lam", "0.5"]), CompAlignConfig)
    assert type(flag.lam) is float and flag.lam == 0.5
    for text, want in (("lam: 0.5\n", 0.5), ("lam: 1\n", 1.0)):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        cfg = config_from_args(parser.parse_args(["fit", "compalign", "--config", str(path)]), CompAlignConfig)
        assert type(cfg.lam) is float and cfg.lam == want


def test_a_bad_flag_value_exits_2_with_one_line_naming_the_flag():
    code = "import sys, vitdecomp.cli; sys.exit(vitdecomp.cli.main(['fit', 'compalign', '--lam', 'abc']))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == ["vitdecomp fit compalign: error: argument --lam: expected a number, got 'abc'"], r.stderr
    assert "Traceback" not in r.stderr


def test_help_shows_each_default_once(monkeypatch):
    from vitdecomp.cli import build_parser

    monkeypatch.setenv("COLUMNS", "400")                # one line per option
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 10
    for path, parser in leaves:
        text = parser.format_help()
        bad = [line for line in text.splitlines() if line.count("(default") > 1 or "(default: None)" in line]
        assert not bad, f"vitdecomp {' '.join(path)} --help:\n" + "\n".join(bad)
        for action in parser._actions:
            assert (action.help or "").count("(default") <= 1, (path, action.dest, action.help)
    assert "(default: 1.0)" in _subparser(build_parser(), "fit", "compalign").format_help()
