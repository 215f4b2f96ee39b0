"""Hub commands for the registry: serve a hub, log in, register models, push modules.

Everything here talks to the hub through the SDK (``packager.sdk``), except ``hub serve``,
which runs one; these commands read options and print what the SDK returns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from manifests.errors import ConfigError
from packager.app import app, console
from packager.commands.options import (
    HubOption,
    JsonOption,
    TokenOption,
    connect,
    model_version,
    parse_pairs,
    split_ref,
)
from packager.commands.output import files_table, pairs_text, print_json
from packager.display import safe_text
from packager.sdk import Hub, Model, Module, SignerChange
from packager.sdk.config import HubConfig

hub_app = typer.Typer(help="Run an edgepack hub.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
model_app = typer.Typer(
    help="Register, list, show, download and delete models on the hub.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
module_app = typer.Typer(
    help="List and show the modules pushed to the hub; grant and revoke the keys that may sign a name.",
    no_args_is_help=True,
)
app.add_typer(module_app, name="module")


# --- hub serve / login ----------------------------------------------------------------------


@hub_app.command("serve")
def serve_cmd(
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite:///DATA_DIR/hub.db)")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="blobs, database, keys (default $EDGEPACK_HOME/hub)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on (default 8800)")] = None,
    public_url: Annotated[str | None, typer.Option(help="URL devices use to reach the hub")] = None,
    trust: Annotated[
        list[Path] | None, typer.Option("--trust", help="trusted publisher key (.pub or trust JSON)")
    ] = None,
    max_upload_mb: Annotated[int | None, typer.Option(help="largest accepted upload (default 2048)")] = None,
    blob_store: Annotated[
        str | None,
        typer.Option(
            help="s3://BUCKET?endpoint=URL (AWS_* credentials), or file:///FOLDER; default DATA_DIR/blobs"
        ),
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
    agent_bundle: Annotated[
        Path | None,
        typer.Option(help="serve this agent bundle and /install.sh ('edgepack hub agent-bundle build')"),
    ] = None,
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
        "agent_bundle": agent_bundle,
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
    with connect(hub, token) as connected:
        freed = connected.collect_garbage(grace)
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
    with Hub(config.url, config.token, ca=config.ca, progress=False) as connected:
        Model.list(connected, latest=True)
    path = config.save()
    console.print(f"logged in to {config.url}; saved to {path}")


# --- models ---------------------------------------------------------------------------------


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
    tags, properties = parse_pairs(tag, "tag"), parse_pairs(prop, "property")
    with connect(hub, token) as connected:
        model = Model.register(
            connected,
            model_path=path,
            model_name=name,
            tags=tags,
            properties=properties,
            description=description,
        )
    if as_json:
        print_json(model.record.raw)
        return
    count = len(model.files)
    console.print(
        f"[green]registered[/] {model.name}:{model.version}  "
        f"{count} files, {model.record.size:,} bytes ({model.uploaded} uploaded, "
        f"{count - model.uploaded} already on the hub)"
    )


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
    with connect(hub, token) as connected:
        models = [m.record.raw for m in Model.list(connected, name=name, tags=tag or [], latest=latest)]
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
            safe_text(pairs_text(m["tags"])),
            m["created_at"][:19],
            safe_text(m["description"]),
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
    with connect(hub, token) as connected:
        m: dict[str, Any] = Model(connected, name, model_version(version)).record.raw
    if as_json:
        print_json(m)
        return
    console.print(f"[bold]{m['name']}[/]:{m['version']}  created {m['created_at'][:19]}")
    if m["description"]:
        console.print(safe_text(m["description"]))
    console.print(safe_text(f"tags        {pairs_text(m['tags']) or '-'}"))
    console.print(safe_text(f"properties  {json.dumps(m['properties']) if m['properties'] else '-'}"))
    console.print(files_table(m["files"]))


@model_app.command("download")
def model_download_cmd(
    ref: Annotated[str, typer.Argument(help="NAME[:VERSION] (default: latest)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to write the model into")],
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Download a model's files into DIR (each checked against its digest)."""
    name, version = split_ref(ref, need_version=False)
    with connect(hub, token) as connected:
        model = Model(connected, name, model_version(version))
        model.download(out, exist_ok=True)
    console.print(f"[green]downloaded[/] {model.id} ({len(model.files)} files) to {out}")


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
    add_tags, properties = parse_pairs(tag, "tag"), parse_pairs(prop, "property")
    with connect(hub, token) as connected:
        model = Model(connected, name, model_version(version))
        model.update(
            description=description,
            add_tags=add_tags,
            remove_tags=remove_tag or [],
            add_properties=properties,
        )
    if as_json:
        print_json(model.record.raw)
        return
    console.print(f"[green]updated[/] {model.id}  tags: {pairs_text(model.tags) or '-'}")


