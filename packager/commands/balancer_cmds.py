"""``edgepack hub nginx-config``: one address in front of several hub replicas."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer

from packager.app import console
from packager.commands.registry_cmds import hub_app
from packager.files import atomic_output


@hub_app.command("nginx-config")
def nginx_config_cmd(
    out: Annotated[Path, typer.Option("--out", help="folder for nginx.conf, its logs and temp files")],
    replica: Annotated[list[str], typer.Option("--replica", help="a hub replica, HOST:PORT (repeat)")],
    listen: Annotated[str, typer.Option(help="address nginx listens on, HOST:PORT")] = "127.0.0.1:8800",
    run_as: Annotated[
        str | None, typer.Option(help="user nginx's workers run as (default: you)")
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            help="the blob store's S3 endpoint as the hubs use it: nginx then sends device blob "
            "downloads from S3 itself (run the hubs with EDGEPACK_HUB_DOWNLOAD_OFFLOAD=nginx)"
        ),
    ] = None,
    blob_dir: Annotated[
        Path | None,
        typer.Option(
            help="the hubs' file blob store (their data dir's 'blobs', or the folder of "
            "--blob-store file:///FOLDER), readable by nginx's user: nginx then sends device blob "
            "downloads from it itself (run the hubs with EDGEPACK_HUB_DOWNLOAD_OFFLOAD=nginx)"
        ),
    ] = None,
) -> None:
    """Write an nginx.conf that balances over the replicas (all share one database and store)."""
    from cloud_hub.balancer.nginx import Upstream, prepare_run_dir, render_nginx_config

    conf = render_nginx_config(
        listen=Upstream.parse(listen),
        replicas=[Upstream.parse(r) for r in replica],
        run_dir=out,
        run_as=run_as or getpass.getuser(),
        s3_endpoint=s3_endpoint,
        blob_dir=blob_dir,
    )
    prepare_run_dir(out)
    path = out / "nginx.conf"
    with atomic_output(path, mode=0o644) as fh:
        fh.write(conf.encode())
    console.print(f"wrote {path}")
    console.print(f"start it:  nginx -c {path.resolve()} -p {out.resolve()}")
