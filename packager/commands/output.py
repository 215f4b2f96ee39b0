"""What several commands print: JSON for scripts, tables of files, what a fleet change did.

Tables are drawn from the hub's answers as it sent them (the SDK records' ``raw``), so that the
text and ``--json`` show the same values.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.table import Table
from rich.text import Text

from packager.app import console
from packager.display import safe_text


def print_json(data: Any) -> None:
    # Plain stdout, not rich: scripts want exactly the JSON, unwrapped and uncoloured.
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def pairs_text(tags: dict[str, str]) -> str:
    """Tags or properties as ``k=v, k=v`` (empty when there are none)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def files_table(files: list[dict[str, Any]]) -> Table:
    """The files of a model or module version as the hub lists them."""
    table = Table("path", "size", "digest")
    for f in files:
        table.add_row(safe_text(f["path"]), f"{f['size']:,}", f["digest"])
    return table


def when(value: str | None) -> str:
    return value.replace("T", " ")[:19] if value else "never"


def print_change(change: dict[str, Any]) -> None:
    """Which devices got a new desired state, and whether the broker has it."""
    issued = change["issued"]
    if not issued:
        console.print("no device's desired state changed")
        return
    listed = ", ".join(f"{d} (generation {g})" for d, g in sorted(issued.items()))
    console.print(safe_text(f"new desired state for {listed}"))
    if change["published"] is False:
        console.print(
            Text.assemble(
                ("not published over MQTT", "yellow"),
                " (devices will fetch it over HTTP): ",
                safe_text(change["publish_errors"][0]),
            )
        )
