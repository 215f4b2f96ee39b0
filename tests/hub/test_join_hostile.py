"""``POST /api/v1/join`` under a client that reaches the hub's port without a provisioning token
of this hub (security.md §19): it learns nothing of the fleet and cannot starve the joins of
other devices."""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from typing import Any

import httpx

from manifests.join import PROVISIONING_TOKEN_PREFIX, make_join_request
from manifests.signing import generate_private_key
from tests.hub.conftest import HubFactory, RunningHub

#: A second loopback address: the attacker's joins come from another client than the device's.
ATTACKER_ADDRESS = "127.0.0.2"


def _unknown_token() -> str:
    """A token of the right shape that this hub never made."""
    return PROVISIONING_TOKEN_PREFIX + secrets.token_urlsafe(32)


def _made(h: RunningHub, **body: Any) -> dict[str, Any]:
    with h.client() as http:
        r = http.post("/api/v1/provisioning-tokens", json={"uses": 10, "expires_in_s": 600, **body})
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


def _request(h: RunningHub, device_id: str) -> bytes:
    return make_join_request(
        generate_private_key(), device_id=device_id, hub_keyid=h.core.hub_key_id,
        nonce=os.urandom(16).hex(), now=datetime.now(UTC),
    )  # fmt: skip


def _join(http: httpx.Client, body: bytes, token: str) -> httpx.Response:
    return http.post("/api/v1/join", content=body, headers={"Authorization": f"Bearer {token}"})


def _refusals(h: RunningHub) -> list[str]:
    with h.client() as http:
        events = http.get("/api/v1/dashboard/events", params={"after": 0}).json()["events"]
    return [e["message"] for e in events if e["kind"] == "device.join-refused"]


def test_a_join_without_a_token_of_this_hub_learns_nothing_of_enrolled_or_waiting_ids(
    hub: HubFactory,
) -> None:
    h = hub()
    plain, approval = _made(h), _made(h, approval=True)
    with httpx.Client(base_url=h.url, timeout=30) as http:
        assert _join(http, _request(h, "edge-known"), plain["token"]).status_code == 201
        assert _join(http, _request(h, "edge-waits"), approval["token"]).status_code == 202
        # The same answer whether the id is enrolled, waiting or unheard of: 401, no 409.
        answers = {
            device_id: _join(http, _request(h, device_id), _unknown_token())
            for device_id in ("edge-known", "edge-waits", "edge-never")
        }
    assert {d: r.status_code for d, r in answers.items()} == dict.fromkeys(answers, 401)
    assert len({r.json()["error"]["message"] for r in answers.values()}) == 1


def test_one_client_sending_wrong_joins_cannot_starve_another_devices_join(hub: HubFactory) -> None:
    # A bucket of 8 joins that hardly refills: a client spending all of it would lock every
    # device out. Its wrong joins get it blocked (for a minute, here) after 5 instead.
    h = hub(join_per_s=0.001, join_burst=8, login_delay_s=60)
    made = _made(h)
    attacker = httpx.HTTPTransport(local_address=ATTACKER_ADDRESS)
    statuses = []
    with httpx.Client(base_url=h.url, timeout=30, transport=attacker) as http:
        for n in range(12):
            # Valid requests (signed, fresh, for this hub) with a token it never made, and garbage.
            if n % 2:
                statuses.append(_join(http, b"{}", "no token").status_code)
            else:
                statuses.append(_join(http, _request(h, f"edge-a{n}"), _unknown_token()).status_code)
    assert statuses[:5] == [401] * 5, statuses
    assert set(statuses[5:]) == {429}, statuses
    with httpx.Client(base_url=h.url, timeout=30) as http:
        r = _join(http, _request(h, "edge-1"), made["token"])
    assert r.status_code == 201, r.text
    # The event log holds the first wrong joins and that the address was throttled, not one
    # event per attempt.
    refusals = _refusals(h)
    assert len(refusals) == 6, refusals
    assert any(ATTACKER_ADDRESS in m and "throttled" in m for m in refusals), refusals


