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
        "lmforge.generation.params",
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
