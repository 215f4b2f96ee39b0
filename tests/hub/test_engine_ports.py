"""An engine whose port another program took between the pick and the bind starts on other
ports instead of failing the fixture (and every test behind it); after a bounded number of
tries the fixture fails with the engine's name and what it said."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import engines
from tests.engines import EngineFailed, EngineStartError, start_on_free_ports
from tests.hub.broker_fixtures import plain_config, start_mosquitto
from tests.hub.seaweedfs_fixtures import LISTENERS, start_seaweedfs

pytestmark = pytest.mark.sql_independent


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port another program listens on (what a parallel session does to a port we picked)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def first_pick_takes(
    monkeypatch: pytest.MonkeyPatch, taken: socket.socket, index: int = 0, times: int = 1
) -> list[list[int]]:
    """Make the first ``times`` picks of ports put the taken port at ``index``; returns every
    pick made, to see which ports the engine was tried on."""
    real = engines.free_ports
    picks: list[list[int]] = []

    def pick(count: int) -> list[int]:
        ports = real(count)
        if len(picks) < times:
            ports[index] = taken.getsockname()[1]
        picks.append(ports)
        return ports

    monkeypatch.setattr(engines, "free_ports", pick)
    return picks


def test_mosquitto_starts_on_another_port_when_its_first_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: socket.socket
) -> None:
    picks = first_pick_takes(monkeypatch, taken)
    broker = start_mosquitto(tmp_path, plain_config)
    try:
        assert len(picks) == 2
        assert broker.port == picks[1][0] != taken.getsockname()[1]
        probe = broker.probe()  # a real MQTT session on the broker's own port
        probe.close()
    finally:
        broker.stop()


def test_seaweedfs_starts_when_its_lance_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: socket.socket
) -> None:
    """The bare-box failure: SeaweedFS died on ``bind: address already in use`` for Lance."""
    picks = first_pick_takes(monkeypatch, taken, index=LISTENERS.index("lance"))
    store = start_seaweedfs(tmp_path)
    try:
        assert len(picks) == 2
        assert store.ports["lance"] != taken.getsockname()[1]
        client = store.client()
        client.put_object(Bucket=store.bucket, Key="after-a-collision", Body=b"ok")
        assert client.get_object(Bucket=store.bucket, Key="after-a-collision")["Body"].read() == b"ok"
    finally:
        store.stop()


def test_an_engine_whose_port_is_always_taken_fails_after_bounded_tries_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: socket.socket
) -> None:
    picks = first_pick_takes(monkeypatch, taken, times=100)
    with pytest.raises(EngineStartError) as failure:
        start_mosquitto(tmp_path, plain_config, attempts=3)
    assert len(picks) == 3
    message = str(failure.value)
    assert message.startswith("mosquitto did not start: a port it was given was taken on each of 3 tries")
    assert "Address already in use" in message


def test_a_failure_that_is_not_a_port_collision_is_not_retried() -> None:
    calls: list[list[int]] = []

    def launch(ports: list[int]) -> None:
        calls.append(ports)
        raise EngineFailed("Error: Unable to open config file /nowhere.conf")

    with pytest.raises(EngineStartError, match="Unable to open config file"):
        start_on_free_ports("mosquitto", 1, launch)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "said",
    [
        "1796645338: Error: Address already in use",  # Mosquitto
        "listen tcp 127.0.0.1:40823: bind: address already in use",  # SeaweedFS, docker-registry
        'LOG:  could not bind IPv4 address "127.0.0.1": Address already in use',  # PostgreSQL
        "bind() to 127.0.0.1:8080 failed (98: Address already in use)",  # nginx
        "{error,{listen_error,eaddrinuse}}",  # RabbitMQ
    ],
)
def test_each_engines_way_of_saying_its_port_was_taken_is_recognised(said: str) -> None:
    assert engines.port_collision(said)
    assert not engines.port_collision("FATAL: data directory has wrong ownership")
