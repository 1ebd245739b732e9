"""Imports run one way: the import-linter contracts of pyproject.toml hold, and no module
reaches itself again through its imports (a package's `__init__` included)."""

import pathlib
import subprocess
import sys

import grimp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    # A subprocess started in the repository root analyses this checkout's `saev`, whatever
    # is installed, and keeps import-linter's global configuration out of the test process.
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
            "--no-logo",
            str(ROOT / "pyproject.toml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def test_no_module_imports_itself_back():
    # acyclic_siblings sees cycles between siblings only; a module importing its own package
    # (whose __init__ imports the module) is a cycle too. Imports inside functions count:
    # they hide a cycle, they do not remove it.
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("saev", exclude_type_checking_imports=True, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    assert {"saev.nn.stack", "saev.nn.checkpoint", "saev.shards.reader"} <= graph.modules
    assert strongly_connected(graph) == []
