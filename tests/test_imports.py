"""Imports: the package root is light, the CLI answers `--version` and `--help` without torch,
and no tcc module imports itself through others.

`import_cycles()` builds the module import graph of the whole tcc tree from the source with
`ast` (top-level and function-level imports alike: a lazy import inside a function is still a
dependency, and a cycle of them means two modules that should be one, or a shared piece that
belongs lower down) and lists every cycle. Imports under `if TYPE_CHECKING:` are left out: they
never run. An import names the module it names: `from tcc.ir.graph import Graph` is an edge to
`tcc.ir.graph` (the parent packages that Python runs first are not counted, or every module
would depend on the root), `from tcc.ir import Graph` an edge to the package `tcc.ir` (its
`__init__`), `from tcc.ir import graph` an edge to the submodule.

    .venv/bin/python tests/test_imports.py     # print every cycle, one a line
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HEAVY = ("torch", "pyrtl", "scipy", "networkx", "matplotlib", "jinja2")


# ---------------------------------------------------------------------------------------------
# the module graph

def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's `package-dir` (subpackages found on disk)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the tcc tree: dotted name -> file (a package's name -> its __init__.py)."""
    found: dict[str, Path] = {}
    roots = package_dirs()
    for package, folder in roots.items():
        others = {f.resolve() for n, f in roots.items() if n != package}
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            folders = [folder.joinpath(*parts[:i]) for i in range(1, len(parts))]
            if any(f.resolve() in others for f in folders):
                continue  # a folder mapped to a package of its own is that package's
            if not all((f / "__init__.py").exists() for f in folders):
                continue  # a script in a plain folder, not a module
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): never run."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skip.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The tcc modules that module `name` (file `path`) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the named module, or the nearest enclosing module the tree holds (`tcc.x.Y` -> `tcc.x`)
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tcc" or alias.name.startswith("tcc."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "tcc" and not source.startswith("tcc."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in known else source)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (node.args[0].value == "tcc" or node.args[0].value.startswith("tcc."))):
            add(node.args[0].value)  # importlib.import_module("tcc.x"): a literal name counts too
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def import_cycles(graph: dict[str, set[str]] | None = None, limit: int = 500) -> list[list[str]]:
    """Every elementary import cycle of the tcc tree (at most `limit`), each as `[a, b, ..., a]`
    starting from its smallest module name, sorted. Empty when the imports form a DAG."""
    import networkx as nx
    graph = import_graph() if graph is None else graph
    g = nx.DiGraph([(a, b) for a, targets in graph.items() for b in targets])
    cycles = []
    for cycle in nx.simple_cycles(g):
        turn = cycle.index(min(cycle))
        cycles.append([*cycle[turn:], *cycle[:turn], cycle[turn]])
        if len(cycles) >= limit:
            break
    return sorted(cycles, key=lambda c: (len(c), c))


# ---------------------------------------------------------------------------------------------
# tests

def test_the_graph_finds_modules_and_their_imports():
    graph = import_graph()
    assert {"tcc", "tcc.cli", "tcc.ir", "tcc.ir.graph", "tcc.passes", "tcc.runtime.artifact",
            "tcc.backends.accel.isa", "tcc.frontend", "tcc.targets"} <= set(graph)
    assert "tcc.ir.dtypes" in graph["tcc.ir.graph"]
    assert not any(m.startswith("tcc.ir") for m in graph["tcc.ir.dtypes"])


