"""A provisioning token's uses under concurrency: many devices join at once (through one hub,
or two hub replicas on one PostgreSQL database) and exactly ``uses`` of them get in."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest

from cloud_hub.fleet.joins import TokenBucket
from cloud_hub.fleet.provisioning import MAX_TOKEN_USES
from manifests.join import make_join_request
from manifests.signing import generate_private_key
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.test_serving_bounds import _answer_to_head, _head

USES = 7
DEVICES = 40


def _join_all(hubs: list[RunningHub], token: str, keyid: str) -> list[int]:
    requests = [
        make_join_request(
            generate_private_key(),
            device_id=f"edge-{n:03d}",
            hub_keyid=keyid,
            nonce=os.urandom(16).hex(),
            now=datetime.now(UTC),
        )
        for n in range(DEVICES)
    ]

    def send(n: int) -> int:
        with httpx.Client(base_url=hubs[n % len(hubs)].url, timeout=60) as http:
            r = http.post("/api/v1/join", content=requests[n], headers={"Authorization": f"Bearer {token}"})
        assert r.status_code in (201, 403), r.text
        return r.status_code

    with ThreadPoolExecutor(max_workers=DEVICES) as pool:
        return list(pool.map(send, range(DEVICES)))


def _check_exactly_uses_joined(hubs: list[RunningHub]) -> None:
    with hubs[0].client() as http:
        made = http.post("/api/v1/provisioning-tokens", json={"uses": USES, "expires_in_s": 600}).json()
        keyid = http.get("/api/v1/hub/key").json()["keyid"]
    statuses = _join_all(hubs, made["token"], keyid)
    assert statuses.count(201) == USES, statuses
    with hubs[-1].client() as http:
        assert len(http.get("/api/v1/devices").json()["devices"]) == USES
        (token,) = http.get("/api/v1/provisioning-tokens").json()["tokens"]
    assert token["used"] == USES


def test_concurrent_joins_never_spend_more_uses_than_the_token_has(hub: HubFactory) -> None:
    _check_exactly_uses_joined([hub()])


def test_two_replicas_on_postgresql_never_spend_the_same_use_twice(hub: HubFactory, postgres: str) -> None:
    first = hub(postgres=postgres)
    # Replicas share the database and the hub key (as behind a load balancer).
    second = hub(db=first.overrides["db"], hub_key=first.data_dir / "hub.key")
    _check_exactly_uses_joined([first, second])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"uses": 0, "expires_in_s": 600}, "uses"),
        ({"uses": MAX_TOKEN_USES + 1, "expires_in_s": 600}, "uses"),
        ({"uses": 1, "expires_in_s": 10}, "expires_in_s"),
        ({"uses": 1, "expires_in_s": 600, "tags": {"site": "bad value!"}}, "tag"),
        ({"uses": 1, "expires_in_s": 600, "admin": True}, "admin"),
    ],
)
def test_a_token_out_of_bounds_is_refused_with_a_4xx(
    hub: HubFactory, body: dict[str, object], words: str
) -> None:
    with hub().client() as http:
        r = http.post("/api/v1/provisioning-tokens", json=body)
    assert r.status_code in (400, 422), r.text
    assert words in r.text


def test_a_token_is_shown_once_and_kept_only_as_its_hash(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        made = http.post("/api/v1/provisioning-tokens", json={"uses": 1, "expires_in_s": 600}).json()
        listed = http.get("/api/v1/provisioning-tokens").json()["tokens"]
    assert made["token"].startswith("ep_join_")
    assert "token" not in listed[0]
    assert not any(made["token"].encode() in p.read_bytes() for p in h.data_dir.rglob("*") if p.is_file())


def test_joins_beyond_the_rate_bound_are_answered_429_with_retry_after(hub: HubFactory) -> None:
    h = hub(join_per_s=0.01, join_burst=2)
    with h.client() as http:
        made = http.post("/api/v1/provisioning-tokens", json={"uses": 10, "expires_in_s": 600}).json()
        keyid = http.get("/api/v1/hub/key").json()["keyid"]
    statuses = []
    with httpx.Client(base_url=h.url, timeout=30) as http:
        for n in range(4):
            body = make_join_request(
                generate_private_key(), device_id=f"edge-{n}", hub_keyid=keyid,
                nonce=os.urandom(16).hex(), now=datetime.now(UTC),
            )  # fmt: skip
            # One keep-alive connection throughout: a refusal must not cost it (a reset).
            r = http.post("/api/v1/join", content=body, headers={"Authorization": f"Bearer {made['token']}"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert float(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "Throttled"
    assert statuses == [201, 201, 429, 429]
    with h.client() as http:
        assert len(http.get("/api/v1/devices").json()["devices"]) == 2


def test_a_join_body_larger_than_a_join_request_is_refused_before_it_is_read(hub: HubFactory) -> None:
    # The join takes a body from anyone holding a token-shaped header: only a small one.
    h = hub()
    head = _head("/api/v1/join", 1_000_000, "Authorization: Bearer ep_join_" + "A" * 43)
    answer = _answer_to_head(h.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]


def test_the_join_bucket_admits_its_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [None, None, None]
    assert bucket.take() == pytest.approx(0.5)  # the next one in half a second
    now[0] = 0.5
    assert bucket.take() is None
    now[0] = 100.0  # a long pause refills only up to the burst
    assert [bucket.take() is None for _ in range(4)] == [True, True, True, False]
