"""Commands that work on modules on the developer's machine: keys, init, build, verify, inspect."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from manifests.errors import ConfigError
from packager.app import app, console, err_console
from packager.build import DEFAULT_IMAGE
from packager.commands.options import TrustOption, bars, parse_pairs
from packager.files import atomic_output
from packager.home import default_key_path, default_trust_path
from packager.inspect import open_verified, read_unverified
from packager.keys import keygen, read_trust
from packager.sdk import DeploymentConfig, InferenceConfig, Module
from packager.sdk.local import trust_store
from packager.sdk.progress import Tracker, reporting

_PIN_SOURCES = {
    "given": "as given",
    "local": "from the local image's repo digest",
    "registry": "from the registry",
}

trust_app = typer.Typer(help="Manage the publisher keys this machine trusts.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")


@app.command("keygen")
def keygen_cmd(
    path: Annotated[Path | None, typer.Argument(help="private key file to write")] = None,
    force: Annotated[bool, typer.Option(help="replace existing key files")] = False,
    trust: Annotated[bool, typer.Option(help="also add the public key to the local trust store")] = True,
) -> None:
    """Create an Ed25519 signing key (private key 0600, public key beside it as .pub)."""
    private_path = path or default_key_path()
    priv, pub, kid = keygen(private_path, force=force)
    console.print(f"private key  {priv}  (keep it secret)")
    console.print(f"public key   {pub}")
    console.print(f"key id       {kid}")
    if trust:
        _trust_add([pub], default_trust_path())


def _trust_add(keys: list[Path], store_path: Path) -> None:
    stores = [store_path] if store_path.exists() else []
    store = read_trust(stores + keys)
    with atomic_output(store_path) as fh:
        fh.write(json.dumps(store.model_dump(mode="json"), indent=2).encode() + b"\n")
    console.print(f"trust store  {store_path}  ({len(store.keys)} key(s))")


@trust_app.command("add")
def trust_add(
    keys: Annotated[list[Path], typer.Argument(help="public key files (.pub)")],
    store: Annotated[Path | None, typer.Option(help="trust store file")] = None,
) -> None:
    """Trust modules signed by these publisher keys."""
    _trust_add(keys, store or default_trust_path())


@trust_app.command("list")
def trust_list(store: Annotated[Path | None, typer.Option(help="trust store file")] = None) -> None:
    """Show the trusted publisher keys."""
    trust = read_trust([store or default_trust_path()])
    table = Table("key id", "name")
    for k in trust.keys:
        table.add_row(k.keyid, k.name)
    console.print(table)


@app.command("init")
def init_cmd(
    directory: Annotated[Path, typer.Argument(help="folder to create")],
    force: Annotated[bool, typer.Option(help="write into a folder that is not empty")] = False,
) -> None:
    """Scaffold score.py, inferenceconfig.json and deploymentconfig.json."""
    if directory.exists() and any(directory.iterdir()) and not force:
        raise ConfigError(f"{directory}: folder is not empty; pass --force to write into it")
    directory.mkdir(parents=True, exist_ok=True)
    templates = resources.files("packager") / "templates"
    for name in ("score.py", "inferenceconfig.json", "deploymentconfig.json"):
        with (templates / name).open("rb") as src, (directory / name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
        console.print(f"wrote {directory / name}")
    console.print(
        "next: put your model file beside score.py, then "
        f"'edgepack build --ic {directory / 'inferenceconfig.json'} -m MODEL -n NAME -v 1'"
    )


@app.command("build")
def build_cmd(
    model: Annotated[Path, typer.Option("--model", "-m", help="model file or folder")],
    name: Annotated[str, typer.Option("--name", "-n", help="module name")],
    version: Annotated[str, typer.Option("--version", "-v", help="module version")],
    inference_config: Annotated[
        Path | None, typer.Option("--inference-config", "--ic", help="inferenceconfig.json")
    ] = None,
    deployment_config: Annotated[
        Path | None, typer.Option("--deployment-config", "--dc", help="deploymentconfig.json")
    ] = None,
    entry_script: Annotated[
        Path | None, typer.Option("--entry-script", "-e", help="entry script (without --ic)")
    ] = None,
    source_dir: Annotated[
        Path | None, typer.Option("--source-dir", "-s", help="source folder (without --ic)")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", "-k", help="signing key")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("dist"),
    runtime_image: Annotated[
        str | None,
        typer.Option(
            "--runtime-image",
            "--image",
            help="runtime image of the docker runtime, REF or REF@sha256:…; a tag is pinned to "
            f"its digest when Docker can resolve it [default: {DEFAULT_IMAGE}, unpinned]",
        ),
    ] = None,
    requirement: Annotated[
        list[str] | None, typer.Option("--requirement", "-r", help="extra pip requirement")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value")] = None,
    created: Annotated[
        datetime | None, typer.Option(help="creation time to record (default: newest input)")
    ] = None,
) -> None:
    """Build and sign dist/NAME-VERSION.edgepack."""
    module = Module.build(
        model,
        name,
        version,
        InferenceConfig.from_file(inference_config) if inference_config else None,
        DeploymentConfig.from_file(deployment_config) if deployment_config else None,
        entry_script=entry_script,
        source_directory=source_dir,
        key=key,
        out_dir=out,
        runtime_image=runtime_image,
        requirements=requirement or [],
        tags=parse_pairs(tag, "tag"),
        created=created,
        progress=bars(),
    )
    pin = module.image_pin
    if pin is not None and pin.warning():
        err_console.print(f"[bold yellow]warning:[/] {pin.warning()}", highlight=False, soft_wrap=True)
    elif pin is not None:
        console.print(
            f"runtime image {pin.image}@{pin.digest} ({_PIN_SOURCES[pin.source]})",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"built [bold]{module.path}[/] ({len(module.manifest.files)} files, {module.total_bytes:,} bytes)"
    )
    console.print(f"manifest digest {module.manifest_digest}", soft_wrap=True)


@app.command("verify")
def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    trust: TrustOption = None,
) -> None:
    """Check every signature and every blob digest of a module bundle."""
    store = trust_store(trust)
    with reporting(bars()) as report:
        tracker = Tracker(report, "verifying", bundle.stat().st_size if bundle.exists() else None)
        verified = open_verified(bundle, store, progress=tracker.advance)
    m = verified.manifest
    console.print(
        f"[green]verified[/] {m.name}:{m.version}: {len(m.files)} files, signed by "
        + ", ".join(k[:16] for k in verified.signers)
    )


@app.command("inspect")
def inspect_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
) -> None:
    """Show a bundle's name, version, signers, entry script, runtime and files (no trust check)."""
    manifest_bytes, envelope, manifest = read_unverified(bundle)
    if as_json:
        console.print_json(manifest_bytes.decode())
        return
    console.print(f"[bold]{manifest.name}[/]:{manifest.version}  created {manifest.created.isoformat()}")
    if manifest.description:
        console.print(manifest.description)
    console.print("signed by    " + ", ".join(s.keyid for s in envelope.signatures), soft_wrap=True)
    console.print(f"entry script {manifest.entry_script}")
    console.print(f"runtime      {manifest.runtime.image}"
                  + (f"@{manifest.runtime.image_digest}" if manifest.runtime.image_digest else ""))
    if manifest.runtime.python.requirements:
        console.print("requirements " + " ".join(manifest.runtime.python.requirements))
    console.print(f"resources    cpu {manifest.resources.cpu}, memory {manifest.resources.memory_mb} MB")
    # Fold rather than truncate: a digest cut short with "…" is no digest at all.
    table = Table(
        Column("path", overflow="fold"),
        Column("size", justify="right", no_wrap=True),
        Column("digest", overflow="fold"),
    )
    for f in manifest.files:
        table.add_row(f.path, f"{f.size:,}", f.digest)
    console.print(table)
    console.print("[yellow]not verified[/]: run 'edgepack verify' to check signatures and digests")
