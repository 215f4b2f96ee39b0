"""The roll-up has one home: its Python and SQL renderings give one answer for the same rows.

The story: a hub runs two services over one fleet, and its devices have reported every kind of
state there is — nothing yet, Transitioning, Healthy, Unhealthy, Unschedulable, Failed with
the old version still serving, Healthy while the old version still serves, a report about an
earlier version, a report from before a settings-only change and one after it — online and
offline, alongside devices the services no longer target (their
old rows still stored), a revoked device and a row of a service deleted since. The deployment
API and ``edgepack device show`` judge these rows in Python; the dashboard's paged views in
SQL. Every device's state for each service, every reason, every service's state, its counts
and every device's rolled-up state must be the same in both, and what the table below says,
on SQLite and on PostgreSQL. Then a user reads one not-yet-reported device through the CLI
and the dashboard, and both name it with the same word.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from cloud_hub.fleet.devices import enroll_device, revoke_device
from cloud_hub.fleet.tables import Device, ServiceChange
from cloud_hub.ingest.tables import ModuleState
from manifests.reported import ModuleStatus
from manifests.states import ServiceState
from tests.conftest import Publisher
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import PushedModule, deploy, push
from tests.hub.test_fleet_cli import run

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
#: Dashboard answers read while the states flip (each one a chance to see two moments).
READS = 60
#: docs/dashboard.md's order, worst first
WORST_FIRST = ("Failed", "Unschedulable", "Unhealthy", "Transitioning", "Pending", "Healthy")


@dataclass(frozen=True)
class Report:
    """What a device's row says about a service: its state, the version the state is about and
    the one serving ("current"/"old" relative to the service; None: not named)."""

    state: ServiceState
    target: str | None = "current"
    serving: str | None = "current"
    reason: str | None = None
    #: the desired-state generation the report is about, relative to the one at which the
    #: service last changed on the device ("before", "at"); None: not named (an older agent)
    generation: str | None = None


#: Each kind of row, and the word every view must give the service on that device.
T, H, N, U, F = (
    ServiceState.TRANSITIONING,
    ServiceState.HEALTHY,
    ServiceState.UNHEALTHY,
    ServiceState.UNSCHEDULABLE,
    ServiceState.FAILED,
)
VARIANTS: dict[str, tuple[Report | None, str]] = {
    "not-reported": (None, "Pending"),
    "transitioning": (Report(T, serving=None, reason="downloading"), "Transitioning"),
    "healthy": (Report(H), "Healthy"),
    "healthy-serving-unnamed": (Report(H, serving=None), "Healthy"),
    "unhealthy": (Report(N, reason="probe failed"), "Unhealthy"),
    "unschedulable": (Report(U, serving=None, reason="disk too small"), "Unschedulable"),
    "failed-old-serving": (Report(F, serving="old", reason="init() raised; rolled back"), "Failed"),
    "healthy-old-serving": (Report(H, serving="old"), "Transitioning"),
    "earlier-version": (Report(H, target="old", serving="old"), "Transitioning"),
    # Same version, other settings (a new port): the report from before the change is not its answer.
    "healthy-before-the-change": (Report(H, generation="before"), "Transitioning"),
    "healthy-at-the-change": (Report(H, generation="at"), "Healthy"),
}
#: What the second service ("gpu", on some devices only) is on each device: None = not targeted.
GPU_VARIANTS = (None, "not-reported", "healthy", "failed-old-serving", "earlier-version")
REASONS = {
    "not-reported": "not reported yet",
    "healthy-old-serving": "version {old} serves, not the deployed version yet",
    "earlier-version": "still running an earlier version",
    "healthy-before-the-change": "has not applied the latest change yet",
}


@dataclass(frozen=True)
class Case:
    device: str
    svc: str | None  # a VARIANTS key, None: not targeted
    gpu: str | None
    online: bool


def cases() -> list[Case]:
    out = []
    for i, (svc, gpu) in enumerate(itertools.product(VARIANTS, GPU_VARIANTS)):
        out.append(Case(f"d-{i:02d}", svc, gpu, online=i % 3 != 0))  # a third offline
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def db_hub(request: pytest.FixtureRequest, hub: HubFactory) -> RunningHub:
    """A hub on SQLite, or on its own database on a real PostgreSQL server."""
    if request.param == "postgresql":
        h = hub(postgres=request.getfixturevalue("postgres"))
        assert h.core.sessions.engine.dialect.name == "postgresql"
        return h
    return hub()  # SQLite, or PostgreSQL on the suite's second pass (EDGEPACK_TEST_POSTGRES)


def _status(service: str, report: Report, digests: dict[str, PushedModule], changed: int = 1) -> ModuleStatus:
    def pick(which: str | None) -> PushedModule | None:
        return None if which is None else digests[which]

    target, serving = pick(report.target), pick(report.serving)
    generation = {None: None, "before": changed - 1, "at": changed}[report.generation]
    return ModuleStatus(
        generation=generation,
        service=service,
        manifest_digest=target.digest if target else None,
        version=target.version if target else None,
        state=report.state,
        reason=report.reason,
        since=AT,
        serving_digest=serving.digest if serving else None,
        serving_version=serving.version if serving else None,
    )


def _row(device: str, status: ModuleStatus) -> ModuleState:
    return ModuleState(
        device_id=device,
        service=status.service,
        state=status.state.value,
        reason=status.reason,
        manifest_digest=status.manifest_digest,
        since=status.since,
        updated_at=AT,
        status=status.model_dump(mode="json"),
    )


@dataclass(frozen=True)
class Fleet:
    hub: RunningHub
    cases: list[Case]
    v1: PushedModule
    v2: PushedModule


def seed(h: RunningHub, publisher: Publisher) -> Fleet:
    """Two services ("svc" runs version 2 on fleet=t, "gpu" version 1 on tier=gpu), the cases'
    devices and their rows, and the devices no view may count."""
    v1 = push(h, publisher, "m", "1", factor=2)
    v2 = push(h, publisher, "m", "2", factor=3)
    all_cases = cases()

    def enroll(s: Any) -> None:
        for c in all_cases:
            enroll_device(s, c.device, {"fleet": "t", **({"tier": "gpu"} if c.gpu else {})})
        enroll_device(s, "removed", {"fleet": "elsewhere"})  # was targeted once, rows remain
        enroll_device(s, "idle", {})
        enroll_device(s, "revoked", {"fleet": "t", "tier": "gpu"})

    h.process.fleet.change(enroll)
    with h.client() as http:
        assert deploy(http, "svc", v2, selector="fleet=t").status_code == 201
        assert deploy(http, "gpu", v1, selector="tier=gpu", port=8891).status_code == 201
    h.process.fleet.change(lambda s: revoke_device(s, "revoked"))

    relative = {"svc": {"current": v2, "old": v1}, "gpu": {"current": v1, "old": v2}}
    with h.core.sessions.begin() as s:
        changed = {(r.device_id, r.service): r.generation for r in s.scalars(select(ServiceChange))}
        for c in all_cases:
            for service, variant in (("svc", c.svc), ("gpu", c.gpu)):
                report = VARIANTS[variant][0] if variant is not None else None
                if report is not None:
                    at = changed[(c.device, service)]
                    s.add(_row(c.device, _status(service, report, relative[service], at)))
            device = s.get(Device, c.device)
            assert device is not None
            device.online = c.online
        # Rows no view may count: services the device no longer runs, a revoked device's, and
        # a service deleted since (ingest keeps a row until the device's next report).
        failed = Report(F, reason="stale")
        s.add(_row("removed", _status("svc", failed, relative["svc"])))
        s.add(_row("removed", _status("gpu", failed, relative["gpu"])))
        s.add(_row("revoked", _status("svc", failed, relative["svc"])))
        s.add(_row("d-00", _status("deleted-since", failed, relative["svc"])))
    return Fleet(h, all_cases, v1, v2)


def expected_reason(variant: str, report: Report | None, old: PushedModule) -> str | None:
    if variant in REASONS:
        return REASONS[variant].format(old=old.version)
    return report.reason if report is not None else None


def get(http: httpx.Client, path: str, **params: Any) -> Any:
    r = http.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_python_and_sql_roll_ups_agree_on_every_kind_of_row(db_hub: RunningHub, publisher: Publisher) -> None:
    fleet = seed(db_hub, publisher)
    old_of = {"svc": fleet.v1, "gpu": fleet.v2}
    with db_hub.client() as http:
        for service in ("svc", "gpu"):
            # Python: the deployment API (service show, the SDK); SQL: the dashboard's service view.
            api = get(http, f"/api/v1/deployments/{service}")
            dash = get(http, f"/api/v1/dashboard/services/{service}", limit=200)
            python = {d["device_id"]: (d["state"], d["reason"]) for d in api["devices"]}
            sql = {d["device_id"]: (d["state"], d["reason"]) for d in dash["devices"]}
            expected = {}
            for c in fleet.cases:
                variant = c.svc if service == "svc" else c.gpu
                if variant is not None:
                    report, word = VARIANTS[variant]
                    expected[c.device] = (word, expected_reason(variant, report, old_of[service]))
            assert python == expected, service
            assert sql == expected, service
            assert dash["total"] == len(expected)

            counts = {w: sum(1 for word, _ in expected.values() if word == w) for w in WORST_FIRST}
            rollout = dash["service"]["rollout"]
            assert rollout["by_state"] == counts and rollout["total"] == len(expected)
            assert rollout["done"] == counts["Healthy"]
            # Both services have a device that failed with the old version serving.
            assert api["state"] == dash["service"]["state"] == "Failed"
            for word, n in counts.items():
                page = get(http, f"/api/v1/dashboard/services/{service}", state=word, limit=200)
                assert page["total"] == n and {d["state"] for d in page["devices"]} <= {word}

        # A device's roll-up: Python (the device API) and SQL (the dashboard's pages and counts).
        def worst(words: list[str]) -> str:
            return min(words, key=WORST_FIRST.index) if words else "Idle"

        expected_devices = {
            c.device: worst([VARIANTS[v][1] for v in (c.svc, c.gpu) if v is not None]) for c in fleet.cases
        }
        expected_devices |= {"removed": "Idle", "idle": "Idle"}
        page = get(http, "/api/v1/dashboard/devices", limit=200)
        assert {d["id"]: d["state"] for d in page["devices"]} == expected_devices
        python_devices = {d: get(http, f"/api/v1/devices/{d}")["state"] for d in expected_devices}
        assert python_devices == expected_devices
        one_by_one = {d: get(http, f"/api/v1/dashboard/devices/{d}")["device"] for d in expected_devices}
        assert {d: view["state"] for d, view in one_by_one.items()} == expected_devices

        by_state = get(http, "/api/v1/dashboard/summary")["devices"]["by_state"]
        expected_counts = {w: 0 for w in (*WORST_FIRST, "Idle")}
        for word in expected_devices.values():
            expected_counts[word] += 1
        assert by_state == expected_counts
        for word, n in expected_counts.items():
            assert get(http, "/api/v1/dashboard/devices", state=word, limit=200)["total"] == n


def test_a_device_that_has_not_reported_has_one_name(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    """``edgepack service show`` (the API's Python roll-up) and the dashboard (its SQL) call a
    targeted device that has not reported yet by the same word, and so does ``device show``."""
    h = hub()
    module = push(h, publisher, "m", "1")
    h.process.fleet.change(lambda s: enroll_device(s, "edge-quiet", {"site": "x"}))
    with h.client() as http:
        assert deploy(http, "svc", module, selector="site=x").status_code == 201
        dash_service = get(http, "/api/v1/dashboard/services/svc")
        dash_device = get(http, "/api/v1/dashboard/devices/edge-quiet")
    [on_dashboard] = dash_service["devices"]
    assert on_dashboard["state"] == dash_device["device"]["state"] == "Pending"

    shown = run(tmp_path, h, "service", "show", "svc", "--json")
    assert shown.returncode == 0, shown.stderr
    [in_cli] = json.loads(shown.stdout)["devices"]
    assert in_cli["state"] == on_dashboard["state"] and in_cli["reason"] == on_dashboard["reason"]

    table = run(tmp_path, h, "service", "show", "svc")
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if "edge-quiet" in line]
    assert "Pending" in row and "not reported yet" in row

    device = run(tmp_path, h, "device", "show", "edge-quiet")
    assert device.returncode == 0, device.stderr
    [row] = [line for line in device.stdout.splitlines() if "svc" in line]
    assert "Pending" in row and "state Pending" in device.stdout


def test_dashboard_views_read_one_snapshot_while_reports_change(
    hub: HubFactory, publisher: Publisher, postgres: str
) -> None:
    """On PostgreSQL (whose READ COMMITTED gives every statement its own snapshot) a dashboard
    answer built from several queries is still one moment: while ingest flips every device's
    state in one transaction after another, the summary's device counts and its service's
    rollout, and a service view's rollout and its device rows, always agree."""
    h = hub(postgres=postgres)
    assert h.core.sessions.engine.dialect.name == "postgresql"
    module = push(h, publisher, "m", "1")
    ids = [f"s-{i:02d}" for i in range(40)]

    def enroll(s: Any) -> None:
        for device in ids:
            enroll_device(s, device, {"fleet": "t"})

    h.process.fleet.change(enroll)
    with h.client() as http:
        assert deploy(http, "svc", module, selector="fleet=t").status_code == 201
    with h.core.sessions.begin() as s:
        for device in ids:
            s.add(_row(device, _status("svc", Report(H), {"current": module})))

    stop = threading.Event()
    flips = 0

    def flip() -> None:
        # What ingest does to the rows, as fast as the database takes it: every device's
        # state changes in one commit, so any one moment has them all in one state.
        nonlocal flips
        while not stop.is_set():
            state = (F if flips % 2 else H).value
            with h.core.sessions.begin() as s:
                s.execute(update(ModuleState).where(ModuleState.service == "svc").values(state=state))
            flips += 1

    writer = threading.Thread(target=flip, daemon=True)
    writer.start()
    torn: list[str] = []
    try:
        with h.client() as http:
            for _ in range(READS):
                summary = get(http, "/api/v1/dashboard/summary")
                counts = {k: n for k, n in summary["devices"]["by_state"].items() if n}
                rollout = {k: n for k, n in summary["services"][0]["rollout"]["by_state"].items() if n}
                if counts != rollout or len(counts) != 1:
                    torn.append(f"summary: devices {counts}, rollout {rollout}")
                view = get(http, "/api/v1/dashboard/services/svc", limit=200)
                rows = Counter(d["state"] for d in view["devices"])
                rollout = {k: n for k, n in view["service"]["rollout"]["by_state"].items() if n}
                if rows != rollout or len(rows) != 1:
                    torn.append(f"service view: rows {dict(rows)}, rollout {rollout}")
    finally:
        stop.set()
        writer.join(timeout=30)
    assert flips > READS, "the writer did not keep up; the reads proved nothing"
    assert not torn, f"{len(torn)} of {2 * READS} answers mixed two moments, e.g. {torn[:3]}"
