"""Hub commands for the registry: serve a hub, log in, register models, push modules.

Everything here talks to the hub over HTTP (``packager.hubclient``), except ``hub serve``,
which runs one. Uploads stream from disk with a progress bar; downloads are checked against
their digests before they are renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from manifests.bundle import write_bundle
from manifests.digests import digest_hex, sha256_digest
from manifests.errors import ConfigError, FetchError, TrustError
from manifests.module import NAME_PATTERN, check_relative_path
from packager.app import app, console
from packager.commands.module_cmds import byte_progress
from packager.files import atomic_output
from packager.hubclient import HubClient, HubConfig, raise_for_hub_error

CHUNK = 1 << 20

hub_app = typer.Typer(help="Run an edgepack hub.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
model_app = typer.Typer(
    help="Register, list, show, download and delete models on the hub.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
module_app = typer.Typer(help="List and show the modules pushed to the hub.", no_args_is_help=True)
app.add_typer(module_app, name="module")

HubOption = Annotated[str | None, typer.Option("--hub", help="hub URL (default: from 'edgepack login')")]
TokenOption = Annotated[str | None, typer.Option("--token", help="admin token (default: from login)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def hub_client(hub: str | None, token: str | None) -> HubClient:
    return HubClient(HubConfig.resolve(hub, token))


def print_json(data: Any) -> None:
    # Plain stdout, not rich: scripts want exactly the JSON, unwrapped and uncoloured.
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def split_ref(ref: str, *, need_version: bool) -> tuple[str, str]:
    """``NAME:VERSION`` (or ``NAME`` = latest when the version may be omitted)."""
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise ConfigError(f"{ref!r} is not NAME:VERSION")
    if not sep:
        if need_version:
            raise ConfigError(f"give the exact version: {ref}:VERSION ('edgepack model list' shows them)")
        version = "latest"
    return name, version


def parse_pairs(texts: list[str] | None, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for text in texts or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {text!r} is not key=value; write it like --{what} stage=prod")
        pairs[key.strip()] = value.strip()
    return pairs


# --- hub serve / login ----------------------------------------------------------------------


@hub_app.command("serve")
def serve_cmd(
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite:///DATA_DIR/hub.db)")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="blobs, database, keys (default ~/.edgepack/hub)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on (default 8800)")] = None,
    public_url: Annotated[str | None, typer.Option(help="URL devices use to reach the hub")] = None,
    trust: Annotated[
        list[Path] | None, typer.Option("--trust", help="trusted publisher key (.pub or trust JSON)")
    ] = None,
    max_upload_mb: Annotated[int | None, typer.Option(help="largest accepted upload (default 2048)")] = None,
    blob_store: Annotated[
        str | None, typer.Option(help="s3://BUCKET?endpoint=URL (AWS_* credentials); default DATA_DIR/blobs")
    ] = None,
    mqtt_host: Annotated[str | None, typer.Option(help="MQTT broker host (none: HTTP only)")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT broker port (default 1883)")] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="MQTT topic prefix (default edgepack)")] = None,
    broker_dir: Annotated[
        Path | None, typer.Option(help="where to write the Mosquitto password file and ACL")
    ] = None,
    broker_pid_file: Annotated[
        Path | None, typer.Option(help="Mosquitto's pid file, to make it reload the ACL (SIGHUP)")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="HTTPS certificate (default <data_dir>/tls/hub.crt)")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="HTTPS key (default <data_dir>/tls/hub.key)")] = None,
    mqtt_tls_ca: Annotated[
        Path | None, typer.Option(help="connect to the broker with TLS, verified against this CA")
    ] = None,
    allow_plain_http: Annotated[
        bool, typer.Option(help="serve plain HTTP beyond loopback (tokens cross the network in clear)")
    ] = False,
) -> None:
    """Run the hub (API, dashboard, MQTT link) until Ctrl-C. Flags override EDGEPACK_HUB_* variables."""
    from cloud_hub.serve import run_hub
    from cloud_hub.settings import HubSettings

    given: dict[str, Any] = {
        "db": db,
        "data_dir": data_dir,
        "host": host,
        "port": port,
        "public_url": public_url,
        "trusted_keys": trust or None,
        "max_upload_mb": max_upload_mb,
        "blob_store": blob_store,
        "mqtt_host": mqtt_host,
        "mqtt_port": mqtt_port,
        "topic_prefix": topic_prefix,
        "broker_dir": broker_dir,
        "broker_pid_file": broker_pid_file,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "mqtt_tls_ca": mqtt_tls_ca,
        "allow_plain_http": allow_plain_http or None,
    }
    for path in trust or []:
        if not path.is_file():
            raise ConfigError(f"{path}: trusted key file not found")
    try:
        settings = HubSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"hub setting {field}: {err['msg']}") from None
    from cloud_hub.serve import serving_settings

    settings = serving_settings(settings)
    url = f"{'https' if settings.tls_cert else 'http'}://{settings.host}:{settings.port}"
    token_source = (
        "EDGEPACK_HUB_ADMIN_TOKEN"
        if settings.admin_token is not None
        else str(settings.data_dir / "admin_token")
    )
    console.print(f"[bold]edgepack hub[/] on {url}  (data in {settings.data_dir})", soft_wrap=True)
    console.print(f"dashboard    {url}/   API docs {url}/docs", soft_wrap=True)
    console.print(
        f"admin token  in {token_source}  (then: edgepack login --hub {url} --token TOKEN)", soft_wrap=True
    )
    if not settings.trusted_keys:
        console.print(
            "[yellow]no trusted publisher keys[/]: every push will be refused; pass --trust KEY.pub"
        )
    if settings.mqtt_host is None:
        console.print("[yellow]no MQTT broker[/]: devices fetch desired state over HTTP only", soft_wrap=True)
    run_hub(settings)


@hub_app.command("gc")
def gc_cmd(
    grace: Annotated[int, typer.Option(help="keep unused blobs younger than this many seconds")] = 3600,
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Delete blobs on the hub that no model or module uses any more."""
    with hub_client(hub, token) as client:
        freed = client.post_json("/api/v1/registry/gc", params={"grace_s": grace})["freed_blobs"]
    console.print(f"[green]freed[/] {len(freed)} unused blobs")