def test_cycles_are_found_at_any_depth():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "f": {"g"}, "g": {"f", "a"}}
    assert import_cycles(graph) == [["f", "g", "f"], ["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_ir_imports_nothing_of_tcc_outside_it():
    """The design's contract: `ir` imports nothing of tcc."""
    graph = import_graph()
    bad = {m: sorted(t for t in targets if not t.startswith("tcc.ir"))
           for m, targets in graph.items() if m.startswith("tcc.ir")}
    assert {m: t for m, t in bad.items() if t} == {}


LAYERS = {"ir": {"ir"}, "passes": {"ir", "passes"}, "backends": {"ir", "passes", "backends"},
          "runtime": {"ir", "backends", "runtime"}, "compiler": {"ir", "passes", "backends", "runtime", "compiler"}}


def _layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS else "compiler"


def test_dependency_direction():
    """DESIGN.md's contract: ir imports nothing of tcc, passes import ir, backends import ir (and
    passes), runtime imports ir and the accelerator's description, the compiler sits on top."""
    graph = import_graph()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if _layer(t) not in LAYERS[_layer(m)])
    assert wrong == []


def test_no_import_cycles():
    cycles = import_cycles()
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP", "PYTHONPATH")}
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("module", ["tcc", "tcc.ir", "tcc.ir.errors", "tcc.cli"])
def test_light_imports(module):
    done = _python(f"import sys, {module}\n"
                   f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import {module} pulls in {done.stdout.strip()}"


def test_every_ir_module_is_light():
    """All of tcc.ir imports numpy and nothing heavier (scipy and networkx on first use only)."""
    names = sorted(m for m in modules() if m.startswith("tcc.ir"))
    done = _python(f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
                   f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"tcc.ir pulls in {done.stdout.strip()}"


def test_root_attributes_stay_lazy_and_work():
    done = _python("import sys, tcc\n"
                   "assert set(tcc.__all__) <= set(dir(tcc)), dir(tcc)\n"
                   "assert 'torch' not in sys.modules\n"
                   "print(tcc.__version__, tcc.TccError.__module__)\n"
                   "assert 'torch' not in sys.modules\n"
                   "print(tcc.Artifact.__name__, tcc.load.__name__, tcc.compile.__name__)\n"
                   "try:\n    tcc.nothing_here\nexcept AttributeError as e:\n    print('AttributeError', e)\n")
    assert done.returncode == 0, done.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.stdout.splitlines() == [f"{version} tcc.ir.errors", "Artifact load compile",
                                        "AttributeError module 'tcc' has no attribute 'nothing_here'"]


def test_root_names_exactly_its_own_submodules():
    """`tcc.NAME` imports a submodule only from the explicit list, and the list is the tree's."""
    import tcc
    compiler = ROOT / "compiler"
    tree = {p.stem for p in compiler.glob("*.py") if not p.stem.startswith("_")}
    tree |= {p.name for p in compiler.iterdir() if (p / "__init__.py").is_file()} | {"ir", "passes", "backends",
                                                                                      "runtime"}
    assert set(tcc.SUBMODULES) == tree
    assert tcc.zoo.__name__ == "tcc.zoo"
    with pytest.raises(AttributeError):
        tcc.os  # a module importable by that name, but not tcc's


def test_version_and_help_import_no_torch():
    code = ("import contextlib, io, sys\nfrom tcc.cli import main\n"
            "for argv in (['--version'], ['--help']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n            main(argv)\n        except SystemExit as e:\n            assert e.code == 0, e.code\n"
            "    print(out.getvalue().splitlines()[0])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tcc ") and lines[1].startswith("usage: tcc")
    assert lines[-1] == "[]", f"tcc --version/--help pull in {lines[-1]}"


def test_python_m_tcc_version():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP", "PYTHONPATH")}
    done = subprocess.run([PYTHON, "-X", "importtime", "-m", "tcc", "--version"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.stdout.strip() == f"tcc {version}"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_lists_every_command():
    from tcc.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = parser.format_help()
    for action in sub._choices_actions:
        assert action.dest in text and action.help in " ".join(text.split())


def test_docs_generator_is_not_in_the_package():
    done = _python("import importlib.util; print(importlib.util.find_spec('tcc.docs'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


if __name__ == "__main__":
    found = import_cycles()
    for cycle in found:
        print("  " + " -> ".join(cycle))
    print(f"{len(found)} cycles")
