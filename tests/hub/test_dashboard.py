"""The dashboard in headless Chromium: log in, watch a device come online and a service turn
Healthy as the device publishes to the real broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text

from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, enroll, push

pytestmark = pytest.mark.sql_independent


def reported(device_id: str, state: str, digest: str, at: datetime) -> str:
    return json.dumps(
        {
            "device_id": device_id,
            "reported_at": at.isoformat(),
            "agent_version": "0.1.0",
            "applied_generation": 2,
            "modules": [
                {"service": "digits", "manifest_digest": digest, "state": state, "since": at.isoformat()}
            ],
        }
    )


def test_dashboard_shows_fleet_changes_live(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str, page: Page
) -> None:
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        enroll(http, "dev-1", site="berlin")
        assert deploy(http, "digits", mod, selector="site=berlin").status_code == 201

    page.goto(h.url + "/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not the admin token")

    page.fill("#token", h.admin_token)
    page.click("#login button[type=submit]")
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()  # the sign-in form goes away once signed in
    device_row = page.locator("#devices tr[data-device='dev-1']")
    service_row = page.locator("#services tr[data-service='digits']")
    expect(device_row).to_have_attribute("data-online", "false")
    expect(service_row).to_have_attribute("data-state", "Transitioning")
    expect(page.locator("#modules")).to_contain_text("digits")

    device = mosquitto.probe()
    try:
        topic = f"{topic_prefix}/devices/dev-1"
        device.publish(f"{topic}/online", b"true", retain=True)
        expect(device_row).to_have_attribute("data-online", "true")
        expect(page.locator("#fleet-summary")).to_have_text("1 online, 0 offline")

        start = datetime.now(UTC)
        device.publish(
            f"{topic}/reported", reported("dev-1", "Transitioning", mod.digest, start), retain=True
        )
        expect(page.locator("#events")).to_contain_text("deployed on dev-1")
        later = start + timedelta(seconds=1)
        device.publish(f"{topic}/reported", reported("dev-1", "Healthy", mod.digest, later), retain=True)
        expect(service_row).to_have_attribute("data-state", "Healthy")
        expect(service_row.locator("li[data-device='dev-1']")).to_have_attribute("data-state", "Healthy")
        expect(page.locator("#events")).to_contain_text("digits became Healthy on dev-1")

        sample = {
            "device_id": "dev-1",
            "ts": datetime.now(UTC).isoformat(),
            "modules": [
                {
                    "service": "digits",
                    "requests_total": 10,
                    "errors_total": 0,
                    "requests_per_s": 2.5,
                    "p50_ms": 4.0,
                }
            ],
        }
        device.publish(f"{topic}/telemetry", json.dumps(sample), qos=0)
        expect(page.locator("[data-chart='digits requests/s']")).to_contain_text("2.5 req/s")
        expect(page.locator("[data-chart='digits latency']")).to_contain_text("4 ms")

        device.publish(f"{topic}/online", b"false", retain=True)
        expect(device_row).to_have_attribute("data-online", "false")
        expect(page.locator("#events")).to_contain_text("dev-1 went offline")
    finally:
        device.close()

    with h.client() as http:
        ingest = http.get("/api/v1/dashboard/ingest").json()
    assert ingest["connected"] is True
    assert ingest["stats"]["applied"] == 5 and ingest["stats"]["rejected"] == 0

    # Signing out drops the cookie: the API refuses the browser again.
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    cookies = page.context.cookies()
    assert not any(c["name"] == "edgepack_admin" for c in cookies)


def test_dashboard_api_needs_the_admin_cookie(hub: HubFactory) -> None:
    h = hub()
    with httpx.Client(base_url=h.url) as http:
        assert http.get("/").status_code == 200  # the page itself is public; its data is not
        assert http.get("/api/v1/dashboard/events").status_code == 401
        assert http.get("/dashboard/../settings.py").status_code == 404
        bad = http.post("/api/v1/dashboard/login", data={"token": "nope"})
        assert bad.status_code == 401 and "admin token" in bad.json()["error"]["message"]
        ok = http.post("/api/v1/dashboard/login", data={"token": h.admin_token})
        assert ok.status_code == 200
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert http.get("/api/v1/dashboard/events").status_code == 200
        assert http.get("/api/v1/devices").status_code == 200


def test_one_failing_feed_does_not_hide_the_others(hub: HubFactory, page: Page) -> None:
    # Any one failing feed (a device's telemetry made it answer 500) used to hide the whole
    # dashboard behind "hub unreachable".
    h = hub()
    with h.client() as http:
        enroll(http, "dev-1", site="berlin")
    # A damaged database: the telemetry table is gone, so that feed fails (JSON 500).
    with h.core.sessions.engine.begin() as conn:
        conn.execute(text("DROP TABLE telemetry_samples"))
    with h.client() as http:
        r = http.get("/api/v1/dashboard/telemetry")
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalError"

    page.goto(h.url + "/")
    page.fill("#token", h.admin_token)
    page.click("#login button[type=submit]")
    expect(page.locator("#devices tr[data-device='dev-1']")).to_be_visible()
    expect(page.locator("[data-feed-error='telemetry']")).to_contain_text("telemetry unavailable")
    expect(page.locator("[data-feed-error='devices']")).to_be_hidden()
    expect(page.locator("#events")).to_contain_text("dev-1")
    expect(page.locator("#status")).to_contain_text("telemetry unavailable")


def test_a_failed_services_cause_is_one_line_and_its_traceback_is_text_on_its_pages(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str, page: Page
) -> None:
    """Tables show the one-line cause (cut, whole in the title); the device and service pages
    give the traceback and the last output in <pre>, as text, and a disclosure opened stays
    open while the page polls (issue 17, item 5)."""
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        enroll(http, "dev-1", site="berlin")
        assert deploy(http, "digits", mod, selector="site=berlin").status_code == 201
    cause = "score.py:6 RuntimeError: cannot open the <b>feature</b> store " + "x" * 150
    trace = 'Traceback (most recent call last):\n  File "score.py", line 6, in init\nRuntimeError: <b>no</b>'
    report = json.loads(reported("dev-1", "Failed", mod.digest, datetime.now(UTC)))
    report["modules"][0].update(
        reason=cause, failure={"traceback": trace, "log_tail": "connecting to <i>the</i> store"}
    )
    device = mosquitto.probe()
    try:
        device.publish(f"{topic_prefix}/devices/dev-1/reported", json.dumps(report), retain=True)
    finally:
        device.close()

    page.goto(h.url + "/")
    page.fill("#token", h.admin_token)
    page.click("#login button[type=submit]")
    page.goto(h.url + "/#/devices/dev-1")
    row = page.locator("#device-modules tr[data-service='digits']")
    expect(row).to_have_attribute("data-state", "Failed")
    shown = row.locator(".cause")
    expect(shown).to_have_text(cause)
    expect(shown).to_have_attribute("title", cause)
    assert shown.evaluate("e => getComputedStyle(e).whiteSpace") == "nowrap"
    assert shown.evaluate("e => e.scrollWidth > e.clientWidth"), "a long cause is cut, not wrapped"
    row.locator("details.failure summary").click()
    expect(row.locator("pre.traceback")).to_have_text(trace)
    expect(row.locator("pre.log-tail")).to_have_text("connecting to <i>the</i> store")
    expect(page.locator("#device-view b, #device-view i")).to_have_count(0)
    page.wait_for_timeout(2500)  # a poll redraws the table: the opened detail stays open
    expect(row.locator("pre.traceback")).to_be_visible()

    page.goto(h.url + "/#/services/digits")
    here = page.locator("#service-devices tr[data-device='dev-1']")
    expect(here.locator(".cause")).to_have_text(cause)
    here.locator("details.failure summary").click()
    expect(here.locator("pre.log-tail")).to_have_text("connecting to <i>the</i> store")
    expect(page.locator("#service-view b, #service-view i")).to_have_count(0)