@model_app.command("delete")
def model_delete_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Delete one model version (refused while a deployment uses it)."""
    name, version = split_ref(ref, need_version=True)
    with connect(hub, token) as connected:
        result = Model(connected, name, model_version(version)).delete()
    console.print(f"[green]deleted[/] model {result.deleted} ({len(result.freed_blobs)} blobs freed)")


# --- modules --------------------------------------------------------------------------------


@app.command("push")
def push_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a signed module; the hub verifies every signature and digest before storing it."""
    with connect(hub, token) as connected:
        result = Module.push(connected, bundle)
    if as_json:
        print_json(result.raw)
        return
    verb = "pushed" if result.created else "already on the hub:"
    console.print(
        f"[green]{verb}[/] {result.name}:{result.version}  {result.manifest_digest}  "
        f"({result.new_blobs} new blobs, {result.reused_blobs} already held)"
    )


@module_app.command("list")
def module_list_cmd(
    name: Annotated[str | None, typer.Option("--name", "-n", help="only this module")] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List pushed modules."""
    with connect(hub, token) as connected:
        modules = [m.record.raw for m in Module.list(connected, name)]
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
    name, version = split_ref(ref, need_version=True, kind="module")
    with connect(hub, token) as connected:
        m: dict[str, Any] = Module(connected, name, version).record.raw
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
    name, version = split_ref(ref, need_version=True, kind="module")
    with connect(hub, token) as connected:
        target = Module(connected, name, version).download(out)
    console.print(f"[green]downloaded[/] {name}:{version} to {target}")


@module_app.command("delete")
def module_delete_cmd(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Delete a module version (refused while a deployment uses it)."""
    name, version = split_ref(ref, need_version=True, kind="module")
    with connect(hub, token) as connected:
        result = Module(connected, name, version).delete()
    console.print(f"[green]deleted[/] module {result.deleted} ({len(result.freed_blobs)} blobs freed)")


# --- who may sign a module name -------------------------------------------------------------

KeyIdArgument = Annotated[
    str, typer.Argument(help="the publisher's key id (64 hex, as 'edgepack keygen' printed it)")
]


def _print_signers(owners: list[str], granted: list[str]) -> None:
    for keyid in owners:
        console.print(f"owner    {keyid}")
    for keyid in granted:
        console.print(f"granted  {keyid}")


def _print_signer_change(change: SignerChange, as_json: bool, what: str) -> None:
    if as_json:
        print_json(change.raw)
        return
    console.print(f"{what} ({len(change.issued)} device(s) told)")
    _print_signers(change.owners, change.granted)


@module_app.command("signers")
def module_signers_cmd(
    name: Annotated[str, typer.Argument(help="module name")],
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the keys that may sign new versions of a module name: its owner and the grants."""
    with connect(hub, token) as connected:
        keys = Module.signers(connected, name)
    if as_json:
        print_json(keys.raw)
        return
    _print_signers(keys.owners, keys.granted)


@module_app.command("grant")
def module_grant_cmd(
    name: Annotated[str, typer.Argument(help="module name")],
    keyid: KeyIdArgument,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Let another trusted publisher key sign versions of a module name (the first key that
    pushed the name owns it); devices running the name are told."""
    with connect(hub, token) as connected:
        change = Module.grant(connected, name, keyid)
    verb = "granted" if change.changed else "already allowed:"
    _print_signer_change(change, as_json, f"[green]{verb}[/] key {keyid} may sign module {name}")


@module_app.command("revoke")
def module_revoke_cmd(
    name: Annotated[str, typer.Argument(help="module name")],
    keyid: KeyIdArgument,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Withdraw a grant: the key may no longer sign versions of the module name (the owner's key
    cannot be revoked); devices running the name are told."""
    with connect(hub, token) as connected:
        change = Module.revoke(connected, name, keyid)
    _print_signer_change(change, as_json, f"[green]revoked[/] key {keyid} on module {name}")
