"""Issue 17, item 11: the dashboard lets an operator act (roll back, redeploy, delete a service,
revoke a device, read a module's log), and its charts are real charts (time axes, units, gaps,
p95 and error rate), against a real hub, a real broker and headless Chromium.

With ``EDGEPACK_SCREENSHOTS=DIR`` set, the browser tests also write the screenshots that
``docs/dashboard.md`` shows (``docs/img/``); without it they write nothing.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import PushedModule, deploy, enroll, push
from tests.hub.test_fleet_cli import ok_json, one_line_error, run

SCREENSHOTS = os.environ.get("EDGEPACK_SCREENSHOTS")


def shoot(page: Page, name: str) -> None:
    """A screenshot for the docs, only when asked for (committed files are not rewritten by
    every test run)."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def _session(h: RunningHub) -> tuple[httpx.Client, dict[str, str]]:
    """A browser's session: its cookie, and the headers the dashboard adds to a change."""
    browser = httpx.Client(base_url=h.url)
    r = browser.post("/api/v1/dashboard/login", data={"token": h.admin_token})
    assert r.status_code == 200, r.text
    return browser, {"Origin": h.url, "X-CSRF-Token": r.json()["csrf_token"]}


# --- the API behind the actions ------------------------------------------------------------------


def test_rollback_redeploys_the_previous_version_and_refuses_when_there_is_none(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    v1, v2, v3 = (push(h, publisher, "digits", v, factor=n) for n, v in ((2, "1"), (3, "2"), (4, "3")))
    with h.client() as http:
        enroll(http, "dev-1")
        assert deploy(http, "digits", v3, devices=["dev-1"]).status_code == 201
        generation = http.get("/api/v1/devices/dev-1").json()["generation"]

        r = http.post("/api/v1/deployments/digits/rollback")
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2" and r.json()["deployment"]["manifest_digest"] == v2.digest
        assert r.json()["issued"] == {"dev-1": generation + 1}  # the device is told at once
        shown = http.get("/api/v1/deployments/digits").json()
        assert (shown["version"], shown["settings"]["port"]) == ("2", 8890)  # settings kept
        events = http.get("/api/v1/dashboard/events").json()["events"]
        assert any(e["message"] == "service digits rolled back from digits:3 to digits:2" for e in events)

        assert http.post("/api/v1/deployments/digits/rollback").json()["version"] == "1"
        r = http.post("/api/v1/deployments/digits/rollback")
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["type"] == "Conflict" and "nothing to roll back to" in error["message"]
        assert http.get("/api/v1/deployments/digits").json()["manifest_digest"] == v1.digest

        assert http.post("/api/v1/deployments/nope/rollback").status_code == 404


def test_every_dashboard_action_needs_the_sessions_csrf_token(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    push(h, publisher, "digits", "1")
    v2 = push(h, publisher, "digits", "2", factor=3)
    with h.client() as http:
        enroll(http, "dev-1")
        enroll(http, "dev-2")
        assert deploy(http, "digits", v2, devices=["dev-1"]).status_code == 201
    browser, own = _session(h)
    redeploy = {
        "module": "digits", "version": "1", "settings": {"port": 8890}, "target": {"devices": ["dev-1"]},
    }  # fmt: skip
    actions: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/api/v1/deployments/digits/rollback", None),
        ("PUT", "/api/v1/deployments/digits", redeploy),
        ("POST", "/api/v1/devices/dev-2/revoke", None),
        ("DELETE", "/api/v1/deployments/digits", None),
    ]
    try:
        for method, path, body in actions:
            # The cookie alone, or with the hub's Origin but no token: refused, nothing done.
            for headers in ({}, {"Origin": h.url}):
                r = browser.request(method, path, json=body, headers=headers)
                assert r.status_code == 403, (method, path, r.text)
                assert r.json()["error"]["type"] == "Forbidden"
            r = browser.request(method, path, json=body, headers=own)
            assert r.status_code in (200, 201), (method, path, r.text)
    finally:
        browser.close()
    with h.client() as http:
        assert http.get("/api/v1/deployments/digits").status_code == 404
        assert http.get("/api/v1/devices/dev-2").json()["revoked"] is True


def test_the_cli_rolls_back_the_same_way(hub: HubFactory, publisher: Publisher, tmp_path: Path) -> None:
    h = hub()
    push(h, publisher, "digits", "1")
    v2 = push(h, publisher, "digits", "2", factor=3)
    with h.client() as http:
        enroll(http, "dev-1")
        assert deploy(http, "digits", v2, devices=["dev-1"]).status_code == 201
    done = run(tmp_path, h, "service", "rollback", "digits")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("service digits rolled back to digits:1\n")
    error = one_line_error(run(tmp_path, h, "service", "rollback", "digits"), 2)
    assert "nothing to roll back to" in error
    assert ok_json(run(tmp_path, h, "service", "show", "digits", "--json"))["version"] == "1"


# --- in the browser -----------------------------------------------------------------------------


@dataclass
class Scene:
    hub: RunningHub
    prefix: str
    versions: list[PushedModule]


@pytest.fixture
def scene(hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str) -> Scene:
    """digits 1, 2 and 3 pushed; dev-1 enrolled (site=berlin) and running digits 3."""
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    versions = [push(h, publisher, "digits", v, factor=n) for n, v in ((2, "1"), (3, "2"), (4, "3"))]
    with h.client() as http:
        enroll(http, "dev-1", site="berlin")
        assert deploy(http, "digits", versions[2], devices=["dev-1"]).status_code == 201
    return Scene(h, topic_prefix, versions)


@pytest.fixture
def device(scene: Scene, mosquitto: Broker) -> Iterator[Any]:
    """dev-1's side of the broker: online, and answering log requests with a module's lines."""
    probe = mosquitto.probe()
    base = f"{scene.prefix}/devices/dev-1"

    def answer(_client: Any, _userdata: Any, msg: Any) -> None:
        request = json.loads(msg.payload)
        lines = ["model loaded", "<script>window.__pwned = 1</script>", "<b>not bold</b> & done"]
        response = {
            "schema": "edgepack.logs-response/v1", "request_id": request["request_id"],
            "device_id": "dev-1", "service": request["service"], "lines": lines,
        }  # fmt: skip
        probe.client.publish(f"{base}/logs-response", json.dumps(response), qos=1)

    probe.client.on_message = answer
    assert probe.subscribe(f"{base}/logs-request") == [1]
    probe.publish(f"{base}/online", b"true", retain=True)
    try:
        yield probe
    finally:
        probe.close()


def _report_failed_update(probe: Any, scene: Scene) -> None:
    """What an agent reports when version 3 failed to start and version 2 kept serving."""
    v2, v3 = scene.versions[1], scene.versions[2]
    now = datetime.now(UTC).isoformat()
    status = {
        "service": "digits", "manifest_digest": v3.digest, "version": "3", "state": "Failed",
        "reason": "score.py:14 ValueError: model input size 64 expected, got 32; rolled back to version 2, "
                  "which keeps serving",
        "failure": {
            "traceback": "Traceback (most recent call last):\n"
                         '  File "/module/src/score.py", line 14, in init\n'
                         '    raise ValueError(f"model input size 64 expected, got {size}")\n'
                         "ValueError: model input size 64 expected, got 32\n",
            "log_tail": "loading model from /module/model/digits.onnx\n",
        },
        "since": now, "serving_digest": v2.digest, "serving_version": "2",
        "endpoint": "http://10.0.0.7:8890",
    }  # fmt: skip
    report = {
        "device_id": "dev-1", "reported_at": now, "agent_version": "0.1.0",
        "applied_generation": 2, "modules": [status],
    }  # fmt: skip
    probe.publish(f"{scene.prefix}/devices/dev-1/reported", json.dumps(report), retain=True)


def _telemetry(probe: Any, scene: Scene, seconds_ago: list[int]) -> None:
    """Samples of dev-1 that many seconds ago (100 requests and 2 errors between two)."""
    now = datetime.now(UTC)
    for n, ago in enumerate(seconds_ago):
        sample = {
            "device_id": "dev-1",
            "ts": (now - timedelta(seconds=ago)).isoformat(),
            "modules": [
                {
                    "service": "digits", "requests_total": 100 * (n + 1), "errors_total": 2 * (n + 1),
                    "requests_per_s": 2.5, "p50_ms": 4.0, "p95_ms": 9.5, "p99_ms": 12.0,
                }
            ],
        }  # fmt: skip
        probe.publish(f"{scene.prefix}/devices/dev-1/telemetry", json.dumps(sample), qos=1)


def _sign_in(page: Page, h: RunningHub, path: str = "/") -> list[str]:
    """Sign in; returns the list the page's script errors (and CSP refusals) are collected in."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # (A refused request is logged by the browser as an error too: 401 before signing in, 404
    # for a service just deleted. Those are answers the page handles, not script errors.)
    page.on(
        "console",
        lambda msg: errors.append(msg.text)
        if msg.type == "error" and not msg.text.startswith("Failed to load resource")
        else None,
    )
    page.goto(h.url + path)
    page.fill("#token", h.admin_token)
    page.click("#login button[type=submit]")
    expect(page.locator("#main")).to_be_visible()
    return errors


def _charts_drawn(scene: Scene) -> None:
    """Wait until the hub has stored the samples (the charts read them from the database)."""
    deadline = time.monotonic() + 20
    with scene.hub.client() as http:
        while not http.get("/api/v1/dashboard/telemetry").json()["services"].get("digits"):
            assert time.monotonic() < deadline, "the hub never stored dev-1's telemetry"
            time.sleep(0.1)


def test_operator_rolls_back_redeploys_and_deletes_a_service(scene: Scene, device: Any, page: Page) -> None:
    _report_failed_update(device, scene)
    _telemetry(device, scene, [50, 40, 30])
    _charts_drawn(scene)
    errors = _sign_in(page, scene.hub)

    row = page.locator("#services tr[data-service='digits']")
    expect(row).to_have_attribute("data-state", "Failed")
    # Not a bare red "Failed": version 3 failed, and version 2 still serves.
    expect(row.locator("td.state")).to_have_text("v3 failed — v2 serving")
    expect(page.locator("#charts [data-chart='digits requests/s']")).to_be_visible()
    shoot(page, "dashboard-fleet")

    row.locator("a").first.click()
    view = page.locator("#service-view")
    expect(view).to_have_attribute("data-service", "digits")
    expect(page.locator("#service-badge")).to_have_text("v3 failed — v2 serving")
    expect(page.locator("#service-charts [data-chart='digits latency']")).to_be_visible()
    expect(page.locator("#redeploy-version option")).to_have_count(3)
    failure = page.locator("#service-devices details.failure")
    failure.locator("summary").click()
    expect(failure.locator("pre.traceback")).to_contain_text("ValueError: model input size 64")
    shoot(page, "dashboard-failure")

    page.click("#service-rollback")
    expect(page.locator("#notice")).to_have_text("digits rolled back to v2")
    expect(page.locator("#service-info [data-field='module']")).to_have_text("digits:2")
    shoot(page, "dashboard-service")
    with scene.hub.client() as http:
        assert http.get("/api/v1/deployments/digits").json()["version"] == "2"

    page.select_option("#redeploy-version", "3")
    page.click("#service-redeploy")
    expect(page.locator("#notice")).to_have_text("digits redeployed with v3 (1 device updated)")
    expect(page.locator("#service-info [data-field='module']")).to_have_text("digits:3")
    page.click("#service-redeploy")  # the same again: nothing to send, and the page says so
    expect(page.locator("#notice")).to_have_text(
        "digits already runs v3 with these settings: nothing to send"
    )

    # Deleting asks in the page first; Cancel leaves the service alone.
    page.click("#service-delete")
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("Delete service digits?")
    page.click("#confirm-no")
    expect(page.locator("#confirm")).to_be_hidden()
    with scene.hub.client() as http:
        assert http.get("/api/v1/deployments/digits").status_code == 200
    page.click("#service-delete")
    page.click("#confirm-yes")
    expect(page.locator("#notice")).to_have_text("service digits deleted")
    expect(page.locator("#home")).to_be_visible()
    expect(page.locator("#services tr[data-service='digits']")).to_have_count(0)
    # Its samples are still in the database, but its charts went with it.
    expect(page.locator("[data-chart^='digits ']")).to_have_count(0)
    with scene.hub.client() as http:
        assert http.get("/api/v1/deployments/digits").status_code == 404
        assert "digits" not in http.get("/api/v1/dashboard/telemetry").json()["services"]
    assert errors == [], errors


def test_a_modules_log_shows_markup_as_text_and_revoking_asks_first(
    scene: Scene, device: Any, page: Page
) -> None:
    _report_failed_update(device, scene)
    _telemetry(device, scene, [30, 20])
    _charts_drawn(scene)
    errors = _sign_in(page, scene.hub, "/#/devices/dev-1")
    expect(page.locator("#device-view")).to_have_attribute("data-online", "true")
    page.click("#device-modules tr[data-service='digits'] button[data-log='digits']")
    lines = page.locator("#log-lines")
    expect(lines).to_contain_text("<script>window.__pwned = 1</script>")
    expect(lines).to_contain_text("<b>not bold</b> & done")
    assert lines.locator("script, b").count() == 0  # text, not markup
    assert page.evaluate("window.__pwned") is None
    expect(page.locator("#log-note")).to_have_text("3 lines")
    shoot(page, "dashboard-device")

    page.click("#device-revoke")
    expect(page.locator("#confirm-text")).to_contain_text("Revoke dev-1?")
    page.click("#confirm-no")
    with scene.hub.client() as http:
        assert http.get("/api/v1/devices/dev-1").json()["revoked"] is False
    page.click("#device-revoke")
    page.click("#confirm-yes")
    expect(page.locator("#notice")).to_have_text("dev-1 revoked")
    expect(page.locator("#devices tr[data-device='dev-1']")).to_have_count(0)
    with scene.hub.client() as http:
        assert http.get("/api/v1/devices/dev-1").json()["revoked"] is True
    assert errors == [], errors


def test_charts_have_time_axes_units_p95_error_rate_and_gaps(scene: Scene, device: Any, page: Page) -> None:
    # Samples 80, 70 and 20 s ago, in 10 s buckets: nothing for 60..30 s ago, a gap.
    _telemetry(device, scene, [80, 70, 20])
    _charts_drawn(scene)
    errors = _sign_in(page, scene.hub, "/#/devices/dev-1")
    for scope in ("#device-charts", "#charts"):
        if scope == "#charts":
            page.goto(scene.hub.url + "/#/")
        traffic = page.locator(f"{scope} [data-chart='digits requests/s']")
        latency = page.locator(f"{scope} [data-chart='digits latency']")
        expect(traffic).to_contain_text("requests/s 2.5 req/s")
        expect(traffic).to_contain_text("errors 2 %")  # 2 errors per 100 requests
        expect(latency).to_contain_text("p50 4 ms")
        expect(latency).to_contain_text("p95 9.5 ms")
        # uPlot's axes (time, and one per unit) and its legend, with the units.
        expect(traffic.locator(".u-axis")).to_have_count(3)
        expect(latency.locator(".u-axis")).to_have_count(2)
        expect(traffic.locator(".u-legend")).to_contain_text("requests/s (req/s)")
        expect(traffic.locator(".u-legend")).to_contain_text("errors (%)")
        expect(latency.locator(".u-legend")).to_contain_text("p95 (ms)")
        expect(traffic.locator("canvas")).to_have_count(1)
        # The missing interval is a gap, not a line drawn across it.
        expect(traffic).to_have_attribute("data-points", "3")
        expect(traffic).to_have_attribute("data-gaps", "1")
    # The page's rule, on other series: one missing or late sample is no gap (buckets are 10 s,
    # and samples drift across their boundaries), and an agent sending every 30 s has none.
    gaps = """(seconds) => columns(seconds.map((s) => ({ t: new Date(s * 1000).toISOString(), rps: 1 })),
                                CHARTS[0].series, 10).gaps"""
    assert page.evaluate(gaps, [0, 10, 30, 40, 50]) == 0
    assert page.evaluate(gaps, [0, 10, 20, 60, 70]) == 1
    assert page.evaluate(gaps, [0, 30, 60, 90, 120]) == 0
    assert page.evaluate(gaps, [0, 30, 60, 150, 180]) == 1
    assert errors == [], errors


# The outermost elements that reach past the viewport's right edge (for the failure message).
WIDER_THAN_THE_SCREEN = """
[...document.querySelectorAll("body *")]
  .filter((e) => e.getBoundingClientRect().right > innerWidth + 0.5 && e.offsetParent !== null)
  .filter((e) => !(e.parentElement && e.parentElement.getBoundingClientRect().right > innerWidth + 0.5))
  .slice(0, 5).map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`)
"""


def test_every_view_fits_a_420_px_wide_screen(scene: Scene, device: Any, page: Page) -> None:
    _report_failed_update(device, scene)
    _telemetry(device, scene, [30, 20])
    _charts_drawn(scene)
    page.set_viewport_size({"width": 420, "height": 900})
    errors = _sign_in(page, scene.hub)
    views = {
        "/#/": "#charts [data-chart='digits latency'] canvas",
        "/#/devices/dev-1": "#device-charts [data-chart='digits latency'] canvas",
        "/#/services/digits": "#service-charts [data-chart='digits latency'] canvas",
    }
    for path, drawn in views.items():
        page.goto(scene.hub.url + path)
        expect(page.locator(drawn)).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        wide = page.evaluate(WIDER_THAN_THE_SCREEN)
        assert width <= 420, f"{path} is {width} px wide at a 420 px viewport: {wide}"
        if path == "/#/services/digits":
            expect(page.locator("#redeploy-version option")).to_have_count(3)
            shoot(page, "dashboard-phone")
    assert errors == [], errors


def test_the_page_loads_uplot_from_the_hub_under_a_policy_without_inline_script(hub: HubFactory) -> None:
    h = hub()
    with httpx.Client(base_url=h.url) as http:
        page = http.get("/")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "default-src 'none'" in policy
        for path, kind in (
            ("/dashboard/vendor/uPlot.iife.min.js", "text/javascript"),
            ("/dashboard/vendor/uPlot.min.css", "text/css"),
            ("/dashboard/vendor/uPlot.LICENSE", "text/plain"),
        ):
            r = http.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
            assert path.rsplit("/", 1)[1] in page.text or kind == "text/plain"
        assert http.get("/dashboard/vendor/..%2Fapp.js").status_code == 404
        assert http.get("/dashboard/vendor/other.js").status_code == 404


def test_the_package_ships_every_dashboard_file() -> None:
    # The vendored files sit in a folder of their own, which "dashboard/*" does not reach: a
    # hub installed from the wheel served a page whose charts' script was missing.
    root = Path(__file__).resolve().parents[2]
    package = root / "cloud_hub"
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {p for pattern in setuptools["package-data"]["cloud_hub"] for p in package.glob(pattern)}
    dashboard = {p for p in (package / "dashboard").rglob("*") if p.is_file()}
    assert dashboard - shipped == set()
    assert package / "dashboard" / "vendor" / "uPlot.iife.min.js" in dashboard
