"""The layers of the code, read from its import statements (those inside functions too), as a check that
fails on an import that points up or sideways:

    front ends     tui, appliance.cli            may import anything below
    orchestration  jobs, jobhost, worker, runs,  start stages as processes and follow them
                   sweep
    stages         data, train, evaluate,        each imports the core and itself, never another stage
                   export, serve, importer
    core           every other appliance module  imports the core only
"""

from __future__ import annotations

import ast
from pathlib import Path

FRONT = ("tui", "appliance.cli", "appliance.__main__")
ORCHESTRATION = ("appliance.jobs", "appliance.jobhost", "appliance.worker", "appliance.runs", "appliance.sweep")
STAGES = ("appliance.data", "appliance.train", "appliance.evaluate", "appliance.export", "appliance.serve",
          "appliance.importer")
RANK = {"core": 0, "stage": 1, "orchestration": 2, "front": 3}


def _within(module: str, packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def layer(module: str) -> tuple[str, str]:
    """The layer of a module of the project, and the unit within it (a stage's package)."""
    if _within(module, FRONT):
        return "front", "front"
    if _within(module, ORCHESTRATION):
        return "orchestration", "orchestration"
    stage = _within(module, STAGES)
    if stage:
        return "stage", stage
    return "core", "core"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the project's packages under `root`, by dotted name."""
    found = {}
    for package in ("appliance", "tui"):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """The project modules `name` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names] + [(base, node.lineno)]
    return [(target, line) for target, line in out if target.split(".")[0] in ("appliance", "tui")]


def violations(root: Path) -> list[str]:
    """Every import under `root` that points to a higher layer or into another stage."""
    known = modules(root)
    problems = set()
    for name, path in known.items():
        own_layer, own_unit = layer(name)
        for target, line in imports(name, path):
            if target not in known:
                continue  # a name imported from a module (`from appliance import jobs` names the module too)
            their_layer, their_unit = layer(target)
            where = f"{path.relative_to(root)}:{line}: {name} imports {target}"
            if RANK[their_layer] > RANK[own_layer]:
                problems.add(f"{where} ({own_layer} importing {their_layer})")
            elif own_layer == their_layer == "stage" and own_unit != their_unit:
                problems.add(f"{where} (a stage importing another stage: shared concepts belong in the core)")
    return sorted(problems)
