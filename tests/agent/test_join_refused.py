"""Joins an attacker (or a broken image) sends, against a real hub and the broker it manages:
each is refused with a clear error and a ``device.join-refused`` event, and leaves no device
row and no broker account behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from cloud_hub.broker.mosquitto import PASSWORD_FILE
from cloud_hub.fleet.tables import ProvisioningToken
from manifests.canonical import canonical_json
from manifests.join import make_join_request
from manifests.signing import envelope_bytes, generate_private_key, key_id, sign_payload
from tests.agent.conftest import Fleet


def _token(fleet: Fleet, uses: int = 10, **tags: str) -> dict[str, Any]:
    with fleet.http() as http:
        r = http.post("/api/v1/provisioning-tokens", json={"tags": tags, "uses": uses, "expires_in_s": 3600})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _hub_keyid(fleet: Fleet) -> str:
    with fleet.http() as http:
        keyid: str = http.get("/api/v1/hub/key").json()["keyid"]
    return keyid


def _request(
    fleet: Fleet, device_id: str, *, now: datetime | None = None, hub_keyid: str | None = None
) -> bytes:
    return make_join_request(
        generate_private_key(), device_id=device_id, hub_keyid=hub_keyid or _hub_keyid(fleet),
        nonce=os.urandom(16).hex(), now=now or datetime.now(UTC),
    )  # fmt: skip


def _join(fleet: Fleet, body: bytes, token: str) -> httpx.Response:
    with httpx.Client(base_url=fleet.hub.url, timeout=30) as http:
        return http.post(
            "/api/v1/join", content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )  # fmt: skip


def _refusals(fleet: Fleet) -> list[str]:
    with fleet.http() as http:
        events = http.get("/api/v1/dashboard/events", params={"after": 0}).json()["events"]
    return [e["message"] for e in events if e["kind"] == "device.join-refused"]


def _has_account(fleet: Fleet, device_id: str) -> bool:
    passwd = (fleet.root.parent / "broker" / PASSWORD_FILE).read_text()
    return any(line.split(":", 1)[0] == device_id for line in passwd.splitlines())


def _device_ids(fleet: Fleet) -> list[str]:
    with fleet.http() as http:
        return [
            d["id"] for d in http.get("/api/v1/devices", params={"include_revoked": True}).json()["devices"]
        ]


def _forge_field(body: bytes, **changes: Any) -> bytes:
    envelope = json.loads(body)
    envelope["signed"].update(changes)
    return canonical_json(envelope)


def _signed_anew(**changes: Any) -> Callable[[Fleet, bytes], bytes]:
    """A request its own key signs, with ``changes`` made before signing (a hostile device)."""

    def make(fleet: Fleet, _body: bytes) -> bytes:
        key = generate_private_key()
        body = make_join_request(
            key,
            device_id="edge-x1",
            hub_keyid=_hub_keyid(fleet),
            nonce=os.urandom(16).hex(),
            now=datetime.now(UTC),
        )
        payload = {**json.loads(body)["signed"], **changes}
        return envelope_bytes(sign_payload(payload, [key]))

    return make


def _other_key_signs(body: bytes) -> bytes:
    # The attacker signs a request with their own key but names another key (the victim's).
    other = generate_private_key()
    envelope = json.loads(body)
    sig = other.sign(canonical_json(envelope["signed"])).hex()
    envelope["signatures"] = [{"keyid": key_id(other.public_key()), "sig": sig}]
    return canonical_json(envelope)


def test_a_replayed_join_is_refused_and_the_device_keeps_its_one_account(fleet: Fleet) -> None:
    token = _token(fleet)["token"]
    body = _request(fleet, "edge-r1")
    assert _join(fleet, body, token).status_code == 201
    replay = _join(fleet, body, token)
    assert replay.status_code == 409, replay.text
    assert "has joined before" in replay.json()["error"]["message"]
    assert _device_ids(fleet) == ["edge-r1"]
    assert any("edge-r1" in m and "joined before" in m for m in _refusals(fleet))
    # Even once the device is revoked, its old request does not bring it back.
    with fleet.http() as http:
        assert http.post("/api/v1/devices/edge-r1/revoke").status_code == 200
    assert _join(fleet, body, token).status_code == 409


CASES: dict[str, tuple[Callable[[Fleet, bytes], bytes], int, str]] = {
    "another device id under the signature": (
        lambda f, b: _forge_field(b, device_id="edge-x9"), 422, "modified"),
    "a signature by a key other than the one named": (
        lambda f, b: _other_key_signs(b), 422, "by the key it names"),
    "a request made for another hub": (
        lambda f, b: _request(f, "edge-x1", hub_keyid="0" * 64), 422, "another hub"),
    "a request from an hour ago": (
        lambda f, b: _request(f, "edge-x1", now=datetime.now(UTC) - timedelta(hours=1)), 422, "replay"),
    "a password hash the broker would spend a second on": (
        _signed_anew(mqtt_password_hash="$7$9999999$" + "A" * 16 + "$" + "A" * 88), 422, "iteration count"),
    "a field the contract does not know": (_signed_anew(admin=True), 422, "admin"),
    "not a join request": (lambda f, b: b"{\"signed\": {}}", 422, "not a signed envelope"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_forged_join_request_is_refused_and_leaves_nothing(fleet: Fleet, case: str) -> None:
    token = _token(fleet)
    forge, status, words = CASES[case]
    body = forge(fleet, _request(fleet, "edge-x1"))
    r = _join(fleet, body, token["token"])
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert _device_ids(fleet) == []
    assert not _has_account(fleet, "edge-x1") and not _has_account(fleet, "edge-x9")
    assert _refusals(fleet), "no device.join-refused event"
    with fleet.http() as http:
        assert http.get("/api/v1/provisioning-tokens").json()["tokens"][0]["used"] == 0


def test_an_exhausted_revoked_expired_or_unknown_token_is_refused_and_leaves_nothing(fleet: Fleet) -> None:
    one = _token(fleet, uses=1, site="berlin")
    assert _join(fleet, _request(fleet, "edge-t1"), one["token"]).status_code == 201
    exhausted = _join(fleet, _request(fleet, "edge-t2"), one["token"])
    assert exhausted.status_code == 403 and "used up" in exhausted.json()["error"]["message"], exhausted.text

    revoked = _token(fleet)
    with fleet.http() as http:
        assert http.post(f"/api/v1/provisioning-tokens/{revoked['id']}/revoke").status_code == 200
    r = _join(fleet, _request(fleet, "edge-t3"), revoked["token"])
    assert r.status_code == 403 and "revoked" in r.json()["error"]["message"], r.text

    expired = _token(fleet)
    with fleet.hub.core.sessions.begin() as s:
        s.execute(
            update(ProvisioningToken).where(ProvisioningToken.id == expired["id"])
            .values(expires=datetime.now(UTC) - timedelta(seconds=1))
        )  # fmt: skip
    r = _join(fleet, _request(fleet, "edge-t4"), expired["token"])
    assert r.status_code == 403 and "expired" in r.json()["error"]["message"], r.text

    r = _join(fleet, _request(fleet, "edge-t5"), "ep_join_" + "A" * 43)
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"], r.text
    r = _join(fleet, _request(fleet, "edge-t6"), "not-a-token")
    assert r.status_code == 401, r.text

    assert _device_ids(fleet) == ["edge-t1"]
    for refused in ("edge-t2", "edge-t3", "edge-t4", "edge-t5"):
        assert not _has_account(fleet, refused)
        assert any(refused in m for m in _refusals(fleet)), refused
    assert _has_account(fleet, "edge-t1")


def test_a_device_whose_answer_was_lost_asks_again_and_its_old_request_stays_refused(fleet: Fleet) -> None:
    token = _token(fleet, uses=1, site="berlin")
    key = generate_private_key()
    keyid = _hub_keyid(fleet)

    def request(at: datetime) -> bytes:
        return make_join_request(
            key, device_id="edge-a1", hub_keyid=keyid, nonce=os.urandom(16).hex(), now=at
        )

    first = request(datetime.now(UTC) - timedelta(seconds=2))
    assert _join(fleet, first, token["token"]).status_code == 201  # ... and the answer never arrived
    # The device asks again with a new request signed by its key: the same answer, no use spent
    # (the token had one), nothing enrolled twice.
    again = _join(fleet, request(datetime.now(UTC)), token["token"])
    assert again.status_code == 201, again.text
    assert again.json()["device_id"] == "edge-a1" and again.json()["tags"] == {"site": "berlin"}
    assert _device_ids(fleet) == ["edge-a1"]
    # The requests it sent before are replays now; so is a newer one by another key.
    assert _join(fleet, first, token["token"]).status_code == 409
    other = make_join_request(generate_private_key(), device_id="edge-a1", hub_keyid=keyid,
                              nonce=os.urandom(16).hex(), now=datetime.now(UTC))  # fmt: skip
    assert _join(fleet, other, token["token"]).status_code in (403, 409)


def _pending(fleet: Fleet) -> list[dict[str, Any]]:
    with fleet.http() as http:
        waiting: list[dict[str, Any]] = http.get("/api/v1/joins/pending").json()["pending"]
    return waiting


def test_joins_of_an_approval_token_wait_for_the_admin_with_nothing_made_until_then(fleet: Fleet) -> None:
    with fleet.http() as http:
        asked = {"tags": {"site": "berlin"}, "uses": 5, "expires_in_s": 3600, "approval": True}
        r = http.post("/api/v1/provisioning-tokens", json=asked)
    token = r.json()["token"]
    key, keyid = generate_private_key(), _hub_keyid(fleet)

    def ask(device_id: str, k: Any = key) -> httpx.Response:
        body = make_join_request(k, device_id=device_id, hub_keyid=keyid, nonce=os.urandom(16).hex(),
                                 now=datetime.now(UTC))  # fmt: skip
        return _join(fleet, body, token)

    first = make_join_request(key, device_id="edge-p1", hub_keyid=keyid, nonce=os.urandom(16).hex(),
                              now=datetime.now(UTC) - timedelta(seconds=1))  # fmt: skip
    waiting = _join(fleet, first, token)
    assert waiting.status_code == 202 and waiting.json()["pending"] is True, waiting.text
    assert _device_ids(fleet) == [] and not _has_account(fleet, "edge-p1")
    assert [p["device_id"] for p in _pending(fleet)] == ["edge-p1"]
    assert _join(fleet, first, token).status_code == 409  # its request replayed
    assert ask("edge-p1").status_code == 202  # still waiting: the device asks again

    with fleet.http() as http:
        approved = http.post("/api/v1/joins/pending/edge-p1/approve")
    assert approved.status_code == 200, approved.text
    assert _device_ids(fleet) == ["edge-p1"] and _has_account(fleet, "edge-p1")
    answer = ask("edge-p1")
    assert answer.status_code == 201 and answer.json()["tags"] == {"site": "berlin"}, answer.text

    other = generate_private_key()
    assert ask("edge-p2", other).status_code == 202
    with fleet.http() as http:
        assert http.post("/api/v1/joins/pending/edge-p2/reject").status_code == 200
    refused = ask("edge-p2", other)
    assert refused.status_code == 403 and "rejected" in refused.json()["error"]["message"], refused.text
    assert _device_ids(fleet) == ["edge-p1"] and not _has_account(fleet, "edge-p2")
    assert any("edge-p2" in m and "rejected" in m for m in _refusals(fleet))
