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
        Path | None, typer.Option(help="the hub's data dir (default $EDGEPACK_HOME/hub)")
    ] = None,
    db: Annotated[str | None, typer.Option(help="the hub's SQLAlchemy URL")] = None,
    topic_prefix: Annotated[str, typer.Option(help="MQTT topic prefix, as the hub's")] = "edgepack",
    listen: Annotated[str, typer.Option(help="address Mosquitto listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port Mosquitto listens on")] = 1883,
    run_as: Annotated[
        str | None, typer.Option(help="user Mosquitto runs as (default: you, who owns the files)")
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="make a CA and certificates; the broker listens with TLS only")
    ] = False,
    hub_host: Annotated[
        list[str] | None, typer.Option(help="name or address devices use for the hub (repeatable)")
    ] = None,
    hub_port: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="also listen on 127.0.0.1:PORT for hub replicas sharing one broker user"
        ),
    ] = None,
    broker_host: Annotated[
        list[str] | None,
        typer.Option(help="name or address devices use for the broker (repeatable; default --listen)"),
    ] = None,
) -> None:
    """Generate a Mosquitto config whose accounts and ACL follow the hub's devices.

    With --tls, also a small CA in the hub's data dir (<data_dir>/tls/ca.crt, handed to devices
    at enrolment), the hub's HTTPS certificate and the broker's.
    """
    from cloud_hub.broker.mosquitto import prepare_broker_tls, write_broker_config
    from cloud_hub.settings import HubSettings

    settings = HubSettings(broker_dir=out, topic_prefix=topic_prefix)
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    if db is not None:
        settings = settings.model_copy(update={"db": db})
    broker_tls = None
    tls_flags = ""
    if tls:
        broker_tls, ca_cert = prepare_broker_tls(
            settings,
            hub_hosts=hub_host or ["localhost", "127.0.0.1"],
            broker_hosts=broker_host or sorted({listen, "localhost", "127.0.0.1"}),
        )
        tls_flags = f" --mqtt-tls-ca {ca_cert}"
        console.print(f"wrote the CA {ca_cert} (give it to clients: edgepack login --ca ...)")
    conf = write_broker_config(
        settings,
        port=port,
        host=listen,
        run_as=run_as or getpass.getuser(),
        tls=broker_tls,
        hub_port=hub_port,
    )
    pid_file = out.resolve() / "mosquitto.pid"
    console.print(f"wrote {conf}, {out / 'passwd'}, {out / 'acl'}")
    console.print(f"start the broker:  mosquitto -c {conf.resolve()} -d")
    console.print(
        "start the hub:     "
        f"edgepack hub serve --data-dir {settings.data_dir} --mqtt-host {listen} --mqtt-port {port} "
        f"--broker-dir {out.resolve()} --broker-pid-file {pid_file} --topic-prefix {topic_prefix}"
        + tls_flags
    )
