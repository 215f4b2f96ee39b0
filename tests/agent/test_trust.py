"""What a device refuses: desired states it must not apply, and modules from a compromised
hub. In every case nothing that runs changes and the device says why."""

from __future__ import annotations

import json
import os
import time

import pytest
from sqlalchemy import update

from cloud_hub.registry.tables import Module
from manifests.signing import TrustStore, generate_private_key
from manifests.topics import device_topic
from tests.agent.conftest import HUB_PASSWORD, Agent, Fleet, free_port, score, wait_for
from tests.agent.modules import files
from tests.factory import DesiredDefect, Forge
from tests.hub.broker_fixtures import MqttProbe


def running_demo(fleet: Fleet) -> tuple[Agent, int, int]:
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    status = agent.status()
    return agent, port, status["applied_generation"]


@pytest.mark.parametrize(
    "defect",
    [d for d in DesiredDefect if d is not DesiredDefect.OVERSIZE],  # the broker caps packets first
    ids=str,
)
def test_a_desired_state_the_device_must_refuse_changes_nothing_and_is_reported(
    fleet: Fleet, defect: DesiredDefect
) -> None:
    agent, port, generation = running_demo(fleet)
    pid = agent.service("demo")["pid"]  # type: ignore[index]
    forge = Forge(publisher=fleet.publisher.key, hub=fleet.hub.core.hub_key)
    # Would stop the service if it were applied: an empty module list.
    data = forge.bad_desired(defect, device_id="edge-1", applied_generation=generation, modules=[])
    hub_user = MqttProbe.connect(
        fleet.broker.host, fleet.broker.port, username="edgepack-hub", password=HUB_PASSWORD
    )
    try:
        hub_user.publish(device_topic("edge-1", "desired", prefix=fleet.prefix), data, retain=True)
    finally:
        hub_user.close()
    if defect is DesiredDefect.REPLAYED:
        time.sleep(1.0)  # a replay of the applied generation is ignored without a word
        assert agent.status()["last_error"] is None
    else:
        error = wait_for(lambda: agent.status()["last_error"], what="the refusal", log=agent.log)
        assert defect.refusal.value in error and defect.reason in error
        device = wait_for(lambda: fleet.hub_device("edge-1").get("last_error"), what="the hub to hear of it")
        assert defect.reason in device
    status = agent.status()
    assert status["applied_generation"] == generation
    assert agent.service("demo")["pid"] == pid  # type: ignore[index]
    assert score(port, [3]) == {"result": [6]}


def test_a_module_signed_by_a_publisher_the_device_does_not_trust_runs_nothing(fleet: Fleet) -> None:
    # The hub trusts the publisher, the device does not: as if the hub had been made to
    # trust another key after the device was enrolled.
    agent = fleet.device("edge-1")
    creds = json.loads(agent.config.credentials.read_text())
    other = TrustStore().with_key(generate_private_key().public_key(), name="other")
    creds["publishers"] = other.model_dump(mode="json")
    agent.config.credentials.write_text(json.dumps(creds))
    agent.start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    body = fleet.wait_rollup("demo", "Failed")
    reason = body["devices"][0]["reason"]
    assert "untrusted key" in reason and "publishers the hub trusted when the device was enrolled" in reason
    assert not list(agent.state_dir.glob("cache/modules/*")), "nothing unverified is installed"
    assert agent.service("demo")["serving_version"] is None  # type: ignore[index]


def test_a_tampered_blob_from_the_hub_is_refused_and_never_used(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    module = fleet.push("demo", "1", files=files(factor=7))
    model_digest = next(f.digest for f in module.manifest.files if f.path == "model/model.json")
    # The hub's disk is changed behind its back (a compromised or failing hub).
    path = fleet.hub.core.blobs.path(model_digest)  # type: ignore[attr-defined]
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes().replace(b"7", b"9"))
    fleet.deploy("demo", module, port=free_port(), devices=["edge-1"])
    # The hub itself checks what it serves (cloud_hub.store.blobs.VerifiedReader): the download
    # is cut off before its end and the hub names the corrupt blob, so the agent, which checks
    # every blob against its digest too (tests/test_cache.py), never gets the changed bytes.
    deadline = time.monotonic() + 60
    while True:
        with fleet.hub.client() as http:
            events = http.get("/api/v1/dashboard/events").json()["events"]
        if any(e["kind"] == "blob-corrupt" and model_digest in e["message"] for e in events):
            break
        assert time.monotonic() < deadline, "the hub did not notice the corrupt blob"
        time.sleep(0.2)
    assert fleet.rollup("demo")["state"] != "Healthy"
    assert not (agent.state_dir / "cache" / "blobs" / "sha256" / model_digest.split(":")[1]).exists()


def test_a_manifest_that_is_not_the_one_the_desired_state_names_is_refused(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    module = fleet.push("demo", "1")
    other = fleet.push("other", "1", files=files(factor=5))
    # The registry row now serves another (validly signed) manifest under this digest.
    with fleet.hub.core.sessions.begin() as s:
        s.execute(update(Module).where(Module.manifest_digest == module.manifest_digest)
                  .values(manifest=other.manifest_bytes))  # fmt: skip
    fleet.deploy("demo", module, port=free_port(), devices=["edge-1"])
    body = fleet.wait_rollup("demo", "Failed")
    assert "does not match the digest in the signed desired state" in body["devices"][0]["reason"]
    assert agent.service("demo")["serving_version"] is None  # type: ignore[index]
