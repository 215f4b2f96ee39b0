"""Progress of long SDK calls: hashing, uploads, downloads, builds and waits.

Every such call takes ``progress=``:

- ``None`` (the default): rich progress bars on stderr when it is a terminal, else nothing;
- ``False``: nothing;
- a callable: it receives a :class:`ProgressEvent` at every step (write your own, or pass a
  :class:`RichBars` bound to the console you draw on).

A ``Hub`` may set the default for every call made through it (``Hub(..., progress=False)``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

if TYPE_CHECKING:
    from packager.sdk.answers import ServiceRecord


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long operation: ``done`` of ``total`` units of ``task``.

    ``unit`` is ``"bytes"`` for hashing, uploads, downloads and builds and ``"devices"`` for
    :meth:`Service.wait_for_deployment` (devices in a final state), whose events also carry
    the ``service`` as last polled.
    """

    task: str
    done: int
    total: int | None
    unit: Literal["bytes", "devices"] = "bytes"
    service: ServiceRecord | None = None


ProgressCallback: TypeAlias = Callable[[ProgressEvent], None]
#: What ``progress=`` accepts (see the module's docstring).
ProgressOption: TypeAlias = ProgressCallback | Literal[False] | None


class _ByUnit(ProgressColumn):
    """A column that shows bytes as ``bytes`` does and devices as ``done/total devices``."""

    def __init__(self, for_bytes: ProgressColumn, *, for_devices: bool) -> None:
        super().__init__()
        self.for_bytes = for_bytes
        self.for_devices = for_devices

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "bytes":
            rendered = self.for_bytes.render(task)
            return rendered if isinstance(rendered, Text) else Text(str(rendered))
        if self.for_devices:
            return Text(f"{int(task.completed)}/{int(task.total or 0)} devices final")
        return Text("")


class RichBars:
    """A progress callback that draws one rich bar per task: bytes with their speed and time
    left, devices of a wait as how many are final.

    The bars appear with the first event and vanish when the call that drew them returns.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                _ByUnit(DownloadColumn(), for_devices=True),
                _ByUnit(TransferSpeedColumn(), for_devices=False),
                _ByUnit(TimeRemainingColumn(), for_devices=False),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        task = self._tasks.get(event.task)
        if task is None:
            task = self._progress.add_task(event.task, total=event.total, unit=event.unit)
            self._tasks[event.task] = task
        self._progress.update(task, completed=event.done, total=event.total)

    def close(self) -> None:
        """Remove the bars (the SDK calls this when the operation that drew them ends)."""
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._tasks = {}


def in_terminal() -> bool:
    """Whether stderr is a terminal a person watches (not a pipe, a file or CI's log)."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def reporting(option: ProgressOption) -> Iterator[ProgressCallback | None]:
    """The callback an operation reports to, for as long as the operation runs."""
    if option is False:
        yield None
        return
    callback: ProgressCallback | None = option
    if callback is None:
        callback = RichBars() if in_terminal() else None
    try:
        yield callback
    finally:
        close = getattr(callback, "close", None)
        if callable(close):
            close()


class Tracker:
    """Counts one task's progress and reports it; a no-op without a callback."""

    def __init__(self, callback: ProgressCallback | None, task: str, total: int | None) -> None:
        self.callback = callback
        self.task = task
        self.total = total
        self.done = 0
        self._emit()

    def advance(self, n: int) -> None:
        self.done += n
        self._emit()

    def update(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total
        self._emit()

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(self.task, self.done, self.total))
