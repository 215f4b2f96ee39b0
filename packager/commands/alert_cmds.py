"""``edgepack hub alert …``: the hub's alert rules and the alerts firing now."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from packager.app import console
from packager.commands.options import HubOption, JsonOption, TokenOption, connect
from packager.commands.output import print_json, when
from packager.commands.registry_cmds import hub_app
from packager.display import safe_text

alert_app = typer.Typer(
    help="Alert rules evaluated on the hub, and the alerts firing now.", no_args_is_help=True
)
hub_app.add_typer(alert_app, name="alert")


@alert_app.command("add")
def add_cmd(
    condition: Annotated[
        str,
        typer.Argument(help="e.g. 'error_rate > 1% for 5m', 'p95_ms > 50 for 10m', 'device offline > 15m'"),
    ],
    name: Annotated[str, typer.Option("--name", help="the rule's name (unique)")],
    service: Annotated[
        str | None, typer.Option("--service", help="only this service (default: every one)")
    ] = None,
    severity: Annotated[str, typer.Option("--severity", help="info, warning or critical")] = "warning",
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add an alert rule; it fires and resolves as events (alert.fired, alert.resolved)."""
    with connect(hub, token) as connected:
        rule = connected.alerts.add(condition, name=name, service=service, severity=severity)
    if as_json:
        print_json(rule.raw)
        return
    scope = f"service {rule.service}" if rule.service else "every service"
    console.print(
        f"added alert rule {safe_text(rule.name)}: {safe_text(rule.condition)} on {safe_text(scope)}"
    )


@alert_app.command("list")
def list_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """The alert rules."""
    with connect(hub, token) as connected:
        rules = connected.alerts.rules()
    if as_json:
        print_json([r.raw for r in rules])
        return
    table = Table("rule", "condition", "service", "severity")
    for r in rules:
        table.add_row(
            safe_text(r.name), safe_text(r.condition), safe_text(r.service or "(every)"), r.severity
        )
    console.print(table)


@alert_app.command("remove")
def remove_cmd(name: str, hub: HubOption = None, token: TokenOption = None) -> None:
    """Remove an alert rule."""
    with connect(hub, token) as connected:
        connected.alerts.remove(name)
    console.print(f"removed alert rule {safe_text(name)}")


@alert_app.command("active")
def active_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """The alerts firing now, newest first."""
    with connect(hub, token) as connected:
        alerts = connected.alerts.active()
    if as_json:
        print_json([a.raw for a in alerts])
        return
    if not alerts:
        console.print("no alert is firing")
        return
    table = Table("since", "rule", "severity", "about", "value")
    for a in alerts:
        about = f"device {a.device_id}" if a.device_id else f"service {a.service}"
        table.add_row(
            when(a.fired_at), safe_text(a.rule), a.severity, safe_text(about), safe_text(a.value or "")
        )
    console.print(table)
