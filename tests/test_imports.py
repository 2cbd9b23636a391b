"""The package's import graph: no cycle, no private name imported across modules, a core free of the
pipeline's frameworks. Read from the source with ``ast`` (imports inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "excitation_pullbacks"


def _modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (``pkg.__init__`` named ``pkg``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` statement in ``module`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement in ``module``."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            out += [(target, alias.name, node.lineno) for alias in node.names]
    return out


def graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}; ``from pkg import submodule`` points at the submodule."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, name, _ in imports(module):
            if name is not None and f"{target}.{name}" in MODULES:
                edges[module].add(f"{target}.{name}")
            elif target in MODULES:
                edges[module].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_checker_sees_a_cycle_and_the_package_layout():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    edges = graph()
    assert f"{PACKAGE}.pipeline.run" in edges[f"{PACKAGE}.pipeline.cli"]
    assert f"{PACKAGE}.pipeline.tasks.figures" in edges[f"{PACKAGE}.pipeline.tasks"]


def test_no_import_cycle_in_src():
    assert find_cycle(graph()) is None


def test_no_private_name_imported_across_modules():
    bad = []
    for module in MODULES:
        for target, name, line in imports(module):
            if target == "__future__":
                continue
            path = target.split(".") + ([name] if name else [])
            if any(p.startswith("_") and not p.startswith("__") for p in path):
                bad.append(f"{MODULES[module].relative_to(SRC)}:{line} imports {'.'.join(path)}")
    assert not bad, "\n".join(bad)


def test_the_core_does_not_import_the_pipeline():
    core = [m for m in MODULES if not m.startswith((f"{PACKAGE}.pipeline", f"{PACKAGE}.app"))]
    edges = graph()
    for m in core:
        assert not [n for n in edges[m] if n.startswith((f"{PACKAGE}.pipeline", f"{PACKAGE}.app"))], m


def test_the_core_imports_without_the_frameworks():
    """In a fresh interpreter, the core (also its metrics and Captum baselines) pulls in no pipeline or app
    framework and neither the pipeline nor the app."""
    code = (
        f"import sys, {PACKAGE}, {PACKAGE}.metrics, {PACKAGE}.baselines; "
        "heavy = {'hydra', 'omegaconf', 'lightning', 'pytorch_lightning', 'wandb', 'gradio', 'datasets'}; "
        f"print(sorted(heavy & {{m.split('.')[0] for m in sys.modules}}), "
        f"sorted(m for m in sys.modules if m.startswith(('{PACKAGE}.pipeline', '{PACKAGE}.app'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_the_app_imports_without_the_pipeline():
    """In a fresh interpreter, the explorer's modules pull in neither Hydra, OmegaConf nor Lightning, nor the
    pipeline: the app stands on the core (class spaces included) and Gradio only."""
    pytest.importorskip("gradio")
    code = (
        f"import sys, {PACKAGE}.app.page, {PACKAGE}.app.cli, {PACKAGE}.app.models; "
        "heavy = {'hydra', 'omegaconf', 'lightning', 'pytorch_lightning'}; "
        f"print(sorted(heavy & {{m.split('.')[0] for m in sys.modules}}), "
        f"sorted(m for m in sys.modules if m.startswith('{PACKAGE}.pipeline')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"
