"""Progressive rollouts on a real hub and a real broker, with devices that report what they run.

The story: a service runs version 1 on a fleet. The team deploys version 2 in waves with gates.
A version that fails 5 % of requests is halted in its first wave and those devices get 1 back;
a good one goes through every wave; a hub restarted in the middle of a bake goes on where it
was; an operator resumes, promotes and aborts; bad requests are refused with one line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from cloud_hub.events import Event
from cloud_hub.rollouts import store
from cloud_hub.rollouts.engine import Promote
from cloud_hub.rollouts.tables import Rollout as RolloutRow
from edgepack import BadArgument, DeploymentConfig, Hub, Rollout, Selector
from manifests.errors import ConfigError
from tests.conftest import Publisher
from tests.factory import Forge
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import PushedModule, enroll, hub_trust, push
from tests.hub.rollout_fleet import Behaviour, SimFleet
from tests.hub.test_fleet_cli import one_line_error, run
from tests.waiting import wait_for

SERVICE = "scorer"
FLEET = 20


def deploy(http: httpx.Client, module: PushedModule, rollout: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {
        "module": module.name,
        "version": module.version,
        "deployment_config": {"computeType": "local", "port": 8890},
        "target": {"selector": "fleet=test"},
    }
    if rollout is not None:
        body["rollout"] = rollout
    return http.put(f"/api/v1/deployments/{SERVICE}", json=body)


def rollout_of(h: RunningHub) -> dict[str, Any]:
    with h.client() as http:
        r = http.get(f"/api/v1/deployments/{SERVICE}/rollout")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def kinds(h: RunningHub) -> list[str]:
    """The rollout events of the service, oldest first (from the hub's event log: the feed's
    newest page fills up with the devices' own state changes)."""
    with h.core.sessions.begin() as s:
        rows = s.scalars(
            select(Event.kind)
            .where(Event.service == SERVICE, Event.kind.like("rollout.%"))
            .order_by(Event.id)
        )
        return list(rows)


class Setup:
    def __init__(self, hub: RunningHub, fleet: SimFleet, v1: PushedModule, v2: PushedModule) -> None:
        self.hub, self.fleet, self.v1, self.v2 = hub, fleet, v1, v2


@pytest.fixture
def setup(hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str) -> Iterator[Setup]:
    h = hub(
        mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None,
        rollout_interval_s=0.3, device_reports_per_min=1000, device_telemetry_per_min=1000,
    )  # fmt: skip
    probe = MqttProbe.connect(mosquitto.host, mosquitto.port)
    fleet = SimFleet(h, probe, topic_prefix, hub_trust(h), SERVICE)
    v1 = push(h, publisher, "scorer", "1", factor=2)
    v2 = push(h, publisher, "scorer", "2", factor=3)
    with h.client() as http:
        for i in range(FLEET):
            fleet.add(enroll(http, f"dev-{i:02d}", fleet="test"))
        assert deploy(http, v1).status_code == 201
    fleet.start(interval_s=0.3)
    wait_for(
        lambda: fleet.running(v1.digest) == set(fleet.devices), timeout=60, what="the fleet on version 1"
    )
    try:
        yield Setup(h, fleet, v1, v2)
    finally:
        fleet.stop()
        probe.close()


WAVES = {"waves": "10%,50%,100%", "bake": "4s", "gates": ["error_rate<1%", "p95_ms<1.5x"]}


def test_a_version_failing_five_percent_is_halted_in_wave_one_and_rolled_back(setup: Setup) -> None:
    h, fleet, v1, v2 = setup.hub, setup.fleet, setup.v1, setup.v2
    fleet.behaviour[v2.digest] = Behaviour(error_share=0.05)
    with h.client() as http:
        r = deploy(http, v2, WAVES)
    assert r.status_code == 200, r.text
    assert r.json()["deployment"]["rollout"]["state"] == "running"
    assert len(r.json()["issued"]) == 2  # only wave 1's devices get a new state

    halted = wait_for(
        lambda: (ro := rollout_of(h))["state"] != "running" and ro, timeout=90, what="a verdict"
    )
    assert halted["state"] == "rolled-back"
    assert halted["status"].startswith("Halted: wave 1 (2 devices): error rate 5.0% vs 0.0% on 1")
    assert halted["status"].endswith("rolled back to 1")
    wait_for(
        lambda: fleet.running(v1.digest) == set(fleet.devices), timeout=60, what="every device back on 1"
    )
    assert len(fleet.ever_ran(v2.digest)) == 2  # nobody outside wave 1 ever ran it
    with h.client() as http:
        service = http.get(f"/api/v1/deployments/{SERVICE}").json()
    assert service["version"] == "1"
    assert kinds(h) == ["rollout.wave-started", "rollout.halted"]


def test_a_version_twice_as_slow_is_halted_by_the_relative_latency_gate(setup: Setup) -> None:
    h, fleet, v2 = setup.hub, setup.fleet, setup.v2
    fleet.behaviour[v2.digest] = Behaviour(p95_ms=20.0)
    with h.client() as http:
        assert deploy(http, v2, {**WAVES, "on_failure": "halt"}).status_code == 200
    halted = wait_for(
        lambda: (ro := rollout_of(h))["state"] != "running" and ro, timeout=90, what="a verdict"
    )
    assert halted["state"] == "halted"
    assert "p95 20 ms vs 10 ms on 1 (gate p95_ms<1.5x)" in halted["status"]
    # Halted without rollback: wave 1 keeps the new version until the operator decides.
    assert fleet.running(v2.digest) == fleet.ever_ran(v2.digest) and len(fleet.ever_ran(v2.digest)) == 2
    # Each device is judged by its own wave's version: the service is Healthy, in the API's
    # roll-up and in the dashboard's (SQL) one, whose state alert rules read too.
    with h.client() as http:

        def states() -> tuple[str, str]:
            api = http.get(f"/api/v1/deployments/{SERVICE}").json()["state"]
            board = http.get(f"/api/v1/dashboard/services/{SERVICE}").json()["service"]["state"]
            return api, board

        wait_for(lambda: states() == ("Healthy", "Healthy"), timeout=30, what=f"Healthy, not {states()}")

    with h.client() as http:
        r = http.post(f"/api/v1/deployments/{SERVICE}/rollout/abort")
    assert r.status_code == 200, r.text
    assert r.json()["deployment"]["rollout"]["status"] == "Aborted: every device back on 1"
    wait_for(lambda: fleet.running(setup.v1.digest) == set(fleet.devices), timeout=60, what="abort done")
    assert kinds(h) == ["rollout.wave-started", "rollout.halted", "rollout.aborted"]


def test_a_good_version_goes_through_every_wave(setup: Setup) -> None:
    h, fleet, v2 = setup.hub, setup.fleet, setup.v2
    with h.client() as http:
        assert deploy(http, v2, WAVES).status_code == 200
    done = wait_for(lambda: (ro := rollout_of(h))["state"] != "running" and ro, timeout=120, what="the end")
    assert done["state"] == "completed", done
    assert done["status"] == "Completed: 2 on every device (3 waves)"
    wait_for(lambda: fleet.running(v2.digest) == set(fleet.devices), timeout=60, what="every device on 2")
    assert kinds(h) == [
        "rollout.wave-started",
        "rollout.promoted",
        "rollout.wave-started",
        "rollout.promoted",
        "rollout.wave-started",
        "rollout.completed",
    ]


def test_a_hub_restarted_during_a_bake_goes_on_where_it_was(setup: Setup) -> None:
    h, fleet, v2 = setup.hub, setup.fleet, setup.v2
    with h.client() as http:
        assert deploy(http, v2, {"waves": "10%,100%", "bake": "6s"}).status_code == 200
    baking = wait_for(lambda: (ro := rollout_of(h))["bake_started_at"] and ro, timeout=60, what="the bake")
    again = h.restart()
    fleet.hub = again
    after = rollout_of(again)
    assert (after["state"], after["wave"], after["bake_started_at"]) == (
        "running",
        1,
        baking["bake_started_at"],
    )
    done = wait_for(
        lambda: (ro := rollout_of(again))["state"] != "running" and ro, timeout=90, what="the end"
    )
    assert done["state"] == "completed"
    # The bake was not started again: one promotion, one completion.
    assert kinds(again) == [
        "rollout.wave-started",
        "rollout.promoted",
        "rollout.wave-started",
        "rollout.completed",
    ]


def test_the_operator_resumes_and_promotes_a_halted_rollout(setup: Setup) -> None:
    h, fleet, v2 = setup.hub, setup.fleet, setup.v2
    fleet.behaviour[v2.digest] = Behaviour(fails_to_start=True)
    with h.client() as http:
        assert deploy(http, v2, {"waves": "10%,100%", "bake": "60s", "on_failure": "halt"}).status_code == 200
    halted = wait_for(lambda: (ro := rollout_of(h))["state"] == "halted" and ro, timeout=60, what="the halt")
    # The first failure halts it; the other device of the wave may or may not have said so yet.
    said = (
        r"Halted: wave 1 \(2 devices\): device dev-\d+ Failed( \(and 1 more\))?: "
        r"score.py:3 RuntimeError: init failed"
    )
    assert re.fullmatch(said, halted["status"]), halted["status"]
    fleet.behaviour[v2.digest] = Behaviour()  # the operator fixed what the devices lacked
    with h.client() as http:
        assert http.post(f"/api/v1/deployments/{SERVICE}/rollout/resume").status_code == 200
        wait_for(lambda: rollout_of(h)["bake_started_at"], timeout=60, what="wave 1 Healthy, baking")
        r = http.post(f"/api/v1/deployments/{SERVICE}/rollout/promote")
        assert r.status_code == 200 and r.json()["deployment"]["rollout"]["wave"] == 2
        r = http.post(f"/api/v1/deployments/{SERVICE}/rollout/promote")
        assert r.json()["deployment"]["rollout"]["state"] == "completed"
        again = http.post(f"/api/v1/deployments/{SERVICE}/rollout/resume")
    assert again.status_code == 409 and "cannot resume: it completed" in again.json()["error"]["message"]
    wait_for(lambda: fleet.running(v2.digest) == set(fleet.devices), timeout=60, what="every device on 2")


@pytest.mark.parametrize(
    ("rollout", "status", "says"),
    [
        ({"waves": "10%,5%"}, 400, "each wave must reach more devices"),
        ({"waves": "10%,100%", "gates": ["latency<2"]}, 400, "unknown metric"),
        ({"waves": "10%,100%", "bake": "1y"}, 400, "expected a duration"),
        ({"waves": "10%,100%", "on_failure": "pray"}, 400, "use 'rollback' or 'halt'"),
    ],
)
def test_bad_rollouts_are_refused_and_nothing_changes(
    hub: HubFactory, forge: Forge, publisher: Publisher, rollout: dict[str, Any], status: int, says: str
) -> None:
    h = hub()
    v1 = push(h, publisher, "scorer", "1", factor=2)
    v2 = push(h, publisher, "scorer", "2", factor=3)
    with h.client() as http:
        enroll(http, "dev-1", fleet="test")
        first = deploy(http, v1, {"waves": "50%,100%"})
        assert first.status_code == 409 and "needs a previous version" in first.json()["error"]["message"]
        assert deploy(http, v1).status_code == 201
        r = deploy(http, v2, rollout)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
        assert http.get(f"/api/v1/deployments/{SERVICE}").json()["version"] == "1"
        assert http.get(f"/api/v1/deployments/{SERVICE}/rollout").status_code == 404
        assert http.post(f"/api/v1/deployments/{SERVICE}/rollout/dance").status_code == 400


def test_two_replicas_on_postgresql_never_promote_a_wave_twice(
    hub: HubFactory, publisher: Publisher, postgres: str
) -> None:
    """Two hub processes on one PostgreSQL database both run the rollout loop, as fast as they
    can: every wave is started, promoted and completed exactly once."""
    first = hub(postgres=postgres, rollout_interval_s=0.02)
    second = hub(db=first.overrides["db"], hub_key=first.data_dir / "hub.key", rollout_interval_s=0.02)
    assert second.core.sessions.engine.dialect.name == "postgresql"
    v1 = push(first, publisher, "scorer", "1", factor=2)
    v2 = push(first, publisher, "scorer", "2", factor=3)
    waves = "10%,20%,30%,40%,50%,60%,70%,80%,90%,100%"
    with first.client() as http:
        for i in range(40):
            enroll(http, f"dev-{i:02d}", fleet="test")  # never online: nobody to wait for
        assert deploy(http, v1).status_code == 201
        assert deploy(http, v2, {"waves": waves, "bake": "1s"}).status_code == 200
    done = wait_for(
        lambda: (ro := rollout_of(second))["state"] != "running" and ro, timeout=120, what="the end"
    )
    assert done["state"] == "completed"
    seen = kinds(first)
    assert seen.count("rollout.wave-started") == 10
    assert seen.count("rollout.promoted") == 9
    assert seen.count("rollout.completed") == 1

    # Both replicas decide the same promotion from the same step at the same moment: the fleet
    # lock makes them take turns, and the second finds the step moved.
    with first.client() as http:
        assert deploy(http, v1, {"waves": "10%,50%,100%", "bake": "1h"}).status_code == 200
    wait_for(lambda: rollout_of(first)["bake_started_at"], timeout=30, what="the hour-long bake")
    with first.core.sessions.begin() as s:
        step = s.get(RolloutRow, SERVICE).step  # type: ignore[union-attr]
    barrier = threading.Barrier(2)

    def promote(replica: RunningHub) -> str | None:
        barrier.wait()
        return replica.process.fleet.change(lambda s: store.apply(s, SERVICE, step, Promote())).result

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(promote, [first, second]))
    assert sorted(map(str, results)) == ["None", "rollout.promoted"]
    assert rollout_of(first)["wave"] == 2


