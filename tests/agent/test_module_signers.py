"""A device runs a module only if a key its desired state allows for that module's name signed
it, whatever else the device trusts: the hub's check of module ownership is made again where
the module runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests.signing import generate_private_key, key_id, public_key_pem
from tests.agent.conftest import Fleet, free_port, score, start_fleet, stop_fleet, wait_for
from tests.agent.modules import files
from tests.conftest import Publisher
from tests.factory import Forge
from tests.hub.broker_fixtures import BrokerFactory
from tests.hub.conftest import HubFactory


@pytest.fixture
def fleet_of_two_publishers(
    hub: HubFactory, broker_factory: BrokerFactory, topic_prefix: str, publisher: Publisher, tmp_path: Path
) -> Iterator[tuple[Fleet, Forge]]:
    """A fleet whose hub (and so every device enrolled there) trusts two publisher keys: the
    test session's, and the second one the returned forge signs with."""
    second = Forge(publisher=generate_private_key())
    keys = []
    for name, key in (("first", publisher.key), ("second", second.publisher)):
        keys.append(tmp_path / f"{name}.pub")
        keys[-1].write_bytes(public_key_pem(key.public_key()))
    fleet = start_fleet(hub, broker_factory, topic_prefix, publisher, tmp_path / "fleet", trusted_keys=keys)
    try:
        yield fleet, second
    finally:
        stop_fleet(fleet)


def test_a_version_signed_by_a_key_its_state_does_not_allow_fails_and_the_last_good_keeps_serving(
    fleet_of_two_publishers: tuple[Fleet, Forge],
) -> None:
    fleet, second = fleet_of_two_publishers
    second_id = key_id(second.publisher.public_key())
    agent = fleet.device("edge-1").start()
    assert len(agent.credentials["publishers"]["keys"]) == 2  # the device trusts both publishers
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    serving = agent.service("demo")
    assert serving is not None

    # The second publisher was granted the name long enough to push version 2, then the grant
    # was revoked: the state naming version 2 allows only the owner's key.
    with fleet.http() as http:
        assert http.put(f"/api/v1/modules/demo/signers/{second_id}").status_code == 200
    v2 = fleet.push("demo", "2", files=files(factor=3), forge=second)
    with fleet.http() as http:
        assert http.delete(f"/api/v1/modules/demo/signers/{second_id}").status_code == 200
    fleet.deploy("demo", v2, port=port, devices=["edge-1"])

    body = fleet.wait_rollup("demo", "Failed")
    reason = body["devices"][0]["reason"]
    assert f"signed by {second_id[:16]}" in reason and "may not sign module 'demo'" in reason, reason
    assert "edgepack module grant demo KEYID" in reason
    assert score(port, [1, 2]) == {"result": [2, 4]}, "version 1 still answers"
    status = wait_for(lambda: (s := agent.service("demo")) and s["version"] == "2" and s, log=agent.log,
                      what="the device to report version 2 refused")  # fmt: skip
    assert status["state"] == "Failed" and status["serving_version"] == "1"
    assert status["pid"] == serving["pid"], "the serving instance was never stopped"

    # The admin grants the key again: the state that names it is a new assignment, so the
    # device tries version 2 once more, and runs it.
    with fleet.http() as http:
        assert http.put(f"/api/v1/modules/demo/signers/{second_id}").status_code == 200
    wait_for(lambda: (s := agent.service("demo")) and s["serving_version"] == "2" and s["state"] == "Healthy",
             log=agent.log, what="version 2 serving after the grant")  # fmt: skip
    # Version 1 stays in the port group as the standby until version 2 has been healthy for
    # restart.settle_s (docs/agent.md), so a new connection may still reach it for a while:
    # version 2 answering is what shows it runs.
    wait_for(lambda: score(port, [1, 2]) == {"result": [3, 6]}, log=agent.log, what="version 2 answering")
