"""The dashboard's fleet API: paged, filtered device lists, summary, one device, one service —
on SQLite and on PostgreSQL, with every bad parameter refused in the one JSON error shape.

A few hundred seeded devices (``tests.hub.fleet_seed``) are enough to page through; the
expected answers are computed from the database rows in plain Python
(``test_dashboard_fleet.db_devices``), not with the queries under test.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text

from cloud_hub.events import Event
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import enroll
from tests.hub.test_dashboard_fleet import DbDevice, db_devices, db_service_states, seed

COUNT = 240


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_hub(
    request: pytest.FixtureRequest,
    hub: HubFactory,
    publisher: Publisher,
    mosquitto: Broker,
    topic_prefix: str,
) -> RunningHub:
    factory = hub
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")

        def factory(**kw: object) -> RunningHub:
            return hub(postgres=server, **kw)

    h = seed(factory, publisher, mosquitto, topic_prefix, COUNT).hub
    with h.client() as http:  # a key with '.' and '/' (as JSON paths go), and no service: Idle
        enroll(http, "odd-1", **{"team.io/owner": "ml"})
    return h


def all_pages(http: httpx.Client, path: str, params: dict[str, object], limit: int = 37) -> list[dict]:
    """Every row of a paged listing, page by page; checks ``total`` on each page."""
    rows: list[dict] = []
    offset, total = 0, None
    while True:
        r = http.get(path, params={**params, "limit": limit, "offset": offset})
        assert r.status_code == 200, r.text
        body = r.json()
        assert total is None or body["total"] == total
        total = body["total"]
        assert len(body["devices"]) <= limit
        rows += body["devices"]
        offset += limit
        if offset >= total:
            break
    assert len(rows) == total
    return rows


def ids(rows: list[dict], key: str = "id") -> list[str]:
    return [r[key] for r in rows]


def expect_ids(devices: list[DbDevice]) -> list[str]:
    return sorted(d.id for d in devices)


def test_device_listing_pages_and_filters(fleet_hub: RunningHub) -> None:
    devices = db_devices(fleet_hub)
    path = "/api/v1/dashboard/devices"
    with fleet_hub.client() as http:
        # Pages cover the fleet once, in id order.
        assert ids(all_pages(http, path, {})) == expect_ids(devices)
        first = http.get(path).json()
        assert (
            first["total"] == len(devices) == COUNT + 1
            and first["limit"] == 50
            and len(first["devices"]) == 50
        )

        # Each filter, and filters combined, give exactly the matching devices.
        cases: list[tuple[dict[str, object], list[DbDevice]]] = [
            ({"state": "Failed"}, [d for d in devices if d.state == "Failed"]),
            ({"state": "Pending"}, [d for d in devices if d.state == "Pending"]),
            ({"online": "false"}, [d for d in devices if not d.online]),
            (
                {"online": "true", "state": "Healthy"},
                [d for d in devices if d.online and d.state == "Healthy"],
            ),
            ({"tag": "site:berlin"}, [d for d in devices if d.tags.get("site") == "berlin"]),
            (
                {"tag": ["site:paris", "tier:gpu"]},
                [d for d in devices if d.tags.get("site") == "paris" and d.tags.get("tier") == "gpu"],
            ),
            (
                {"tag": "tier=gpu", "online": "true"},
                [d for d in devices if d.tags.get("tier") == "gpu" and d.online],
            ),
            ({"tag": "site:nowhere"}, []),
            ({"tag": "team.io/owner:ml"}, [d for d in devices if d.id == "odd-1"]),
            ({"state": "Idle"}, [d for d in devices if d.id == "odd-1"]),
            ({"tag": "nosuchkey:x"}, []),
            ({"q": "sim-0012"}, [d for d in devices if "sim-0012" in d.id]),
            ({"q": "SIM-0012"}, [d for d in devices if "sim-0012" in d.id]),  # case does not matter
            ({"q": "canary"}, [d for d in devices if d.tags.get("ring") == "canary"]),  # tag text
            ({"q": "%"}, []),  # a LIKE wildcard is a plain character
            ({"q": "_"}, []),
        ]
        for params, wanted in cases:
            got = all_pages(http, path, params)
            assert ids(got) == expect_ids(wanted), params
        # The rows carry what the table shows.
        row = http.get(path, params={"q": "sim-00000"}).json()["devices"][0]
        assert row["tags"]["site"] == "berlin" and row["online"] is True and row["state"] == "Healthy"


def test_summary_counts_equal_the_database(fleet_hub: RunningHub) -> None:
    devices = db_devices(fleet_hub)
    with fleet_hub.client() as http:
        body = http.get("/api/v1/dashboard/summary").json()
    counts = body["devices"]
    assert counts["total"] == len(devices) == COUNT + 1
    assert counts["online"] == sum(d.online for d in devices)
    assert counts["offline"] == len(devices) - counts["online"]
    assert {k: v for k, v in counts["by_state"].items() if v} == dict(Counter(d.state for d in devices))
    services = {s["name"]: s for s in body["services"]}
    assert list(services) == ["canary", "digits", "vision"]  # by name
    for name, svc in services.items():
        states = db_service_states(fleet_hub, name, devices)
        assert svc["rollout"]["total"] == len(states)
        assert {k: v for k, v in svc["rollout"]["by_state"].items() if v} == dict(Counter(states.values()))
        assert svc["rollout"]["done"] == sum(st == "Healthy" for st in states.values())
    assert services["digits"]["state"] == "Failed" and services["digits"]["devices"] is None
    assert services["canary"]["state"] == "Healthy"
    assert [d["device_id"] for d in services["canary"]["devices"]] == ["sim-00000", "sim-00001", "sim-00002"]


def test_service_view_pages_its_devices(fleet_hub: RunningHub) -> None:
    devices = db_devices(fleet_hub)
    states = db_service_states(fleet_hub, "vision", devices)
    path = "/api/v1/dashboard/services/vision"
    with fleet_hub.client() as http:
        rows = all_pages(http, path, {}, limit=7)
        assert [r["device_id"] for r in rows] == sorted(states)
        assert {r["device_id"]: r["state"] for r in rows} == states
        failed = all_pages(http, path, {"state": "Failed"}, limit=3)
        assert [r["device_id"] for r in failed] == sorted(d for d, st in states.items() if st == "Failed")
        assert all(r["reason"] == "vision: simulated failed" for r in failed)
        pending = all_pages(http, path, {"state": "Pending"})
        assert all(r["reason"] == "not reported yet" for r in pending) and pending
        bad = http.get(path, params={"state": "Idle"})  # a device state, not a service's
        assert bad.status_code == 400 and "expected one of" in bad.json()["error"]["message"]
        body = http.get(path).json()
        assert body["service"]["module"] == "vision" and body["service"]["target"] == {
            "selector": {"tier": "gpu"}
        }
        assert body["service"]["rollout"]["total"] == len(states)


def test_device_view(fleet_hub: RunningHub) -> None:
    with fleet_hub.client() as http:
        body = http.get("/api/v1/dashboard/devices/sim-00015").json()  # i % 20 == 15: Failed
    assert body["device"]["state"] == "Failed"
    assert body["services"] == ["digits"]
    assert [(m["service"], m["state"], m["reason"]) for m in body["modules"]] == [
        ("digits", "Failed", "digits: simulated failed")
    ]
    assert {"enrolled", "online"} <= {e["kind"] for e in body["events"]}
    assert all(e["device_id"] == "sim-00015" for e in body["events"])
    assert [e["id"] for e in body["events"]] == sorted((e["id"] for e in body["events"]), reverse=True)
    assert body["telemetry"] == {} and body["latest_sample"] is None


BAD_DEVICE_QUERIES: list[tuple[dict[str, object], int, str]] = [
    ({"limit": 0}, 422, "limit"),
    ({"limit": 201}, 422, "limit"),
    ({"limit": "many"}, 422, "limit"),
    ({"offset": -1}, 422, "offset"),
    ({"offset": 10**7}, 422, "offset"),
    ({"tag": "site"}, 400, "key:value"),
    ({"tag": "site:"}, 400, "value"),
    ({"tag": "bad key:x"}, 400, "key"),
    ({"tag": [f"k{i}:v" for i in range(9)]}, 400, "at most 8"),
    ({"tag": ["site:berlin", "site:paris"]}, 400, "twice"),
    ({"state": "Sleeping"}, 400, "expected one of"),
    ({"online": "maybe"}, 422, "online"),
    ({"q": "x" * 65}, 422, "q"),
    ({"q": "a\x00b"}, 400, "control characters"),
]


def test_bad_device_queries_are_refused(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        for params, status, says in BAD_DEVICE_QUERIES:
            r = http.get("/api/v1/dashboard/devices", params=params)
            assert r.status_code == status, (params, r.text)
            error = r.json()["error"]
            assert set(error) == {"type", "message"} and says in error["message"], (params, error)


def test_bad_views_are_refused(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        for path, status in [
            ("/api/v1/dashboard/devices/no-such-device", 404),
            ("/api/v1/dashboard/devices/bad%20id", 400),
            ("/api/v1/dashboard/services/nope", 404),
            ("/api/v1/dashboard/services/Bad_Name", 400),
        ]:
            r = http.get(path)
            assert r.status_code == status, (path, r.text)
            assert set(r.json()["error"]) == {"type", "message"}
    with httpx.Client(base_url=h.url) as anonymous:
        for path in ("summary", "devices", "devices/x", "services/x"):
            r = anonymous.get(f"/api/v1/dashboard/{path}")
            assert r.status_code == 401 and r.json()["error"]["type"] == "Unauthorized"


def test_the_dashboard_doc_names_every_dashboard_route(hub: HubFactory) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "dashboard.md").read_text()
    documented = set(re.findall(r"/api/v1/dashboard/[a-z_{}/]+", doc))
    documented |= {f"/api/v1/dashboard/{m}" for m in re.findall(r"`/(events|telemetry|ingest)`", doc)}
    h = hub()
    spec = httpx.get(f"{h.url}/openapi.json").json()
    served = {p for p in spec["paths"] if p.startswith("/api/v1/dashboard/")}
    assert served == documented  # the sign-in and session routes too


def test_the_dashboard_script_never_parses_html() -> None:
    # Device ids, tags, reasons and endpoints are device-controlled: the script only ever sets
    # them as text (document.createElement + append), never through an HTML parser.
    script = (Path(__file__).resolve().parents[2] / "cloud_hub" / "dashboard" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_a_devices_newest_events_are_read_through_an_index(hub: HubFactory, tmp_path: Path) -> None:
    # The device and service pages read their newest events; migration 0005's indexes let the
    # database walk them newest first instead of sorting every event of the device. (SQLite's
    # plan, pinned in the PostgreSQL pass too: the planner's words differ per engine.)
    h = hub(data_dir=tmp_path, db=f"sqlite:///{tmp_path / 'hub.db'}")
    with h.core.sessions.begin() as s:
        for column, name in [
            (Event.device_id, "ix_events_device_id_id"),
            (Event.service, "ix_events_service_id"),
        ]:
            query = select(Event.id).where(column == "x").order_by(Event.id.desc()).limit(30)
            sql = str(query.compile(dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(row[-1]) for row in s.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
            assert name in plan and "TEMP B-TREE" not in plan, plan