def test_the_cli_stages_a_deploy_and_the_operator_follows_and_aborts_it(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub(rollout_interval_s=0.3)
    push(h, publisher, "scorer", "1", factor=2)
    push(h, publisher, "scorer", "2", factor=3)
    with h.client() as http:
        for i in range(10):
            enroll(http, f"dev-{i}", fleet="test")
    common = ["deploy", "-n", SERVICE, "--selector", "fleet=test"]
    assert run(tmp_path, h, *common, "-m", "scorer:1").returncode == 0
    for flags, says in [
        (["--bake", "2m"], "--bake needs --waves"),
        (["--waves", "50%"], "the last wave must be 100%"),
        (["--waves", "10%,100%", "--gate", "error_rate<1"], "share of requests"),
        (["--waves", "10%,100%", "--on-failure", "shrug"], "use 'rollback' or 'halt'"),
        (["--strategy", "all", "--waves", "10%,100%"], "--strategy all deploys at once"),
    ]:
        assert says in one_line_error(run(tmp_path, h, *common, "-m", "scorer:2", *flags), 2)
    staged = run(
        tmp_path, h, *common, "-m", "scorer:2", "--waves", "10%,100%", "--bake", "1h",
        "--gate", "error_rate<1%", "--gate", "p95_ms<1.5x", "--on-failure", "halt",
    )  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    assert "Rolling out 2: wave 1 (1 device) of 2 waves" in staged.stdout
    assert f"edgepack service rollout {SERVICE} status" in staged.stdout
    status = run(tmp_path, h, "service", "rollout", SERVICE, "status")
    assert status.returncode == 0, status.stderr
    assert (
        "1 -> 2  waves 10%,100%  bake 3600s  gates error_rate<1% p95_ms<1.5x  on failure halt"
        in status.stdout
    )
    shown = run(tmp_path, h, "service", "show", SERVICE)
    assert "rollout Rolling out 2: wave 1 (1 device) of 2 waves" in shown.stdout
    with h.client() as http:
        page = http.get(f"/api/v1/dashboard/services/{SERVICE}").json()
    assert page["service"]["staged"].startswith("Rolling out 2: wave 1 (1 device) of 2 waves")
    aborted = run(tmp_path, h, "service", "rollout", SERVICE, "abort", "--yes")
    assert aborted.stdout.startswith("Aborted: every device back on 1"), aborted.stderr
    again = run(tmp_path, h, "service", "rollout", SERVICE, "resume")
    assert "cannot resume: it was aborted" in one_line_error(again, again.returncode)
    assert "use status, resume" in one_line_error(run(tmp_path, h, "service", "rollout", SERVICE, "undo"), 2)


def test_the_sdk_stages_a_deploy_and_follows_it(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    push(h, publisher, "scorer", "1", factor=2)
    push(h, publisher, "scorer", "2", factor=3)
    with h.client() as http:
        for i in range(4):
            enroll(http, f"dev-{i}", fleet="test")
    with Hub(h.url, h.admin_token) as workspace:
        where = Selector("fleet=test")
        workspace.deploy(SERVICE, "scorer:1", DeploymentConfig(port=8890), target=where)
        staged = Rollout.waves("25%,100%", bake="1h", gates=["error_rate<1%"], on_failure="halt")
        service = workspace.deploy(SERVICE, "scorer:2", target=where, rollout=staged)
        assert service.record.rollout is not None and service.record.rollout["state"] == "running"
        assert service.rollout()["status"].startswith("Rolling out 2: wave 1 (1 device) of 2 waves")
        assert service.rollout_action("promote")["wave"] == 2  # released: its own bake is next
        assert service.rollout_action("promote")["state"] == "completed"
        assert service.record.version == "2"
        # A manual rollback during a rollout ends it: every device gets the version rolled back to.
        push(h, publisher, "scorer", "3", factor=4)
        third = workspace.deploy(SERVICE, "scorer:3", target=where, rollout=staged)
        assert third.rollout()["devices_on_new"] == 1
        assert third.rollback().version == "2"
        ended = third.rollout()
        assert (ended["state"], ended["devices_on_new"]) == ("superseded", 0)
        with pytest.raises(ConfigError, match="the last wave must be 100%"):
            Rollout.waves("50%")
        with pytest.raises(BadArgument, match="use resume, promote or abort"):
            service.rollout_action("dance")
