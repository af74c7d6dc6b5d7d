"""The house rules of engine/ and app/, checked on their source: no import circles, no import upwards.

The floors, bottom to top, are declared once, here (``FLOORS``). A module belongs to the longest room
(package or module name) that contains it. It may import its own room and any room on a lower floor;
rooms on one floor are independent of each other. Every import counts, the ones inside functions
too: a lazy import is still a dependency, and the circles this layout removed were lazy ones.

    python -m pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "app")

# Bottom to top, by pipeline stage: tasks -> rollout -> reward -> advantage/shaping -> update -> store ->
# study/app. A stage that only needs the policy network (model) or only describes records (store) sits low.
FLOORS: list[tuple[str, ...]] = [
    ("engine", "engine.resources", "engine.errors"),  # the package face, shipped files' paths, ConfigError
    ("engine.model", "engine.shaping", "engine.store"),  # policy network + worker pool; advantages; records
    ("engine.tasks", "engine.rollout"),  # problems, verifiers, tiny models; sampling backends
    ("engine.update",),  # loss and backward shares (on rollouts, with the model's forward)
    ("engine.config",),  # every key: lists the stages' choices (algorithms, backends, verifiers)
    ("engine.train",),  # the training loop and evaluation: the one room that imports every stage
    ("engine.study", "engine.integrations"),  # the study over many runs; TRL and verl entry points
    ("app",),  # the Streamlit app
    ("engine.cli",),  # the `a3po` command: trains, evaluates, runs studies, serves the app
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` for every module of ``PACKAGES`` under ``root``, read with ``ast``.

    ``from pkg import name`` points at ``pkg.name`` when that is a module of the tree, else at ``pkg``.
    Imports of anything outside the tree (torch, streamlit) are left out."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        edges: dict[str, int] = {}
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # `import engine.model.ops` without the module: its package
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges.setdefault(t, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The graph's circles: its strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def room(mod: str) -> tuple[str, int] | None:
    """``(room, floor)`` of a module: the longest declared room that is the module or contains it. The
    ``engine`` room is the package face alone (``engine/__init__.py``): a new folder or module of engine/
    gets a floor of its own, or the test names it."""
    best = None
    for floor, rooms in enumerate(FLOORS):
        for r in rooms:
            if (mod == r or (r != "engine" and mod.startswith(r + "."))) and (best is None or len(r) > len(best[0])):
                best = (r, floor)
    return best


def violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """One line per module outside every room, and per import into a room on the same floor or above."""
    out = []
    for mod, edges in sorted(graph.items()):
        here = room(mod)
        if here is None:
            out.append(f"{mod}: in no room — declare its floor in FLOORS (tests/test_layers.py)")
            continue
        for target, line in sorted(edges.items()):
            there = room(target)
            if there is None or there[0] == here[0]:
                continue
            if there[1] >= here[1]:
                where = "above" if there[1] > here[1] else "on the same floor as"
                out.append(f"{mod}:{line} imports {target} ({there[0]}, {where} {here[0]})")
    return out


def circle_lines(graph) -> list[str]:
    return [" <-> ".join(c) for c in cycles(graph)]


# --- the real tree -------------------------------------------------------------------------------


def test_engine_and_app_have_no_import_circles():
    graph = import_graph(ROOT)
    assert "engine.train.trainer" in graph and "app.common" in graph  # the walk found the tree
    assert circle_lines(graph) == []


def test_no_module_imports_a_room_above_or_beside_its_own():
    assert violations(import_graph(ROOT)) == []


def test_every_declared_room_exists():
    graph = import_graph(ROOT)
    for rooms in FLOORS:
        for r in rooms:
            assert any(m == r or m.startswith(r + ".") for m in graph), f"room {r} has no module"


def test_the_rollout_layer_does_not_depend_on_the_update():
    """The worker pool runs sampling and update shares; it lives below both (engine/model/workers.py)."""
    graph = import_graph(ROOT)
    reach, todo = set(), [m for m in graph if m.startswith("engine.rollout")]
    while todo:
        m = todo.pop()
        for t in graph[m]:
            if t not in reach:
                reach.add(t)
                todo.append(t)
    assert not [m for m in reach if m.startswith(("engine.update", "engine.train"))]
    assert "engine.model.workers" in graph["engine.rollout.kv"]


# --- the checker fails where it should (fixtures) ----------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    return tmp_path


def test_a_lazy_circle_is_found(tmp_path):
    root = _tree(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/config.py": "from engine.shaping.algorithms import ALGORITHMS\n",
            "engine/shaping/__init__.py": "",
            "engine/shaping/algorithms.py": "ALGORITHMS = {}\n\ndef f():\n    from engine.config import check_value\n",
        },
    )
    graph = import_graph(root)
    assert circle_lines(graph) == ["engine.config <-> engine.shaping.algorithms"]
    assert violations(graph) == [
        "engine.shaping.algorithms:4 imports engine.config (engine.config, above engine.shaping)"
    ]


def test_relative_and_package_imports_resolve(tmp_path):
    root = _tree(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/model/__init__.py": "from . import ops\n",
            "engine/model/ops.py": "from .. import resources\n",
            "engine/resources.py": "",
            "engine/store/__init__.py": "",
            "engine/store/store.py": "import engine.model.ops\nfrom engine.model import ops\n",
        },
    )
    graph = import_graph(root)
    assert graph["engine.model"] == {"engine.model.ops": 1}
    assert graph["engine.model.ops"] == {"engine.resources": 1}
    assert graph["engine.store.store"] == {"engine.model.ops": 1}
    assert violations(graph) == [
        "engine.store.store:1 imports engine.model.ops (engine.model, on the same floor as engine.store)"
    ]


def test_an_undeclared_module_is_named(tmp_path):
    root = _tree(tmp_path, {"engine/__init__.py": "", "engine/newstage.py": "", "engine/sub/__init__.py": ""})
    assert violations(import_graph(root)) == [
        "engine.newstage: in no room — declare its floor in FLOORS (tests/test_layers.py)",
        "engine.sub: in no room — declare its floor in FLOORS (tests/test_layers.py)",
    ]


def test_reintroducing_an_old_circle_in_a_copy_of_the_tree_fails(tmp_path):
    """The circle this layout removed (the kv engine's pool imported the kv engine and the update), put back
    into a copy of the tree: the checker names the circle and both upward imports."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    workers = tmp_path / "engine/model/workers.py"
    workers.write_text(
        workers.read_text()
        + "\n\ndef _serve_old():\n    from engine.rollout.kv import KVEngine\n    from engine.update.shares import backward\n"
    )
    graph = import_graph(tmp_path)
    assert ["engine.model.workers", "engine.rollout.kv"] in cycles(graph)
    bad = violations(graph)
    assert len(bad) == 2 and all(b.startswith("engine.model.workers:") for b in bad)
    assert "imports engine.rollout.kv (engine.rollout, above engine.model)" in bad[0]
    assert "imports engine.update.shares (engine.update, above engine.model)" in bad[1]
