"""How the CLI shows what others wrote: service states in one colour each, and every string a
device (or a hub) sent, made safe for a terminal."""

from __future__ import annotations

from rich.text import Text

from manifests.bounds import escape_controls

STATE_STYLE = {
    "Healthy": "green",
    "Failed": "bold red",
    "Unhealthy": "yellow",
    "Unschedulable": "magenta",
    "Transitioning": "cyan",
    "Pending": "dim",
}


def safe_text(value: object, style: str = "") -> Text:
    """``value`` as it may reach a terminal: control characters written as visible escapes
    (``\\x1b``, :func:`manifests.bounds.escape_controls`), and as rich :class:`Text`, so that
    ``[bold]``-like markup and ``:emoji:`` codes in it print as they are.

    Every string a device reported (log lines, reasons, errors, tags, versions, ids) goes
    through here on its way to the screen; build lines with ``Text.assemble``, never by
    formatting such a string into markup.
    """
    return Text(escape_controls("" if value is None else str(value)), style=style)


def state_text(state: str | None) -> Text:
    return safe_text(state or "not reported", style=STATE_STYLE.get(state or "", "dim"))
