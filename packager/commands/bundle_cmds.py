"""``edgepack hub agent-bundle build``: the wheels devices install the agent from, offline.

The hub serves the folder this writes (``hub serve --agent-bundle DIR``) with ``install.sh``;
see docs/agent.md, "Install from the hub".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from packager.app import console
from packager.commands.registry_cmds import hub_app
from packager.home import default_key_path
from packager.keys import read_private_key

bundle_app = typer.Typer(help="The agent bundle devices install from the hub.", no_args_is_help=True)
hub_app.add_typer(bundle_app, name="agent-bundle")


@bundle_app.command("build")
def build_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write (hub serve --agent-bundle)")],
    key: Annotated[
        Path | None, typer.Option("--key", "-k", help="publisher key to sign with (devices must trust it)")
    ] = None,
    arch: Annotated[
        list[str] | None, typer.Option("--arch", help="amd64 or arm64; repeatable (default amd64)")
    ] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option("--extra", help="onnx, docker; repeatable (default onnx: process-runtime ONNX modules)"),
    ] = None,
    no_extras: Annotated[bool, typer.Option("--no-extras", help="the agent alone")] = False,
    project: Annotated[
        Path | None, typer.Option("--project", help="edgepack source tree (default: the one running)")
    ] = None,
    wheel: Annotated[
        Path | None, typer.Option("--wheel", help="an edgepack wheel instead of a source tree")
    ] = None,
) -> None:
    """Download the agent's wheels (and pip) for Debian's python3 and sign their list."""
    from packager.agent_bundle import BundleSpec, build_agent_bundle

    spec = BundleSpec(out=out, key=read_private_key(key or default_key_path()),
                      arches=tuple(arch or ["amd64"]), project=project, wheel=wheel,
                      extras=() if no_extras else tuple(extra or ["onnx"]))  # fmt: skip
    bundle = build_agent_bundle(spec)
    for name, wheels in bundle.wheels.items():
        size = sum(w.size for w in wheels) / 1e6
        console.print(f"{name}: {len(wheels)} wheels, {size:.1f} MB", highlight=False)
    console.print(
        f"wrote {out} (edgepack {bundle.version}); serve it with: edgepack hub serve --agent-bundle {out}"
    )
