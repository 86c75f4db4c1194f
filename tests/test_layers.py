"""The architecture stays as designed: no import cycles between fmtune's modules (deferred
imports inside functions included), and no code outside fmtune/tasks/ branches on a task's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fmtune

ROOT = Path(fmtune.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fmtune"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fmtune")}
    return {m for m in found if m in known and m != "fmtune"}  # the package only re-exports the verbs


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_only_tasks_branch_on_a_task_name():
    from fmtune.tasks import TASKS

    names = "|".join(map(re.escape, TASKS.names()))
    pattern = re.compile(rf"""task(\.name|\.type|_type)\s*(==|!=|in)\s*.*["']({names})["']""")
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in ROOT.rglob("*.py")
                 if "tasks" not in p.relative_to(ROOT).parts
                 for i, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
    assert not offenders, "\n".join(offenders)


def test_the_verbs_stay_functions_when_their_modules_are_imported():
    """fmtune.explain / robustness / transfer are verbs and modules of the same name: importing the module (as
    fmtune's own code does) once replaced the verb, and a user's next fmtune.explain(...) failed."""
    import importlib

    import fmtune

    for name in ("explain", "robustness", "transfer"):
        module = importlib.import_module(f"fmtune.{name}")
        assert callable(getattr(fmtune, name)) and getattr(fmtune, name) is not module
