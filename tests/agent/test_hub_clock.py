"""A device whose clock runs ahead of the hub's is told so, by how much, for a desired state it
fetched over HTTP: the hub's answer carries its clock (the ``Date`` header), and the refusal
blames the clock, not the state (issue 15, finding 9). Real HTTP from a real hub; the skewed
device clock is the ``wall`` the pure step is given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from edge_agent.reconcile.events import HttpDesired
from edge_agent.reconcile.step import Context, Records, step
from edge_agent.state.records import AgentRecord
from edge_agent.uplink.http import HubHttp
from manifests.device import DeviceCredentials
from tests.agent.conftest import Fleet

SKEW = timedelta(days=8, hours=2, minutes=3)  # beyond the hub's 7-day desired-state lifetime


def test_a_state_expired_only_by_the_device_clock_is_refused_as_clock_skew_naming_the_skew(
    fleet: Fleet,
) -> None:
    agent = fleet.device("edge-1")
    fleet.deploy("demo", fleet.push(), port=18601, devices=["edge-1"])
    credentials = DeviceCredentials.model_validate(agent.credentials)
    http = HubHttp(credentials)
    try:
        before = datetime.now(UTC)
        fetch = http.desired(None)
        after = datetime.now(UTC)
    finally:
        http.close()
    assert fetch.data is not None and fetch.hub_time is not None
    # The Date header has one-second resolution, and the hub's server (uvicorn) refreshes it
    # about once a second: a second or two behind, never ahead.
    assert before - timedelta(seconds=5) <= fetch.hub_time <= after

    ctx = Context(device_id="edge-1", hub_trust=credentials.hub_trust())
    records = Records(agent=AgentRecord(device_id="edge-1"))
    skewed = fetch.hub_time + SKEW
    after_step, _ = step(records, HttpDesired(fetch), ctx=ctx, now=0.0, wall=skewed, rand=0.5)

    error = after_step.agent.last_error
    assert after_step.agent.applied_generation == 0 and error is not None
    assert "(clock-skew)" in error and "the device clock is 8 d 2 h ahead of the hub's" in error, error
    assert "re-issue" not in error, error
