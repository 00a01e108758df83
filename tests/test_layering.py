"""The packages import downward only: every import of every module (lazy ones and ``TYPE_CHECKING`` ones included,
read with ``ast``) is checked against one table of what each top-level package may use, and the package graph has
no cycle. A new top-level package fails here until it is placed in the table."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What each top-level package may import, bottom to top. ``common`` (files, images, plots) and ``ldm`` (the model
# math) are the floor; ``shapes`` (the synthetic world) is used by training, evaluation and the recipes; ``eval``
# sits above ``training`` because it reads held-out data with training's readers (``training.records``, any training
# format) and benchmarks the trainer; ``recipes`` chain everything; ``docs`` holds scripts that draw the pictures.
# Nothing imports ``tests``.
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "ldm": frozenset({"common"}),
    "shapes": frozenset({"common", "ldm"}),
    "pipelines": frozenset({"common", "ldm"}),
    "training": frozenset({"common", "ldm", "pipelines", "shapes"}),
    "eval": frozenset({"common", "ldm", "pipelines", "shapes", "training"}),
    "recipes": frozenset({"common", "ldm", "pipelines", "shapes", "training", "eval"}),
    "docs": frozenset({"common", "ldm", "pipelines", "shapes", "training", "eval"}),
}
SKIPPED_DIRS = {"tests", "models", "results", "outputs", "runs", "data"}


def source_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(top-level package, file)`` for every ``.py`` file under ``root``'s top-level folders (not ``tests``, not
    hidden folders such as ``.venv``)."""
    for top in sorted(root.iterdir()):
        if not top.is_dir() or top.name.startswith((".", "_")) or top.name in SKIPPED_DIRS:
            continue
        for path in sorted(top.rglob("*.py")):
            if not any(part.startswith(".") for part in path.relative_to(root).parts):
                yield top.name, path


def imported_packages(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, top-level name)`` of every absolute import in ``path``; relative imports stay inside the package."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def layering_violations(root: Path, allowed: Mapping[str, frozenset[str]]) -> tuple[list[str], dict[str, set[str]]]:
    """The imports that break ``allowed`` (one line each: file, line, what it imports, what the package may import)
    and the graph of imports between top-level packages."""
    ours = set(allowed) | {"tests"}
    problems, graph = [], {}
    for package, path in source_files(root):
        if package not in allowed:
            problems.append(f"{path.relative_to(root)}: package {package!r} is not in the layering table; add it")
            continue
        graph.setdefault(package, set())
        for line, imported in imported_packages(path):
            if imported == package or imported not in ours:
                continue
            graph[package].add(imported)
            if imported not in allowed[package]:
                may = ", ".join(sorted(allowed[package])) or "no other package"
                problems.append(
                    f"{path.relative_to(root)}:{line}: {package} imports {imported} ({package} may import: {may})"
                )
    return problems, graph


def find_cycle(graph: Mapping[str, set[str] | frozenset[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_packages_import_downward_only_and_have_no_cycle() -> None:
    problems, graph = layering_violations(REPO, ALLOWED)
    assert not problems, "upward or unknown imports:\n" + "\n".join(problems)
    assert find_cycle(graph) is None
    assert find_cycle(ALLOWED) is None, "the layering table itself allows a cycle"
    assert {"ldm", "pipelines", "training", "eval", "shapes", "common", "recipes"} <= set(graph)


def test_the_checker_catches_an_upward_import_a_cycle_and_an_unplaced_package(tmp_path: Path) -> None:
    for name, text in {
        "low/a.py": "import os\nfrom high.b import thing\n",  # upward
        "low/c.py": "def f():\n    from . import a\n    import low.a\n",  # relative and own package: fine
        "high/b.py": "import low\n\nthing = 1\n",
        "stray/d.py": "import low\n",
        "tests/test_x.py": "import high\n",  # tests may import anything
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems, graph = layering_violations(tmp_path, {"low": frozenset(), "high": frozenset({"low"})})
    assert problems == [
        "low/a.py:2: low imports high (low may import: no other package)",
        "stray/d.py: package 'stray' is not in the layering table; add it",
    ]
    assert graph == {"low": {"high"}, "high": {"low"}}
    assert find_cycle(graph) == ["high", "low", "high"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
