"""The import graph of the three packages: no cycles, and imports run one way, server → shared ←
client (the client never imports the server, nor the server the client)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "plm_owner_server", "data_owner_client")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports (at any depth of its code)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod when there is one.
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_the_import_graph_has_no_cycles():
    graphlib.TopologicalSorter(import_graph()).prepare()  # raises CycleError on a cycle


def test_imports_run_server_to_shared_and_client_to_shared_only():
    allowed = {
        "shared": {"shared"},
        "plm_owner_server": {"plm_owner_server", "shared"},
        "data_owner_client": {"data_owner_client", "shared"},
    }
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in allowed[module.split(".")[0]]
    ]
    assert not wrong
