"""Every error the hub answers has one shape, and the CLI acts on its ``type``."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text

from manifests.errors import TrustError
from packager.hubclient import HubRequestError, raise_for_hub_error
from tests.hub.conftest import HubFactory


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return response.status_code, body["error"]["type"], body["error"]["message"]


def test_framework_errors_have_the_hub_shape(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        status, kind, message = error_of(http.get("/api/v1/no-such-thing"))
        assert (status, kind) == (404, "NotFound") and "/api/v1/no-such-thing" in message
        status, kind, message = error_of(http.delete("/api/v1/hub/key"))
        assert (status, kind) == (405, "MethodNotAllowed") and "DELETE" in message
        status, kind, _ = error_of(http.post("/api/v1/devices", json={"id": "x", "tagz": {}}))
        assert (status, kind) == (422, "ValidationError")
        big = b'{"id": "' + b"x" * (17 << 20) + b'"}'
        status, kind, _ = error_of(http.post("/api/v1/devices", content=big))
        assert (status, kind) == (413, "TooLarge")
        status, kind, _ = error_of(http.get("/api/v1/devices", headers={"Authorization": "Bearer nope"}))
        assert (status, kind) == (401, "Unauthorized")


def test_an_unexpected_failure_is_a_500_in_the_same_shape_without_internals(hub: HubFactory) -> None:
    h = hub()
    with h.core.sessions.begin() as s:
        s.execute(text("DROP TABLE events"))
    with h.client() as http:
        status, kind, message = error_of(http.get("/api/v1/dashboard/events"))
    assert (status, kind) == (500, "InternalError")
    assert "events" not in message and "Traceback" not in message


def test_the_cli_maps_the_hub_error_type_to_its_exit_code(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        invalid = http.post("/api/v1/devices", json={"id": "x", "tagz": {}})
        missing = http.get("/api/v1/devices/nobody")
        tampered = http.post("/api/v1/modules", content=b"not a tar at all" * 100)
    with pytest.raises(HubRequestError) as exc:
        raise_for_hub_error(invalid)
    # A 422 used to be taken for a trust failure (exit 3) because of its status alone.
    assert (exc.value.kind, exc.value.exit_code) == ("ValidationError", 2)
    with pytest.raises(HubRequestError) as exc:
        raise_for_hub_error(missing)
    assert (exc.value.kind, exc.value.exit_code) == ("NotFound", 2)
    with pytest.raises(TrustError):
        raise_for_hub_error(tampered)


def test_an_answer_not_from_the_hub_falls_back_on_its_status() -> None:
    request = httpx.Request("GET", "http://127.0.0.1/api/v1/devices")
    proxy_page = httpx.Response(502, text="<html>Bad Gateway</html>", request=request)
    with pytest.raises(HubRequestError) as exc:
        raise_for_hub_error(proxy_page)
    assert (exc.value.kind, exc.value.exit_code) == (None, 4)