@app.command("login")
def login_cmd(
    hub: Annotated[str, typer.Option("--hub", help="hub URL, e.g. http://hub.example:8800")],
    token: Annotated[str, typer.Option("--token", help="the hub's admin token")],
    ca: Annotated[
        Path | None, typer.Option("--ca", help="CA certificate of an HTTPS hub (from broker-config --tls)")
    ] = None,
) -> None:
    """Check the token against the hub and save both to $EDGEPACK_HOME/config.json."""
    if ca is not None and not ca.is_file():
        raise ConfigError(f"{ca}: CA certificate not found")
    config = HubConfig(url=hub.rstrip("/"), token=token, ca=str(ca.resolve()) if ca else None)
    with HubClient(config) as client:
        client.get_json("/api/v1/models", params={"latest": True})
    path = config.save()
    console.print(f"logged in to {config.url}; saved to {path}")


# --- models ---------------------------------------------------------------------------------


def model_files(path: Path) -> dict[str, Path]:
    """A file registers as its own name; a folder as ``folder/…`` for every file beneath it."""
    if path.is_symlink() or not path.exists():
        raise ConfigError(f"{path}: no such model file or folder")
    if path.is_file():
        return {path.name: path}
    files: dict[str, Path] = {}
    for item in sorted(path.rglob("*")):
        rel = f"{path.name}/{item.relative_to(path).as_posix()}"
        if item.is_symlink():
            raise ConfigError(f"{item}: links are not registered; copy the file into the folder")
        if item.is_file():
            files[check_relative_path(rel)] = item
    if not files:
        raise ConfigError(f"{path}: the folder holds no files")
    return files


