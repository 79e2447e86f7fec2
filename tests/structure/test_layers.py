"""The package reads as the pipeline: every import (lazy ones included) runs from a stage to an earlier one.

Stages, earliest first (a package may import only packages listed before it, and its own rooms):
util (collectives, lock, version) -> saes (architecture definitions: pure math) -> config (the run settings) ->
text -> lm -> store -> generate -> ensemble -> saved -> evaluate -> train -> report -> export -> sweep -> cli.
Across packages, code imports a package's face (its __init__), not its rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "saetool"
STAGES = ["util", "saes", "config", "text", "lm", "store", "generate", "ensemble", "saved", "evaluate", "train",
          "report", "export", "sweep", "cli"]
TOP = {"__init__", "__main__"}  # the package's own face: the API, above every stage


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of saetool."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def modules_named() -> set[str]:
    return set(modules())


def imports(path: Path) -> list[tuple[str, int]]:
    """(saetool module named, line) of every import in the file, at any depth (lazy imports included); `from pkg
    import room` names the room."""
    found, known = [], modules_named()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saetool") and not node.level:
            rooms = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            found += [(r, node.lineno) for r in rooms]
            if len(rooms) < len(node.names):
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("saetool")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import (write the saetool path)")
    return found


def stage(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_belongs_to_a_stage():
    stray = sorted(m for m in modules() if stage(m) not in STAGES and stage(m) not in TOP)
    assert stray == [], f"modules outside the stages {STAGES}: {stray}"


def test_imports_run_from_a_stage_to_an_earlier_one_through_faces():
    wrong = []
    for module, path in modules().items():
        here = stage(module)
        for name, line in imports(path):
            there = stage(name)
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            if here in TOP or there == here:
                continue
            if there in TOP:
                wrong.append(f"{where}: a stage imports the package's API face")
            elif STAGES.index(there) > STAGES.index(here):
                wrong.append(f"{where}: {here} is an earlier stage than {there}")
            elif name.count(".") > 1:
                wrong.append(f"{where}: import the face saetool.{there}, not its room")
    assert wrong == [], "\n".join(wrong)


def test_no_import_circle_between_modules():
    """Depth-first search over the module graph (faces resolved to the rooms they import)."""
    graph = {m: {n for n, _ in imports(p) if n in modules()} for m, p in modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if n == m:
                continue
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(n):] + [n]))
            if n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
