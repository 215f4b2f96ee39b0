"""Agent test fixtures: a real hub with the broker it manages, and real agent processes.

``fleet`` starts Mosquitto from hub-generated accounts and ACL and a hub that manages them
(both on loopback, ephemeral ports, a fresh topic prefix). ``fleet.device("edge-1")`` enrolls a
device through the hub's API, writes its credentials and ``agent.toml`` the way ``edgepack
device enroll --out`` and ``edgepack agent init`` do, and ``device.start()`` runs the agent as
a separate process (``python -m edge_agent``), exactly as on a device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from cloud_hub.broker.mosquitto import BrokerTLS, prepare_broker_dir
from cloud_hub.settings import HubSettings
from cloud_hub.tls.material import make_tls_material
from edge_agent.status import agent_status
from manifests.desired import RuntimeKind
from manifests.device import AgentConfig, parse_agent_config, render_agent_config
from tests.conftest import Publisher, free_port
from tests.factory import Forge, ModuleParts, default_files
from tests.hub.broker_fixtures import *  # noqa: F403  (Mosquitto fixtures)
from tests.hub.conftest import HubFactory, RunningHub, blob_backend, hub  # noqa: F401  (fixtures)
from tests.waiting import wait_for

HUB_PASSWORD = "hub-broker-password-for-tests"


#: the checkout under test (see Fleet.checkout_python)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Agent:
    """One device: its credentials, its agent.toml, and (once started) its agent process."""

    fleet: Fleet
    device_id: str
    config_path: Path
    credentials: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    @property
    def config(self) -> AgentConfig:
        data = self.config_path.read_bytes()
        return parse_agent_config(data, source="agent.toml", base_dir=self.config_path.parent)

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def start(self, *extra: str, env: dict[str, str] | None = None) -> Agent:
        self.starts += 1
        self.log_path = self.config_path.parent / f"agent-{self.starts}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--config", str(self.config_path), *extra],
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        return self

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"agent did not stop on signal {sig}:\n{self.log()}") from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def status(self) -> dict[str, Any]:
        return agent_status(self.config, self.device_id)

    def service(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["services"] if s["service"] == name), None)

    def wait_state(
        self, name: str, state: str, *, timeout: float = 60, version: str | None = None
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            s = self.service(name)
            if s and s["state"] == state and (version is None or s["serving_version"] == version):
                return s
            return None

        return wait_for(check, timeout=timeout, what=f"{name} {state} on {self.device_id}", log=self.log)


@dataclass
class Fleet:
    hub: RunningHub
    broker: Broker  # noqa: F405
    prefix: str
    root: Path
    publisher: Publisher
    agents: list[Agent] = field(default_factory=list)

    def http(self) -> httpx.Client:
        return self.hub.client()

    def device(
        self,
        device_id: str,
        *,
        runtimes: tuple[RuntimeKind, ...] = (RuntimeKind.PROCESS,),
        tags: dict[str, str] | None = None,
        **config: Any,
    ) -> Agent:
        with self.http() as http:
            r = http.post("/api/v1/devices", json={"id": device_id, "tags": tags or {"fleet": "test"}})
        assert r.status_code == 201, r.text
        folder = self.root / device_id
        folder.mkdir(parents=True)
        credentials = r.json()["device_credentials"]
        creds_path = folder / f"{device_id}.json"
        creds_path.write_text(json.dumps(credentials))
        creds_path.chmod(0o600)
        settings = AgentConfig.model_validate(
            {
                "credentials": creds_path,
                "state_dir": folder / "state",
                "runtimes": list(runtimes),
                "service_host": "127.0.0.1",
                "telemetry_interval_s": 1,
                "report_interval_s": 5,
                "poll_interval_s": 30,
                "log_format": "text",
                "log_level": "info",
                "process": {"python": str(self.checkout_python())},
                **config,
            }
        )
        config_path = folder / "agent.toml"
        config_path.write_text(render_agent_config(settings))
        agent = Agent(self, device_id, config_path, credentials)
        self.agents.append(agent)
        return agent

    def checkout_python(self) -> Path:
        """An interpreter that imports edgepack from this checkout. The process runtime starts
        modules in a clean environment (no PYTHONPATH), so with an edgepack installed from
        another checkout the modules would run that checkout's scoring server, not the one
        under test."""
        python = self.root / "python-of-this-checkout"
        if not python.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            python.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n')
            python.chmod(0o755)
        return python

    def push(self, name: str = "demo", version: str = "1", *, files: dict[str, bytes] | None = None,
             forge: Forge | None = None, **manifest: Any) -> ModuleParts:  # fmt: skip
        """Push a module signed by the trusted publisher (or by ``forge``'s publisher)."""
        forge = forge or Forge(publisher=self.publisher.key)
        contents = files if files is not None else default_files()
        bundle = forge.bundle(files=contents, name=name, version=version, **manifest)
        with self.http() as http:
            r = http.post("/api/v1/modules", content=bundle)
        assert r.status_code in (200, 201), r.text
        return forge.module(files=contents, name=name, version=version, **manifest)

    def deploy(
        self,
        service: str,
        parts: ModuleParts,
        *,
        port: int,
        devices: list[str] | None = None,
        selector: str | None = None,
        runtime: str | None = "process",
        probe: dict[str, int] | None = None,
        **edgepack: Any,
    ) -> dict[str, Any]:
        """Deploy with a deploymentconfig.json: ``probe`` is its livenessProbeRequirements,
        ``edgepack`` its edgepack object (restartPolicy, environmentVariables, ...)."""
        target: dict[str, Any] = {"selector": selector} if selector else {"devices": devices}
        extension = {**({"runtime": runtime} if runtime else {}), **edgepack}
        config: dict[str, Any] = {"computeType": "local", "port": port, "edgepack": extension}
        if probe is not None:
            config["livenessProbeRequirements"] = probe
        with self.http() as http:
            r = http.put(
                f"/api/v1/deployments/{service}",
                json={"module": parts.manifest.name, "version": parts.manifest.version,
                      "deployment_config": config, "target": target},
            )  # fmt: skip
        assert r.status_code in (200, 201), r.text
        body: dict[str, Any] = r.json()
        return body

    def hub_device(self, device_id: str) -> dict[str, Any]:
        """The hub's view of a device, with its last reported state's ``last_error``."""
        with self.http() as http:
            r = http.get(f"/api/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def rollup(self, service: str) -> dict[str, Any]:
        with self.http() as http:
            r = http.get(f"/api/v1/deployments/{service}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait_rollup(self, service: str, state: str, *, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            body = self.rollup(service)
            return body if body["state"] == state else None

        logs = lambda: "\n".join(a.log() for a in self.agents)  # noqa: E731
        what = f"{service} {state} in the hub's roll-up"
        return wait_for(check, timeout=timeout, what=what, log=logs)


def start_fleet(
    hub: HubFactory,  # noqa: F811
    broker_factory: BrokerFactory,  # noqa: F405
    topic_prefix: str,
    publisher: Publisher,
    root: Path,
    *,
    tls: bool = False,
    **hub_settings: Any,
) -> Fleet:
    """A hub and the broker it manages; with ``tls`` both speak only TLS, from a CA the hub
    made (what ``edgepack hub broker-config --tls`` does), and devices get that CA.
    ``hub_settings`` go to the hub as they are (e.g. ``trusted_keys``)."""
    broker_dir = root / "broker"
    prepare_broker_dir(
        HubSettings(
            data_dir=root / "prep",
            broker_dir=broker_dir,
            topic_prefix=topic_prefix,
            mqtt_password=SecretStr(HUB_PASSWORD),
        )
    )
    extra: dict[str, Any] = {}
    broker_tls = None
    if tls:
        files = make_tls_material(
            HubSettings(data_dir=root / "hub"),
            hub_hosts=["127.0.0.1", "localhost"],
            broker_hosts=["127.0.0.1", "localhost"],
            broker_dir=broker_dir,
        )
        broker_tls = BrokerTLS(files.broker_cert, files.broker_key, files.broker_ca)
        extra = {
            "data_dir": root / "hub",
            "ca": files.ca_cert,
            "tls_cert": files.hub_cert,
            "tls_key": files.hub_key,
            "mqtt_tls_ca": files.ca_cert,
        }
    broker = broker_factory(broker_dir, broker_tls)
    running = hub(
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_password=HUB_PASSWORD,
        broker_dir=broker_dir,
        broker_pid_file=broker.pid_file,
        topic_prefix=topic_prefix,
        **extra,
        **hub_settings,
    )
    return Fleet(running, broker, topic_prefix, root / "devices", publisher)


def stop_fleet(fleet: Fleet) -> None:
    for agent in fleet.agents:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
        # Modules outlive their agent by design; a test must not leave them behind.
        kill_modules(agent.state_dir)
        remove_containers(agent.device_id)


@pytest.fixture
def fleet(
    hub: HubFactory,  # noqa: F811
    broker_factory: BrokerFactory,  # noqa: F405
    topic_prefix: str,
    publisher: Publisher,
    tmp_path: Path,
) -> Iterator[Fleet]:
    running = start_fleet(hub, broker_factory, topic_prefix, publisher, tmp_path)
    yield running
    stop_fleet(running)


def remove_containers(device_id: str) -> None:
    """Remove the containers an agent started for ``device_id`` (docker runtime tests)."""
    if not any(Path(p).exists() for p in ("/var/run/docker.sock", "/run/docker.sock")):
        return
    import docker

    client = docker.from_env()
    try:
        for container in client.containers.list(all=True, filters={"label": f"edgepack.device={device_id}"}):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
    finally:
        client.close()


def kill_modules(state_dir: Path) -> list[int]:
    """SIGKILL every module process an agent on ``state_dir`` started (what a power cut does)."""
    killed = []
    for state_file in state_dir.glob("run/*/*/instance.json"):
        try:
            pid = json.loads(state_file.read_text())["pid"]
        except (ValueError, KeyError):
            continue
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and str(state_file).encode() in cmdline.read_bytes().split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def answers_with(port: int, data: list[float], expected: Any, *, timeout: float = 20) -> None:
    """Wait until the service answers ``expected``: right after a switch the old version may
    still take a request or two while it drains."""
    wait_for(lambda: score(port, data) == expected, timeout=timeout, what=f"the answer {expected}")


def score(port: int, data: list[float], *, timeout: float = 10) -> Any:
    r = httpx.post(f"http://127.0.0.1:{port}/score", json={"data": data}, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


__all__ = [
    "Agent",
    "Fleet",
    "answers_with",
    "free_port",
    "kill_modules",
    "score",
    "start_fleet",
    "stop_fleet",
    "wait_for",
]
