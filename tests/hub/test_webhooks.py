"""Events to webhooks: an admin subscribes a URL; the hub sends each matching event as a signed
CloudEvent, retries, dead-letters, and survives a restart (docs/webhooks.md)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_hub.events import trim_events
from manifests.signing import public_key_pem
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker
from tests.hub.conftest import ADMIN_TOKEN, HubFactory, RunningHub
from tests.hub.fleet_support import deploy, push
from tests.hub.fleet_support import enroll as fleet_enroll
from tests.hub.test_dashboard import reported
from tests.hub.test_hostile_clients import serve_hub_process
from tests.hub.test_registry_cli import ok_json, run
from tests.hub.test_registry_models import register
from tests.hub.webhook_receiver import Receiver, start_receiver

#: Quick retries and polling, so that a test's receiver outage lasts seconds.
FAST: dict[str, Any] = {
    "webhook_poll_s": 0.05,
    "webhook_retry_base_s": 0.1,
    "webhook_retry_max_s": 0.5,
    "webhook_timeout_s": 2,
}


def _running_receiver() -> Iterator[Receiver]:
    made = start_receiver()
    yield made
    assert made.server is not None
    made.server.shutdown()


receiver = pytest.fixture(_running_receiver, name="receiver")
second_receiver = pytest.fixture(_running_receiver, name="second_receiver")


def subscribe(h: RunningHub, url: str, **body: Any) -> dict[str, Any]:
    with h.client() as c:
        r = c.post("/api/v1/webhooks", json={"url": url, **body})
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


def enroll(h: RunningHub, *ids: str) -> None:
    with h.client() as c:
        r = c.post("/api/v1/devices/bulk", json={"devices": [{"id": i} for i in ids]})
    assert r.status_code == 201, r.text


def revoke(h: RunningHub, device_id: str) -> None:
    with h.client() as c:
        assert c.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200


def test_a_subscriber_gets_signed_cloudevents_of_the_types_and_device_it_asked_for(
    hub: HubFactory, receiver: Receiver
) -> None:
    h = hub(**FAST)
    sub = subscribe(h, receiver.url, events=["device.enrolled"], filters={"device": "edge-1"})
    receiver.secret = sub["secret"]
    assert sub["secret"].startswith("whsec_")

    enroll(h, "edge-0", "edge-1", "edge-2")
    revoke(h, "edge-1")
    [event] = receiver.wait_for(1)
    time.sleep(0.5)  # anything else would have come by now

    assert len(receiver.received) == 1
    assert event["specversion"] == "1.0"
    assert event["type"] == "edgepack.device.enrolled"
    assert event["subject"] == "devices/edge-1"
    assert event["data"]["device"] == "edge-1"
    headers = receiver.received[0].headers
    assert headers["webhook-id"] == event["id"]
    assert headers["content-type"].startswith("application/cloudevents+json")
    with h.client() as c:
        listed = c.get("/api/v1/webhooks").json()
    assert [s["id"] for s in listed] == [sub["id"]]
    assert "secret" not in listed[0]  # shown once, at creation


def test_a_receiver_that_fails_then_recovers_gets_everything_in_order_per_subject(
    hub: HubFactory, receiver: Receiver
) -> None:
    h = hub(**FAST)
    receiver.secret = subscribe(h, receiver.url)["secret"]
    receiver.mode = "fail"
    devices = [f"edge-{i}" for i in range(5)]
    enroll(h, *devices)
    for d in devices:
        revoke(h, d)
    assert receiver.wait_attempts(10) >= 10  # retried while failing
    receiver.mode = "ok"

    events = receiver.wait_for(10)
    for d in devices:
        about = [e["type"] for e in events if e["subject"] == f"devices/{d}"]
        assert about == ["edgepack.device.enrolled", "edgepack.device.revoked"]
    assert len(receiver.ids()) == len(set(receiver.ids()))
    # /metrics counts the attempts, failed and delivered, as a Grafana user reads them.
    with h.client() as http:
        text = http.get("/metrics").text
    counted = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edgepack_hub_webhook_deliveries_total"
    }
    assert counted["failed"] >= 10 and counted["delivered"] >= 10, counted


def test_a_receiver_that_hangs_does_not_hold_up_another_subscription(
    hub: HubFactory, receiver: Receiver, second_receiver: Receiver
) -> None:
    h = hub(**{**FAST, "webhook_timeout_s": 20, "webhook_concurrency": 8,
               "webhook_concurrency_per_subscription": 4})
    receiver.mode = "hang"
    subscribe(h, receiver.url)
    second_receiver.secret = subscribe(h, second_receiver.url)["secret"]

    started = time.monotonic()
    enroll(h, *[f"edge-{i}" for i in range(40)])
    second_receiver.wait_for(40, timeout=10)
    assert time.monotonic() - started < 10  # not after the hanging receiver's 20 s timeout
    assert receiver.attempts <= 4  # it holds no more than its own share of requests


def test_a_redirect_is_not_followed_and_the_delivery_ends_as_a_dead_letter_that_can_be_replayed(
    hub: HubFactory, receiver: Receiver, second_receiver: Receiver
) -> None:
    h = hub(**{**FAST, "webhook_max_age_s": 1})
    receiver.mode = "redirect"
    receiver.redirect_to = second_receiver.url
    sub = subscribe(h, receiver.url)
    receiver.secret = sub["secret"]
    enroll(h, "edge-1")

    deadline = time.monotonic() + 15
    dead: list[dict[str, Any]] = []
    with h.client() as c:
        while not dead and time.monotonic() < deadline:
            dead = c.get(f"/api/v1/webhooks/{sub['id']}/dead").json()
            time.sleep(0.1)
        assert len(dead) == 1
        assert "redirect" in dead[0]["last_error"] and "not followed" in dead[0]["last_error"]
        assert second_receiver.attempts == 0

        receiver.mode = "ok"
        assert c.post(f"/api/v1/webhooks/{sub['id']}/replay").json() == {"replayed": 1}
        [event] = receiver.wait_for(1)
        assert event["id"] == dead[0]["message_id"]
        assert c.get(f"/api/v1/webhooks/{sub['id']}/dead").json() == []


def test_pending_deliveries_go_out_after_a_hub_restart_and_none_twice(
    hub: HubFactory, receiver: Receiver
) -> None:
    h = hub(**FAST)
    receiver.secret = subscribe(h, receiver.url)["secret"]
    receiver.mode = "fail"
    enroll(h, *[f"edge-{i}" for i in range(20)])
    receiver.wait_attempts(5)

    h = h.restart()
    receiver.mode = "ok"
    receiver.wait_for(20)
    time.sleep(1)  # a second copy of any would have come by now
    assert len(receiver.ids()) == 20
    assert sorted(e["subject"] for e in receiver.events()) == sorted(f"devices/edge-{i}" for i in range(20))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"url": "ftp://example.com/x"}, "http:// or https://"),
        ({"url": "http://example.com/" + "a" * 3000}, "at most"),
        ({"url": "http://example.com/x", "events": ["model.exploded"]}, "unknown event type"),
        ({"url": "http://example.com/x", "filters": {"site": "berlin"}}, "unknown webhook filter"),
    ],
)
def test_a_bad_subscription_is_refused_with_a_json_error(
    hub: HubFactory, body: dict[str, Any], words: str
) -> None:
    h = hub()
    with h.client() as c:
        r = c.post("/api/v1/webhooks", json=body)
    assert r.status_code in (400, 422), r.text
    assert words in r.json()["error"]["message"]


def test_webhooks_are_for_the_admin_only(hub: HubFactory) -> None:
    h = hub()
    r = httpx.post(h.url + "/api/v1/webhooks", json={"url": "http://example.com/x"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "Unauthorized"


def test_the_registry_and_deployment_lifecycle_arrives_as_cloudevents(
    hub: HubFactory, receiver: Receiver, publisher: Publisher
) -> None:
    h = hub(**FAST)
    receiver.secret = subscribe(h, receiver.url)["secret"]
    with h.client() as http:
        assert register(http, "digits-model", {"digits.onnx": b"v1"}).status_code == 201
        v1 = push(h, publisher, "digits", "1", factor=2)
        v2 = push(h, publisher, "digits", "2", factor=3)
        fleet_enroll(http, "edge-1", site="berlin")
        assert deploy(http, "svc", v1, selector="site=berlin").status_code in (200, 201)
        assert deploy(http, "svc", v2, selector="site=berlin").status_code == 200
        assert http.delete("/api/v1/deployments/svc").status_code == 200
    events = receiver.wait_for(7)
    assert [e["type"] for e in events if e["subject"] == "services/svc"] == [
        "edgepack.deployment.created",
        "edgepack.deployment.updated",
        "edgepack.deployment.deleted",
    ]
    kinds = {e["type"] for e in events}
    assert {"edgepack.model.registered", "edgepack.module.pushed", "edgepack.device.enrolled"} <= kinds


def test_the_cli_adds_lists_and_removes_a_subscription(
    hub: HubFactory, receiver: Receiver, tmp_path: Path
) -> None:
    h = hub(**FAST)
    added = run(tmp_path, "hub", "webhook", "add", receiver.url, "--event", "device.enrolled",
                "--event", "edgepack.device.revoked", "--filter", "device=edge-1", "--json", hub=h)
    sub = ok_json(added)
    assert sub["events"] == ["edgepack.device.enrolled", "edgepack.device.revoked"]
    assert sub["filters"] == {"device": "edge-1"}
    receiver.secret = sub["secret"]

    enroll(h, "edge-1", "edge-2")
    [event] = receiver.wait_for(1)
    assert event["subject"] == "devices/edge-1"
    listed = run(tmp_path, "hub", "webhook", "list", hub=h)
    assert listed.returncode == 0 and sub["id"] in listed.stdout and "whsec_" not in listed.stdout
    assert ok_json(run(tmp_path, "hub", "webhook", "dead", sub["id"], "--json", hub=h)) == []
    assert run(tmp_path, "hub", "webhook", "remove", sub["id"], hub=h).returncode == 0
    assert ok_json(run(tmp_path, "hub", "webhook", "list", "--json", hub=h)) == []

    refused = run(tmp_path, "hub", "webhook", "add", "file:///etc/passwd", hub=h)
    assert refused.returncode != 0
    assert refused.stderr.strip().count("\n") == 0 and "http:// or https://" in refused.stderr


def test_two_replicas_on_one_postgresql_send_each_event_once(
    hub: HubFactory, receiver: Receiver, postgres: str
) -> None:
    first = hub(postgres=postgres, **FAST)
    second = hub(db=first.overrides["db"], **FAST)  # the same database: a scaled-out hub
    receiver.secret = subscribe(first, receiver.url)["secret"]
    enroll(second, *[f"edge-{i}" for i in range(300)])

    receiver.wait_for(300)
    time.sleep(1)  # a second copy of any would have come by now
    assert len(receiver.ids()) == 300


def test_trimming_the_event_log_loses_no_delivery(hub: HubFactory, receiver: Receiver) -> None:
    h = hub(**FAST)
    receiver.secret = subscribe(h, receiver.url)["secret"]
    receiver.mode = "fail"
    enroll(h, *[f"edge-{i}" for i in range(10)])
    with h.core.sessions.begin() as s:
        assert trim_events(s, keep=0, older_than=datetime.now(UTC)) >= 10
    receiver.mode = "ok"
    assert len(receiver.wait_for(10)) == 10


def test_a_hub_restarted_mid_delivery_sends_the_rest_within_seconds_and_none_twice(
    hub: HubFactory, receiver: Receiver
) -> None:
    # One request at a time: of the deliveries claimed ahead, one is being sent (to a receiver
    # that hangs past the hub's stop) and the others wait for the slot when the hub stops.
    h = hub(**{**FAST, "webhook_concurrency_per_subscription": 1})
    receiver.secret = subscribe(h, receiver.url)["secret"]
    receiver.mode, receiver.hang_s = "hang", 3
    enroll(h, *[f"edge-{i}" for i in range(20)])
    receiver.wait_attempts(1)

    h = h.restart()
    receiver.mode = "ok"
    restarted = time.monotonic()
    # Every one, the one cut off mid-request too: its lease ended with the hub that held it.
    receiver.wait_for(20, timeout=5)
    assert time.monotonic() - restarted < 5
    time.sleep(1)  # a second copy of any would have come by now
    assert len(receiver.ids()) == 20


def test_a_service_whose_roll_up_changes_sends_one_event_about_the_service(
    hub: HubFactory, receiver: Receiver, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix,
            mqtt_username=None, **FAST)  # fmt: skip
    receiver.secret = subscribe(h, receiver.url, events=["service.state-changed"])["secret"]
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        fleet_enroll(http, "dev-1", site="berlin")
        fleet_enroll(http, "dev-2", site="berlin")
        assert deploy(http, "digits", mod, selector="site=berlin").status_code == 201
    # The service is Transitioning (deployed, no device there yet): each step below moves a
    # device, and only the last of dev-2's and then dev-1's failure move the service.
    steps = [("dev-1", "Transitioning"), ("dev-1", "Healthy"), ("dev-2", "Transitioning"),
             ("dev-2", "Healthy"), ("dev-1", "Failed")]  # fmt: skip
    device = mosquitto.probe()
    try:
        at = datetime.now(UTC)
        for i, (device_id, state) in enumerate(steps):
            report = reported(device_id, state, mod.digest, at + timedelta(seconds=i))
            device.publish(f"{topic_prefix}/devices/{device_id}/reported", report, qos=1)
            # one at a time: each report is a batch of its own, as reports from a fleet are
            receiver.wait_for(sum(1 for _ in receiver.ids()) + 1, timeout=10)
    finally:
        device.close()
    time.sleep(1)  # anything else would have come by now

    about_service = [e for e in receiver.events() if e["subject"] == "services/digits"]
    assert [(e["type"], e["data"]["kind"]) for e in about_service] == [
        ("edgepack.service.state-changed", "service_healthy"),
        ("edgepack.service.state-changed", "service_failed"),
    ]
    assert about_service[1]["data"]["service"] == "digits" and "device" not in about_service[1]["data"]
    assert "is Failed (was Healthy)" in about_service[1]["data"]["message"]
    per_device = [e for e in receiver.events() if e["subject"] != "services/digits"]
    assert len(per_device) == 5  # deployed and Healthy on each device, Failed on dev-1


def test_a_hub_process_stopped_by_sigterm_mid_delivery_leaves_nothing_leased(
    receiver: Receiver, publisher: Publisher, tmp_path: Path
) -> None:
    trusted = tmp_path / "publisher.pub"
    trusted.write_bytes(public_key_pem(publisher.key.public_key()))
    settings = {**FAST, "webhook_concurrency_per_subscription": 1}
    proc, url = serve_hub_process(tmp_path / "hub", trusted, **settings)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        with httpx.Client(base_url=url, headers=admin) as c:
            r = c.post("/api/v1/webhooks", json={"url": receiver.url})
            assert r.status_code == 201, r.text
            receiver.secret = r.json()["secret"]
            receiver.mode, receiver.hang_s = "hang", 3
            r = c.post("/api/v1/devices/bulk", json={"devices": [{"id": f"edge-{i}"} for i in range(20)]})
            assert r.status_code == 201, r.text
        receiver.wait_attempts(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    receiver.mode = "ok"
    proc, url = serve_hub_process(tmp_path / "hub", trusted, **settings)
    try:
        # The stopped process freed what it held, the request it cut off too: no lease of a
        # process that is gone holds any of them back.
        receiver.wait_for(20, timeout=5)
        time.sleep(1)  # a second copy of any would have come by now
        assert len(receiver.ids()) == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_hub_that_sends_no_webhooks_does_not_load_the_http_client() -> None:
    # aiohttp is 9 MB of the hub's memory (its peak at 5,000 devices has a 300 MB target): it
    # comes with the first subscription's requests, not with the hub.
    code = "import sys, cloud_hub.wiring, cloud_hub.app; print('aiohttp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
