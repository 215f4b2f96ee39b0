"""The agent's broker session: two agents with one device's credentials are noticed, reported
once on the hub, and stop fighting twice a second."""

from __future__ import annotations

import time
from typing import Any

import pytest

from edge_agent.uplink.mqtt import TAKEN_OVER, SessionWatch
from manifests.device import render_agent_config
from tests.agent.conftest import Agent, Fleet, wait_for

CONNECTED = "connected to the broker"


@pytest.mark.parametrize(
    ("case", "steps", "short_in_row", "problem"),
    [
        ("three sessions closed within seconds are a takeover",
         [("connect", 0), ("lose", 0.4), ("connect", 0.9), ("lose", 1.3), ("connect", 2), ("lose", 2.5)],
         3, TAKEN_OVER),
        ("two are not yet",
         [("connect", 0), ("lose", 0.4), ("connect", 0.9), ("lose", 1.3)], 2, None),
        ("a broker that refuses the reconnect is away, not taken over",
         [("connect", 0), ("lose", 0.4), ("connect", 0.9), ("lose", 1.3), ("unreachable", 2), ("connect", 3),
          ("lose", 3.5)], 1, None),
        ("a session that lasted breaks the row",
         [("connect", 0), ("lose", 0.4), ("connect", 1), ("lose", 60), ("connect", 61), ("lose", 61.5)],
         1, None),
        ("the problem stays through a session of minutes, for the hub to hear of it",
         [("connect", 0), ("lose", 0.4), ("connect", 1), ("lose", 1.4), ("connect", 2), ("lose", 2.4),
          ("connect", 3), ("lose", 200)], 0, TAKEN_OVER),
        ("and is forgotten after a steady session",
         [("connect", 0), ("lose", 0.4), ("connect", 1), ("lose", 1.4), ("connect", 2), ("lose", 2.4),
          ("connect", 3), ("lose", 400)], 0, None),
        ("a refused CONNACK is no session at all",
         [("lose", 1), ("lose", 2), ("lose", 3)], 0, None),
    ],
)  # fmt: skip
def test_session_watch(
    case: str, steps: list[tuple[str, float]], short_in_row: int, problem: str | None
) -> None:
    watch = SessionWatch()
    for what, now in steps:
        if what == "connect":
            watch.connected(now)
        elif what == "lose":
            watch.lost(now)
        else:
            watch.unreachable()
    assert (watch.short_in_row, watch.problem) == (short_in_row, problem), case


def _events(fleet: Fleet, kind: str, device_id: str) -> list[dict[str, Any]]:
    with fleet.http() as http:
        r = http.get("/api/v1/dashboard/events")
    assert r.status_code == 200, r.text
    return [e for e in r.json()["events"] if e["kind"] == kind and e["device_id"] == device_id]


def test_two_agents_with_one_devices_credentials_are_reported_once_and_back_off(fleet: Fleet) -> None:
    first = fleet.device("edge-1")
    # A second box started from a copy of the first one's set-up: same credentials file, its
    # own state folder (the lock of one state folder cannot see it).
    folder = fleet.root / "edge-1-clone"
    folder.mkdir(parents=True)
    config = first.config.model_copy(update={"state_dir": folder / "state"})
    (folder / "agent.toml").write_text(render_agent_config(config))
    second = Agent(fleet, "edge-1", folder / "agent.toml", first.credentials)
    fleet.agents.append(second)
    first.start()
    wait_for(lambda: CONNECTED in first.log(), what="the first agent connected", log=first.log)
    second.start()

    logs = lambda: f"{first.log()}\n--- the clone ---\n{second.log()}"  # noqa: E731
    noticed = lambda: _events(fleet, "link-problem", "edge-1")  # noqa: E731
    events = wait_for(noticed, timeout=60, what="the hub's link-problem event", log=logs)
    assert "another client connects with the device's id" in events[0]["message"]

    # The fight without backoff: about two reconnects a second between the two.
    connects = lambda: first.log().count(CONNECTED) + second.log().count(CONNECTED)  # noqa: E731
    before, began = connects(), time.monotonic()
    time.sleep(30)
    rate = (connects() - before) / (time.monotonic() - began)
    assert rate < 0.5, f"{rate:.2f} reconnects/s after the takeover was noticed\n{logs()}"
    assert len(_events(fleet, "link-problem", "edge-1")) == 1  # both report it; the hub says it once
