"""``edgepack hub webhook add|list|remove|dead|replay``: the hub's event subscriptions.

The SDK (``packager.sdk.Webhook``) talks to the hub; these commands read options and print.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from packager.app import console
from packager.commands.options import HubOption, JsonOption, TokenOption, connect, parse_pairs
from packager.commands.output import print_json
from packager.commands.registry_cmds import hub_app
from packager.display import safe_text
from packager.sdk import Webhook

webhook_app = typer.Typer(
    help="Send the hub's events to URLs, as signed CloudEvents (docs/webhooks.md).", no_args_is_help=True
)
hub_app.add_typer(webhook_app, name="webhook")

IdArgument = Annotated[str, typer.Argument(help="subscription id (wh_..., see 'edgepack hub webhook list')")]


@webhook_app.command("add")
def add_cmd(
    url: Annotated[str, typer.Argument(help="the receiver's http:// or https:// URL")],
    event: Annotated[
        list[str] | None,
        typer.Option("--event", help="event type, e.g. model.registered (repeatable; none: every type)"),
    ] = None,
    filter_: Annotated[
        list[str] | None,
        typer.Option("--filter", help="service=NAME or device=ID: only events about it (repeatable)"),
    ] = None,
    hub: HubOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Subscribe a URL; prints its signing secret, which the hub shows only this once."""
    filters = parse_pairs(filter_, "filter")
    with connect(hub, token) as connected:
        record = Webhook.add(connected, url, events=event or [], filters=filters)
    if as_json:
        print_json(record.raw)
        return
    console.print(f"[green]subscribed[/] {record.id} → {safe_text(record.url)}")
    console.print(f"events   {', '.join(record.events) or 'all'}")
    console.print(f"secret   {record.secret}  (shown once: receivers verify deliveries with it)")


@webhook_app.command("list")
def list_cmd(hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """The hub's webhook subscriptions (without their secrets)."""
    with connect(hub, token) as connected:
        records = Webhook.list(connected)
    if as_json:
        print_json([r.raw for r in records])
        return
    table = Table("ID", "URL", "EVENTS", "FILTERS")
    for r in records:
        filters = ",".join(f"{k}={v}" for k, v in sorted(r.filters.items()))
        table.add_row(r.id, safe_text(r.url), ", ".join(r.events) or "all", safe_text(filters) or "-")
    console.print(table)


@webhook_app.command("remove")
def remove_cmd(webhook_id: IdArgument, hub: HubOption = None, token: TokenOption = None) -> None:
    """Delete a subscription and its pending and dead deliveries."""
    with connect(hub, token) as connected:
        Webhook.remove(connected, webhook_id)
    console.print(f"[green]removed[/] {webhook_id}")


@webhook_app.command("dead")
def dead_cmd(
    webhook_id: IdArgument, hub: HubOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """The deliveries the hub gave up on (dead letters), oldest first."""
    with connect(hub, token) as connected:
        letters = Webhook.dead(connected, webhook_id)
    if as_json:
        print_json([d.raw for d in letters])
        return
    table = Table("DELIVERY", "EVENT ID", "SUBJECT", "ATTEMPTS", "LAST ERROR")
    for d in letters:
        error = safe_text(d.last_error or "")
        table.add_row(str(d.id), d.message_id, safe_text(d.subject), str(d.attempts), error)
    console.print(table)


@webhook_app.command("replay")
def replay_cmd(
    webhook_id: IdArgument,
    delivery: Annotated[
        list[int] | None, typer.Option("--delivery", help="only this dead letter (repeatable; none: all)")
    ] = None,
    hub: HubOption = None,
    token: TokenOption = None,
) -> None:
    """Send dead letters again, with a fresh retry window."""
    with connect(hub, token) as connected:
        count = Webhook.replay(connected, webhook_id, delivery)
    console.print(f"[green]replayed[/] {count} dead letter(s) of {webhook_id}")
