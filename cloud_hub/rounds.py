"""A hub loop that runs one round every ``interval_s`` on a daemon thread of its own (the alert
rules, the rollouts). Each round must never raise: the loop outlives a database hiccup."""

from __future__ import annotations

import threading
from typing import Any


class Rounds:
    """Subclasses give ``run_once``; ``start``/``stop`` run it every ``interval_s`` seconds."""

    #: the thread's name, as ``ps -T`` and a stack dump show it
    thread_name = "rounds"

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_once()
