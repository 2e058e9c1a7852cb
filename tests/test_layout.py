"""Module lines that match the design, checked on the source so that they cannot erode one import at a time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What serves, scores or ships a trained model. None of it may reach the training code, even through a function's
# local import: a served model would otherwise pull in the loop, its loaders and its losses.
SERVING_SIDE = ["anodfd.registry", "anodfd.gate", "anodfd.card", "anodfd.pyfunc", "anodfd.serving", "anodfd.scoring", "anodfd.batch", "anodfd.export",
                "anodfd.checkpoint", "anodfd.inference", "anodfd.predict", "anodfd.openvino_ir"]


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def project_imports(name: str) -> set[str]:
    """Every anodfd module that ``name``'s source imports, at the top or inside a function."""
    path = module_file(name)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from anodfd import registry` imports the module anodfd.registry
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return {m for m in found if m.split(".")[0] == "anodfd" and module_file(m)}


def reachable(start: str) -> dict[str, str]:
    """Every project module ``start`` can end up importing, each with the module that imports it."""
    seen, todo = {start: ""}, [start]
    while todo:
        current = todo.pop()
        for m in project_imports(current):
            if m not in seen:
                seen[m] = current
                todo.append(m)
    return seen


def chain(seen: dict[str, str], module: str) -> str:
    path = [module]
    while seen[path[-1]]:
        path.append(seen[path[-1]])
    return " <- ".join(path)


@pytest.mark.parametrize("module", SERVING_SIDE)
def test_serving_side_never_imports_the_training_code(module):
    seen = reachable(module)
    training = sorted(m for m in seen if m.startswith("anodfd.train"))
    assert not training, f"{module} reaches the training code: {chain(seen, training[0])}"


def test_the_check_sees_imports_inside_functions():
    """The launcher imports the loop at the top and the CLI only inside its commands: both must be seen."""
    assert "anodfd.train.loop" in reachable("anodfd.train.launch")
    assert "anodfd.train.loop" in reachable("anodfd.cli")
