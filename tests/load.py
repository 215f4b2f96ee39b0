"""Clients calling a scoring endpoint without pause, for tests of updates and hand-overs.

Each client posts ``body`` to ``/score`` in a loop, on a keep-alive connection or a fresh one
per request, and records every answer (through ``answer``) and every failure.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Load:
    port: int
    body: bytes
    answer: Callable[[Any], int]  # the JSON answer -> which version answered
    clients: int = 2
    #: where the service listens: loopback's 127.0.0.1, or another loopback address (tests/e2e)
    host: str = "127.0.0.1"
    fresh_connections: bool = False
    answers: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    last: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> None:
        headers = {"Content-Type": "application/json"}
        if self.fresh_connections:
            headers["Connection"] = "close"
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    url = f"http://{self.host}:{self.port}/score"
                    r = client.post(url, content=self.body, headers=headers)
                    r.raise_for_status()
                    version = self.answer(r.json())
                except Exception as exc:
                    self.failures.append(repr(exc))
                    continue
                self.answers[version] += 1
                self.last.append(version)
                del self.last[:-50]

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
