"""The package's layers: no import cycle, and the import rules of docs/architecture.md.

The cycle check reads every ``import`` of ``olmo_mini/`` with ``ast``, also those inside
functions: a late import hides a cycle from a plain import but not from the graph. Importing a
module also runs its packages' ``__init__``; a lazy package export (``olmo_mini._lazy``) counts
as an import of the submodule that defines the name. ``if TYPE_CHECKING:`` blocks never run.

The package graph collapses that module graph to ``olmo_mini.<package>`` nodes: a top-level
module (``olmo_mini.config``, ``olmo_mini.run_dir``, ``olmo_mini._lazy``) is a node of its own.
Two modules can import each other's packages without a module cycle (``training.callbacks`` ->
``stability.monitor`` and ``stability.x`` -> ``training.run``): only the package graph sees it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from olmo_mini.run_dir import DATA_STATE_KEY

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "olmo_mini"
# Optional dependencies whose absence a module handles (no triton on CPU-only machines).
OPTIONAL = {"triton"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _lazy_exports(tree: ast.Module, package: str) -> dict[str, str]:
    """``{name: defining module}`` of a package's ``lazy_exports(__name__, {...})`` call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            exports = ast.literal_eval(node.args[1])
            return {
                name: f"{package}{where}" if where.startswith(".") else where
                for name, where in exports.items()
            }
    return {}


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
LAZY = {name: _lazy_exports(TREES[name], name) for name in PACKAGES}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:``."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        found.append(node)
        found.extend(_runtime_nodes(node))
    return found


