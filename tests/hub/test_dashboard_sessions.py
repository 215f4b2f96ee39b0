"""Issue 8: the dashboard cookie is a server-side session (expiring, revocable), not the admin
token; over HTTPS it is Secure. Each test failed while the cookie held the admin token."""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import update

from cloud_hub.api.sessions import DashboardSession
from cloud_hub.db.base import utcnow
from cloud_hub.settings import HubSettings
from cloud_hub.tls.material import make_tls_material
from tests.hub.conftest import HubFactory


def _sign_in(url: str, token: str, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    browser = httpx.Client(base_url=url, verify=verify)
    r = browser.post("/api/v1/dashboard/login", data={"token": token})
    assert r.status_code == 200, r.text
    return browser


def test_the_cookie_is_a_session_that_signing_out_ends(hub: HubFactory) -> None:
    h = hub()
    browser = httpx.Client(base_url=h.url)
    r = browser.post("/api/v1/dashboard/login", data={"token": h.admin_token})
    # Plain HTTP on loopback: a Secure cookie would never be sent back.
    assert r.status_code == 200 and "secure" not in r.headers["set-cookie"].lower()
    cookie = browser.cookies["edgepack_admin"]
    assert cookie != h.admin_token and h.admin_token not in cookie
    assert browser.get("/api/v1/devices").status_code == 200
    assert browser.post("/api/v1/dashboard/logout").status_code == 200
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
    with h.ctx.sessions.begin() as s:
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
