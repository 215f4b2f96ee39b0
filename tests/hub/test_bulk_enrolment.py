"""Bulk enrolment from a CSV file, as an operator runs it: ``edgepack device enroll --from-file``.

Against a real hub that writes a real Mosquitto's password file and ACL: every enrolled device
logs in with its own credentials file, gets its own desired state and nobody else's; a bad row,
or a device already enrolled, refuses the whole file and nothing is enrolled or written.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cloud_hub.broker.mosquitto import prepare_broker_dir
from cloud_hub.settings import HubSettings
from manifests.device import parse_credentials
from packager.sdk.device_file import parse_device_file
from packager.sdk.errors import BadArgument
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker, BrokerFactory, MqttProbe
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import deploy, enroll, hub_trust, push, verified_state
from tests.hub.test_fleet_cli import one_line_error, run

HUB_PASSWORD = "hub-secret-for-bulk-tests"


def _secured_hub(
    hub: HubFactory, broker_factory: BrokerFactory, tmp_path: Path, prefix: str, **overrides: Any
) -> tuple[RunningHub, Broker]:
    broker_dir = tmp_path / "broker"
    prepare_broker_dir(
        HubSettings(
            data_dir=tmp_path / "prep", broker_dir=broker_dir, topic_prefix=prefix,
            mqtt_password=SecretStr(HUB_PASSWORD),
        )
    )  # fmt: skip
    broker = broker_factory(broker_dir)
    h = hub(
        mqtt_host=broker.host, mqtt_port=broker.port, mqtt_password=HUB_PASSWORD, broker_dir=broker_dir,
        broker_pid_file=broker.pid_file, topic_prefix=prefix, **overrides,
    )  # fmt: skip
    return h, broker


def _connect(broker: Broker, user: str, password: str) -> MqttProbe:
    # Mosquitto reloads its password file on SIGHUP between network iterations.
    deadline = time.monotonic() + 10
    while True:
        try:
            return MqttProbe.connect(
                broker.host, broker.port, username=user, password=password, client_id=user
            )
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _device_ids(h: RunningHub) -> list[str]:
    with h.client() as http:
        return [d["id"] for d in http.get("/api/v1/devices").json()["devices"]]


def test_bulk_enrolled_devices_each_log_in_with_their_own_file_and_read_only_their_own_state(
    hub: HubFactory, publisher: Publisher, broker_factory: BrokerFactory, topic_prefix: str, tmp_path: Path
) -> None:
    h, broker = _secured_hub(hub, broker_factory, tmp_path, topic_prefix)
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        # A service already targets berlin: devices enrolled there get a state at once.
        assert deploy(http, "digits", mod, selector="site=berlin").status_code == 201
    ids = [f"bulk-{i:02d}" for i in range(24)]
    csv = tmp_path / "devices.csv"
    lines = ["id,tags"] + [
        f"{d},site={'berlin' if i % 2 == 0 else 'munich'};row={i}" for i, d in enumerate(ids)
    ]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "creds"

    result = run(
        tmp_path / "home", h, "device", "enroll", "--from-file", str(csv), "--out-dir", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["enrolled"] == len(ids)
    assert sorted(p.name for p in out.iterdir()) == [f"{d}.json" for d in ids]  # nothing else left behind

    creds = {}
    for device_id in ids:
        path = out / f"{device_id}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        creds[device_id] = c = parse_credentials(path.read_bytes(), source=str(path))
        assert c.device_id == device_id and c.mqtt.username == device_id
        assert len(c.publishers.keys) == 1
    assert len({c.mqtt.password for c in creds.values()}) == len(ids)
    with h.client() as http:
        listed = {d["id"]: d for d in http.get("/api/v1/devices").json()["devices"]}
    assert listed["bulk-03"]["tags"] == {"site": "munich", "row": "3"}
    assert listed["bulk-00"]["services"] == ["digits"] and listed["bulk-01"]["services"] == []

    trust = hub_trust(h)
    for i, device_id in enumerate(ids):
        c = creds[device_id]
        # Another device's password does not open this account.
        other = creds[ids[(i + 1) % len(ids)]].mqtt.password
        with pytest.raises(ConnectionRefusedError):
            MqttProbe.connect(
                broker.host, broker.port, username=device_id, password=other, client_id=device_id
            )
        device = _connect(broker, device_id, c.mqtt.password)
        try:
            device.subscribe(f"{topic_prefix}/devices/+/desired")
            got = device.received_within(lambda m: m.retain, 0.4 if i else 1.0)
            # Its own state and nobody else's, though every device has one retained.
            assert [m.topic for m in got] == [f"{topic_prefix}/devices/{device_id}/desired"]
            state = verified_state(got[0].payload, trust, device_id)
            assert [m.service for m in state.modules] == (["digits"] if i % 2 == 0 else [])
        finally:
            device.close()


def test_a_bad_row_refuses_the_whole_file_and_nothing_is_written(
    hub: HubFactory, broker_factory: BrokerFactory, topic_prefix: str, tmp_path: Path
) -> None:
    h, _broker = _secured_hub(hub, broker_factory, tmp_path, topic_prefix)
    home, out = tmp_path / "home", tmp_path / "creds"
    csv = tmp_path / "devices.csv"
    csv.write_text("id,tags\nok-1,site=a\nok-2,site=a\nbad id,site=a\nok-4,site=a\n")
    args = ("device", "enroll", "--from-file", str(csv), "--out-dir", str(out))
    error = one_line_error(run(home, h, *args), 2)
    assert "devices.csv row 4" in error and "'bad id'" in error
    assert _device_ids(h) == [] and not out.exists()

    # A device the hub already has: refused by the hub, for the whole file.
    with h.client() as http:
        enroll(http, "taken", site="a")
    csv.write_text("id,tags\nfresh-1,site=a\ntaken,site=b\nfresh-3,site=a\n")
    error = one_line_error(run(home, h, *args), 2)
    assert "'taken'" in error and "already enrolled" in error
    assert _device_ids(h) == ["taken"] and not out.exists()

    # A credentials file already in the folder is never overwritten: refused before enrolling.
    out.mkdir()
    (out / "fresh-3.json").write_text("{}")
    csv.write_text("id,tags\nfresh-1,site=a\nfresh-3,site=a\n")
    error = one_line_error(run(home, h, *args), 2)
    assert "row 3" in error and "already exists" in error
    assert _device_ids(h) == ["taken"] and [p.name for p in out.iterdir()] == ["fresh-3.json"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("name,tags\nx,a=b\n", "row 1: the header"),
        ("id,tags,site\nx,a=b,c\n", "row 1: the header"),
        ("id,tags\n", "lists no devices"),
        ("id,tags\nx,site=a,tier=b\n", "row 2: 3 fields"),
        ("id,tags\nx,site=a\ny,site\n", "row 3: tag 'site' is not key=value"),
        ("id,tags\nx,site=a\n\ny,site=b;site=c\n", "row 4: tag key 'site' is given twice"),
        ("id,tags\nx,site=a\nx,site=b\n", "row 3: device 'x' is listed twice (first on row 2)"),
        ("id,tags\nx,-site=a\n", "row 2: tag key '-site'"),
        ("id,tags\nx,site=a b\n", "row 2: tag value 'a b'"),
        ("id\n" + "a" * 64 + "\n", "row 2: device id"),
    ],
)
def test_a_device_file_is_checked_row_by_row(text: str, expected: str) -> None:
    with pytest.raises(BadArgument) as caught:
        parse_device_file(text)
    assert expected in str(caught.value)


def test_a_device_file_reads_ids_and_tags() -> None:
    rows = parse_device_file("ID, Tags\nedge-1,site=berlin; tier=gpu\n\nedge-2,\n")
    assert [(r.row, r.device_id, r.tags) for r in rows] == [
        (2, "edge-1", {"site": "berlin", "tier": "gpu"}),
        (4, "edge-2", {}),
    ]
