"""The package's layout: a root that holds the entry points, rooms with a docstring each, no import circle."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ebmad"
ENTRY_POINTS = {"train", "predict", "export", "report"}
MAX_ROOT_MODULES = 8  # incl. __init__.py
# module paths that moved in issue 28; none may be named anywhere any more
OLD_MODULES = ("builders", "calibration", "callbacks", "checkpointing", "cli", "distributed", "guards", "jobs",
               "metrics", "outputs", "progress", "quiet", "report_html", "report_jobs", "report_wandb", "restore",
               "selection", "spikes", "untrained", "utils")  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The ebmad modules ``name`` imports, at module level or inside functions (anything in its AST).

    ``from pkg import x`` names the module ``pkg.x`` when that is a module, else ``pkg``: its ``__init__``, a
    node of the graph with the imports of its own, so a re-exported name leads on to the module it comes from.
    ``import a.b.c`` / ``from a.b.c import x`` name ``a.b.c`` itself; the packages above it that Python
    initialises on the way are not edges (a module is judged by what it names, not by its neighbours).
    """
    targets: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, *([base] if base else [])])
            for a in node.names:
                targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {t for t in targets if t in MODULES and t != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imported(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle() -> None:
    graph = import_graph()
    assert graph["ebmad.train"], "the import walk found nothing: it is broken"
    assert "ebmad.reporting.html" in graph["ebmad.report"]  # function-level imports count
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_find_cycle_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_root_holds_the_entry_points() -> None:
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules in ebmad/: {root}"
    assert ENTRY_POINTS <= set(root)
    for name in ENTRY_POINTS:  # real modules with a main(), runnable with python -m
        source = (PACKAGE / f"{name}.py").read_text()
        assert "def main(" in source and '__name__ == "__main__"' in source, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_owns(name: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and doc.splitlines()[0].strip(), f"{MODULES[name]} has no opening docstring line"


def test_console_scripts_and_targets_resolve() -> None:
    """Every ``module:function`` of pyproject's console scripts and every ``_target_: ebmad...`` in conf/."""
    text = (REPO / "pyproject.toml").read_text()
    scripts = re.findall(r'^ebmad-[\w-]+ = "([\w.]+):(\w+)"', text, flags=re.M)
    assert len(scripts) >= 6
    targets = [(m, f) for m, f in scripts]
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        for target in re.findall(r"_target_:\s*(ebmad\.[\w.]+)", path.read_text()):
            module, _, attr = target.rpartition(".")
            targets.append((module, attr))
    assert any(m == "ebmad.run.callbacks" for m, _ in targets)
    for module, attr in targets:
        assert hasattr(importlib.import_module(module), attr), f"{module}.{attr}"
    yaml.safe_load((REPO / "conf" / "callbacks" / "default.yaml").read_text())


def test_no_old_module_path_left() -> None:
    """The moved modules' old dotted and file paths are named nowhere (code, config, docs, Makefile)."""
    old = re.compile(r"(?<![\w.])ebmad[./](" + "|".join(OLD_MODULES) + r")\b(?![/\w])")
    files = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    for folder, pattern in (("ebmad", "*.py"), ("tests", "*.py"), ("experiments", "*.py"), ("conf", "*.yaml"),
                            ("docs", "*.md")):  # fmt: skip
        files += sorted((REPO / folder).rglob(pattern))
    hits = [f"{f.relative_to(REPO)}:{i}: {m.group(0)}" for f in files if f.name != Path(__file__).name
            for i, line in enumerate(f.read_text().splitlines(), 1) for m in old.finditer(line)]  # fmt: skip
    assert not hits, "old module paths:\n" + "\n".join(hits)
