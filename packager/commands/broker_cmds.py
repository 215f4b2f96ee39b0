"""``edgepack hub broker-config``: a Mosquitto config for the hub's fleet, ready to start.

Writes ``mosquitto.conf``, the password file and the ACL (from the devices in the hub's
database) into one folder, and prints how to start Mosquitto and the hub so that the hub keeps
those files current after every enrolment and revocation.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer

from packager.app import console
from packager.commands.registry_cmds import hub_app


@hub_app.command("broker-config")
def broker_config_cmd(
    out: Annotated[Path, typer.Option("--out", help="folder for mosquitto.conf, passwd and acl")],
    data_dir: Annotated[
        Path | None, typer.Option(help="the hub's data dir (default ~/.edgepack/hub)")
    ] = None,
    db: Annotated[str | None, typer.Option(help="the hub's SQLAlchemy URL")] = None,
    listen: Annotated[str, typer.Option(help="address Mosquitto listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port Mosquitto listens on")] = 1883,
    run_as: Annotated[
        str | None, typer.Option(help="user Mosquitto runs as (default: you, who owns the files)")
    ] = None,
) -> None:
    """Generate a Mosquitto config whose accounts and ACL follow the hub's devices."""
    from cloud_hub.broker.mosquitto import CONFIG_FILE, render_config, sync_broker
    from cloud_hub.context import HubContext
    from cloud_hub.settings import HubSettings

    values: dict[str, object] = {"broker_dir": out}
    if data_dir is not None:
        values["data_dir"] = data_dir
    if db is not None:
        values["db"] = db
    settings = HubSettings(**values)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    pid_file = out / "mosquitto.pid"
    ctx = HubContext.open(settings)
    try:
        sync_broker(ctx)
    finally:
        ctx.close()
    user = run_as or getpass.getuser()
    conf = render_config(out, port=port, host=listen, run_as=user, persistence=True, pid_file=pid_file)
    (out / CONFIG_FILE).write_text(conf)
    console.print(f"wrote {out / CONFIG_FILE}, {out / 'passwd'}, {out / 'acl'}")
    console.print(f"start the broker:  mosquitto -c {(out / CONFIG_FILE).resolve()} -d")
    console.print(
        f"start the hub:     EDGEPACK_HUB_BROKER_PID_FILE={pid_file.resolve()} edgepack hub serve "
        f"--data-dir {settings.data_dir} --mqtt-host {listen} --mqtt-port {port} --broker-dir {out.resolve()}"
    )