def file_digest(path: Path, progress: Callable[[int], None]) -> str:
    hasher = hashlib.sha256()
    for chunk in read_chunks(path, progress):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def read_chunks(path: Path, progress: Callable[[int], None]) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            progress(len(chunk))
            yield chunk


def upload_blob(client: HubClient, path: Path, digest: str, progress: Callable[[int], None]) -> bool:
    """Upload a file unless the hub holds its blob already; True when bytes were sent."""
    head = client.http.head(f"/api/v1/blobs/{digest}")
    if head.status_code == 200:
        return False
    if head.status_code != 404:
        raise_for_hub_error(head)
    size = path.stat().st_size
    # An explicit Content-Length lets the hub refuse an oversized file before it is sent.
    client.request(
        "PUT",
        f"/api/v1/blobs/{digest}",
        content=read_chunks(path, progress),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )
    return True


@model_app.command("register")
def model_register_cmd(
    name: Annotated[str, typer.Option("--name", "-n", help="model name")],
    path: Annotated[Path, typer.Option("--path", "-p", help="model file or folder")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable)")] = None,
    prop: Annotated[list[str] | None, typer.Option("--property", help="key=value (repeatable)")] = None,
    description: Annotated[str, typer.Option(help="free text")] = "",
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a file or folder as the next version of model NAME (uploads only what the hub lacks)."""
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(
            f"model name {name!r} is invalid: lower-case letters, digits, '.', '_', '-' "
            "(starting with a letter or digit, at most 63)"
        )
    files = model_files(path)
    total = sum(p.stat().st_size for p in files.values())
    with hub_client(hub, token) as client, byte_progress() as progress:
        hashing = progress.add_task("hashing", total=total)
        digests = {rel: file_digest(p, lambda n: progress.advance(hashing, n)) for rel, p in files.items()}
        uploading = progress.add_task("uploading", total=total)
        sent = 0
        for rel, p in files.items():
            if upload_blob(client, p, digests[rel], lambda n: progress.advance(uploading, n)):
                sent += 1
            else:
                progress.advance(uploading, p.stat().st_size)
        listing = [
            {"path": rel, "digest": digests[rel], "size": p.stat().st_size} for rel, p in files.items()
        ]
        body = {
            "files": listing,
            "tags": parse_pairs(tag, "tag"),
            "properties": parse_pairs(prop, "property"),
            "description": description,
        }
        model = client.post_json(f"/api/v1/models/{name}/versions", body)
    if as_json:
        print_json(model)
        return
    console.print(
        f"[green]registered[/] {model['name']}:{model['version']}  "
        f"{len(files)} files, {total:,} bytes ({sent} uploaded, {len(files) - sent} already on the hub)"
    )


def tags_text(tags: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def files_table(files: list[dict[str, Any]]) -> Table:
    """The files of a model or module version as the hub lists them."""
    table = Table("path", "size", "digest")
    for f in files:
        table.add_row(f["path"], f"{f['size']:,}", f["digest"])
    return table


@model_app.command("list")
def model_list_cmd(
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value or key (all must match)")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="only this model")] = None,
    latest: Annotated[bool, typer.Option(help="only the latest version of each model")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List registered model versions."""
    params: dict[str, Any] = {"tag": tag or [], "latest": latest}
    if name:
        params["name"] = name
    with hub_client(hub, token) as client:
        models = client.get_json("/api/v1/models", params=params)
    if as_json:
        print_json(models)
        return
    table = Table("name", "version", "files", "size", "tags", "created", "description")
    for m in models:
        table.add_row(
            m["name"],
            str(m["version"]),
            str(len(m["files"])),
            f"{m['size']:,}",
            tags_text(m["tags"]),
            m["created_at"][:19],
            m["description"],
        )
    console.print(table)


@model_app.command("show")
def model_show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION] (default: latest)")],
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one model version: tags, properties and files."""
    name, version = split_ref(ref, need_version=False)
    with hub_client(hub, token) as client:
        m = client.get_json(f"/api/v1/models/{name}/versions/{version}")
    if as_json:
        print_json(m)
        return
    console.print(f"[bold]{m['name']}[/]:{m['version']}  created {m['created_at'][:19]}")
    if m["description"]:
        console.print(m["description"])
    console.print(f"tags        {tags_text(m['tags']) or '-'}")
    console.print(f"properties  {json.dumps(m['properties']) if m['properties'] else '-'}")
    console.print(files_table(m["files"]))


def download_blob(
    client: HubClient, url: str, target: Path, digest: str, progress: Callable[[int], None]
) -> None:
    """Stream a blob to ``target``; the file appears only once its digest has matched."""
    hasher = hashlib.sha256()
    try:
        with client.http.stream("GET", url) as response:
            if response.status_code >= 400:
                response.read()
                raise_for_hub_error(response)
            with atomic_output(target) as out:
                for chunk in response.iter_bytes(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    progress(len(chunk))
                if "sha256:" + hasher.hexdigest() != digest:
                    raise TrustError(f"{target.name}: downloaded bytes do not match {digest}; download again")
    except (OSError, ValueError) as exc:
        raise FetchError(f"downloading {url} failed ({exc}); try again") from None


def download_blobs(client: HubClient, wanted: Iterable[tuple[str, Path]], total: int) -> None:
    """Download each ``(digest, target)`` in turn behind one progress bar of ``total`` bytes."""
    with byte_progress() as progress:
        task = progress.add_task("downloading", total=total)
        for digest, target in wanted:
            download_blob(
                client, f"/api/v1/blobs/{digest}", target, digest, lambda n: progress.advance(task, n)
            )


@model_app.command("download")
def model_download_cmd(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION] (default: latest)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the model into")],
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Download a model's files into DIR (each checked against its digest)."""
    name, version = split_ref(ref, need_version=False)
    with hub_client(hub, token) as client:
        m = client.get_json(f"/api/v1/models/{name}/versions/{version}")
        # Lazily, so each path is still checked just before its file is written.
        wanted = ((f["digest"], out / check_relative_path(f["path"])) for f in m["files"])
        download_blobs(client, wanted, m["size"])
    console.print(f"[green]downloaded[/] {m['name']}:{m['version']} ({len(m['files'])} files) to {out}")


