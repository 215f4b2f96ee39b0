"""Telling systemd how the agent is doing (``sd_notify``): ready, alive, stopping.

The unit ``edgepack agent install-service`` writes is ``Type=notify`` with a watchdog: systemd
counts the agent as started only once its modules were started from the cache and its loop ran
once, and restarts an agent whose loop stopped turning (a deadlock, a hung call) even though
its process still exists. Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing.

The protocol is one datagram per message on a unix socket; the standard library's ``socket``
does it, where a binding would cost the agent's memory budget more than it saves.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """``READY=1``, ``WATCHDOG=1`` and ``STOPPING=1`` to the service manager, if there is one."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # An abstract socket is written with a leading '@' and addressed with a NUL byte.
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        # systemd's own advice: ping at half the interval, so one late tick is not a restart.
        self._every = watchdog_usec / 2e6 if watchdog_usec else None
        self._clock = clock
        self._last_ping: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        # WATCHDOG_PID names the process meant; a module the agent started inherits nothing
        # (the runtimes build their environment), but a stray child must not ping for it.
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            watchdog = int(env["WATCHDOG_USEC"]) or None
        return cls(address, watchdog)

    @property
    def active(self) -> bool:
        return self._address is not None

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode())
        except OSError as exc:
            # The service manager went away or refused: the agent goes on serving.
            log.warning("cannot notify the service manager (%s): %s", message.split("=")[0], exc)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")
        self._last_ping = self._clock()

    def alive(self) -> None:
        """One turn of the agent's loop: a watchdog ping when one is due."""
        if self._every is None:
            return
        now = self._clock()
        if self._last_ping is None or now - self._last_ping >= self._every:
            self._send("WATCHDOG=1")
            self._last_ping = now

    def stopping(self) -> None:
        self._send("STOPPING=1")
