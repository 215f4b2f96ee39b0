"""The module's own run() time on the hub: stored with the other telemetry, charted as
``run_p95_ms`` beside ``p95_ms``, and an alert rule can watch it."""

from __future__ import annotations

from typing import Any

from cloud_hub.db.base import utcnow
from cloud_hub.ingest.tables import TelemetrySample
from manifests.reported import ModuleMetrics, Telemetry
from tests.conftest import Publisher
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, enroll, push
from tests.waiting import wait_for


def test_run_p95_is_charted_beside_p95_and_an_alert_rule_fires_on_it(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(alert_interval_s=1)
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        enroll(http, "dev-1", site="berlin")
        enroll(http, "dev-2", site="berlin")
        assert deploy(http, "digits", mod, selector="site=berlin").status_code == 201
        rule = {"name": "slow-run", "condition": "run_p95_ms > 20", "service": "digits"}
        r = http.post("/api/v1/alerts/rules", json=rule)
        assert r.status_code == 201, r.text
        assert r.json()["metric"] == "run_p95_ms"
    # What ingest stores of each device's sample: the requests take 60 ms at p95, of which the
    # module's run() is 30 ms on one device and 40 ms on the other.
    now = utcnow()
    with h.core.sessions.begin() as s:
        for device, run_p95 in (("dev-1", 30.0), ("dev-2", 40.0)):
            metrics = ModuleMetrics(
                service="digits", requests_total=10, errors_total=0, requests_per_s=1.0,
                p50_ms=20.0, p95_ms=60.0, run_p50_ms=10.0, run_p95_ms=run_p95,
            )  # fmt: skip
            sample = Telemetry(device_id=device, ts=now, modules=[metrics])
            s.add(TelemetrySample(device_id=device, ts=now, received_at=now,
                                  payload=sample.model_dump(mode="json", by_alias=True)))  # fmt: skip

    with h.client() as http:
        charts = http.get("/api/v1/dashboard/telemetry", params={"bucket_s": 3600}).json()
    [point] = charts["services"]["digits"]
    assert (point["p95_ms"], point["run_p95_ms"]) == (60.0, 35.0)  # medians over the devices

    def firing() -> list[dict[str, Any]]:
        with h.client() as http:
            alerts: list[dict[str, Any]] = http.get("/api/v1/alerts").json()["alerts"]
        return alerts

    [alert] = wait_for(firing, timeout=30, what="the run_p95_ms alert firing")
    assert alert["rule"] == "slow-run" and float(alert["value"]) == 35.0
