"""``edgepack device rotate`` as an admin runs it against a real hub: one rotation in flight
per device, refusals in one line, and ``device show`` says where a rotation stands."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.hub.conftest import HubFactory
from tests.hub.test_fleet_cli import one_line_error, run


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
