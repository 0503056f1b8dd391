"""The import directions between homodistil's units are those written in docs/design.md §6.

Every ``import``/``from … import`` of a ``homodistil`` module (relative ones resolved) is read
with ``ast``, so an import inside a function counts too. A unit is the first name under
``homodistil`` (``engine``, ``pruning``, ``cli``, …).

The directions the design forbids are also listed here, on their own (:data:`FORBIDDEN`), so
that loosening the documented graph cannot allow one of them.
"""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "homodistil"


# unit -> the units it must never import (docs/design.md §6 says why)
FORBIDDEN = {
    # the algorithm without the training loop, the cost model or the applications
    "pruning": {"engine", "cost", "data", "eval", "lm", "apps", "cli"},
    # kernels know tensors, not models
    "kernels": {"pruning", "engine", "cost", "data", "eval", "lm", "apps", "cli"},
    # data knows nothing of training
    "data": {"engine", "pruning", "kernels", "cost", "eval", "lm", "apps", "cli"},
    # evaluation reads exported models through lm and data, never the training
    "eval": {"engine", "pruning", "kernels", "cost", "apps", "cli"},
    # what training and evaluation share: only the config beside it
    "lm": {"engine", "pruning", "kernels", "cost", "data", "eval", "apps", "cli"},
    # the planner: no training code (it imports no torch at import time)
    "cost": {"engine", "kernels", "data", "eval", "lm", "apps", "cli"},
    # the training loop does not know its applications
    "engine": {"eval", "apps", "cli"},
    "config": {"pruning", "kernels", "engine", "cost", "data", "eval", "lm", "apps", "cli"},
    "apps": {"cli"},
}


def documented_graph() -> dict[str, set[str]]:
    text = (REPO / "docs" / "design.md").read_text()
    block = re.search(r"<!-- import-graph -->\s*```text\n(.*?)```", text, re.S).group(1)
    graph = {}
    for line in block.strip().splitlines():
        unit, _, targets = line.partition("->")
        graph[unit.strip()] = {t.strip() for t in targets.split(",") if t.strip()}
    return graph


def unit_of(module: str) -> str:
    parts = [p for p in module.split(".") if p != "__init__"]
    return parts[1] if len(parts) > 1 else "homodistil"


def imports(path: Path, root: Path = REPO) -> set[str]:
    """The homodistil modules ``path`` (a file under ``root``/homodistil) imports."""
    rel = path.relative_to(root).with_suffix("").parts
    package = rel if path.name == "__init__.py" else rel[:-1]
    package = package[:-1] if package[-1:] == ("__init__",) else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return {m for m in found if m.split(".")[0] == "homodistil"}


def actual_edges() -> set[tuple[str, str]]:
    edges = set()
    for path in PKG.rglob("*.py"):
        source = unit_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        for module in imports(path):
            target = unit_of(module)
            if target != source and target != "homodistil":
                edges.add((source, target))
    return edges


def test_every_import_follows_the_documented_graph():
    graph = documented_graph()
    units = {unit_of(".".join(p.relative_to(REPO).with_suffix("").parts)) for p in PKG.rglob("*.py")} - {"homodistil"}
    assert units <= set(graph), f"units missing from docs/design.md §6: {sorted(units - set(graph))}"
    stray = sorted((s, t) for s, t in actual_edges() if t not in graph[s])
    assert not stray, f"imports outside docs/design.md §6: {stray}"


def test_no_forbidden_direction_is_imported_or_documented():
    """Asserted on their own: an import in a forbidden direction fails even if docs/design.md §6 allowed it."""
    imported = sorted((s, t) for s, t in actual_edges() if t in FORBIDDEN.get(s, set()))
    assert not imported, f"forbidden imports: {imported}"
    documented = sorted((s, t) for s, targets in documented_graph().items() for t in targets if t in FORBIDDEN.get(s, set()))
    assert not documented, f"docs/design.md §6 allows forbidden directions: {documented}"


def test_the_check_sees_relative_and_function_level_imports(tmp_path):
    """``from ..engine.recipe import x`` inside a function of eval/ is an eval -> engine edge."""
    fake = tmp_path / "homodistil" / "eval"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import os\n\ndef f():\n    from ..engine.recipe import Recipe\n    import homodistil.pruning\n")
    assert imports(fake / "bad.py", tmp_path) == {"homodistil.engine.recipe", "homodistil.pruning"}
    assert {"pruning", "engine"} <= FORBIDDEN["eval"]
