"""Hub commands for the fleet: devices, deployments (services), waiting for a rollout.

``edgepack deploy`` is the Azure ML ``deploy`` step for a fleet: one module version, a
``deploymentconfig.json`` as it is, and a target (device ids or a tag selector); with ``--ic``
it is ``az ml model deploy``: a registered model and an entry script, built, signed, pushed and
deployed in one command. ``edgepack service wait`` is ``wait_for_deployment(show_output=True)``:
live per-device state until every device is final, exit code 0 only when the service ended
Healthy. Every command calls the SDK (``packager.sdk``) and prints what it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from manifests.errors import ConfigError
from manifests.rollout import RolloutSpec, parse_rollout
from packager.app import app, console, err_console
from packager.commands.options import (
    HubOption,
    JsonOption,
    TokenOption,
    confirm,
    connect,
    model_version,
    parse_pairs,
    parse_target,
    request_body,
    split_ref,
)
from packager.commands.output import print_change, print_json, when
from packager.display import safe_text, state_text
from packager.sdk import (
    DeploymentConfig,
    DeploymentFailed,
    Device,
    DeviceServiceState,
    InferenceConfig,
    Model,
    Service,
    save_credentials,
)
from packager.sdk.data import delete_service_data, download_service_data
from packager.sdk.device_file import CredentialsFiles, check_out_dir, parse_device_file
from packager.sdk.enrolment import ProvisioningToken, ProvisioningTokens, parse_duration
from packager.sdk.live import LiveServiceView, StateLines, devices_table, tags_text, target_text

device_app = typer.Typer(help="Enroll, list, show, tag and revoke devices.", no_args_is_help=True)
app.add_typer(device_app, name="device")
service_app = typer.Typer(
    help="List, show, delete and wait for deployed services; download their collected data.",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")


# --- devices ---------------------------------------------------------------------------------


@device_app.command("enroll")
def enroll_cmd(
    device_id: Annotated[str | None, typer.Argument(help="device id (letters, digits, . _ -)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="also write the credentials to this file (mode 0600) for the agent"),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file",
            help="enroll every device of a CSV file (columns id,tags; tags as k=v;k2=v2), all or none",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="with --from-file: write <id>.json (mode 0600) per device here"),
    ] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enroll a device and print its credentials ONCE (the hub keeps only hashes).

    With --from-file, enroll a whole list in one request (one broker reload) and write each
    device's credentials into --out-dir; a bad row refuses the whole file and writes nothing.
    """
    if from_file is not None:
        if device_id is not None or tag or out is not None:
            raise ConfigError("--from-file takes no device id, --tag or --out; put them in the file")
        if out_dir is None:
            raise ConfigError("--from-file needs --out-dir DIR: the credentials are shown only once")
        _enroll_file(from_file, out_dir, hub, token, as_json)
        return
    if device_id is None:
        raise ConfigError("give a device id, or --from-file devices.csv --out-dir DIR")
    if out_dir is not None:
        raise ConfigError("--out-dir goes with --from-file; for one device use --out FILE")
    tags = parse_pairs(tag, "tag")
    with connect(hub, token) as connected:
        creds = Device.enroll(connected, device_id, tags=tags)
    if out is not None:
        save_credentials(creds, out)
    if as_json:
        print_json(creds.model_dump(mode="json", by_alias=True, exclude_none=True))
        return
    lines = [
        f"device        {device_id}  ({tags_text(tags)})",
        f"hub           {creds.hub_url}",
        f"HTTP token    {creds.token}",
        f"MQTT          {creds.mqtt.host or '(no broker)'}:{creds.mqtt.port}  user {creds.mqtt.username}",
        f"MQTT password {creds.mqtt.password}",
        f"hub key id    {creds.hub_key.keyid}",
        f"publishers    {len(creds.publishers.keys)} trusted key(s)",
    ]
    console.print(Panel(Text("\n").join(safe_text(line) for line in lines), title="enrolled", expand=False))
    where = f"saved to {out}" if out else "copy them now"
    console.print(f"[yellow]These credentials are shown only once[/] ({where}).")


