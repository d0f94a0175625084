"""Which package may import which: the layering of docs/architecture.md, checked on every import statement."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# modules of sashimi.models / sashimi.objectives that serve every family (the rest are one family each)
SHARED_MODELS = {"__init__", "config", "registry", "pretrained", "state_spaces"}
SHARED_OBJECTIVES = {"__init__", "base"}


def modules(package: str) -> list[str]:
    root = os.path.join(REPO, *package.split("."))
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(found)


def imports(path: str) -> set[str]:
    """Every module a file imports (also inside functions), relative imports resolved."""
    package = os.path.relpath(os.path.dirname(path), REPO).replace(os.sep, ".")
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` may be a module
    return names


def family_modules() -> set[str]:
    found = set()
    for package, shared in (("sashimi.models", SHARED_MODELS), ("sashimi.objectives", SHARED_OBJECTIVES)):
        for path in modules(package):
            name = os.path.splitext(os.path.basename(path))[0]
            if name not in shared:
                found.add(f"{package}.{name}")
    return found


def violations(package: str, forbidden) -> list[str]:
    bad = []
    for path in modules(package):
        for name in sorted(imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{os.path.relpath(path, REPO)} imports {name}")
    return bad


def test_the_rules_see_imports():
    assert "sashimi.objectives.base" in imports(os.path.join(REPO, "sashimi", "training", "loop.py"))
    assert "sashimi.models.autoregressive" in family_modules()
    assert "sashimi.objectives.autoregressive" in family_modules()
    assert "sashimi/models/autoregressive.py imports sashimi.nn.backbone" in violations("sashimi.models", ["sashimi.nn"])


def test_nn_imports_no_data_training_pipelines_models_or_objectives():
    assert violations("sashimi.nn", ["sashimi.data", "sashimi.training", "sashimi.pipelines", "sashimi.models",
                                     "sashimi.objectives"]) == []


def test_training_imports_no_family_module_and_no_pipeline():
    assert violations("sashimi.training", sorted(family_modules()) + ["sashimi.pipelines"]) == []


def test_data_imports_no_model_training_or_pipeline():
    assert violations("sashimi.data", ["sashimi.nn", "sashimi.models", "sashimi.objectives", "sashimi.training",
                                       "sashimi.pipelines"]) == []


def test_objectives_import_no_models_training_or_pipelines():
    assert violations("sashimi.objectives", ["sashimi.models", "sashimi.training", "sashimi.pipelines"]) == []


def test_s4lib_imports_nothing_from_sashimi():
    assert violations("s4lib", ["sashimi"]) == []


@pytest.mark.parametrize("package", ["sashimi.nn", "sashimi.models", "sashimi.objectives", "sashimi.data",
                                     "sashimi.training", "sashimi.pipelines"])
def test_no_package_imports_the_cli_or_the_demo(package):
    assert violations(package, ["sashimi.cli", "sashimi.demo"]) == []
