"""Starting the engines the fixtures run (Mosquitto, PostgreSQL, SeaweedFS, the registry,
nginx, RabbitMQ, hub processes) on loopback ports chosen at run time.

A port picked free can be taken by another process before the engine binds it (seven other
test sessions share the machine), and the engine then dies with "address already in use".
One such death used to fail a whole session fixture and every test behind it. So every
fixture starts its engine through :func:`start_on_free_ports`: it picks fresh ports, calls the
fixture's ``launch(ports)``, and when the launch failed because a port was taken it tries
again on new ports, :data:`ENGINE_START_ATTEMPTS` times at most, then fails with the engine's
name, the ports of each try and the end of its log. A failure that is not a port collision
(a bad config, a missing binary) is not retried: it fails at once, with its log.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "ENGINE_START_ATTEMPTS",
    "EngineFailed",
    "EngineStartError",
    "free_port",
    "free_ports",
    "listens",
    "nowhere_image",
    "port_collision",
    "start_on_free_ports",
]

T = TypeVar("T")

#: How many sets of ports an engine is tried on before the fixture fails.
ENGINE_START_ATTEMPTS = 5

# How each engine says its port was taken: Go's and libc's "address already in use"
# (SeaweedFS, docker-registry, Mosquitto, PostgreSQL, nginx, uvicorn), Erlang's eaddrinuse.
_COLLISION = re.compile(r"address already in use|eaddrinuse|address in use", re.IGNORECASE)


def free_port() -> int:
    """A loopback port that was free a moment ago (an engine on it starts through
    :func:`start_on_free_ports`, which tries another if it was taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while chosen, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def nowhere_image(tag: str = "3.11") -> str:
    """An image reference no engine or registry knows: a free port (no registry on it) and a
    repository no test ever pushes. The repository has to be new as well, because the Docker
    engine keeps the tags a stopped test registry was pushed under: ``127.0.0.1:PORT/acme/python``
    on a port a registry of another worker used is a local image with a digest."""
    return f"127.0.0.1:{free_port()}/never-pushed/{uuid.uuid4().hex[:12]}:{tag}"


class EngineFailed(Exception):
    """Raised by a ``launch`` whose engine did not come up (after it stopped what it started);
    ``log`` is what the engine said, which tells a taken port from any other failure."""

    def __init__(self, log: str) -> None:
        super().__init__(log[-300:])
        self.log = log


class EngineStartError(RuntimeError):
    """An engine did not start: not for a taken port, or not on any of the ports tried."""


def port_collision(log: str) -> bool:
    """Whether an engine's output says that a port it was to listen on was taken."""
    return _COLLISION.search(log) is not None


def start_on_free_ports(
    engine: str,
    count: int,
    launch: Callable[[list[int]], T],
    *,
    attempts: int = ENGINE_START_ATTEMPTS,
    pick: Callable[[int], list[int]] | None = None,
    pause_s: float = 0.0,
) -> T:
    """``launch(ports)`` with ``count`` fresh loopback ports; again with new ones while it
    raises :class:`EngineFailed` for a port collision, ``attempts`` times at most.

    ``pick`` chooses the ports, :func:`free_ports` by default (a restart passes the engine's
    old ones, and ``pause_s`` then gives the previous listener time to let go)."""
    tried: list[list[int]] = []
    last_log = ""
    for attempt in range(attempts):
        if attempt and pause_s:
            time.sleep(pause_s)
        ports = (pick or free_ports)(count)
        tried.append(ports)
        try:
            return launch(ports)
        except EngineFailed as failed:
            if not port_collision(failed.log):
                said = failed.log[-3000:]
                raise EngineStartError(f"{engine} did not start on ports {ports}:\n{said}") from None
            last_log = failed.log
    ports_tried = ", ".join(str(p) for p in tried)
    raise EngineStartError(
        f"{engine} did not start: a port it was given was taken on each of {attempts} tries "
        f"(ports {ports_tried}):\n{last_log[-3000:]}"
    )


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` (or one of its descendants) holds a listening TCP socket on
    ``port``. A connect succeeds on whatever listens there, and that may be the process that
    took the port: readiness must be the engine's own listener."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    for proc in _tree(pid):
        try:
            for fd in Path(f"/proc/{proc}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (RabbitMQ's listener is a child of its start script)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out
