"""Issue 8: the dashboard cookie is a server-side session (expiring, revocable), not the admin
token; over HTTPS it is Secure. Each test failed while the cookie held the admin token.

Issue 16: a page on another port of the hub's host cannot act with that session (finding 6),
and wrong admin tokens are throttled per client address (finding 8)."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect
from sqlalchemy import update

from cloud_hub.api.sessions import DashboardSession
from cloud_hub.db.base import utcnow
from cloud_hub.settings import HubSettings
from cloud_hub.tls.material import make_tls_material
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import enroll


def _sign_in(url: str, token: str, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    browser = httpx.Client(base_url=url, verify=verify)
    r = browser.post("/api/v1/dashboard/login", data={"token": token})
    assert r.status_code == 200, r.text
    return browser


def test_the_cookie_is_a_session_that_signing_out_ends(hub: HubFactory) -> None:
    h = hub()
    browser = httpx.Client(base_url=h.url)
    r = browser.post("/api/v1/dashboard/login", data={"token": h.admin_token})
    own = {"Origin": h.url, "X-CSRF-Token": r.json()["csrf_token"]}  # as the dashboard sends
    # Plain HTTP on loopback: a Secure cookie would never be sent back.
    assert r.status_code == 200 and "secure" not in r.headers["set-cookie"].lower()
    cookie = browser.cookies["edgepack_admin"]
    assert cookie != h.admin_token and h.admin_token not in cookie
    assert browser.get("/api/v1/devices").status_code == 200
    assert browser.post("/api/v1/dashboard/logout", headers=own).status_code == 200
    # Someone who copied the cookie before the sign-out gets nothing with it now.
    stolen = httpx.Client(base_url=h.url, cookies={"edgepack_admin": cookie})
    r = stolen.get("/api/v1/devices")
    assert r.status_code == 401 and "session" in r.json()["error"]["message"]
    # And a made-up cookie, or the admin token as a cookie, is no session either.
    for value in ("made-up", h.admin_token):
        assert httpx.get(h.url + "/api/v1/devices", cookies={"edgepack_admin": value}).status_code == 401


def test_sessions_expire_and_an_admin_can_end_them_all(hub: HubFactory) -> None:
    h = hub()
    first, second = _sign_in(h.url, h.admin_token), _sign_in(h.url, h.admin_token)
    with h.core.sessions.begin() as s:
        s.execute(update(DashboardSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert first.get("/api/v1/devices").status_code == 401
    third, fourth = _sign_in(h.url, h.admin_token), _sign_in(h.url, h.admin_token)
    assert third.get("/api/v1/devices").status_code == 200
    with h.client() as admin:
        ended = admin.delete("/api/v1/dashboard/sessions").json()["ended"]
    assert ended == 2  # the expired ones were already gone
    for browser in (second, third, fourth):
        assert browser.get("/api/v1/devices").status_code == 401


def test_over_https_the_session_cookie_is_secure(hub: HubFactory, tmp_path: Path) -> None:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    files = make_tls_material(
        HubSettings(data_dir=tmp_path / "hub"),
        hub_hosts=["127.0.0.1"],
        broker_hosts=["127.0.0.1"],
        broker_dir=broker_dir,
    )
    h = hub(data_dir=tmp_path / "hub", ca=files.ca_cert, tls_cert=files.hub_cert, tls_key=files.hub_key)
    verify = ssl.create_default_context(cafile=str(files.ca_cert))
    r = httpx.post(h.url + "/api/v1/dashboard/login", data={"token": h.admin_token}, verify=verify)
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"].lower()
    assert "secure" in set_cookie and "httponly" in set_cookie and "samesite=strict" in set_cookie


# --- issue 16, finding 6: cross-origin requests from the same host ------------------------------


def _sign_in_page(page: Page, h: RunningHub) -> None:
    page.goto(h.url + "/")
    page.fill("#token", h.admin_token)
    page.click("#login button[type=submit]")
    expect(page.locator("#main")).to_be_visible()


def _enrolled(h: RunningHub) -> list[str]:
    with h.client() as http:
        return [d["id"] for d in http.get("/api/v1/devices").json()["devices"]]


@contextmanager
def _other_port_site(pages: dict[str, str]) -> Iterator[str]:
    """A tiny web site on another loopback port (any local program can serve one)."""

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_port_cannot_act_with_the_dashboard_session(hub: HubFactory, page: Page) -> None:
    # Before: both requests revoked the device (SameSite does not separate ports).
    h = hub()
    with h.client() as http:
        enroll(http, "dev-1")
        enroll(http, "dev-2")
    _sign_in_page(page, h)
    revoke = h.url + "/api/v1/devices/{}/revoke"
    pages = {
        "/form.html": f"""<!doctype html><form id="f" method="post" action="{revoke.format("dev-1")}">
            <input name="x" value="1"></form><script>document.getElementById("f").submit()</script>""",
        "/fetch.html": f"""<!doctype html><script>
            fetch("{revoke.format("dev-2")}", {{method: "POST", mode: "no-cors", credentials: "include",
                   headers: {{"X-CSRF-Token": "guess"}}, body: "x"}})
              .then(() => {{ document.title = "sent"; }}, () => {{ document.title = "failed"; }});
            </script>""",
    }
    with _other_port_site(pages) as site:
        with page.expect_response(lambda r: r.url == revoke.format("dev-1")) as answer:
            page.goto(site + "/form.html")
        assert answer.value.status == 403
        assert answer.value.json()["error"]["type"] == "Forbidden"
        with page.expect_response(lambda r: r.url == revoke.format("dev-2")) as answer:
            page.goto(site + "/fetch.html")
        expect(page).to_have_title("sent")
        assert answer.value.status == 403
    assert _enrolled(h) == ["dev-1", "dev-2"]
    # The session itself still works for the dashboard.
    page.goto(h.url + "/")
    expect(page.locator("#devices tr[data-device='dev-1']")).to_be_visible()


def test_the_dashboards_own_buttons_still_work(hub: HubFactory, page: Page) -> None:
    h = hub()
    with h.client() as http:
        enroll(http, "dev-1")
        enroll(http, "dev-2")
    _sign_in_page(page, h)
    page.goto(h.url + "/#/devices/dev-1")
    page.reload()  # the token the sign-in gave is gone: the script asks the hub for it again
    expect(page.locator("#device-view")).to_have_attribute("data-device", "dev-1")
    page.click("#device-revoke")
    page.click("#confirm-yes")  # the page asks first (in the page, not a browser dialog)
    expect(page.locator("#notice")).to_have_text("dev-1 revoked")
    expect(page.locator("#devices tr[data-device='dev-2']")).to_be_visible()
    expect(page.locator("#devices tr[data-device='dev-1']")).to_have_count(0)
    assert _enrolled(h) == ["dev-2"]

    page.click("#collect-garbage")
    expect(page.locator("#notice")).to_have_text("0 unused blobs deleted")

    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "edgepack_admin")
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    r = httpx.get(h.url + "/api/v1/devices", cookies={"edgepack_admin": cookie})
    assert r.status_code == 401  # the sign-out ended the session on the hub


def test_cookie_writes_need_the_hubs_origin_and_the_sessions_token(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        enroll(http, "dev-1")
    browser = httpx.Client(base_url=h.url)
    token = browser.post("/api/v1/dashboard/login", data={"token": h.admin_token}).json()["csrf_token"]
    other_session_token = _sign_in(h.url, h.admin_token).get("/api/v1/dashboard/session").json()["csrf_token"]
    foreign = "http://127.0.0.1:1"
    refused = [
        {"Origin": foreign, "X-CSRF-Token": token},  # before: accepted
        {"Origin": "null", "X-CSRF-Token": token},
        {"Origin": h.url},  # no token
        {"Origin": h.url, "X-CSRF-Token": "0" * 64},
        {"Origin": h.url, "X-CSRF-Token": other_session_token},
        {"Sec-Fetch-Site": "same-site", "X-CSRF-Token": token},
        {"X-CSRF-Token": token},  # neither Origin nor Sec-Fetch-Site
    ]
    for headers in refused:
        for path in ("/api/v1/registry/gc", "/api/v1/devices/dev-1/revoke", "/api/v1/dashboard/logout"):
            r = browser.post(path, headers=headers)
            assert r.status_code == 403, (path, headers, r.text)
            assert r.json()["error"]["type"] == "Forbidden"
        r = browser.delete("/api/v1/dashboard/sessions", headers=headers)
        assert r.status_code == 403
    assert _enrolled(h) == ["dev-1"]
    # Reading needs neither (another origin cannot read the answers); the token is per session.
    assert browser.get("/api/v1/devices", headers={"Origin": foreign}).status_code == 200
    assert browser.get("/api/v1/dashboard/session").json() == {"csrf_token": token}
    # The dashboard's own requests: its origin, or same-origin fetch metadata, and the token.
    own = {"Origin": h.url, "X-CSRF-Token": token}
    assert browser.post("/api/v1/registry/gc", headers=own).status_code == 200
    same = {"Sec-Fetch-Site": "same-origin", "X-CSRF-Token": token}
    assert browser.post("/api/v1/registry/gc", headers=same).status_code == 200
    # Bearer requests are not affected, whatever their Origin.
    r = httpx.post(h.url + "/api/v1/registry/gc", headers={**h.admin_headers, "Origin": foreign})
    assert r.status_code == 200
    assert browser.post("/api/v1/dashboard/logout", headers=own).status_code == 200
    assert browser.get("/api/v1/devices").status_code == 401


def test_behind_a_proxy_the_public_url_is_the_dashboards_origin(hub: HubFactory) -> None:
    h = hub(public_url="https://hub.example.com")
    browser = _sign_in(h.url, h.admin_token)
    token = browser.get("/api/v1/dashboard/session").json()["csrf_token"]
    for origin, status in (
        ("https://hub.example.com", 200),
        ("https://HUB.example.com:443", 200),
        ("http://hub.example.com", 403),
        ("https://hub.example.com:8443", 403),
        ("https://hub.example.com.evil.test", 403),
    ):
        r = browser.post("/api/v1/registry/gc", headers={"Origin": origin, "X-CSRF-Token": token})
        assert r.status_code == status, origin


# --- issue 16, finding 8: sign-in throttling -----------------------------------------------------


def _throttle_events(h: RunningHub) -> list[dict[str, object]]:
    with h.client() as http:
        events = http.get("/api/v1/dashboard/events").json()["events"]
    return [e for e in events if e["kind"] == "signin-throttled"]


def test_wrong_tokens_are_throttled_per_address_with_a_growing_delay(hub: HubFactory) -> None:
    # Before: 600 wrong tokens in 7.5 s, every one compared and answered 401.
    h = hub(login_free_failures=5, login_delay_s=3.0, login_max_delay_s=60.0)
    login = "/api/v1/dashboard/login"
    with httpx.Client(base_url=h.url) as http:
        answers = [http.post(login, data={"token": f"guess-{i}"}) for i in range(30)]
        assert [r.status_code for r in answers[:5]] == [401] * 5
        assert {r.status_code for r in answers[5:]} == {429}
        blocked = answers[-1]
        assert blocked.json()["error"]["type"] == "Throttled"
        assert 1 <= int(blocked.headers["Retry-After"]) <= 3
        # During a block even the right token is refused (or a block would tell which is right).
        assert http.post(login, data={"token": h.admin_token}).status_code == 429

        time.sleep(int(blocked.headers["Retry-After"]))
        assert http.post(login, data={"token": "guess-again"}).status_code == 401
        doubled = http.post(login, data={"token": h.admin_token})
        assert doubled.status_code == 429 and 3 < int(doubled.headers["Retry-After"]) <= 6

        time.sleep(int(doubled.headers["Retry-After"]))
        ok = http.post(login, data={"token": h.admin_token})
        assert ok.status_code == 200 and ok.json()["csrf_token"]
        # A success resets the address: the next mistakes are answered again.
        assert [http.post(login, data={"token": "typo"}).status_code for _ in range(5)] == [401] * 5
        assert http.post(login, data={"token": h.admin_token}).status_code == 429

    # One event per throttling episode (two episodes here), not one per attempt.
    events = _throttle_events(h)
    assert len(events) == 2
    assert "127.0.0.1" in str(events[0]["message"]) and "5 wrong admin tokens" in str(events[0]["message"])


def test_concurrent_wrong_tokens_get_no_more_tries_than_one_by_one(hub: HubFactory) -> None:
    # Each attempt is counted in the same step that checks it (cloud_hub.login_throttle.admit):
    # a concurrent burst gets exactly as many comparisons as the same attempts one by one.
    h = hub(login_free_failures=5, login_delay_s=30.0, login_max_delay_s=60.0)
    login = h.url + "/api/v1/dashboard/login"
    with httpx.Client(limits=httpx.Limits(max_connections=40)) as http, ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(lambda i: http.post(login, data={"token": f"g{i}"}).status_code, range(200)))
    assert codes.count(401) == 5 and codes.count(429) == 195
    assert len(_throttle_events(h)) == 1
