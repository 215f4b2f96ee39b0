"""Proof that a cookie-authenticated request which changes something came from the dashboard.

The session cookie is ``SameSite=Strict``, but a *site* is scheme and host without the port:
a page served from another port of the hub's host (any local program can serve one) is
same-site, so the browser sends it the cookie, and its form posts and ``fetch`` calls acted
with the operator's session. So every request that changes state (not GET, HEAD or OPTIONS)
and is authenticated by the cookie must show both:

1. **The hub's own origin**: ``Origin`` is the hub's public URL (``public_url``, what browsers
   use behind nginx) or the URL the request was sent to (scheme and ``Host``, as the browser
   wrote them); without an ``Origin``, ``Sec-Fetch-Site`` must be ``same-origin``; with
   neither the request is refused, as every browser the dashboard supports sends one.
2. **The session's CSRF token** in ``X-CSRF-Token``, compared in constant time. The dashboard's
   script reads it from the sign-in answer or ``GET /api/v1/dashboard/session``; a page of
   another origin (another port included) cannot read those answers. A readable cookie would
   not do: cookies are not separated by port, so that page could read it.

Requests with ``Authorization: Bearer`` are not affected: a browser never adds that header by
itself, and a page of another origin cannot add it without a CORS preflight the hub refuses.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import Request

from cloud_hub.api.sessions import csrf_token
from cloud_hub.errors import Forbidden
from cloud_hub.settings import HubSettings

CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a URL or an ``Origin`` value; None when it has no host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in _DEFAULT_PORTS:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def hub_origins(request: Request, settings: HubSettings) -> set[tuple[str, str, int]]:
    """The origins the dashboard is served from: the public URL and the one asked for."""
    origins = set()
    for url in (settings.base_url(), f"{request.url.scheme}://{request.headers.get('host', '')}"):
        origin = _origin(url)
        if origin is not None:
            origins.add(origin)
    return origins


def check_same_origin(request: Request, settings: HubSettings) -> None:
    """Refuse (403) a request a page of another origin sent."""
    origin = request.headers.get("origin")
    if origin is not None:
        theirs = _origin(origin)
        if theirs is None or theirs not in hub_origins(request, settings):
            raise Forbidden(
                f"a request from {origin[:100]!r} cannot use the dashboard's session; "
                "use the dashboard itself, or send 'Authorization: Bearer <admin token>'"
            )
        return
    site = request.headers.get("sec-fetch-site")
    if site is None:
        raise Forbidden(
            "a request authenticated by the dashboard's cookie must come from the dashboard "
            "(it sends an Origin header); other clients send 'Authorization: Bearer <admin token>'"
        )
    if site != "same-origin":
        raise Forbidden(f"a {site[:40]} request cannot use the dashboard's session")


def check_csrf_token(request: Request, session_id: str) -> None:
    """Refuse (403) a request without this session's CSRF token."""
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), csrf_token(session_id).encode()):
        raise Forbidden(
            f"missing or wrong {CSRF_HEADER} header: reload the dashboard, or sign in again"
        )


def check_dashboard_write(request: Request, settings: HubSettings, session_id: str) -> None:
    """Both proofs, for a state-changing request that the session cookie authenticates."""
    if request.method.upper() in SAFE_METHODS:
        return
    check_same_origin(request, settings)
    check_csrf_token(request, session_id)
