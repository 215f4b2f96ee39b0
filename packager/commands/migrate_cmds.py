"""``edgepack hub migrate``: bring the hub's database schema to what this version needs."""

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
        Path | None, typer.Option(help="the hub's data dir (default ~/.edgepack/hub)")
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
