"""Layer contracts: low layers never import high ones, and the three products meet only at
public entry points (STYLE.md: kopf checks this with import-linter; an AST walk is enough here).
"""

from __future__ import annotations

import ast
from pathlib import Path

from manifests.extras import extra_for

REPO = Path(__file__).resolve().parent.parent
OURS = ("manifests", "packager", "edge_agent", "cloud_hub", "edgepack")

# What one product may use of another: the public entry points the CLI needs on a laptop.
PUBLIC = {
    ("packager", "edge_agent"): ("edge_agent.scoring.server", "edge_agent.scoring.entry",
                                 "edge_agent.scoring.failure",  # why an instance did not start
                                 "edge_agent.cache", "edge_agent.status",
                                 "edge_agent.setup",
                                 "edge_agent.teardown"),  # agent uninstall-service --purge
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


#: The only modules of the device's side that may import a package of an extra (lazily
#: loaded themselves): the docker runtime and the runtime image's builder, the docker SDK.
EXTRA_USERS = {"edge_agent/runtime/docker.py": "docker", "packager/runtime_image/engine.py": "docker"}


def _module_level_imports(path: Path) -> list[str]:
    """What ``path`` imports when it is imported (not inside a function: a hub command loads
    the hub only when it runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names.extend(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.append(sub.module)
    return names


def test_the_device_side_never_imports_a_package_of_an_extra() -> None:
    # The base install is the device's (pyproject.toml): the agent may not need the hub's
    # packages anywhere, and the CLI only inside the commands of an extra.
    found = []
    for package, imports in (("edge_agent", _imports), ("packager", _module_level_imports),
                             ("manifests", _imports), ("edgepack", _imports)):  # fmt: skip
        for path in sorted((REPO / package).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            if "templates" in path.parts:
                continue
            for name in imports(path):
                extra = extra_for(name)
                if extra is not None and EXTRA_USERS.get(where) != extra:
                    found.append(f"{where} imports {name}, of the extra edgepack[{extra}]")
    assert found == []


def test_layers_are_respected() -> None:
    assert _violations() == []


#: ``manifests`` is pure but for one module: the durable write every part shares.
MANIFESTS_IO = REPO / "manifests" / "durable.py"
#: Calls that touch the file system.
FILE_IO = ("open", "os.open", "os.replace", "os.rename", "os.fsync", "os.sync", "os.unlink", "os.mkdir",
           "os.makedirs", "read_bytes", "read_text", "write_bytes", "write_text", "mkdir",
           "unlink")  # fmt: skip
#: Where a file may be renamed into place other than through ``manifests.durable``: the two
#: blob stores, whose streamed temp files are renamed only after their digest was checked.
OWN_RENAMES = ("cloud_hub/store/blobs.py", "edge_agent/cache/")


def _calls(path: Path) -> list[str]:
    """The dotted names of every call in ``path`` (``os.replace``; ``x.write_bytes`` as
    ``write_bytes``)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                names.append(func.id)
            elif isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                names.append(f"{owner}.{func.attr}" if owner == "os" else func.attr)
    return names


def test_manifests_does_no_io_but_the_durable_write() -> None:
    found = [
        f"{path.relative_to(REPO)} calls {name}"
        for path in sorted((REPO / "manifests").rglob("*.py"))
        if path != MANIFESTS_IO
        for name in _calls(path)
        if name in FILE_IO
    ]
    assert found == []


def test_every_file_is_renamed_into_place_by_the_one_durable_write() -> None:
    found = []
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            if path == MANIFESTS_IO or where.startswith(OWN_RENAMES):
                continue
            found += [f"{where} calls {name}" for name in _calls(path) if name in ("os.replace", "os.rename")]
    assert found == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # Guard against a check that passes because it reads nothing.
    assert "packager.build" in _imports(REPO / "packager" / "commands" / "module_cmds.py")
    assert "packager.sdk" in _imports(REPO / "edgepack" / "__init__.py")
    assert "os.replace" in _calls(MANIFESTS_IO) and "os.replace" in _calls(REPO / "cloud_hub/store/blobs.py")
