"""The shape of the house (docs/architecture.md): imports go one way, functions stay short, no
code edits the import path, one module owns the run directory's files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "cdsr").rglob("*.py")):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The cdsr modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdsr"):
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    # importing a submodule imports its package first: an edge to a package of its own is no cycle
    this = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    return {m for m in out if m in known and not this.startswith(m + ".") and m != "cdsr"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_in_src_or_flows_is_longer_than_80_lines():
    long = []
    for p in [*sorted(SRC.rglob("*.py")), *sorted((ROOT / "flows").glob("*.py"))]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def _tracked_python() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:  # not a git checkout (an sdist): every .py file of the project
        return [p for d in ("src", "flows", "tests", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    return [ROOT / f for f in out.stdout.split() if (ROOT / f).exists()]  # not those deleted since


def test_nothing_edits_the_import_path():
    calls = []
    for p in _tracked_python():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                calls.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def test_the_flows_import_from_any_directory(tmp_path):
    """`cdsr benchmark|tune|promote` import the installed flows, wherever they are run from."""
    code = "import flows.benchmark, flows.promote, flows.tune, flows.data, flows.retrain; print(flows.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).parent == ROOT / "flows"


def test_only_runs_py_names_the_run_directory_files():
    owned = ("best.pt", "last.pt", "fit.json", "history.json", "steps.csv", "tracking.json")
    found = []
    for p in sorted((SRC / "cdsr").rglob("*.py")):
        if p.name == "runs.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and node.value in owned:
                found.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []
