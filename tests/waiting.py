"""Polling for a condition in tests that drive real processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05, log: Callable[[], str] | None = None) -> T:  # fmt: skip
    """The first truthy value of ``check()``, polling until ``timeout``; on timeout the
    assertion shows the last value and, with ``log``, what the processes under test wrote."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    detail = f"\n--- log ---\n{log()}" if log else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r}){detail}")
