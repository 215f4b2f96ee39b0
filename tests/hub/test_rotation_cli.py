"""``edgepack device rotate`` as an admin runs it against a real hub: one rotation in flight
per device, refusals in one line, and ``device show`` says where a rotation stands."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.hub.conftest import HubFactory
from tests.hub.test_fleet_cli import one_line_error, run
from tests.waiting import wait_for


def test_device_rotate_marks_once_and_show_says_so(hub: HubFactory, tmp_path: Path) -> None:
    h = hub()
    home = tmp_path / "admin"
    with h.client() as http:
        assert http.post("/api/v1/devices", json={"id": "edge-1", "tags": {}}).status_code == 201
    shown = json.loads(run(home, h, "device", "show", "edge-1", "--json").stdout)
    assert shown["credentials"] == {
        "generation": 0, "mqtt_username": "edge-1", "rotated_at": None, "rotation_requested": None,
        "rotation_stage": None,
    }  # fmt: skip

    done = run(home, h, "device", "rotate", "edge-1")
    assert done.returncode == 0, done.stderr
    assert "credentials rotation requested" in done.stdout
    text = run(home, h, "device", "show", "edge-1").stdout
    assert "credentials generation 0 (broker user edge-1)" in text and "rotation in flight since" in text
    assert "requested" in text

    # A second while the first is in flight, an unknown device, a device that is not the admin's
    # to ask about without a token: one line each.
    assert "in flight" in one_line_error(run(home, h, "device", "rotate", "edge-1"), 2)
    assert "not enrolled" in one_line_error(run(home, h, "device", "rotate", "edge-9"), 2)
    assert httpx.post(f"{h.url}/api/v1/devices/edge-1/rotate").status_code == 401


def test_credentials_past_their_maximum_age_are_marked_by_the_hub_itself(hub: HubFactory) -> None:
    # A maximum age of about 2 s (the setting is in days), upkeep rounds every 0.2 s.
    h = hub(credentials_max_age_days=2 / 86400, upkeep_interval_s=0.2)
    with h.client() as http:
        assert http.post("/api/v1/devices", json={"id": "edge-old", "tags": {}}).status_code == 201

        def marked() -> Any:
            creds = http.get("/api/v1/devices/edge-old").json()["credentials"]
            return creds["rotation_requested"]

        wait_for(marked, timeout=30, what="the old credentials marked for rotation")
        events = http.get("/api/v1/dashboard/events").json()["events"]
    messages = [e["message"] for e in events if e["kind"] == "device.rotation-requested"]
    assert messages == ["device edge-old: credentials rotation requested by the hub: credentials older than "
                        f"{2 / 86400:g} day(s)"]  # fmt: skip


def test_without_a_maximum_age_the_hub_never_rotates_by_itself(hub: HubFactory) -> None:
    h = hub(upkeep_interval_s=0.2)
    with h.client() as http:
        assert http.post("/api/v1/devices", json={"id": "edge-old", "tags": {}}).status_code == 201
        time.sleep(2)  # ten upkeep rounds
        assert http.get("/api/v1/devices/edge-old").json()["credentials"]["rotation_requested"] is None