def _enroll_file(path: Path, out_dir: Path, hub: str | None, token: str | None, as_json: bool) -> None:
    """Every row checked and every target file free before the one request; then the files."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's export may start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    rows = parse_device_file(text, name=path.name)
    check_out_dir(out_dir, rows, name=path.name)
    with CredentialsFiles(out_dir, [r.device_id for r in rows]) as files:
        with connect(hub, token) as connected:
            documents = Device.enroll_many(connected, [(r.device_id, r.tags) for r in rows])
        paths = files.save(documents)
    if as_json:
        print_json({"enrolled": len(paths), "credentials": [str(p) for p in paths]})
        return
    console.print(f"enrolled {len(paths)} device(s) from {path}; credentials in {out_dir}/<id>.json (0600)")
    console.print("[yellow]These credentials are shown only once[/] (the hub keeps only hashes).")


@device_app.command("list")
def list_devices_cmd(
    selector: Annotated[str | None, typer.Option(help="only devices matching k=v,...")] = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="include revoked devices")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Devices with their tags, online state and services."""
    with connect(hub, token) as connected:
        devices = [d.record.raw for d in Device.list(connected, selector, include_revoked=include_revoked)]
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
            safe_text(d["id"]),
            safe_text(tags_text(d["tags"])),
            online,
            when(d["last_seen"]),
            safe_text(d["agent_version"] or "-"),
            str(d["generation"]),
            safe_text(", ".join(d["services"]) or "-"),
        )
    console.print(table)