@model_app.command("update")
def model_update_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value to add or change")] = None,
    remove_tag: Annotated[list[str] | None, typer.Option("--remove-tag", help="key to remove")] = None,
    prop: Annotated[list[str] | None, typer.Option("--property", help="key=value to add")] = None,
    description: Annotated[str | None, typer.Option(help="new description")] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a model version's tags, description or properties (its files never change)."""
    name, version = split_ref(ref, need_version=True)
    body = {
        "set_tags": parse_pairs(tag, "tag"),
        "remove_tags": remove_tag or [],
        "properties": parse_pairs(prop, "property"),
        "description": description,
    }
    with hub_client(hub, token) as client:
        m = client.request("PATCH", f"/api/v1/models/{name}/versions/{version}", json=body).json()
    if as_json:
        print_json(m)
        return
    console.print(f"[green]updated[/] {m['name']}:{m['version']}  tags: {tags_text(m['tags']) or '-'}")


@model_app.command("delete")
def model_delete_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Delete one model version (refused while a deployment uses it)."""
    delete_version("model", ref, hub, token)


def delete_version(kind: str, ref: str, hub: str | None, token: str | None) -> None:
    """DELETE a model or module version (``kind``) and say how many blobs that freed."""
    name, version = split_ref(ref, need_version=True)
    with hub_client(hub, token) as client:
        result = client.request("DELETE", f"/api/v1/{kind}s/{name}/versions/{version}").json()
    console.print(f"[green]deleted[/] {kind} {result['deleted']} ({len(result['freed_blobs'])} blobs freed)")


# --- modules --------------------------------------------------------------------------------


@app.command("push")
def push_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a signed module; the hub verifies every signature and digest before storing it."""
    if not bundle.is_file():
        raise ConfigError(f"{bundle}: no such bundle; build one with 'edgepack build'")
    size = bundle.stat().st_size
    with hub_client(hub, token) as client, byte_progress() as progress:
        task = progress.add_task("pushing", total=size)
        result = client.request(
            "POST",
            "/api/v1/modules",
            content=read_chunks(bundle, lambda n: progress.advance(task, n)),
            headers={"Content-Length": str(size), "Content-Type": "application/vnd.edgepack.module+tar"},
        ).json()
    if as_json:
        print_json(result)
        return
    verb = "pushed" if result["created"] else "already on the hub:"
    console.print(
        f"[green]{verb}[/] {result['name']}:{result['version']}  {result['manifest_digest']}  "
        f"({result['new_blobs']} new blobs, {result['reused_blobs']} already held)"
    )


