"""The dashboard's alerts list in headless Chromium: a device unheard of for an hour makes the
``device offline`` rule fire, and the list shows it with a link to the device."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from playwright.sync_api import Page, expect
from sqlalchemy import update

from cloud_hub.db.base import utcnow
from cloud_hub.fleet.tables import Device
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import enroll
from tests.waiting import wait_for


def test_the_dashboard_lists_the_alerts_firing_now(hub: HubFactory, page: Page) -> None:
    h = hub(alert_interval_s=1)
    with h.client() as http:
        enroll(http, "dev-1", site="berlin")
        enroll(http, "dev-2", site="berlin")
        r = http.post("/api/v1/alerts/rules", json={"name": "gone", "condition": "device offline > 15m",
                                                    "severity": "critical"})  # fmt: skip
        assert r.status_code == 201, r.text
    page.goto(h.url + "/")
    page.fill("#token", h.admin_token)
    page.click("#login button[type=submit]")
    expect(page.locator("#alerts")).to_contain_text("No alert is firing")
    # dev-1 was last heard of an hour ago (what ingest writes), dev-2 a minute ago.
    with h.core.sessions.begin() as s:
        s.execute(update(Device).where(Device.id == "dev-1").values(last_seen=utcnow() - timedelta(hours=1)))
        s.execute(
            update(Device).where(Device.id == "dev-2").values(last_seen=utcnow() - timedelta(minutes=1))
        )
    row = page.locator("#alerts tr[data-severity='critical']")
    expect(row).to_contain_text("gone")
    expect(row).to_contain_text("device dev-1")
    expect(row).to_contain_text(re.compile(r"offline 36\d\ds"))
    expect(page.locator("#alerts tr")).to_have_count(1)
    expect(page.locator("#alert-total")).to_have_text("(1 firing)")
    expect(row.locator("a[href='#/devices/dev-1']")).to_be_visible()


def test_a_restarted_hub_does_not_fire_a_firing_alert_again(hub: HubFactory) -> None:
    h = hub(alert_interval_s=1)
    with h.client() as http:
        enroll(http, "dev-1")
        r = http.post("/api/v1/alerts/rules", json={"name": "gone", "condition": "device offline > 15m"})
        assert r.status_code == 201, r.text
    with h.core.sessions.begin() as s:
        s.execute(update(Device).where(Device.id == "dev-1").values(last_seen=utcnow() - timedelta(hours=1)))

    def firing(running: RunningHub) -> list[dict[str, Any]]:
        with running.client() as http:
            alerts: list[dict[str, Any]] = http.get("/api/v1/alerts").json()["alerts"]
        return alerts

    before = wait_for(lambda: firing(h), timeout=30, what="the offline alert firing")
    again = h.restart()
    # Rounds of the new process have run once the alert's value moved on.
    wait_for(lambda: firing(again)[0]["value"] != before[0]["value"] or None, timeout=30, what="a new round")
    with again.client() as http:
        events = http.get("/api/v1/dashboard/events").json()["events"]
    assert [e["kind"] for e in events if e["kind"].startswith("alert.")] == ["alert.fired"]
    assert firing(again)[0]["fired_at"] == before[0]["fired_at"]
