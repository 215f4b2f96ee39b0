"""A real RabbitMQ cluster with the MQTT plugin (star-imported by ``tests/hub/conftest.py``).

``rabbitmq``: three RabbitMQ nodes (Debian's ``rabbitmq-server``, with ``rabbitmq_mqtt`` and
``rabbitmq_management``) clustered on loopback, one cluster per test session (per xdist worker;
the tests that use it share an xdist group, so one worker starts it). Every port is ephemeral,
including the Erlang port mapper's, so nothing clashes with another session's broker.
Anonymous MQTT is off: the hub's account sync (``cloud_hub.broker.rabbitmq``) makes the users.

Three, not two: RabbitMQ 3.10's MQTT plugin tracks client ids in a Raft group that needs a
majority, so in a two-node cluster a node that crashed took ~100 s to serve MQTT again; with
three it is back in seconds (test_engine_restarts.py restarts one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.engines import EngineFailed, listens, start_on_free_ports

__all__ = ["RABBITMQ_BIN", "RabbitCluster", "RabbitNode", "rabbitmq"]

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
INSTALL_HINT = "install Debian's 'rabbitmq-server' package (scripts/test.sh does)"
ADMIN = ("guest", "guest")  # RabbitMQ's default administrator, allowed from loopback only


@dataclass
class RabbitNode:
    name: str
    root: Path
    amqp_port: int
    mqtt_port: int
    api_port: int
    dist_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self, epmd_port: int, home: Path) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(home),  # where the shared Erlang cookie lives
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Erlang distribution on loopback only, like every other listener here.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.root / "plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
        }

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = false\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.api_port}\n"
            "log.console.level = warning\n"
        )
        (self.root / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_mqtt].\n")


@dataclass
class RabbitCluster:
    nodes: list[RabbitNode]
    home: Path
    epmd_port: int
    log: Path
    epmd: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        """The management API of the first node (any node's answers for the whole cluster)."""
        return self.nodes[0].api

    def ctl(self, node: RabbitNode, *args: str) -> None:
        run = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args],
            env=node.env(self.epmd_port, self.home), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name}: {run.stdout}{run.stderr}")

    def start_node(self, node: RabbitNode, timeout: float = 120) -> None:
        node.write_config()
        with self.log.open("ab") as out:
            node.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")], env=node.env(self.epmd_port, self.home),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError, OSError):
                # The management API can answer before the MQTT listener is up: wait for both.
                if httpx.get(f"{node.api}/api/overview", auth=ADMIN, timeout=2).status_code == 200:
                    socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=1).close()
                    return
            time.sleep(0.25)
        raise RuntimeError(f"RabbitMQ node {node.name} did not start:\n{self.log.read_text()[-4000:]}")

    def stop_node(self, node: RabbitNode, *, graceful: bool = False) -> None:
        """Stop a node: ``rabbitmqctl stop`` when ``graceful``, else SIGKILL its whole session
        (start script, Erlang VM, helpers), which is a crash and quick. Its data dir stays, so
        ``start_node`` brings back its users and permissions."""
        if graceful and node.process is not None and node.process.poll() is None:
            self.ctl(node, "stop")
            node.process.wait(timeout=60)
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=30)
        node.process = None

    def running_nodes(self) -> list[str]:
        nodes = httpx.get(f"{self.api}/api/nodes", auth=ADMIN, timeout=10).json()
        return sorted(n["name"] for n in nodes if n.get("running"))

    def start_epmd(self) -> None:
        """Erlang's port mapper, started by us in the foreground (a node would start a daemon
        that outlives the test), on loopback and a port of our own."""
        with self.log.open("ab") as out:  # "address already in use" if its port was taken
            self.epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.epmd.poll() is None:
            if listens(self.epmd.pid, self.epmd_port):
                return
            time.sleep(0.05)
        raise RuntimeError("epmd did not start")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node)
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(timeout=10)


def start_cluster(size: int = 3) -> RabbitCluster:
    """``size`` nodes clustered, each with four ports, plus one for epmd: all tried again on
    new ports when one was taken before its node bound it."""
    if not (RABBITMQ_BIN / "rabbitmq-server").is_file():
        pytest.fail(f"no RabbitMQ under {RABBITMQ_BIN}: {INSTALL_HINT}", pytrace=False)

    def launch(ports: list[int]) -> RabbitCluster:
        root = Path(tempfile.mkdtemp(prefix="edgepack-rabbit-"))
        (root / ".erlang.cookie").write_text("edgepack-test-cookie")
        (root / ".erlang.cookie").chmod(0o400)
        nodes = [
            RabbitNode(f"ept{i}_{os.getpid()}@localhost", root / f"node{i}", *ports[4 * i : 4 * i + 4])
            for i in range(size)
        ]
        cluster = RabbitCluster(nodes, root, ports[-1], root / "rabbit.log")
        try:
            cluster.start_epmd()
            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(cluster.start_node, nodes))
            for node in nodes[1:]:
                cluster.ctl(node, "stop_app")
                cluster.ctl(node, "join_cluster", nodes[0].name)
                cluster.ctl(node, "start_app")
            if len(cluster.running_nodes()) != size:
                raise RuntimeError(f"the RabbitMQ cluster has {cluster.running_nodes()}, not {size} nodes")
            return cluster
        except RuntimeError as exc:
            cluster.stop()
            said = cluster.log.read_text(errors="replace") if cluster.log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise EngineFailed(f"{said}\n{exc}") from None
        except BaseException:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)
            raise

    return start_on_free_ports("RabbitMQ", 4 * size + 1, launch)


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitCluster]:
    """A three-node RabbitMQ cluster for this test session."""
    cluster = start_cluster(3)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.home, ignore_errors=True)
