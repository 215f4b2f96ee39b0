"""How the CLI shows service states: one colour per state, the same in every command."""

from __future__ import annotations

from rich.text import Text

STATE_STYLE = {
    "Healthy": "green",
    "Failed": "bold red",
    "Unhealthy": "yellow",
    "Unschedulable": "magenta",
    "Transitioning": "cyan",
}


def state_text(state: str | None) -> Text:
    return Text(state or "not reported", style=STATE_STYLE.get(state or "", "dim"))
