"""Commands that work on modules on the developer's machine: keys, init, build, verify, inspect."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from manifests.azureml import DeploymentConfig, InferenceConfig, parse_config
from manifests.bundle import BlobSink
from manifests.errors import ConfigError
from manifests.module import Resources
from manifests.signing import TrustStore
from manifests.verified import VerifiedModule
from packager.app import app, console, edgepack_home, err_console
from packager.build import DEFAULT_IMAGE, build_module, spec_from_configs
from packager.files import atomic_output, load_json_file
from packager.inspect import open_verified, read_unverified
from packager.keys import keygen, read_private_key, read_trust
from packager.runtime_image.pinning import pin_image

_PIN_SOURCES = {
    "given": "as given",
    "local": "from the local image's repo digest",
    "registry": "from the registry",
}

trust_app = typer.Typer(help="Manage the publisher keys this machine trusts.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")


def default_key_path() -> Path:
    return edgepack_home() / "keys" / "publisher.key"


def default_trust_path() -> Path:
    return edgepack_home() / "trust.json"


def trust_paths(given: list[Path] | None) -> list[Path]:
    """Trust given on the command line, else the default trust store."""
    if given:
        return given
    default = default_trust_path()
    if not default.exists():
        raise ConfigError(
            "no trusted keys: pass --trust PUBLISHER.pub, or add one with 'edgepack trust add'"
        )
    return [default]


def byte_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


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


def _load(model: type[InferenceConfig] | type[DeploymentConfig], path: Path) -> object:
    return parse_config(model, load_json_file(path, what="config file"), source=str(path))


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
    ic = _load(InferenceConfig, inference_config) if inference_config else None
    dc = _load(DeploymentConfig, deployment_config) if deployment_config else None
    assert ic is None or isinstance(ic, InferenceConfig)
    assert dc is None or isinstance(dc, DeploymentConfig)
    key_path = key or default_key_path()
    signing_key = read_private_key(key_path)
    spec = spec_from_configs(
        name=name,
        version=version,
        model=model,
        inference_config=ic,
        ic_path=inference_config,
        entry_script=entry_script.resolve() if entry_script else None,
        source_dir=source_dir.resolve() if source_dir else None,
        deployment_config=dc,
    )
    if runtime_image is not None:
        pin = pin_image(runtime_image)
        spec.image, spec.image_digest = pin.image, pin.digest
        if pin.warning():
            err_console.print(f"[bold yellow]warning:[/] {pin.warning()}", highlight=False, soft_wrap=True)
        else:
            console.print(
                f"runtime image {pin.image}@{pin.digest} ({_PIN_SOURCES[pin.source]})",
                highlight=False,
                soft_wrap=True,
            )
    spec.requirements += requirement or []
    spec.tags = _parse_tags(tag or [])
    spec.exclude.add(key_path)
    if created is not None:
        spec.created = created if created.tzinfo else created.astimezone()
    if dc is None:
        spec.resources = Resources()
    with byte_progress() as progress:
        task = progress.add_task(f"building {name}:{version}", total=None)
        result = build_module(
            spec,
            signing_key,
            out,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(
        f"built [bold]{result.path}[/] ({len(result.manifest.files)} files, "
        f"{result.total_bytes:,} bytes)"
    )
    console.print(f"manifest digest {result.manifest_digest}", soft_wrap=True)


def _parse_tags(items: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"--tag {item!r}: expected key=value")
        tags[k] = v
    return tags


TrustOption = Annotated[
    list[Path] | None,
    typer.Option("--trust", "-t", help="trusted publisher key (.pub) or trust store; repeatable"),
]


def verify_with_progress(
    bundle: Path, trust: TrustStore, *, sink: BlobSink | None = None
) -> VerifiedModule:
    """Verify ``bundle`` behind a progress bar; every command that takes a bundle refuses
    it through here, so they all refuse the same things with the same message."""
    with byte_progress() as progress:
        task = progress.add_task("verifying", total=bundle.stat().st_size if bundle.exists() else None)
        return open_verified(
            bundle, trust, sink=sink, progress=lambda n: progress.advance(task, n)
        )


@app.command("verify")
def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    trust: TrustOption = None,
) -> None:
    """Check every signature and every blob digest of a module bundle."""
    verified = verify_with_progress(bundle, read_trust(trust_paths(trust)))
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
