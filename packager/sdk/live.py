"""How a service's rollout is shown while it is waited for (``show_output=True``).

In a terminal: a table of every device's state that redraws at each poll (what ``edgepack
service wait`` shows). Elsewhere (a pipe, a log): one line per device whose state changed.
The CLI draws its service tables with the same pieces (and its colours, ``packager.display``).
What devices reported (ids, states, reasons) is shown through ``packager.display.safe_text``.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from manifests.reported import Progress
from packager.display import safe_text, state_text
from packager.sdk.answers import ServiceRecord, seen_text
from packager.sdk.progress import ProgressEvent


def progress_text(progress: Progress | None) -> str:
    """`` (12.3/96.0 MB)`` for a download or pull under way, else nothing."""
    if progress is None or not progress.total_bytes:
        return ""
    return f" ({progress.done_bytes / 1e6:.1f}/{progress.total_bytes / 1e6:.1f} MB)"


def tags_text(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def target_text(target: dict[str, Any]) -> str:
    """A deployment's target as the hub stores it, in words."""
    if "devices" in target:
        return "devices " + ", ".join(target["devices"])
    return "selector " + tags_text(target.get("selector", {}))


def devices_table(service: ServiceRecord) -> Table:
    """One row per device: online, state, reason."""
    table = Table("device", "online", "state", "reason")
    for d in service.devices:
        table.add_row(
            safe_text(d.device_id),
            Text("online", "green")
            if d.online
            else Text(f"offline, last seen {seen_text(d.last_seen)}", "red"),
            state_text(d.state),
            safe_text((d.reason or "") + progress_text(d.progress)),
        )
    return table


def wait_view(service: ServiceRecord, elapsed: float) -> Group:
    header = Text.assemble(
        safe_text(service.name, "bold"),
        safe_text(f"  {service.module}:{service.version}  "),
        state_text(service.state),
        f"  {elapsed:.0f}s",
    )
    return Group(header, devices_table(service))


class LiveServiceView:
    """A progress callback that redraws the per-device table at each poll of a wait."""

    def __init__(self, console: Console | None = None, *, transient: bool = False) -> None:
        self.console = console or Console()
        self.transient = transient
        self._live: Live | None = None
        self._start = time.monotonic()

    def __call__(self, event: ProgressEvent) -> None:
        if event.service is None:
            return
        view = wait_view(event.service, time.monotonic() - self._start)
        if self._live is None:
            self._live = Live(view, console=self.console, transient=self.transient, auto_refresh=False)
            self._live.start(refresh=True)
        else:
            self._live.update(view, refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
        self._live = None


class StateLines:
    """A progress callback that prints a line whenever a device's state or reason changes."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self._seen: dict[str, tuple[str | None, str | None, bool]] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.service is None:
            return
        for d in event.service.devices:
            now = (d.state, d.reason, d.online)
            if self._seen.get(d.device_id) != now:
                self._seen[d.device_id] = now
                said = f"{d.state} ({d.reason})" if d.reason else str(d.state)
                if not d.online:
                    said += f"; offline (last seen {seen_text(d.last_seen)})"
                line = safe_text(f"{event.service.name} on {d.device_id}: {said}").plain
                self.out.write(line + "\n")
                self.out.flush()


def show_output_view() -> LiveServiceView | StateLines:
    """What ``show_output=True`` draws: the live table in a terminal, else state lines."""
    return LiveServiceView() if sys.stdout.isatty() else StateLines()
