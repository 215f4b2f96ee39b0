"""Layer contracts: low layers never import high ones, and the three products meet only at
public entry points (STYLE.md: kopf checks this with import-linter; an AST walk is enough here).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("manifests", "packager", "edge_agent", "cloud_hub", "edgepack")

# What one product may use of another: the public entry points the CLI needs on a laptop.
PUBLIC = {
    ("packager", "edge_agent"): ("edge_agent.scoring.server", "edge_agent.scoring.entry",
                                 "edge_agent.cache", "edge_agent.status",
                                 "edge_agent.setup"),
    ("packager", "cloud_hub"): ("cloud_hub.serve", "cloud_hub.settings", "cloud_hub.broker",
                                 "cloud_hub.balancer"),
    # The top-level package users import only names the SDK's public API.
    ("edgepack", "packager"): ("packager.sdk",),
}
#: Libraries the device agent must not load: the SDK's and the CLI's (the agent counts its MB).
AGENT_NEVER = ("typer", "rich", "httpx", "packager", "edgepack")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _violations() -> list[str]:
    found: list[str] = []
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            if "templates" in path.parts:
                continue
            for name in _imports(path):
                top = name.split(".", 1)[0]
                if top not in OURS or top == package:
                    continue
                if package == "manifests":
                    found.append(
                        f"{path.relative_to(REPO)} imports {name}: manifests imports nothing of ours"
                    )
                elif package == "edgepack" and top != "packager":
                    found.append(f"{path.relative_to(REPO)} imports {name}: edgepack re-exports the SDK only")
                elif top != "manifests" and not name.startswith(PUBLIC.get((package, top), ())):
                    found.append(f"{path.relative_to(REPO)} imports {name}: not a public entry point")
    for path in sorted((REPO / "edge_agent").rglob("*.py")):
        for name in _imports(path):
            if name.split(".", 1)[0] in AGENT_NEVER:
                found.append(f"{path.relative_to(REPO)} imports {name}: the agent never loads it")
    return found


def test_layers_are_respected() -> None:
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # Guard against a check that passes because it reads nothing.
    assert "packager.build" in _imports(REPO / "packager" / "commands" / "module_cmds.py")
    assert "packager.sdk" in _imports(REPO / "edgepack" / "__init__.py")
