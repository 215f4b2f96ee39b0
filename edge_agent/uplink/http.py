"""The device side of the hub's HTTP API: its desired state, manifests and blobs.

Every call authenticates with the device token. Failures are classified for the reconcile
loop: :class:`HubUnavailable` (network, 5xx, 429: retry with backoff), :class:`NotFoundError`
(the hub does not have it), :class:`ConfigError` (the token is refused: enroll again).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

# httpx imports its command-line tool (click and rich, about 10 MB) whenever they are installed,
# as they are beside the edgepack CLI; the agent never needs it, so it is kept out.
sys.modules.setdefault("httpx._main", types.ModuleType("httpx._main"))

import httpx  # noqa: E402

from edge_agent.uplink.tls import client_context  # noqa: E402
from manifests.device import DeviceCredentials  # noqa: E402
from manifests.errors import ConfigError, HubUnavailable, NotFoundError  # noqa: E402

#: a manifest lists a module's files; far below this
MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 256 << 10


@dataclass(frozen=True)
class DesiredFetch:
    """What ``GET /device/desired`` gave: new bytes, or nothing new (304) or nothing yet."""

    data: bytes | None
    etag: str | None


class HubHttp:
    def __init__(self, credentials: DeviceCredentials, *, timeout_s: float = 30.0) -> None:
        self.base = credentials.hub_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base,
            headers={"Authorization": f"Bearer {credentials.token}", "User-Agent": "edgepack-agent"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            verify=client_context(credentials) if self.base.startswith("https") else True,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._client.get(path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"hub {self.base} unreachable ({type(exc).__name__}: {exc})") from None
        _raise_for_status(response, self.base, path)
        return response

    def desired(self, etag: str | None) -> DesiredFetch:
        """This device's signed desired state, unless it is still ``etag`` (304)."""
        headers = {"If-None-Match": etag} if etag else {}
        try:
            response = self._get("/api/v1/device/desired", headers=headers)
        except NotFoundError:
            return DesiredFetch(None, None)  # enrolled, nothing issued yet
        if response.status_code == 304:
            return DesiredFetch(None, etag)
        return DesiredFetch(response.content, response.headers.get("etag"))

    def manifest(self, digest: str) -> bytes:
        with self._stream(f"/api/v1/device/manifests/{digest}", {}) as response:
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise HubUnavailable(f"manifest {digest} from the hub exceeds {MAX_MANIFEST_BYTES} bytes")
        return bytes(data)

    @contextlib.contextmanager
    def blob(self, digest: str, offset: int) -> Iterator[tuple[int, Iterator[bytes]]]:
        """Open blob ``digest`` from byte ``offset``; yields the offset the body starts at (0
        when the hub sent the whole blob instead of the range) and the chunks."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._stream(f"/api/v1/device/blobs/{digest}", headers) as response:
            start = offset if response.status_code == 206 else 0
            try:
                yield start, response.iter_bytes(CHUNK)
            except httpx.HTTPError as exc:
                raise HubUnavailable(
                    f"download of {digest} from {self.base} broke off ({type(exc).__name__})"
                ) from None

    @contextlib.contextmanager
    def _stream(self, path: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        try:
            with self._client.stream("GET", path, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                _raise_for_status(response, self.base, path)
                yield response
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"hub {self.base} unreachable ({type(exc).__name__}: {exc})") from None


def _hub_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase


def _raise_for_status(response: httpx.Response, base: str, path: str) -> None:
    status = response.status_code
    if status < 400:
        return
    message = f"hub {base} answered {status} for {path}: {_hub_message(response)}"
    if status in (401, 403) and path.endswith("/desired"):
        raise ConfigError(message + "; the device token was refused: enroll the device again")
    if status == 404:
        raise NotFoundError(message)
    if status in (401, 403):
        # The hub no longer names this file for the device (its desired state moved on).
        raise NotFoundError(message)
    retry_after = response.headers.get("retry-after")
    delay = float(retry_after) if retry_after and retry_after.isdigit() else None
    raise HubUnavailable(message, retry_after_s=delay)
