"""How the reconcile loop takes desired states from its two sources (no broker, no hub: the
loop is fed the bytes each source would hand it)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.reconcile.loop import ReconcileLoop
from edge_agent.uplink.http import HubHttp
from edge_agent.uplink.mqtt import DesiredMessage
from manifests.device import AgentConfig, DeviceCredentials
from tests.factory import Forge

EXAMPLE = Path(__file__).parents[2] / "manifests" / "examples" / "device-credentials.json"


def _loop(tmp_path: Path, forge: Forge) -> ReconcileLoop:
    data = json.loads(EXAMPLE.read_text())
    data["device_id"] = "device-1"
    data["hub_url"] = "http://127.0.0.1:9"  # never called: the test feeds the loop itself
    data["mqtt"]["tls"] = False
    data["hub_key"] = forge.hub_trust.keys[0].model_dump(mode="json")
    data["publishers"] = forge.trust.model_dump(mode="json")
    credentials = DeviceCredentials.model_validate(data)
    config = AgentConfig(
        credentials=tmp_path / "edge.json", state_dir=tmp_path / "state", runtimes=["process"]
    )
    return ReconcileLoop(
        config,
        credentials,
        runtimes={},
        hub=HubHttp(credentials),
        publish_reported=lambda _: None,
        publish_logs=lambda _: None,
        agent_version="test",
    )


def _state(forge: Forge, generation: int) -> bytes:
    return forge.desired_bytes(forge.desired_state("device-1", generation, []))


def test_an_http_answer_older_than_the_applied_state_is_dropped_without_a_false_refusal(
    tmp_path: Path,
) -> None:
    # A poll sent before generation 5 arrived over MQTT answers generation 4: it was reported
    # as a refused replay, hiding any real refusal behind it.
    forge = Forge()
    loop = _loop(tmp_path, forge)
    loop.handle(DesiredMessage(_state(forge, 5), "mqtt"))
    assert loop.record.applied_generation == 5
    loop.handle(DesiredMessage(_state(forge, 4), "http"))
    assert loop.record.applied_generation == 5
    assert loop.record.last_error is None


def test_an_older_state_over_mqtt_is_still_refused_and_reported(tmp_path: Path) -> None:
    forge = Forge()
    loop = _loop(tmp_path, forge)
    loop.handle(DesiredMessage(_state(forge, 5), "mqtt"))
    loop.handle(DesiredMessage(_state(forge, 4), "mqtt"))
    assert loop.record.applied_generation == 5
    assert loop.record.last_error is not None and "not-newer" in loop.record.last_error
