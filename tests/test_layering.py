"""What each layer may import: serving a model folder needs no training or orchestration stack."""

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("pytorch_lightning", "lightning", "lightning_fabric", "mlflow", "bentoml", "prefect", "dvc")


def imported_by(module: str) -> list[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in json.loads(out.stdout) if m.split(".")[0] in HEAVY]


def test_loading_and_serving_a_model_folder_imports_no_training_or_orchestration_stack():
    for module in (
        "lmforge.generation.chat",
        "lmforge.model_folder",
        "lmforge.generation.sampling_params",
        "lmforge.generation.driver",
        "lmforge.tokenizer",
        "lmforge.serving",
        "lmforge.serving.process",
        "lmforge.serving.child",
    ):
        assert imported_by(module) == [], module


def test_training_core_imports_no_orchestration_stack():
    heavy = imported_by("lmforge.training.trainer")
    assert "pytorch_lightning" in heavy
    assert not [m for m in heavy if m.split(".")[0] in ("mlflow", "bentoml", "prefect", "dvc")], heavy


def test_registered_model_requirements_cover_what_loading_it_imports():
    """Every third-party package that the lmforge code loaded by the registered model imports
    (the pyfunc, the engine and what they pull in) is one of its pinned pip requirements."""
    import ast
    import importlib.util
    from importlib.metadata import packages_distributions

    from lmforge.registry.publish import SERVING_DISTRIBUTIONS, serving_requirements

    code = "import sys, json, lmforge.registry.pyfunc_model; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ours = [m for m in json.loads(out.stdout) if m == "lmforge" or m.startswith("lmforge.")]
    imported = set()
    for name in ours:
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    dists = packages_distributions()
    # A module of several distributions (mlflow: mlflow, mlflow-skinny, ...) needs one of them.
    missing = {
        m: dists[m]
        for m in imported - {"lmforge"}
        if m in dists and not set(dists[m]) & set(SERVING_DISTRIBUTIONS)
    }
    assert not missing, missing
    assert all("==" in r for r in serving_requirements())


# --------------------------------------------------------------------------- layers and circles

SRC = Path(__file__).resolve().parents[1] / "src"
OURS = ("lmforge", "services")

# Lowest first. A module may import its own layer and those below; never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "lmforge",
            "lmforge.atomic",
            "lmforge.paths",
            "lmforge.padding",
            "lmforge.seeding",
            "lmforge.progress",
            "lmforge.names",
            "lmforge.cancellation",
            "lmforge.knobs",
            "lmforge.stats",
        ),
    ),
    (
        "model",
        (
            "lmforge.model",
            "lmforge.kv_cache",
            "lmforge.heads",
            "lmforge.tokenizer",
            "lmforge.model_folder",
            "lmforge.export",
        ),
    ),
    ("generation", ("lmforge.generation",)),
    ("serving and training", ("lmforge.serving", "lmforge.training", "lmforge.evaluation")),
    ("configuration", ("lmforge.params",)),
    (
        "stages",
        ("lmforge.ingest", "lmforge.stages", "lmforge.registry", "lmforge.tracking", "lmforge.harness"),
    ),
    ("orchestration", ("lmforge.orchestration", "lmforge.cli")),
]
# Siblings of one layer that must not lean on each other.
APART = [
    ("lmforge.serving", ("lmforge.training", "lmforge.evaluation")),
    ("lmforge.training", ("lmforge.serving",)),
]


def _modules() -> dict[str, Path]:
    """lmforge's modules, and the service's (``services/``, the top: it may import anything)."""
    out = {}
    for base, folder in ((SRC, SRC / "lmforge"), (SRC.parent, SRC.parent / "services")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _import_graph() -> dict[str, set[str]]:
    """lmforge module -> the lmforge modules it imports (at module level or inside functions)."""
    import ast

    modules = _modules()

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] in OURS}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.split(".")[0] in OURS:
                    # `from pkg import sub` imports the submodule when there is one.
                    targets |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[module] = targets - {module, ""}
    return graph


def _layer(module: str) -> int:
    found = [
        (len(prefix), rank)
        for rank, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if _within(module, prefix)
    ]
    assert found, f"{module} belongs to no layer: add it to LAYERS in tests/test_layering.py"
    return max(found)[1]  # the longest prefix decides (lmforge.generation over lmforge)


def test_every_module_imports_only_its_layer_and_those_below():
    graph = {
        m: {t for t in ts if t.startswith("lmforge")}
        for m, ts in _import_graph().items()
        if m.startswith("lmforge")
    }
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(upward)
    apart = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for side, others in APART
        if _within(m, side)
        for t in targets
        if any(_within(t, o) for o in others)
    ]
    assert not apart, "\n".join(apart)


def test_no_import_circles():
    """No chain of imports leads back to where it started, in lmforge or the service, type-checking
    imports included (strongly connected components of the import graph, Tarjan's algorithm), so
    every module can be read, tested and moved from the bottom up."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_layer_check_sees_an_upward_import():
    """The checker itself: params importing registry (the edge issue 23 removed) would be reported."""
    assert _layer("lmforge.params") < _layer("lmforge.registry.publish")
    assert _layer("lmforge.generation.engine") < _layer("lmforge.serving.process")
    assert _layer("lmforge.tracking") < _layer("lmforge.orchestration.pipeline_run")
    graph = _import_graph()
    assert "lmforge.params" not in graph["lmforge.model"]
    assert "lmforge.generation.driver" in graph["lmforge.training.rollouts"]  # edges are found
