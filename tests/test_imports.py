"""The package's layering: imports run one way (catalog -> runtime -> model -> index -> service),
with no cycle, and nothing the server loads can reach torch or transformers.

Every import statement counts, including the ones inside functions: a lazy import still ties the
two modules together, and a cycle hidden that way breaks the day someone moves it to the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed subpackage lives (pyproject.toml's package-dir).
PACKAGES = {"fashionbert": "fashionbert", "fashionbert.catalog": "catalog", "fashionbert.runtime": "runtime",
            "fashionbert.model": "model", "fashionbert.index": "index", "fashionbert.service": "service"}
SERVING = ("fashionbert.runtime", "fashionbert.index", "fashionbert.service")
PIPELINE_ONLY = {"torch", "transformers", "safetensors", "matplotlib", "onnx", "efficientnet_lite_pytorch"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
        for path in sorted((ROOT / folder).glob("*/*.py")):  # one level of subpackages (service/routes)
            sub = f"{package}.{path.parent.name}"
            out[sub if path.stem == "__init__" else f"{sub}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file."""
    is_package = path.stem == "__init__"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module
            found.add(stem)
            found.update(f"{stem}.{a.name}" for a in node.names)  # `from . import x` may name a module
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {i for i in _imports(name, path) if i in modules or not i.startswith("fashionbert")}
            for name, path in modules.items()}


def _internal(graph, name):
    return {i for i in graph[name] if i in graph and i != name}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(_internal(graph, node)):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_serving_side_imports_nothing_of_the_training_side(graph):
    for name in graph:
        if name.startswith(SERVING):
            assert not any(i.startswith("fashionbert.model") for i in _internal(graph, name)), name


def test_torch_is_unreachable_from_the_server(graph):
    seen, todo = set(), [n for n in graph if n.startswith("fashionbert.service")]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        third_party = {i.split(".")[0] for i in graph[node] if not i.startswith("fashionbert")}
        assert not third_party & PIPELINE_ONLY, f"{node} imports {sorted(third_party & PIPELINE_ONLY)}"
        todo.extend(_internal(graph, node))
    assert "fashionbert.runtime.exported" in seen and "fashionbert.index.store" in seen


def test_the_server_process_loads_without_torch():
    code = ("import sys, fashionbert.service.app, fashionbert.index.search, fashionbert.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r); "
            "print(bad); sys.exit(1 if bad else 0)" % (PIPELINE_ONLY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pyflakes_is_clean():
    out = subprocess.run([sys.executable, "-m", "pyflakes", *PACKAGES.values(), "bench", "tests"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
