"""Hub commands for the fleet: devices, deployments (services), waiting for a rollout.

``edgepack deploy`` is the Azure ML ``deploy`` step for a fleet: one module version, a
``deploymentconfig.json`` as it is, and a target (device ids or a tag selector).
``edgepack service wait`` is ``wait_for_deployment(show_output=True)``: live per-device state
until every device is final, exit code 0 only when the service ended Healthy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from manifests.device import DeviceCredentials
from manifests.errors import ConfigError, RuntimeFailure
from packager.app import app, console
from packager.commands.registry_cmds import (
    HubOption,
    JsonOption,
    TokenOption,
    hub_client,
    parse_pairs,
    print_json,
    split_ref,
)
from packager.files import atomic_output, load_json_file
from packager.hubclient import HubClient

device_app = typer.Typer(help="Enroll, list, show, tag and revoke devices.", no_args_is_help=True)
app.add_typer(device_app, name="device")
service_app = typer.Typer(help="List, show, delete and wait for deployed services.", no_args_is_help=True)
app.add_typer(service_app, name="service")

FINAL = ("Healthy", "Failed")
STATE_STYLE = {
    "Healthy": "green",
    "Failed": "bold red",
    "Unhealthy": "yellow",
    "Unschedulable": "magenta",
    "Transitioning": "cyan",
}


def state_text(state: str | None) -> Text:
    return Text(state or "not reported", style=STATE_STYLE.get(state or "", "dim"))


def tags_text(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def target_text(target: dict[str, Any]) -> str:
    if "devices" in target:
        return "devices " + ", ".join(target["devices"])
    return "selector " + tags_text(target.get("selector", {}))


def when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "never"


# --- devices ---------------------------------------------------------------------------------


@device_app.command("enroll")
def enroll_cmd(
    device_id: Annotated[str, typer.Argument(help="device id (letters, digits, . _ -)")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="also write the credentials to this file (mode 0600) for the agent"),
    ] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enroll a device and print its credentials ONCE (the hub keeps only hashes)."""
    tags = parse_pairs(tag, "tag")
    with hub_client(hub, token) as client:
        body = client.post_json("/api/v1/devices", {"id": device_id, "tags": tags})
    creds = body["credentials"]
    # Validated before it is written: the agent reads exactly this document.
    document = DeviceCredentials.model_validate(body["device_credentials"]).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    if out is not None:
        with atomic_output(out, mode=0o600) as fh:
            fh.write(json.dumps(document, indent=2).encode() + b"\n")
    if as_json:
        print_json(document)
        return
    lines = [
        f"device        {device_id}  ({tags_text(tags)})",
        f"hub           {body['hub_url']}",
        f"HTTP token    {creds['token']}",
        f"MQTT          {body['mqtt_host'] or '(no broker)'}:{body['mqtt_port']}"
        f"  user {creds['mqtt_username']}",
        f"MQTT password {creds['mqtt_password']}",
        f"hub key id    {document['hub_key']['keyid']}",
        f"publishers    {len(document['publishers']['keys'])} trusted key(s)",
    ]
    console.print(Panel("\n".join(lines), title="enrolled", expand=False), highlight=False)
    where = f"saved to {out}" if out else "copy them now"
    console.print(f"[yellow]These credentials are shown only once[/] ({where}).")


@device_app.command("list")
def list_devices_cmd(
    selector: Annotated[str | None, typer.Option(help="only devices matching k=v,...")] = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="include revoked devices")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Devices with their tags, online state and services."""
    params: dict[str, Any] = {"include_revoked": include_revoked}
    if selector is not None:
        params["selector"] = selector
    with hub_client(hub, token) as client:
        devices = client.get_json("/api/v1/devices", params=params)["devices"]
    if as_json:
        print_json(devices)
        return
    table = Table("device", "tags", "online", "last seen", "agent", "generation", "services")
    for d in devices:
        online = (
            Text("revoked", "dim")
            if d["revoked"]
            else (Text("online", "green") if d["online"] else Text("offline", "red"))
        )
        table.add_row(
            d["id"],
            tags_text(d["tags"]),
            online,
            when(d["last_seen"]),
            d["agent_version"] or "-",
            str(d["generation"]),
            ", ".join(d["services"]) or "-",
        )
    console.print(table)


@device_app.command("show")
def show_device_cmd(
    device_id: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """One device: tags, online state, desired state, and each module's reported state."""
    with hub_client(hub, token) as client:
        d = client.get_json(f"/api/v1/devices/{device_id}")
    if as_json:
        print_json(d)
        return
    status = "revoked" if d["revoked"] else ("online" if d["online"] else "offline")
    console.print(f"[bold]{d['id']}[/]  {status}  tags {tags_text(d['tags'])}", highlight=False)
    console.print(
        f"last seen {when(d['last_seen'])}  agent {d['agent_version'] or '-'}  "
        f"desired generation {d['generation']} (expires {when(d['desired_expires'])})",
        highlight=False,
    )
    table = Table("service", "state", "reason", "port", "restarts", "since")
    reported = {m["service"]: m for m in d["modules"]}
    for name in sorted(set(d["services"]) | set(reported)):
        m = reported.get(name)
        suffix = "" if name in d["services"] else " (not desired)"
        table.add_row(
            name + suffix,
            state_text(m["state"] if m else None),
            (m or {}).get("reason") or "",
            str((m or {}).get("port") or "-"),
            str((m or {}).get("restarts", 0)),
            when((m or {}).get("since")),
        )
    console.print(table)


