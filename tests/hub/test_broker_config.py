"""The broker config an operator generates with the CLI, and the hub's own broker account."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_hub.broker.mosquitto import HUB_PASSWORD_FILE, MosquittoAccounts
from cloud_hub.broker.passwords import hash_password
from cloud_hub.core import HubCore
from cloud_hub.fleet.tables import Device
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import open_hub
from tests.hub.broker_fixtures import BrokerFactory, start_mosquitto

pytestmark = pytest.mark.sql_independent


def test_cli_broker_config_starts_a_broker_for_the_fleet(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    core = HubCore.open(HubSettings(data_dir=data_dir))
    with core.sessions.begin() as s:
        s.add(Device(id="dev-x", tags={}, mqtt_password_hash=hash_password("pw-x"), token_hash="tx"))
    core.close()
    out = tmp_path / "broker"

    def generate(port: int) -> str:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "packager",
                "hub",
                "broker-config",
                "--out",
                str(out),
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert "mosquitto -c" in run.stdout and "--broker-dir" in run.stdout
        return (out / "mosquitto.conf").read_text()

    broker = start_mosquitto(tmp_path / "run", generate)
    try:
        hub_password = (data_dir / HUB_PASSWORD_FILE).read_text().strip()
        hub = broker.probe(username="edgepack-hub", password=hub_password)
        device = broker.probe(username="dev-x", password="pw-x")
        try:
            hub.subscribe("edgepack/devices/+/reported")
            device.publish("edgepack/devices/dev-x/reported", b"{}")
            device.publish("edgepack/devices/dev-y/reported", b"not mine")
            assert hub.expect(lambda m: True).topic == "edgepack/devices/dev-x/reported"
            assert hub.received_within(lambda m: True, 0.5) == []
        finally:
            device.close()
            hub.close()
    finally:
        broker.stop()


def test_hub_generates_and_uses_its_own_broker_password(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    broker_dir = tmp_path / "broker"
    settings = HubSettings(data_dir=tmp_path / "hub", broker_dir=broker_dir, mqtt_host="127.0.0.1")
    core = HubCore.open(settings)
    MosquittoAccounts(core.sessions, settings).sync()
    core.close()
    password = (settings.data_dir / HUB_PASSWORD_FILE).read_text().strip()
    assert password and password not in (broker_dir / "passwd").read_text()
    broker = broker_factory(broker_dir)
    hub = open_hub(settings.model_copy(update={"mqtt_port": broker.port, "broker_pid_file": broker.pid_file}))
    try:
        hub.start()
        assert hub.link is not None and hub.link.wait_connected(10)
        hub.link.publish_desired("dev-1", b"state")  # the hub's ACL lets it publish anywhere
    finally:
        hub.close()


def test_the_hub_data_dir_follows_edgepack_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDGEPACK_HUB_DATA_DIR", raising=False)
    assert HubSettings().data_dir == tmp_path / "home" / "hub"
    monkeypatch.setenv("EDGEPACK_HUB_DATA_DIR", str(tmp_path / "elsewhere"))  # still the override
    assert HubSettings().data_dir == tmp_path / "elsewhere"


def test_cli_broker_config_without_data_dir_writes_into_edgepack_home(tmp_path: Path) -> None:
    home, user_home = tmp_path / "edgepack-home", tmp_path / "user"
    user_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update({"EDGEPACK_HOME": str(home), "HOME": str(user_home), "COLUMNS": "1000"})
    run = subprocess.run(
        [sys.executable, "-m", "packager", "hub", "broker-config", "--out", str(tmp_path / "broker")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert (home / "hub" / HUB_PASSWORD_FILE).is_file()
    assert f"--data-dir {home / 'hub'} " in run.stdout
    assert not (user_home / ".edgepack").exists()