@device_app.command("show")
def show_device_cmd(
    device_id: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """One device: tags, online state, desired state, and each module's reported state."""
    with connect(hub, token) as connected:
        d: dict[str, Any] = Device(connected, device_id).record.raw
    if as_json:
        print_json(d)
        return
    status = "revoked" if d["revoked"] else ("online" if d["online"] else "offline")
    console.print(
        Text.assemble(safe_text(d["id"], "bold"), f"  {status}  tags ", safe_text(tags_text(d["tags"])))
    )
    console.print(
        safe_text(
            f"last seen {when(d['last_seen'])}  agent {d['agent_version'] or '-'}  "
            f"desired generation {d['generation']} (expires {when(d['desired_expires'])})"
        )
    )
    if d.get("last_error"):
        console.print(Text.assemble(("last error:", "red"), " ", safe_text(d["last_error"])))
    creds = d.get("credentials")
    if creds:  # a hub from before credential rotation does not say
        line = f"credentials generation {creds['generation']} (broker user {creds['mqtt_username']}"
        line += f", rotated {when(creds['rotated_at'])})" if creds.get("rotated_at") else ")"
        if creds.get("rotation_requested"):
            since = when(creds["rotation_requested"])
            line += f"  rotation in flight since {since}: {creds['rotation_stage']}"
        console.print(safe_text(line))
    if "state" in d:  # a hub from before the roll-up's one home does not say
        console.print(Text.assemble("state ", state_text(d["state"])))
    table = Table("service", "state", "reason", "port", "restarts", "since")
    reported = {m["service"]: m for m in d["modules"]}
    # The hub's word for each assigned service (Pending until reported); a module the device
    # still reports but is no longer assigned shows as the device reported it.
    judged = {j["service"]: j for j in d.get("service_states", [])}
    for name in sorted(set(d["services"]) | set(reported) | set(judged)):
        m = reported.get(name)
        here = judged.get(name) or m or {}
        suffix = "" if name in d["services"] or name in judged else " (not desired)"
        table.add_row(
            safe_text(name + suffix),
            state_text(here.get("state")),
            safe_text(here.get("reason") or ""),
            safe_text((m or {}).get("port") or "-"),
            safe_text((m or {}).get("restarts", 0)),
            safe_text(when((m or {}).get("since"))),
        )
    console.print(table)
    for name in sorted(reported):
        m = reported[name]
        if m.get("failure"):
            print_failure(f"{name} version {m.get('version') or '?'} on {d['id']}", m["failure"])


def print_failure(title: str, failure: dict[str, Any]) -> None:
    """A failed service's detail under its one-line reason: the traceback, then the last
    lines its instance wrote, each line as text (escaped), never as markup."""
    for label, key in (("traceback", "traceback"), ("last output", "log_tail")):
        text = failure.get(key)
        if not text:
            continue
        console.print(Text.assemble((f"{label} of ", "bold"), safe_text(title, "bold")))
        for line in str(text).splitlines():
            console.print(Text.assemble("  ", safe_text(line)), soft_wrap=True)


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
    new = parse_pairs(tags, "tag")
    with connect(hub, token) as connected:
        device = Device(connected, device_id)
        change = device.tag(new, remove=remove or [], replace=replace)
    if as_json:
        print_json({"change": change.raw, "device": device.record.raw})
        return
    console.print(safe_text(f"{device_id} tags now {tags_text(device.tags)}"))
    print_change(change.raw)


@device_app.command("rotate")
def rotate_device_cmd(
    device_id: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Rotate the device's credentials: it makes a new key, gets new credentials over its
    current session and switches to them; the old ones work until it confirms."""
    with connect(hub, token) as connected:
        requested = Device(connected, device_id).rotate_credentials()
    if as_json:
        print_json({"device_id": device_id, "rotation_requested": requested.isoformat()})
        return
    console.print(
        f"device {device_id}: credentials rotation requested; the device switches at its next "
        "desired-state check ('edgepack device show' says when it is done)",
        highlight=False,
    )


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
        confirm(f"revoke device {device_id}? Its services stop being desired", f"revoke device {device_id}")
    with connect(hub, token) as connected:
        change = Device(connected, device_id).revoke()
    if as_json:
        print_json(change.raw)
        return
    console.print(f"device {device_id} revoked", highlight=False)


# --- deploy and services ---------------------------------------------------------------------


@app.command("deploy")
def deploy_cmd(
    name: Annotated[str, typer.Option("--name", "-n", help="service name")],
    module: Annotated[
        str | None,
        typer.Option(
            "--module",
            "-m",
            help="NAME:VERSION of a pushed module (with --ic: of a registered model; leave it out "
            "when the model lies in the source directory)",
        ),
    ] = None,
    dc: Annotated[
        Path | None, typer.Option("--dc", help="deploymentconfig.json (Azure ML v1 schema)")
    ] = None,
    ic: Annotated[
        Path | None,
        typer.Option(
            "--ic", help="inferenceconfig.json: build a module of model -m and the entry script, deploy it"
        ),
    ] = None,
    target: Annotated[list[str] | None, typer.Option("--target", help="device:ID, repeatable")] = None,
    selector: Annotated[str | None, typer.Option(help="tag selector, e.g. site=berlin,tier=gpu")] = None,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="all (every device at once, the default) or waves")
    ] = None,
    waves: Annotated[
        str | None, typer.Option("--waves", help="gated waves, cumulative shares, e.g. 1%,10%,50%,100%")
    ] = None,
    bake: Annotated[str | None, typer.Option("--bake", help="how long each wave bakes, e.g. 2m")] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate", help="e.g. error_rate<1% or p95_ms<1.5x (vs the previous version); repeatable"
        ),
    ] = None,
    on_failure: Annotated[
        str | None, typer.Option("--on-failure", help="rollback (default) or halt, when a wave breaks a gate")
    ] = None,
    spread_by: Annotated[
        str | None, typer.Option("--spread-by", help="a tag key: every wave takes each value's share")
    ] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deploy (or update) a service: a module version with its config to devices.

    With --waves a new version of a running service reaches its devices wave by wave; each wave
    bakes, and a wave that breaks a gate (or whose devices fail) halts the rollout and, unless
    --on-failure halt, rolls it back (docs/rollouts.md; follow it with 'edgepack service rollout
    NAME status').

    With --ic, -m names a registered model: its files and the entry script's folder become a
    new module (signed with your key, only what the hub lacks is uploaded), as
    'az ml model deploy -m MODEL:VERSION --ic ... --dc ...' does. With --ic and no -m, the
    entry script's folder alone (a local model that lies in it, never registered), as
    'az ml model deploy --ic ... --dc ...' does.
    """
    ref_name = version = None
    if ic is None:
        if module is None:
            raise ConfigError(
                "deploy: give -m NAME:VERSION of a pushed module, or --ic inferenceconfig.json to build "
                "one from the entry script's folder"
            )
        hint = "; with --ic, -m names a registered model instead"
        ref_name, version = split_ref(module, need_version=True, kind="module", hint=hint)
    elif module is not None:
        ref_name, version = split_ref(module, need_version=True)
    where = parse_target(target, selector)
    rollout = _rollout_flags(strategy, waves, bake, gate, on_failure, spread_by)
    if rollout.staged and ic is not None:
        raise ConfigError("deploy: --waves stages a pushed module (-m NAME:VERSION without --ic)")
    config = DeploymentConfig.from_file(dc) if dc is not None else None
    inference = InferenceConfig.from_file(ic) if ic is not None else None
    with connect(hub, token) as connected:
        if inference is None:
            service = connected.deploy(
                name, f"{ref_name}:{version}", config, where, rollout=rollout if rollout.staged else None
            )
        else:
            models = (
                []
                if ref_name is None or version is None
                else [Model(connected, ref_name, model_version(version))]
            )
            service = Model.deploy(connected, name, models, inference, config, target=where, overwrite=True)
    assert service.deployed is not None
    result = service.deployed.raw
    if as_json:
        print_json(result if inference is None else {**result, "module_version": service.module_version})
        return
    for warning in result.get("warnings", []):
        err_console.print(Text.assemble(("warning:", "yellow"), " ", safe_text(warning)), soft_wrap=True)
    if inference is not None:
        source = (
            module
            if module is not None
            else f"{inference.document.source_directory or '.'} (no registered model)"
        )
        console.print(f"built module [bold]{name}:{service.module_version}[/] from {source}", highlight=False)
    dep = result["deployment"]
    verb = "created" if result["created"] else "updated"
    console.print(
        f"service [bold]{name}[/] {verb}: {dep['module']}:{dep['version']} on port "
        f"{dep['settings']['port']} to {target_text(dep['target'])} "
        f"({len(dep['devices'])} device(s))",
        highlight=False,
    )
    print_change(result)
    _say_offline(service.record.devices)
    if dep.get("rollout") and dep["rollout"]["state"] == "running" and rollout.staged:
        console.print(safe_text(dep["rollout"]["status"]))
        console.print(f"follow it with: edgepack service rollout {name} status")
        return
    console.print(f"follow it with: edgepack service wait {name}")


def _rollout_flags(
    strategy: str | None,
    waves: str | None,
    bake: str | None,
    gates: list[str] | None,
    on_failure: str | None,
    spread_by: str | None,
) -> RolloutSpec:
    """The deploy flags as the API's rollout object, checked as the hub checks it."""
    staged_flags = {"--bake": bake, "--gate": gates, "--on-failure": on_failure, "--spread-by": spread_by}
    if waves is None:
        if strategy == "waves":
            raise ConfigError("deploy --strategy waves needs --waves, e.g. --waves 1%,10%,50%,100%")
        given = [flag for flag, value in staged_flags.items() if value]
        if given:
            raise ConfigError(f"deploy {given[0]} needs --waves, e.g. --waves 1%,10%,50%,100%")
    if strategy not in (None, "all", "waves"):
        raise ConfigError(f"deploy --strategy {strategy!r}: use all or waves")
    if waves is not None and strategy == "all":
        raise ConfigError("deploy: --strategy all deploys at once; leave out --waves or use --strategy waves")
    raw: dict[str, object] = {"strategy": "all"} if waves is None else {"waves": waves}
    if waves is not None:
        extra = {"bake": bake, "on_failure": on_failure, "spread_by": spread_by}
        raw.update({key: value for key, value in extra.items() if value})
        raw["gates"] = list(gates or [])
    return parse_rollout(raw)


def _say_offline(devices: list[DeviceServiceState]) -> None:
    """A warning per targeted device that is offline: it gets the change only when its agent
    reconnects, so a deploy that 'worked' may not run anywhere yet."""
    for d in devices:
        if not d.online:
            said = f"{d.offline_text}; it gets this change when its agent reconnects"
            err_console.print(Text.assemble(("warning:", "yellow"), " ", safe_text(said)), soft_wrap=True)


@service_app.command("list")
def list_services_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Services with their module, target and rolled-up state."""
    with connect(hub, token) as connected:
        services = [s.record.raw for s in Service.list(connected)]
    if as_json:
        print_json(services)
        return
    table = Table("service", "module", "port", "target", "devices", "state")
    for s in services:
        healthy = sum(1 for d in s["devices"] if d["state"] == "Healthy")
        table.add_row(
            safe_text(s["name"]),
            safe_text(f"{s['module']}:{s['version']}"),
            str(s["settings"]["port"]),
            safe_text(target_text(s["target"])),
            f"{healthy}/{len(s['devices'])} healthy",
            state_text(s["state"]),
        )
    console.print(table)


@service_app.command("show")
def show_service_cmd(
    name: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """One service: module, settings, target and its state on every device."""
    with connect(hub, token) as connected:
        service = Service(connected, name)
    s: dict[str, Any] = service.record.raw
    uris = {"scoring_uri": service.scoring_uri, "swagger_uri": service.swagger_uri}
    if as_json:
        print_json({**s, **uris})
        return
    console.print(
        Text.assemble(
            safe_text(s["name"], "bold"),
            safe_text(
                f"  {s['module']}:{s['version']}  port {s['settings']['port']}  "
                f"runtime {s['settings']['runtime']}  {target_text(s['target'])}"
            ),
        )
    )
    console.print(Text.assemble("state ", state_text(s["state"])))
    if s.get("rollout"):
        console.print(Text.assemble("rollout ", safe_text(s["rollout"]["status"])))
    for label, uri in uris.items():
        console.print(f"{label}  {uri or '- (on no Healthy device yet)'}", highlight=False, soft_wrap=True)
    console.print(devices_table(service.record))
    for d in s["devices"]:
        if d.get("failure"):
            print_failure(f"{s['name']} version {s['version']} on {d['device_id']}", d["failure"])


@service_app.command("keys")
def service_keys_cmd(
    name: str,
    regenerate: Annotated[
        str | None, typer.Option(help="replace one key: primary or secondary (the other keeps working)")
    ] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show (or regenerate) the endpoint keys of a service deployed with authEnabled.

    Callers send one as 'Authorization: Bearer KEY' (edgepack call --key KEY); devices switch to
    a regenerated key without restarting the service.
    """
    if regenerate is not None and regenerate not in ("primary", "secondary"):
        raise ConfigError(f"--regenerate {regenerate!r}: give primary or secondary")
    with connect(hub, token) as connected:
        service = Service(connected, name)
        if regenerate is None:
            keys, change = service.keys().raw, None
        else:
            change = service.regen_key(regenerate).raw
            keys = change["keys"]
    if as_json:
        print_json(keys if change is None else change)
        return
    console.print(f"primary    {keys['primary']}", highlight=False)
    console.print(f"secondary  {keys['secondary']}", highlight=False)
    if change is not None:
        print_change(change)


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
        confirm(f"delete service {name} from every device?", f"delete service {name}")
    with connect(hub, token) as connected:
        change = Service(connected, name).delete()
    if as_json:
        print_json(change.raw)
        return
    console.print(f"service {name} deleted", highlight=False)
    print_change(change.raw)


@service_app.command("rollback")
def rollback_service_cmd(
    name: str,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Redeploy a service's previous module version (the one pushed before its current one),
    with the same settings and target."""
    with connect(hub, token) as connected:
        answer = Service(connected, name).rollback()
    if as_json:
        print_json(answer.raw)
        return
    module = answer.deployment.module
    console.print(f"service {name} rolled back to {module}:{answer.version}", highlight=False)
    print_change(answer.raw)


@service_app.command("rollout")
def rollout_cmd(
    name: str,
    action: Annotated[str, typer.Argument(help="status, resume, promote or abort")] = "status",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask (abort, promote)")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """A service's rollout: its status line, or resume a halted one (its wave is judged
    again), promote the next wave now, or abort (every device back on the previous version)."""
    if action not in ("status", "resume", "promote", "abort"):
        raise ConfigError(f"service rollout {name} {action!r}: use status, resume, promote or abort")
    if action in ("promote", "abort") and not yes and not as_json:
        confirm(f"{action} the rollout of service {name}?", f"{action} the rollout of {name}")
    with connect(hub, token) as connected:
        service = Service(connected, name)
        rollout = service.rollout() if action == "status" else service.rollout_action(action)
    if as_json:
        print_json(rollout)
        return
    console.print(safe_text(rollout["status"]))
    waves = ",".join(f"{w:g}%" for w in rollout["waves"])
    gates = " ".join(rollout["gates"]) or "none"
    console.print(
        safe_text(
            f"{rollout['from_version']} -> {rollout['to_version']}  waves {waves}  "
            f"bake {rollout['bake_s']:g}s  gates {gates}  on failure {rollout['on_failure']}  "
            f"{rollout['devices_on_new']} device(s) on {rollout['to_version']}"
        )
    )


@service_app.command("logs")
def logs_cmd(
    name: str,
    device: Annotated[str, typer.Option("--device", help="the device whose module log to show")],
    tail: Annotated[int, typer.Option("--tail", min=1, max=10_000, help="how many lines")] = 100,
    failed: Annotated[
        bool,
        typer.Option("--failed", help="the log of the service's last failed instance (kept on the device)"),
    ] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """The last lines a service's module logged on one device (fetched through the hub): the
    serving version's, or with --failed those the last failed version left there."""
    with connect(hub, token) as connected:
        logs = Service(connected, name).logs(device, tail, failed=failed)
    if as_json:
        print_json(logs.raw)
        return
    # On stderr, as every note here: stdout holds the log lines alone, for a pipe.
    if failed:
        err_console.print(
            safe_text(f"(the log version {logs.version or '?'} left when it failed on {device})", "dim")
        )
    elif logs.failed_version is not None and logs.failed_version != logs.version:
        err_console.print(
            safe_text(
                f"(version {logs.version or '?'} serves on {device} and these are its lines; version "
                f"{logs.failed_version} failed there: add --failed for its log)",
                "dim",
            ),
            soft_wrap=True,
        )
    if logs.truncated:
        err_console.print("[dim](older lines left out: beyond --tail, or over a size limit)[/]")
    for line in logs.lines:
        # The hub escaped these already; a hub of another version may not have.
        console.print(safe_text(line), soft_wrap=True)


@service_app.command("data")
def data_cmd(
    name: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder the JSON lines are written under")],
    since: Annotated[
        str | None,
        typer.Option("--since", help="records from: 30m, 1h, 2d ago, a day (2026-12-01) or an ISO time"),
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="records before: as --since")] = None,
    designation: Annotated[
        str | None, typer.Option("--designation", help="inputs, predictions, or the name the module gave")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="only this model's records")] = None,
    device: Annotated[str | None, typer.Option("--device", help="only this device's records")] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download the production data a service's devices collected (Azure's ModelDataCollector)
    as JSON lines under --out, in Azure's layout: SERVICE/MODEL/VERSION/DESIGNATION/YYYY/MM/DD/."""
    with connect(hub, token) as connected:
        done = download_service_data(
            connected, name, out, since=since, until=until, designation=designation, model=model,
            device=device,
        )
    if as_json:
        print_json(
            {
                "batches": done.batches,
                "records": done.records,
                "bytes": done.bytes,
                "files": [str(f) for f in done.files],
                "dropped": done.dropped,
            }
        )
        return
    dropped = ", ".join(f"{d} dropped {n}" for d, n in sorted(done.dropped.items()))
    console.print(
        safe_text(
            f"{done.batches} batches, {done.records} records, {done.bytes} bytes of {name}'s data under {out}"
            + (f" (spools full: {dropped})" if dropped else "")
        ),
        soft_wrap=True,
    )


