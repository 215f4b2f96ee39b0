"""Credential rotation with real parts: a real hub, the Mosquitto it manages, and a real agent
process (or, to hold a rotation half-way on purpose, the test acting as the device).

The story: the admin runs ``edgepack device rotate``; the agent makes a new key, gets new
credentials over its current session, writes them, switches its broker session and confirms,
while its module keeps answering; then the old password and token are refused and the new ones
work, also after the agent restarts. Revoking the device mid-rotation refuses old and new at
once; one device's token cannot rotate another's credentials, nor replay a request.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.uplink.rotation import KEY_FILE, load_or_make_key
from manifests.device import DeviceCredentials
from manifests.durable import write_durable
from manifests.join import derive_secrets
from manifests.rotation import (
    CONFIRM_PATH,
    REQUEST_PATH,
    ROTATED_FILE,
    RotationAnswer,
    make_rotation_request,
    rotated_credentials,
    rotated_file_bytes,
)
from tests.agent.conftest import Fleet, free_port, score, wait_for
from tests.hub.broker_fixtures import MqttProbe


def _broker_accepts(fleet: Fleet, username: str, password: str) -> bool:
    try:
        probe = MqttProbe.connect(fleet.broker.host, fleet.broker.port, username=username,
                                  password=password, client_id=username)  # fmt: skip
    except ConnectionRefusedError:
        return False
    probe.close()
    return True


def _desired_status(fleet: Fleet, token: str) -> int:
    with fleet.hub.client(token=token) as http:
        return http.get("/api/v1/device/desired").status_code


def _events(fleet: Fleet, kind: str) -> list[dict[str, Any]]:
    with fleet.http() as http:
        r = http.get("/api/v1/dashboard/events")
    assert r.status_code == 200, r.text
    return [e for e in r.json()["events"] if e["kind"] == kind]


def _hub_key_id(fleet: Fleet) -> str:
    with fleet.http() as http:
        r = http.get("/api/v1/hub/key")
    assert r.status_code == 200, r.text
    keyid: str = r.json()["keyid"]
    return keyid


def test_rotation_while_a_module_serves_retires_the_old_credentials_and_survives_a_restart(
    fleet: Fleet,
) -> None:
    agent = fleet.device("edge-rot", poll_interval_s=1)
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-rot"])
    agent.start()
    agent.wait_state("demo", "Healthy", timeout=90)
    old = json.loads(agent.config.credentials.read_text())

    # Clients keep scoring through the whole rotation.
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def keep_scoring() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                assert score(port, [1, 2]) == {"result": [2, 4]}
                answered += 1
            except Exception as exc:  # any failure is the finding
                failures.append(repr(exc))

    scorer = threading.Thread(target=keep_scoring)
    scorer.start()
    try:
        with fleet.http() as http:
            r = http.post("/api/v1/devices/edge-rot/rotate")
        assert r.status_code == 200, r.text

        def rotated() -> dict[str, Any] | None:
            creds = fleet.hub_device("edge-rot")["credentials"]
            return creds if creds["generation"] == 1 and creds["rotation_requested"] is None else None

        creds = wait_for(rotated, timeout=60, what="the rotation confirmed", log=agent.log)
    finally:
        stop.set()
        scorer.join()
    assert failures == [] and answered > 0
    assert creds["mqtt_username"] == "edge-rot~r1" and creds["rotated_at"] is not None

    # The new credentials are in the state folder, readable by the agent alone (the configured
    # file may be read-only to it, and is left as it was).
    assert json.loads(agent.config.credentials.read_text()) == old
    path = agent.state_dir / ROTATED_FILE
    new = json.loads(path.read_text())["credentials"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert new["mqtt"]["username"] == "edge-rot~r1"
    assert new["token"] != old["token"] and new["mqtt"]["password"] != old["mqtt"]["password"]
    # The agent removes its rotation key once the hub answered its confirmation (a crash before
    # that confirms again at start).
    key_file = agent.state_dir / "rotation-key.pem"
    wait_for(lambda: not key_file.exists(), timeout=10, what="the rotation key removed", log=agent.log)

    # The old account's persistent session was ended with a clean connect (Mosquitto's log
    # line "as <client> (p2, c1, ...)"), not left queueing messages for a client gone for good.
    assert "as edge-rot (p2, c1" in fleet.broker.log_text()
    # Old credentials are refused by the broker and the hub, the new ones work.
    assert not _broker_accepts(fleet, old["mqtt"]["username"], old["mqtt"]["password"])
    assert _desired_status(fleet, old["token"]) == 401
    assert _desired_status(fleet, new["token"]) == 200
    assert [e["device_id"] for e in _events(fleet, "device.credentials-rotated")] == ["edge-rot"]
    # Polls that said "rotate" while the rotation ran do not start another one.
    time.sleep(3)  # three polls
    assert _events(fleet, "device.rotation-refused") == []
    assert fleet.hub_device("edge-rot")["credentials"]["generation"] == 1
    # The agent's broker session is the new one: a log request (MQTT only) is answered.
    with fleet.http() as http:
        logs = http.get("/api/v1/deployments/demo/logs", params={"device": "edge-rot", "tail": 5})
    assert logs.status_code == 200, logs.text + agent.log()
    assert fleet.hub_device("edge-rot")["online"]

    # The agent restarted after the rotation reads its new credentials and reconnects.
    agent.stop()
    wait_for(lambda: not fleet.hub_device("edge-rot")["online"], timeout=30, what="offline after stop")
    agent.start()
    wait_for(lambda: fleet.hub_device("edge-rot")["online"], timeout=60, what="online again", log=agent.log)
    assert score(port, [3]) == {"result": [6]}


def _enrolled(fleet: Fleet, device_id: str) -> dict[str, Any]:
    with fleet.http() as http:
        r = http.post("/api/v1/devices", json={"id": device_id, "tags": {}})
    assert r.status_code == 201, r.text
    creds: dict[str, Any] = r.json()["device_credentials"]
    return creds


def _ask(fleet: Fleet, token: str, body: bytes) -> httpx.Response:
    with fleet.hub.client(token=token) as http:
        return http.post(REQUEST_PATH, content=body, headers={"Content-Type": "application/json"})


def test_revoking_mid_rotation_refuses_old_and_new_credentials_at_once(fleet: Fleet) -> None:
    creds = _enrolled(fleet, "edge-mid")
    with fleet.http() as http:
        assert http.post("/api/v1/devices/edge-mid/rotate").status_code == 200
        # One rotation in flight per device.
        again = http.post("/api/v1/devices/edge-mid/rotate")
    assert again.status_code == 409 and "in flight" in again.json()["error"]["message"]
    # The device hears of it in the answer it asks for anyway.
    with fleet.hub.client(token=creds["token"]) as http:
        assert http.get("/api/v1/device/desired").headers.get("x-edgepack-rotate-credentials")

    key = Ed25519PrivateKey.generate()
    secrets = derive_secrets(key)
    body = make_rotation_request(key, device_id="edge-mid", hub_keyid=_hub_key_id(fleet),
                                 nonce="1" * 32, now=datetime.now(UTC))  # fmt: skip
    answer = _ask(fleet, creds["token"], body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["mqtt_username"] == "edge-mid~r1"
    # Half-way: both work, on the broker and on the hub.
    old_user, old_password = creds["mqtt"]["username"], creds["mqtt"]["password"]
    wait_for(lambda: _broker_accepts(fleet, "edge-mid~r1", secrets.mqtt_password), timeout=20,
             what="the new broker user")  # fmt: skip
    assert _broker_accepts(fleet, old_user, old_password)
    assert _desired_status(fleet, creds["token"]) == 200
    assert _desired_status(fleet, secrets.token) == 200
    assert fleet.hub_device("edge-mid")["credentials"]["rotation_stage"] == "both-valid"

    # Both sessions are connected when the admin revokes: both are cut off, both refused.
    sessions = [
        MqttProbe.connect(fleet.broker.host, fleet.broker.port, username=u, password=p, client_id=u)
        for u, p in ((old_user, old_password), ("edge-mid~r1", secrets.mqtt_password))
    ]
    with fleet.http() as http:
        assert http.post("/api/v1/devices/edge-mid/revoke").status_code == 200
    wait_for(lambda: all(s.disconnects for s in sessions), timeout=20, what="both sessions cut off")
    for s in sessions:
        s.close()
    assert not _broker_accepts(fleet, old_user, old_password)
    assert not _broker_accepts(fleet, "edge-mid~r1", secrets.mqtt_password)
    assert _desired_status(fleet, creds["token"]) == 401
    assert _desired_status(fleet, secrets.token) == 401
    with fleet.hub.client(token=secrets.token) as http:
        assert http.post(CONFIRM_PATH).status_code == 401


def test_a_device_cannot_rotate_another_devices_credentials_nor_replay_a_request(fleet: Fleet) -> None:
    mine, theirs = _enrolled(fleet, "edge-a"), _enrolled(fleet, "edge-b")
    hub_keyid = _hub_key_id(fleet)
    with fleet.http() as http:
        assert http.post("/api/v1/devices/edge-b/rotate").status_code == 200

    def request(device_id: str, nonce: str) -> tuple[Ed25519PrivateKey, bytes]:
        key = Ed25519PrivateKey.generate()
        return key, make_rotation_request(key, device_id=device_id, hub_keyid=hub_keyid, nonce=nonce,
                                          now=datetime.now(UTC))  # fmt: skip

    # edge-a's token with a request for edge-b: refused, edge-b's credentials untouched.
    _, foreign = request("edge-b", "2" * 32)
    refused = _ask(fleet, mine["token"], foreign)
    assert refused.status_code == 422, refused.text
    assert "only its own credentials" in refused.json()["error"]["message"]
    assert fleet.hub_device("edge-b")["credentials"]["rotation_stage"] == "requested"
    # edge-a has no rotation asked: its own request is refused too.
    _, own = request("edge-a", "3" * 32)
    assert _ask(fleet, mine["token"], own).status_code == 409
    # The new token of a rotation cannot ask for another one; only the current token can.
    key, good = request("edge-b", "4" * 32)
    assert _ask(fleet, theirs["token"], good).status_code == 200
    assert _ask(fleet, derive_secrets(key).token, good).status_code == 401
    # The same request again is a replay.
    replay = _ask(fleet, theirs["token"], good)
    assert replay.status_code == 409 and "replay" in replay.json()["error"]["message"]
    # A body far over a rotation request's size is refused before it is held.
    assert _ask(fleet, theirs["token"], b"x" * 64 * 1024).status_code == 413
    assert len(_events(fleet, "device.rotation-refused")) >= 3



def test_an_agent_that_crashed_after_writing_its_new_credentials_resumes_and_confirms(fleet: Fleet) -> None:
    """The agent died between writing the new credentials and confirming them: it starts with
    the new (not yet confirmed) credentials, which work, and confirms; nothing is lost."""
    agent = fleet.device("edge-crash", poll_interval_s=1)
    with fleet.http() as http:
        assert http.post("/api/v1/devices/edge-crash/rotate").status_code == 200
    # What the agent had done before it died: the key, the request, the new credentials file.
    agent.state_dir.mkdir(mode=0o700, parents=True)
    key = load_or_make_key(agent.state_dir / KEY_FILE)
    secrets = derive_secrets(key)
    body = make_rotation_request(key, device_id="edge-crash", hub_keyid=_hub_key_id(fleet),
                                 nonce="5" * 32, now=datetime.now(UTC))  # fmt: skip
    answer = _ask(fleet, agent.credentials["token"], body)
    assert answer.status_code == 200, answer.text
    current = DeviceCredentials.model_validate(agent.credentials)
    written = rotated_credentials(current, secrets, RotationAnswer.model_validate(answer.json()))
    path = agent.state_dir / ROTATED_FILE
    write_durable(path, rotated_file_bytes(agent.config.credentials.read_bytes(), written), mode=0o600)

    agent.start()
    creds = wait_for(
        lambda: (c := fleet.hub_device("edge-crash")["credentials"])["rotation_requested"] is None and c,
        timeout=60, what="the resumed rotation confirmed", log=agent.log,
    )  # fmt: skip
    assert creds["generation"] == 1
    wait_for(lambda: fleet.hub_device("edge-crash")["online"], timeout=30, what="online", log=agent.log)
    assert json.loads(path.read_text())["credentials"]["token"] == secrets.token
    wait_for(lambda: not (agent.state_dir / KEY_FILE).exists(), timeout=10, what="key removed")
    assert not _broker_accepts(fleet, "edge-crash", agent.credentials["mqtt"]["password"])