@module_app.command("list")
def module_list_cmd(
    name: Annotated[str | None, typer.Option("--name", "-n", help="only this module")] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List pushed modules."""
    with hub_client(hub, token) as client:
        modules = client.get_json("/api/v1/modules", params={"name": name} if name else None)
    if as_json:
        print_json(modules)
        return
    table = Table("name", "version", "files", "size", "manifest digest", "pushed")
    for m in modules:
        table.add_row(
            m["name"],
            m["version"],
            str(len(m["files"])),
            f"{m['size']:,}",
            m["manifest_digest"],
            m["created_at"][:19],
        )
    console.print(table)


@module_app.command("show")
def module_show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a pushed module: signers, entry script, runtime and files."""
    name, version = split_ref(ref, need_version=True)
    with hub_client(hub, token) as client:
        m = client.get_json(f"/api/v1/modules/{name}/versions/{version}")
    if as_json:
        print_json(m)
        return
    manifest = m["manifest"]
    console.print(f"[bold]{m['name']}[/]:{m['version']}  {m['manifest_digest']}")
    console.print(f"signed by    {', '.join(m['signers'])}")
    console.print(f"entry script {manifest['entry_script']}")
    console.print(f"runtime      {manifest['runtime']['image']}")
    console.print(files_table(m["files"]))


@module_app.command("download")
def module_download_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for NAME-VERSION.edgepack")] = Path("."),
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Download a pushed module as a signed .edgepack (the same bytes 'edgepack build' wrote)."""
    name, version = split_ref(ref, need_version=True)
    target = out / f"{name}-{version}.edgepack"
    with hub_client(hub, token) as client:
        m = client.get_json(f"/api/v1/modules/{name}/versions/{version}")
        manifest_bytes = client.request("GET", f"/api/v1/modules/{name}/versions/{version}/manifest").content
        if sha256_digest(manifest_bytes) != m["manifest_digest"]:
            raise TrustError(f"module {ref}: the manifest served does not match its digest; try again")
        sizes = {f["digest"]: f["size"] for f in m["files"]}
        with tempfile.TemporaryDirectory(
            prefix=".edgepack-download-", dir=out if out.is_dir() else None
        ) as tmp:
            download_blobs(client, [(d, Path(tmp) / digest_hex(d)) for d in sizes], sum(sizes.values()))
            blobs = [(d, size, _opener(Path(tmp) / digest_hex(d))) for d, size in sizes.items()]
            with atomic_output(target) as fh:
                write_bundle(fh, manifest_bytes, blobs)
    console.print(f"[green]downloaded[/] {name}:{version} to {target}")


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


@module_app.command("delete")
def module_delete_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Delete a module version (refused while a deployment uses it)."""
    delete_version("module", ref, hub, token)
