"""The package's layers: every import (those inside functions included) points down, never up,
and no two modules import each other, directly or round a longer loop.

The order, bottom first, is the architecture in one line (docs/architecture.md):

    errors < model < store < kinds < pipeline < remote < execution < inspection < api < cli

A module may import its own subpackage's modules and those of any lower layer.  The package's
`__init__.py` (the public API, `api`) imports everything lazily, and `cli` sits on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stagestore"
ORDER = ["errors", "model", "store", "kinds", "pipeline", "remote", "execution", "inspection",
         "api", "cli"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every stagestore module `name` imports, anywhere in its body, including modules named
    to `importlib.import_module` as a string constant."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                module = ".".join(parent + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "stagestore":
                module = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in MODULES else module)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.split(".")[0] == "stagestore")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            target = node.args[0].value
            if target.startswith("."):
                target = ".".join(base) + target
            targets.add(target)
    return {t for t in targets if t in MODULES and t != name}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "cli" if parts[1] == "__main__" else parts[1]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in MODULES} <= set(ORDER), sorted({_layer(m) for m in MODULES})


def test_imports_point_down():
    upward = [f"{src} imports {dst} ({_layer(src)} < {_layer(dst)})"
              for src, targets in GRAPH.items() for dst in sorted(targets)
              if ORDER.index(_layer(dst)) > ORDER.index(_layer(src))]
    assert upward == []


def test_no_import_cycles():
    """Tarjan's strongly connected components: any with more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    private = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("stagestore")):
                private += [f"{name}: {a.name} from {'.' * node.level}{node.module or ''}"
                            for a in node.names if a.name.startswith("_")]
    assert private == []


def test_the_scan_sees_an_upward_import_inside_a_function(tmp_path):
    """The checks above would pass vacuously if the scan missed imports; this one proves it
    finds one hidden in a function body."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..cli import app\n")
    assert _imports("stagestore.store.probe", probe) == {"stagestore.cli.app"}


def test_every_command_is_mapped_to_an_existing_module_in_architecture_md():
    import re

    from stagestore.cli import command_group

    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = dict(re.findall(r"^\| `([a-z]+)` \| `(stagestore/[a-z/_]+\.py)` \|$", text, re.M))
    commands = set(command_group().commands)
    assert commands - set(table) == set(), "commands missing from docs/architecture.md"
    assert set(table) - commands == set(), "docs/architecture.md names commands that do not exist"
    missing = [path for path in table.values() if not (PACKAGE.parent / path).is_file()]
    assert missing == []