def test_a_rejected_join_does_not_keep_its_id_from_the_device_that_owns_it(hub: HubFactory) -> None:
    # Whoever holds an approval token asks first as the id of a device to come; the admin
    # rejects it. The real device (another key) must still be able to join as that id.
    h = hub()
    approval, plain = _made(h, approval=True), _made(h)
    squatter = _request(h, "edge-v")
    with httpx.Client(base_url=h.url, timeout=30) as http:
        assert _join(http, squatter, approval["token"]).status_code == 202
        with h.client() as admin:
            assert admin.post("/api/v1/joins/pending/edge-v/reject").status_code == 200
        assert _join(http, _request(h, "edge-v"), approval["token"]).status_code == 202
        with h.client() as admin:
            (waiting,) = admin.get("/api/v1/joins/pending").json()["pending"]
            assert waiting["device_id"] == "edge-v" and not waiting["rejected"]
            assert admin.post("/api/v1/joins/pending/edge-v/reject").status_code == 200
        r = _join(http, _request(h, "edge-v"), plain["token"])
        assert r.status_code == 201, r.text
        # The rejected requests stay refused: a replay, and the first key asking again.
        assert _join(http, squatter, approval["token"]).status_code == 409
    with h.client() as admin:
        assert admin.get("/api/v1/joins/pending").json()["pending"] == []
        assert [d["id"] for d in admin.get("/api/v1/devices").json()["devices"]] == ["edge-v"]


def test_a_token_holder_replaying_a_join_is_throttled_and_cannot_fill_the_event_log(hub: HubFactory) -> None:
    h = hub(join_per_s=0.001, join_burst=10, login_delay_s=60)
    made = _made(h)
    body = _request(h, "edge-r")
    statuses = []
    with httpx.Client(
        base_url=h.url, timeout=30, transport=httpx.HTTPTransport(local_address=ATTACKER_ADDRESS)
    ) as http:
        for _ in range(12):
            statuses.append(_join(http, body, made["token"]).status_code)
    # Joined once, then 409 for each replay until the address is blocked.
    assert statuses == [201] + [409] * 5 + [429] * 6, statuses
    with httpx.Client(base_url=h.url, timeout=30) as http:
        assert _join(http, _request(h, "edge-1"), made["token"]).status_code == 201
    assert len(_refusals(h)) == 6, _refusals(h)


def test_a_revoked_device_cannot_undo_its_revocation_with_the_token_in_its_image(hub: HubFactory) -> None:
    h = hub()
    plain, approval = _made(h), _made(h, approval=True)
    with httpx.Client(base_url=h.url, timeout=30) as http:
        assert _join(http, _request(h, "edge-s"), plain["token"]).status_code == 201
        with h.client() as admin:
            assert admin.post("/api/v1/devices/edge-s/revoke").status_code == 200
        # Its image still holds the token; a new key as its id is refused.
        r = _join(http, _request(h, "edge-s"), plain["token"])
        assert r.status_code == 409, r.text
        assert "was revoked" in r.json()["error"]["message"]
        with h.client() as admin:
            (device,) = admin.get("/api/v1/devices", params={"include_revoked": True}).json()["devices"]
            assert device["revoked"]
        # Through the admin it may come back: a join that needs approval, approved.
        assert _join(http, _request(h, "edge-s"), approval["token"]).status_code == 202
        with h.client() as admin:
            assert admin.post("/api/v1/joins/pending/edge-s/approve").status_code == 200
            (device,) = admin.get("/api/v1/devices").json()["devices"]
            assert device["id"] == "edge-s" and not device["revoked"]


def test_a_refused_join_writes_the_event_log_as_text_not_as_terminal_controls(hub: HubFactory) -> None:
    h = hub()
    made = _made(h)
    envelope = json.loads(_request(h, "edge-t"))
    # A field name is quoted in the refusal: here one that would write the operator's clipboard
    # (OSC 52) and clear the screen on a terminal.
    envelope["signed"]["\x1b]52;c;ZXZpbA==\x07\x1b[2J"] = 1
    with httpx.Client(base_url=h.url, timeout=30) as http:
        assert _join(http, json.dumps(envelope).encode(), made["token"]).status_code == 422
    (refusal,) = _refusals(h)
    assert "\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J" in refusal, refusal
    assert not any(c in refusal for c in "\x1b\x07"), refusal