@service_app.command("delete-data")
def delete_data_cmd(
    name: str,
    device: Annotated[str | None, typer.Option("--device", help="only this device's data")] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="only what was received before: 30d ago, a day or an ISO time"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete the production data the hub holds for a service (deleting the service keeps it)."""
    what = f"the collected data of {name}" + (f" from {device}" if device else "")
    what += f" received before {until}" if until else ""
    if not yes and not as_json:
        confirm(f"delete {what}?", f"delete {what}")
    with connect(hub, token) as connected:
        deleted = delete_service_data(connected, name, device=device, until=until)
    if as_json:
        print_json({"deleted": deleted})
        return
    console.print(safe_text(f"deleted {deleted} batches: {what}"), soft_wrap=True)


@service_app.command("wait")
def wait_service_cmd(
    name: str,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 600,
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
    wait_offline: Annotated[
        bool,
        typer.Option("--wait-offline", help="keep waiting when every device still waited for is offline"),
    ] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show each device's state live until all are final; exit 0 only if all are Healthy.

    When every device still waited for is offline (after a 10 s grace for agents that are just
    connecting) it stops (exit 5, naming when each was last seen), unless --wait-offline.

    In a terminal the per-device table redraws at each poll; in a pipe or a log (CI, scripts)
    a line per device whose state changed, since a live table is drawn there only once, at the
    end, and the rollout's steps would be lost.
    """
    progress: LiveServiceView | StateLines | Literal[False]
    if console.is_terminal:
        progress = LiveServiceView(console, transient=as_json)
    else:
        progress = False if as_json else StateLines(console.file)
    with connect(hub, token) as connected:
        service = Service(connected, name)
        try:
            service.wait_for_deployment(
                timeout=timeout, interval=interval, progress=progress, wait_offline=wait_offline
            )
        except DeploymentFailed:
            if as_json and service.record.devices:
                print_json(service.record.raw)
            raise
    if as_json:
        print_json(service.record.raw)
    else:
        console.print(f"[green]service {name} is Healthy on {len(service.devices)} device(s)[/]")


@service_app.command("run")
def run_service_cmd(
    name: str,
    data: Annotated[str | None, typer.Option("--data", "-d", help="request body (JSON)")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="file holding the request body")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="the device to call (default: the first Healthy one)")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(envvar="EDGEPACK_SERVICE_KEY", help="endpoint key (default: the service's primary)"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer", min=0.1)] = 30.0,
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Score one request on a deployed service and print its JSON answer (Azure's service.run).

    The hub says where the service answers (a Healthy device's endpoint); the request goes
    there, with the primary key of an authEnabled service and over HTTPS for an sslEnabled
    one. Exit code 5 when the service's run() raised, 4 when it cannot be reached.
    """
    body = request_body(data, file)
    with connect(hub, token) as connected:
        answer = Service(connected, name).run(body.decode(), device, key=key, timeout=timeout)
    if isinstance(answer, str):
        console.print(answer, markup=False, highlight=False)
    else:
        console.print_json(data=answer)


# --- provisioning tokens (zero-touch enrolment) ----------------------------------------------

token_app = typer.Typer(
    help="Provisioning tokens: devices join with one by themselves ('edgepack agent join').",
    no_args_is_help=True,
)
device_app.add_typer(token_app, name="token")


def _token_row(t: ProvisioningToken) -> list[str]:
    state = "revoked" if t.revoked else "used up" if t.used >= t.uses else "active"
    return [t.id, f"{t.used}/{t.uses}", t.expires, state, tags_text(t.tags)]


@token_app.command("create")
def token_create_cmd(
    tag: Annotated[
        list[str] | None,
        typer.Option("--tags", "--tag", help="k=v[,k=v] given to each device ('{id}': its id)"),
    ] = None,
    uses: Annotated[int, typer.Option("--uses", help="devices that may join with it")] = 1,
    expires: Annotated[str, typer.Option("--expires", help="lifetime: 90m, 12h, 7d ...")] = "7d",
    approval: Annotated[
        bool, typer.Option("--approval", help="each join waits for 'edgepack device approve ID'")
    ] = False,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make a provisioning token and print it ONCE (the hub keeps only its sha256)."""
    tags = parse_pairs([p for t in tag or [] for p in t.split(",") if p], "tag")
    with connect(hub, token) as connected:
        lifetime = parse_duration(expires)
        made = ProvisioningTokens(connected).create(
            tags=tags, uses=uses, expires_in_s=lifetime, approval=approval
        )
    if as_json:
        print_json(vars(made))
        return
    console.print(
        safe_text(f"token {made.id}: {made.uses} use(s) until {made.expires}, tags {tags_text(made.tags)}")
    )
    console.print(safe_text(str(made.token)), highlight=False)
    console.print(
        "[yellow]The token is shown only once[/]; "
        "devices join with 'edgepack agent join URL --token-file FILE'."
    )


@token_app.command("list")
def token_list_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Every provisioning token: uses spent, expiry, state (never the token itself)."""
    with connect(hub, token) as connected:
        tokens = ProvisioningTokens(connected).list()
    if as_json:
        print_json({"tokens": [vars(t) for t in tokens]})
        return
    table = Table("id", "used", "expires", "state", "tags")
    for t in tokens:
        table.add_row(*(safe_text(c) for c in _token_row(t)))
    console.print(table)


@token_app.command("revoke")
def token_revoke_cmd(
    token_id: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """No device joins with the token from now on (devices that joined keep their credentials)."""
    with connect(hub, token) as connected:
        revoked = ProvisioningTokens(connected).revoke(token_id)
    if as_json:
        print_json(vars(revoked))
        return
    console.print(
        f"provisioning token {revoked.id} revoked ({revoked.used} device(s) joined with it)", highlight=False
    )


@device_app.command("pending")
def pending_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Devices whose join waits for approval (tokens made with --approval), and those rejected."""
    with connect(hub, token) as connected:
        waiting = ProvisioningTokens(connected).pending()
    if as_json:
        print_json({"pending": waiting})
        return
    table = Table("device", "token", "asked at", "state")
    for p in waiting:
        state = "rejected" if p["rejected"] else "waiting"
        table.add_row(*(safe_text(str(c)) for c in (p["device_id"], p["token_id"], p["asked_at"], state)))
    console.print(table)


@device_app.command("approve")
def approve_cmd(
    device_id: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Enrol a device whose join waits: it gets its credentials the next time it asks."""
    with connect(hub, token) as connected:
        done = ProvisioningTokens(connected).approve(device_id)
    if as_json:
        print_json(done)
        return
    console.print(safe_text(f"device {device_id} approved ({tags_text(done['tags'])})"), highlight=False)


@device_app.command("reject")
def reject_cmd(
    device_id: str, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Refuse a device's waiting join; it is told so the next time it asks."""
    with connect(hub, token) as connected:
        done = ProvisioningTokens(connected).reject(device_id)
    if as_json:
        print_json(done)
        return
    console.print(safe_text(f"the join of device {device_id} was rejected"), highlight=False)