def _targets(node: ast.AST) -> list[str]:
    """The modules of ours that an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom) or node.level or node.module is None:
        return []
    found = []
    for alias in node.names:
        if f"{node.module}.{alias.name}" in MODULES:
            found.append(f"{node.module}.{alias.name}")
            continue
        module = node.module  # a name the package defines, or exports lazily from a submodule
        while alias.name in LAZY.get(module, {}):
            module = LAZY[module][alias.name]
        found.append(module)
    return found


def _imports(name: str) -> tuple[set[str], set[str]]:
    """``(modules of ours, top-level third-party packages)`` that importing ``name`` runs
    directly, with the ``__init__`` of each package above a module of ours it imports."""
    ours, others = set(), set()
    for node in _runtime_nodes(TREES[name]):
        for target in _targets(node):
            if target.split(".")[0] != "olmo_mini":
                others.add(target.split(".")[0])
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                above = ".".join(parts[:i])
                if not (name == above or name.startswith(above + ".")):
                    ours.add(above)
    return ours, others


GRAPH = {name: _imports(name) for name in MODULES}


def _closure(name: str) -> tuple[set[str], set[str]]:
    """Every module of ours and third-party package that importing ``name`` can load."""
    seen, stack, others = {name}, [name], set()
    while stack:
        ours, theirs = GRAPH[stack.pop()]
        others |= theirs
        stack.extend(ours - seen)
        seen |= ours
    return seen, others


def test_the_import_graph_resolves_every_import_of_ours():
    unknown = {t for ours, _ in GRAPH.values() for t in ours if t not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


def test_the_package_has_no_import_cycle():
    sorter = TopologicalSorter({name: ours for name, (ours, _) in GRAPH.items()})
    try:
        sorter.prepare()
    except CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        (
            "olmo_mini.model",
            {
                "lightning",
                "hydra",
                "wandb",
                "olmo_mini.data",
                "olmo_mini.stability",
                "olmo_mini.training",
            },
        ),
        ("olmo_mini.kernels", {"olmo_mini.model"}),
        ("olmo_mini.data", {"olmo_mini.model"}),
        ("olmo_mini.config", {"lightning", "torch", "olmo_mini.training"}),
        ("olmo_mini.interop", {"lightning", "olmo_mini.training"}),
        ("olmo_mini.run_dir", {"torch", "lightning", "olmo_mini.training"}),
        ("olmo_mini.sizing", {"lightning", "olmo_mini.training"}),
    ],
)
def test_the_import_rules_of_the_architecture_hold(layer, forbidden):
    """docs/architecture.md: the model knows nothing of Lightning, Hydra, wandb or the layers
    above it; kernels nothing of the model; data nothing of the model. The config schema, the
    run-dir names, interop (which the trainer reads) and sizing (which training, benchmarks and
    tools use) load no training stack."""
    modules = [m for m in MODULES if m == layer or m.startswith(layer + ".")]
    assert modules, f"no module {layer}"
    for module in modules:
        ours, others = _closure(module)
        hits = {m for m in ours | others for f in forbidden if m == f or m.startswith(f + ".")}
        assert not hits, f"importing {module} can load {sorted(hits)}"


def _package(module: str) -> str:
    """A module's node in the package graph: its ``olmo_mini.<package>``, or itself when it is
    a top-level module."""
    return ".".join(module.split(".")[:2])


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (ours, _) in GRAPH.items():
        here = _package(name)
        graph.setdefault(here, set()).update(_package(m) for m in ours if _package(m) != here)
    return graph


PACKAGE_GRAPH = _package_graph()
# Above training: what drives it or reads its finished runs, and the benchmarks. Every other
# package (the model, data, kernels, the stability observatory, the config schema, ...) is
# below it: training plugs them in, none of them may reach training.
ABOVE_TRAINING = {"olmo_mini.analysis", "olmo_mini.bench"}
BELOW_TRAINING = sorted(set(PACKAGE_GRAPH) - ABOVE_TRAINING - {"olmo_mini.training"})


def _package_closure(package: str) -> set[str]:
    seen, stack = set(), [package]
    while stack:
        for above in PACKAGE_GRAPH[stack.pop()] - seen:
            seen.add(above)
            stack.append(above)
    return seen


def test_the_packages_have_no_import_cycle():
    sorter = TopologicalSorter(PACKAGE_GRAPH)
    try:
        sorter.prepare()
    except CycleError as e:
        # graphlib lists a cycle against the arrows: reversed, each package imports the next
        pytest.fail(f"package import cycle: {' -> '.join(reversed(e.args[1]))}")


@pytest.mark.parametrize(
    "package, forbidden",
    [
        *[
            (p, {"olmo_mini.training", "olmo_mini.analysis", "olmo_mini.bench"})
            for p in BELOW_TRAINING
        ],
        ("olmo_mini.training", {"olmo_mini.analysis", "olmo_mini.bench"}),
        ("olmo_mini.analysis", {"olmo_mini.bench"}),
    ],
)
def test_every_package_imports_only_packages_below_it(package, forbidden):
    """The stability observatory (metrics, monitor) is below training, which plugs it in;
    analysis (run readers, LR sensitivity, the study runner) is above it and may drive it."""
    assert "olmo_mini.stability" in BELOW_TRAINING and "olmo_mini.model" in BELOW_TRAINING
    hits = _package_closure(package) & forbidden
    assert not hits, f"importing {package} can load {sorted(hits)}"


def test_nothing_in_the_package_imports_the_benchmarks():
    """``olmo_mini.bench`` sits on top: only tools and tests use it."""
    for module in (m for m in MODULES if m.split(".")[:2] != ["olmo_mini", "bench"]):
        ours, _ = _closure(module)
        assert not {m for m in ours if m.startswith("olmo_mini.bench")}, module


def test_every_module_imports_and_the_light_ones_load_no_lightning():
    """In a fresh interpreter: the light modules first (each checked for Lightning), then all."""
    light = [
        "olmo_mini.config",
        "olmo_mini.model",
        "olmo_mini.run_dir",
        "olmo_mini.interop",
        "olmo_mini.sizing",
        "olmo_mini.sizing.flops",
        "olmo_mini.sizing.memory",
        "olmo_mini.training",
    ]
    script = f"""
import importlib, json, sys
OPTIONAL = {OPTIONAL!r}
found = {{}}
for name in {light!r}:
    importlib.import_module(name)
    found[name] = sorted(m for m in ("lightning", "pytorch_lightning") if m in sys.modules)
failed = {{}}
for name in {sorted(MODULES)!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL:
            failed[name] = repr(e)
    except Exception as e:
        failed[name] = repr(e)
key = sys.modules["olmo_mini.data.datamodule"].OLMoDataModule.__qualname__
print(json.dumps({{"lightning": found, "failed": failed, "datamodule_key": key}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["lightning"] == {name: [] for name in light}
    assert result["failed"] == {}
    # Lightning saves the DataModule's state under its class name; interop reads it there.
    assert result["datamodule_key"] == DATA_STATE_KEY
