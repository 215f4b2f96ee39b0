"""The end-to-end stack, started the way an operator starts it: every part a process of its own,
set up through the installed ``edgepack`` entry point.

- a publisher key (``edgepack keygen``) and a saved login (``edgepack login``) in a private
  ``EDGEPACK_HOME``;
- Mosquitto on the config ``edgepack hub broker-config`` generated (per-device accounts, ACL);
- ``edgepack hub serve`` managing that broker's accounts;
- the test registry with the runtime image (``tests/docker_fixtures.py``), for docker devices;
- devices: ``edgepack device enroll`` + ``edgepack agent init`` + ``edgepack agent run``, each
  with its own state folder, credentials and loopback address (``127.X.Y.N``), so that every
  device serves a service on the same port as real devices on their own hosts do.

The stack is module-scoped: the workflow test reuses one for all its steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.status import agent_status
from manifests.device import parse_agent_config
from tests.agent.conftest import kill_modules, remove_containers
from tests.conftest import free_port
from tests.docker_fixtures import PushedRuntimeImage
from tests.engines import EngineFailed, listens, start_on_free_ports
from tests.hub.broker_fixtures import MOSQUITTO

#: The installed entry point, as a user runs it (not ``python -m``).
EDGEPACK = str(Path(sys.executable).parent / "edgepack")
#: Wide enough that rich never wraps a table row the test reads.
COLUMNS = "240"


@dataclass(frozen=True)
class Cli:
    """``edgepack`` as a subprocess with its own home (keys, trust store, saved login)."""

    home: Path

    def env(self) -> dict[str, str]:
        # The test runner's own EDGEPACK_* settings must not leak into the user's CLI.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
        env.update({"EDGEPACK_HOME": str(self.home), "COLUMNS": COLUMNS, "NO_COLOR": "1",
                    "PYTHONUNBUFFERED": "1"})  # fmt: skip
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``edgepack ARGS``; a non-zero exit fails the test with what it printed."""
        done = subprocess.run(
            [EDGEPACK, *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"edgepack {' '.join(args)} exited {done.returncode}\n"
                f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
            )
        return done

    def json(self, *args: str, timeout: float = 120) -> Any:
        return json.loads(self.run(*args, "--json", timeout=timeout).stdout)

    def popen_text(self, *args: str) -> subprocess.Popen[str]:
        """``edgepack ARGS`` in the background, its output read as it comes."""
        return subprocess.Popen([EDGEPACK, *args], env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen([EDGEPACK, *args], env=self.env(), stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def started(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 20) -> bool:
    """Whether ``proc`` became ``ready`` in time (else it is stopped: its log says why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.05)
    stop_process(proc)
    return False


def answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def loopback_block() -> str:
    """``127.X.Y``: a /24 of loopback addresses of this run's own, so that devices of parallel
    test sessions never share an address (Linux answers on all of 127.0.0.0/8)."""
    return f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"


def port_free_on(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` a moment ago."""
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


@dataclass
class Device:
    """An enrolled device and its agent process."""

    stack: Stack
    device_id: str
    address: str
    folder: Path
    runtime: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    @property
    def log_path(self) -> Path:
        return self.folder / "agent.log"

    def start(self) -> Device:
        self.proc = self.stack.cli.popen("agent", "run", "--config", str(self.config), log=self.log_path)
        return self

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def status(self) -> dict[str, Any]:
        """``edgepack agent status --json``: read from the state folder, as on the device."""
        body: dict[str, Any] = self.stack.cli.json("agent", "status", "--config", str(self.config))
        return body

    def peek(self) -> dict[str, Any]:
        """What ``status()`` says, read in this process: for polling (a CLI run costs seconds
        on a busy machine)."""
        config = parse_agent_config(self.config.read_bytes(), source="agent.toml", base_dir=self.folder)
        return agent_status(config, self.device_id)

    def service(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.peek()["services"] if s["service"] == name), None)

    def url(self, port: int) -> str:
        return f"http://{self.address}:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()  # a paused agent would not act on SIGTERM
            stop_process(self.proc)
        # Modules outlive their agent by design; the test must not leave them behind.
        kill_modules(self.state_dir)
        remove_containers(self.device_id)


@dataclass
class Stack:
    root: Path
    cli: Cli
    url: str
    admin_token: str
    hub_data: Path
    runtime_ref: str
    run_id: str
    block: str
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)

    def device(self, name: str, *, runtime: str, tags: dict[str, str]) -> Device:
        """Enroll ``name`` with ``tags`` and write its agent.toml, through the CLI."""
        device_id = f"{self.run_id}-{name}"
        folder = self.root / "devices" / name
        folder.mkdir(parents=True)
        creds = folder / "credentials.json"
        tag_args = [a for k, v in tags.items() for a in ("--tag", f"{k}={v}")]
        self.cli.run("device", "enroll", device_id, *tag_args, "--out", str(creds))
        address = f"{self.block}.{len(self.devices) + 2}"
        self.cli.run(
            "agent", "init", "--credentials", str(creds), "--runtime", runtime,
            "--state-dir", str(folder / "state"), "--service-host", address,
            "--telemetry-interval", "1", "--out", str(folder / "agent.toml"),
        )  # fmt: skip
        device = Device(self, device_id, address, folder, runtime)
        self.devices.append(device)
        return device

    def addresses(self, count: int) -> list[str]:
        return [f"{self.block}.{n + 2}" for n in range(count)]

    def logs(self) -> str:
        """Every process's log tail, for a failure message."""
        parts = [f"--- {name} ---\n{log.read_text(errors='replace')[-3000:]}" for name, _, log in self.procs]
        parts += [f"--- agent {d.device_id} ---\n{d.log()}" for d in self.devices]
        return "\n".join(parts)

    def close(self) -> None:
        for device in self.devices:
            device.stop()
        for _, proc, _ in reversed(self.procs):
            stop_process(proc)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, runtime_image: PushedRuntimeImage
) -> Iterator[Stack]:
    """Broker, hub and a logged-in CLI; devices are added by the test (``stack.device``)."""
    root = tmp_path_factory.mktemp("e2e")
    cli = Cli(root / "home")
    cli.run("keygen")
    hub_data, broker_dir = root / "hub", root / "broker"
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    run_id = f"e2e{os.getpid() % 10000}{random.randint(100, 999)}"
    running = Stack(root, cli, "", "", hub_data, runtime_image.pinned, run_id, loopback_block(), procs)

    def launch_broker(ports: list[int]) -> int:
        cli.run("hub", "broker-config", "--out", str(broker_dir), "--data-dir", str(hub_data),
                "--port", str(ports[0]), *(["--run-as", "root"] if os.geteuid() == 0 else []))  # fmt: skip
        log = root / "mosquitto.log"
        with log.open("wb") as out:
            broker = subprocess.Popen([str(MOSQUITTO), "-c", str(broker_dir / "mosquitto.conf")],
                                      stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        if not started(broker, lambda: listens(broker.pid, ports[0])):
            raise EngineFailed(log.read_text(errors="replace"))
        procs.append(("mosquitto", broker, log))
        # In the foreground Mosquitto writes no pid file; the hub needs it to make it reload.
        (broker_dir / "mosquitto.pid").write_text(f"{broker.pid}\n")
        return ports[0]

    def launch_hub(ports: list[int]) -> str:
        log = root / "hub.log"
        hub = cli.popen(
            "hub", "serve", "--data-dir", str(hub_data), "--port", str(ports[0]),
            "--trust", str(cli.home / "keys" / "publisher.pub"), "--mqtt-host", "127.0.0.1",
            "--mqtt-port", str(mqtt_port), "--broker-dir", str(broker_dir),
            "--broker-pid-file", str(broker_dir / "mosquitto.pid"), log=log,
        )  # fmt: skip
        url = f"http://127.0.0.1:{ports[0]}"
        if not started(hub, lambda: answers(f"{url}/api/v1/hub/key"), timeout=60):
            raise EngineFailed(log.read_text(errors="replace"))
        procs.append(("hub", hub, log))
        return url

    try:
        mqtt_port = start_on_free_ports("mosquitto", 1, launch_broker)
        running.url = start_on_free_ports("the hub", 1, launch_hub)
        running.admin_token = (hub_data / "admin_token").read_text().strip()
        cli.run("login", "--hub", running.url, "--token", running.admin_token)
        yield running
    finally:
        running.close()
