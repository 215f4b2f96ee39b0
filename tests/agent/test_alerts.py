"""Alert rules against a real fleet: a module that fails a share of its requests makes the
error-rate rule fire and, once it stops failing, resolve; a stopped agent makes the
device-offline rule fire; ``/metrics`` is scraped and parsed as Prometheus would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgepack import Hub
from tests.agent.conftest import Fleet, start_fleet, stop_fleet
from tests.agent.modules import files
from tests.conftest import Publisher, free_port
from tests.factory import SCORE_PY
from tests.hub.broker_fixtures import BrokerFactory
from tests.hub.conftest import HubFactory
from tests.waiting import wait_for

#: run() raises for a request whose data says "fail": the scoring server counts it an error
FAILS_ON_REQUEST = (
    SCORE_PY
    + b"""

_run = run


def run(raw_data):
    if "fail" in raw_data:
        raise ValueError("this request was asked to fail")
    return _run(raw_data)
"""
)


METRICS_TOKEN = "prometheus-read-only-token"


@pytest.fixture
def alerting_fleet(
    hub: HubFactory, broker_factory: BrokerFactory, topic_prefix: str, publisher: Publisher, tmp_path: Path
) -> Iterator[Fleet]:
    # Rounds every second over a short window, so that the test waits seconds, not minutes.
    running = start_fleet(
        hub,
        broker_factory,
        topic_prefix,
        publisher,
        tmp_path,
        alert_interval_s=1,
        alert_window_s=5,
        metrics_token=METRICS_TOKEN,
    )
    yield running
    stop_fleet(running)


class Traffic:
    """Requests to a service on a thread: ``fail_every``-th fails (0: none fails)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.fail_every = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        n = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as http:
            while not self._stop.wait(0.01):
                n += 1
                fail = self.fail_every and n % self.fail_every == 0
                http.post("/score", json={"data": ["fail"] if fail else [1]})


def _events(fleet: Fleet, kind: str) -> list[dict[str, Any]]:
    with fleet.http() as http:
        events: list[dict[str, Any]] = http.get("/api/v1/dashboard/events", params={"after": 0}).json()[
            "events"
        ]
    return [e for e in events if e["kind"] == kind]


