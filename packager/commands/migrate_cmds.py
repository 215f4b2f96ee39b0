"""``edgepack hub migrate`` and ``copy-blobs``: bring a hub's database schema up to date, and
move its blobs to another store (a single hub's disk to the S3 bucket of a scaled-out one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from packager.app import console
from packager.commands.registry_cmds import hub_app


@hub_app.command("migrate")
def migrate_cmd(
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite:///DATA_DIR/hub.db)")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="the hub's data dir (default $EDGEPACK_HOME/hub)")
    ] = None,
) -> None:
    """Upgrade the database schema (back it up first; safe to run again). Flags override
    EDGEPACK_HUB_DB / EDGEPACK_HUB_DATA_DIR."""
    from cloud_hub.serve import migrate_hub
    from cloud_hub.settings import HubSettings

    given: dict[str, Any] = {"db": db, "data_dir": data_dir}
    settings = HubSettings(**{k: v for k, v in given.items() if v is not None})
    done = migrate_hub(settings)
    if done.before == done.after:
        console.print(f"database schema already at revision {done.after}; nothing to do")
    else:
        console.print(f"database schema migrated: {done.before or 'empty'} → {done.after}")


@hub_app.command("copy-blobs")
def copy_blobs_cmd(
    to: Annotated[str, typer.Option("--to", help="target blob store, s3://BUCKET?endpoint=URL")],
    data_dir: Annotated[
        Path | None, typer.Option(help="the hub whose blobs to copy (default $EDGEPACK_HOME/hub)")
    ] = None,
    blob_store: Annotated[
        str | None, typer.Option(help="its blob store, when not DATA_DIR/blobs")
    ] = None,
) -> None:
    """Copy every blob into another store, each checked against its digest (safe to re-run)."""
    from cloud_hub.serve import copy_hub_blobs
    from cloud_hub.settings import HubSettings

    given: dict[str, Any] = {"data_dir": data_dir, "blob_store": blob_store}
    source = HubSettings(**{k: v for k, v in given.items() if v is not None})
    target = source.model_copy(update={"blob_store": to})
    done = copy_hub_blobs(source, target)
    console.print(f"copied {done.copied} blobs ({done.bytes} bytes); {done.skipped} were there already")