@device_app.command("tag")
def tag_device_cmd(
    device_id: str,
    tags: Annotated[list[str] | None, typer.Argument(help="key=value to set")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="tag key to remove")] = None,
    replace: Annotated[bool, typer.Option(help="drop every tag not given here")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a device's tags; the services it runs follow (selectors are re-evaluated)."""
    body = {"set": parse_pairs(tags, "tag"), "remove": remove or [], "replace": replace}
    with hub_client(hub, token) as client:
        change = client.request("PATCH", f"/api/v1/devices/{device_id}", json=body).json()
        device = client.get_json(f"/api/v1/devices/{device_id}")
    if as_json:
        print_json({"change": change, "device": device})
        return
    console.print(f"{device_id} tags now {tags_text(device['tags'])}", highlight=False)
    print_change(change)


@device_app.command("revoke")
def revoke_device_cmd(
    device_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Refuse the device's credentials and withdraw its desired state."""
    if not yes and not as_json:
        typer.confirm(f"revoke device {device_id}? Its services stop being desired", abort=True)
    with hub_client(hub, token) as client:
        change = client.post_json(f"/api/v1/devices/{device_id}/revoke")
    if as_json:
        print_json(change)
        return
    console.print(f"device {device_id} revoked", highlight=False)


def print_change(change: dict[str, Any]) -> None:
    issued = change["issued"]
    if not issued:
        console.print("no device's desired state changed")
        return
    listed = ", ".join(f"{d} (generation {g})" for d, g in sorted(issued.items()))
    console.print(f"new desired state for {listed}", highlight=False)
    if change["published"] is False:
        console.print(
            "[yellow]not published over MQTT[/] (devices will fetch it over HTTP): "
            + change["publish_errors"][0],
            highlight=False,
        )


# --- deploy and services ---------------------------------------------------------------------


def parse_targets(targets: list[str]) -> list[str]:
    ids: list[str] = []
    for text in targets:
        kind, sep, value = text.partition(":")
        if kind != "device" or not sep or not value:
            raise ConfigError(f"--target {text!r}: write it as device:ID (repeat for several devices)")
        ids.append(value)
    return ids


@app.command("deploy")
def deploy_cmd(
    name: Annotated[str, typer.Option("--name", "-n", help="service name")],
    module: Annotated[str, typer.Option("--module", "-m", help="NAME:VERSION of a pushed module")],
    dc: Annotated[
        Path | None, typer.Option("--dc", help="deploymentconfig.json (Azure ML v1 schema)")
    ] = None,
    target: Annotated[list[str] | None, typer.Option("--target", help="device:ID, repeatable")] = None,
    selector: Annotated[str | None, typer.Option(help="tag selector, e.g. site=berlin,tier=gpu")] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deploy (or update) a service: a module version with its config to devices."""
    mod_name, version = split_ref(module, need_version=True)
    if (target is None) == (selector is None):
        raise ConfigError("give either --target device:ID (repeatable) or --selector k=v,...")
    body: dict[str, Any] = {
        "module": mod_name,
        "version": version,
        "target": {"devices": parse_targets(target)} if target else {"selector": selector},
    }
    if dc is not None:
        body["deployment_config"] = load_json_file(dc)
    with hub_client(hub, token) as client:
        result = client.request("PUT", f"/api/v1/deployments/{name}", json=body).json()
    if as_json:
        print_json(result)
        return
    dep = result["deployment"]
    verb = "created" if result["created"] else "updated"
    console.print(
        f"service [bold]{name}[/] {verb}: {dep['module']}:{dep['version']} on port "
        f"{dep['settings']['port']} to {target_text(dep['target'])} "
        f"({len(dep['devices'])} device(s))",
        highlight=False,
    )
    print_change(result)
    console.print(f"follow it with: edgepack service wait {name}")


@service_app.command("list")
def list_services_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Services with their module, target and rolled-up state."""
    with hub_client(hub, token) as client:
        services = client.get_json("/api/v1/deployments")["deployments"]
    if as_json:
        print_json(services)
        return
    table = Table("service", "module", "port", "target", "devices", "state")
    for s in services:
        healthy = sum(1 for d in s["devices"] if d["state"] == "Healthy")
        table.add_row(
            s["name"],
            f"{s['module']}:{s['version']}",
            str(s["settings"]["port"]),
            target_text(s["target"]),
            f"{healthy}/{len(s['devices'])} healthy",
            state_text(s["state"]),
        )
    console.print(table)


def devices_table(service: dict[str, Any]) -> Table:
    table = Table("device", "online", "state", "reason")
    for d in service["devices"]:
        table.add_row(
            d["device_id"],
            Text("online", "green") if d["online"] else Text("offline", "red"),
            state_text(d["state"]),
            d["reason"] or "",
        )
    return table


@service_app.command("show")
def show_service_cmd(
    name: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """One service: module, settings, target and its state on every device."""
    with hub_client(hub, token) as client:
        s = client.get_json(f"/api/v1/deployments/{name}")
    if as_json:
        print_json(s)
        return
    console.print(
        f"[bold]{s['name']}[/]  {s['module']}:{s['version']}  port {s['settings']['port']}  "
        f"runtime {s['settings']['runtime']}  {target_text(s['target'])}",
        highlight=False,
    )
    console.print(Text.assemble("state ", state_text(s["state"])))
    console.print(devices_table(s))


@service_app.command("delete")
def delete_service_cmd(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a service; its devices stop running it."""
    if not yes and not as_json:
        typer.confirm(f"delete service {name} from every device?", abort=True)
    with hub_client(hub, token) as client:
        change = client.request("DELETE", f"/api/v1/deployments/{name}").json()
    if as_json:
        print_json(change)
        return
    console.print(f"service {name} deleted", highlight=False)
    print_change(change)


def settled(service: dict[str, Any]) -> bool:
    return bool(service["devices"]) and all(d["state"] in FINAL for d in service["devices"])


def wait_view(service: dict[str, Any], elapsed: float) -> Group:
    header = Text.assemble(
        (service["name"], "bold"),
        f"  {service['module']}:{service['version']}  ",
        state_text(service["state"]),
        f"  {elapsed:.0f}s",
    )
    return Group(header, devices_table(service))


def poll_service(client: HubClient, name: str) -> dict[str, Any]:
    service: dict[str, Any] = client.get_json(f"/api/v1/deployments/{name}")
    return service


@service_app.command("logs")
def logs_cmd(
    name: str,
    device: Annotated[str, typer.Option("--device", help="the device whose module log to show")],
    tail: Annotated[int, typer.Option("--tail", min=1, max=10_000, help="how many lines")] = 100,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """The last lines a service's module logged on one device (fetched through the hub)."""
    with hub_client(hub, token) as client:
        body = client.get_json(f"/api/v1/deployments/{name}/logs", params={"device": device, "tail": tail})
    if as_json:
        print_json(body)
        return
    if body["truncated"]:
        console.print("[dim](older lines left out to fit one message)[/]")
    for line in body["lines"]:
        console.out(line, highlight=False)


@service_app.command("wait")
def wait_service_cmd(
    name: str,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 600,
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show each device's state live until all are final; exit 0 only if all are Healthy."""
    start = time.monotonic()
    with hub_client(hub, token) as client:
        service = poll_service(client, name)
        if not service["devices"]:
            raise RuntimeFailure(
                f"service {name} targets no device ({target_text(service['target'])}); "
                "enroll or tag a device so that it matches"
            )
        with Live(wait_view(service, 0), console=console, transient=as_json, auto_refresh=False) as live:
            while not settled(service) and time.monotonic() - start < timeout:
                time.sleep(interval)
                service = poll_service(client, name)
                live.update(wait_view(service, time.monotonic() - start), refresh=True)
    if as_json:
        print_json(service)
    if not settled(service):
        pending = [d["device_id"] for d in service["devices"] if d["state"] not in FINAL]
        raise RuntimeFailure(
            f"service {name} did not settle within {timeout:g}s: still {service['state']} on "
            f"{', '.join(pending)}; check 'edgepack device show' for those devices"
        )
    failed = [d for d in service["devices"] if d["state"] != "Healthy"]
    if failed:
        first = failed[0]
        raise RuntimeFailure(
            f"service {name} is {service['state']}: {len(failed)} device(s) failed, first "
            f"{first['device_id']}: {first['reason'] or 'no reason reported'}"
        )
    if not as_json:
        console.print(f"[green]service {name} is Healthy on {len(service['devices'])} device(s)[/]")