def _cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEPACK_HUB_URL": fleet.hub.url, "EDGEPACK_TOKEN": fleet.hub.admin_token}
    return subprocess.run(
        [sys.executable, "-m", "packager", "hub", "alert", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_an_error_rate_rule_fires_while_a_module_fails_and_resolves_when_it_stops(
    alerting_fleet: Fleet,
) -> None:
    fleet = alerting_fleet
    fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy(
        "digits", fleet.push("digits", "1", files=files(FAILS_ON_REQUEST)), port=port, devices=["edge-1"]
    )
    fleet.wait_rollup("digits", "Healthy")
    added = _cli(fleet, "add", "error_rate > 1%", "--service", "digits", "--name", "digits-errors")
    assert added.returncode == 0, added.stderr
    assert "added alert rule digits-errors: error_rate > 1% on service digits" in added.stdout

    def active() -> list[dict[str, Any]]:
        with fleet.http() as http:
            alerts: list[dict[str, Any]] = http.get("/api/v1/alerts").json()["alerts"]
        return alerts

    with Traffic(port) as traffic:
        wait_for(
            lambda: _events(fleet, "alert.resolved") == [] and not active(), timeout=5, what="no alert yet"
        )
        traffic.fail_every = 20  # 5 % of requests fail
        firing = wait_for(active, timeout=60, what="the error-rate alert firing")
        assert [(a["rule"], a["service"], a["device_id"]) for a in firing] == [
            ("digits-errors", "digits", None)
        ]
        fired = _events(fleet, "alert.fired")
        assert [(e["service"], e["device_id"]) for e in fired] == [("digits", None)]
        assert "alert digits-errors (warning) fired on service digits" in fired[0]["message"]
        shown = _cli(fleet, "active", "--json")
        assert shown.returncode == 0 and '"rule": "digits-errors"' in shown.stdout, shown.stderr

        traffic.fail_every = 0  # the module is well again
        wait_for(lambda: not active(), timeout=60, what="the error-rate alert resolving")
        resolved = _events(fleet, "alert.resolved")
        assert [(e["service"], e["device_id"]) for e in resolved] == [("digits", None)]
        said = re.match(
            r"alert digits-errors resolved on service digits: now ([\d.]+)% ", resolved[0]["message"]
        )
        assert said is not None and float(said.group(1)) <= 1, resolved[0]["message"]
    # It fired once: the rounds after firing did not fire it again.
    assert len(_events(fleet, "alert.fired")) == 1


def test_a_device_offline_rule_fires_when_the_agent_stops(alerting_fleet: Fleet) -> None:
    fleet = alerting_fleet
    agent = fleet.device("edge-1").start()
    fleet.device("edge-2").start()
    wait_for(lambda: (fleet.hub_device("edge-1")["online"] and fleet.hub_device("edge-2")["online"]) or None,
             timeout=60, what="both devices online")  # fmt: skip
    with Hub(fleet.hub.url, fleet.hub.admin_token) as hub:
        rule = hub.alerts.add("device offline > 2s", name="gone", severity="critical")
        assert rule.condition == "device offline > 2s" and rule.service is None
        agent.stop()
        alerts = wait_for(hub.alerts.active, timeout=60, what="the offline alert firing", log=agent.log)
        assert [(a.rule, a.device_id, a.severity) for a in alerts] == [("gone", "edge-1", "critical")]
        assert [e["device_id"] for e in _events(fleet, "alert.fired")] == ["edge-1"]
        # A removed rule's alerts end with it, resolved (a webhook subscriber closes its incident).
        hub.alerts.remove("gone")
        assert hub.alerts.active() == [] and hub.alerts.rules() == []
        resolved = _events(fleet, "alert.resolved")
        assert [e["device_id"] for e in resolved] == ["edge-1"]
        assert resolved[0]["message"].startswith("alert gone resolved on device edge-1: the rule was removed")


def test_a_rule_the_hub_cannot_read_is_refused_in_one_line(alerting_fleet: Fleet) -> None:
    bad = _cli(alerting_fleet, "add", "error_rate > 1% for 5 fortnights", "--name", "x")
    assert bad.returncode == 2
    line = bad.stderr.strip()
    assert (
        line.startswith("error: ")
        and "alert condition 'error_rate > 1% for 5 fortnights' is not understood" in line
    )
    assert len(bad.stderr.strip().splitlines()) == 1
    with alerting_fleet.http() as http:
        r = http.post("/api/v1/alerts/rules", json={"name": "Bad Name", "condition": "state == Failed"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "ConfigError"
        body = {"name": "nl", "condition": "state == Failed", "service": "digits\n"}
        r = http.post("/api/v1/alerts/rules", json=body)
        assert r.status_code == 400 and "is not a service name" in r.json()["error"]["message"]
        ok = http.post("/api/v1/alerts/rules", json={"name": "failed", "condition": "state == Failed"})
        assert ok.status_code == 201, ok.text
        again = http.post("/api/v1/alerts/rules", json={"name": "failed", "condition": "state == Failed"})
        assert again.status_code == 409 and "exists" in again.json()["error"]["message"]
    listed = _cli(alerting_fleet, "list", "--json")
    assert listed.returncode == 0 and '"condition": "state == Failed"' in listed.stdout, listed.stderr
    assert _cli(alerting_fleet, "remove", "failed").returncode == 0
    gone = _cli(alerting_fleet, "remove", "failed")
    assert gone.returncode != 0 and "no alert rule named failed" in gone.stderr


def _scrape(fleet: Fleet, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{fleet.hub.url}/metrics", headers=headers, timeout=30)


def test_metrics_are_prometheus_text_with_the_fleet_counts_of_the_api(alerting_fleet: Fleet) -> None:
    fleet = alerting_fleet
    fleet.device("edge-1").start()
    fleet.device("edge-2")  # enrolled, never started: offline
    fleet.deploy("demo", fleet.push("demo", "1"), port=free_port(), devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    with fleet.http() as http:
        summary = http.get("/api/v1/dashboard/summary").json()["devices"]
        http.get("/api/v1/devices/edge-1")
    # What a client picks (method, path) never becomes a label of its own.
    httpx.request("PROPFIND", f"{fleet.hub.url}/coffee/pot-1", timeout=30)
    assert _scrape(fleet, None).status_code == 401
    assert _scrape(fleet, "not-the-token-at-all").status_code == 401
    # The read-only token reads the metrics and nothing else.
    assert _scrape(fleet, METRICS_TOKEN).status_code == 200
    denied = httpx.get(
        f"{fleet.hub.url}/api/v1/devices", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert denied.status_code == 401
    r = _scrape(fleet, fleet.hub.admin_token)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("edgepack_hub_devices_online", ())] == summary["online"] == 1
    by_state = {dict(k[1])["state"]: v for k, v in samples.items() if k[0] == "edgepack_hub_devices"}
    assert by_state == summary["by_state"]
    assert sum(by_state.values()) == summary["total"] == 2
    assert samples[("edgepack_hub_mqtt_connected", ())] == 1
    services = {dict(k[1])["state"]: v for k, v in samples.items() if k[0] == "edgepack_hub_services"}
    assert services == {"Failed": 0, "Unschedulable": 0, "Unhealthy": 0, "Transitioning": 0, "Healthy": 1}
    assert ("edgepack_hub_publish_backlog", ()) in samples
    assert ("edgepack_hub_ingest_lag_seconds", ()) in samples
    assert samples[("edgepack_hub_webhook_deliveries_total", (("outcome", "failed"),))] == 0
    # API latencies by route template, never by raw path.
    routes = {
        dict(k[1]).get("route") for k in samples if k[0] == "edgepack_hub_http_request_duration_seconds_count"
    }
    assert "/api/v1/devices/{device_id}" in routes and "/api/v1/devices/edge-1" not in routes
    assert "/coffee/pot-1" not in routes
    labels = [dict(k[1]) for k in samples if k[0] == "edgepack_hub_http_request_duration_seconds_count"]
    assert {"method": "other", "route": "unmatched", "status": "4xx"} in labels
