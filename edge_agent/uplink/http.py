"""The device side of the hub's HTTP API: its desired state, manifests and blobs.

Every call authenticates with the device token. Failures are classified for the reconcile
loop: :class:`HubUnavailable` (network, 5xx, 408, 429: retry with backoff),
:class:`NotFoundError` (the hub does not have it, or no longer names it for this device),
:class:`TokenRefused`, a ``ConfigError`` (the token is refused: enroll again; logged as an
error that says how, and asked again only after a backoff), :class:`HubRefused` (any other 4xx:
the hub refuses what it was asked, e.g. a blob whose stored bytes no longer match its digest
is a 422, and asking again gets the same answer).

This is the standard library's ``http.client``, not httpx as elsewhere in edgepack: the agent
runs for months on small devices with a memory budget (45 MB), and httpx with its
dependencies costs it about 5 MB more for three GET requests. Each thread keeps one
keep-alive connection, so the blobs of a module come over one connection.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.backoff import full_jitter
from edge_agent.uplink.tls import client_context
from manifests.device import DeviceCredentials
from manifests.errors import ConfigError, HubRefused, HubUnavailable, NotFoundError
from manifests.rotation import CONFIRM_PATH, REQUEST_PATH, ROTATE_HEADER, RotationAnswer

if TYPE_CHECKING:
    from manifests.data import BatchKey

#: a manifest lists a module's files; far below this
MAX_MANIFEST_BYTES = 4 << 20
MAX_ERROR_BYTES = 16 << 10
CHUNK = 256 << 10
#: client errors that say "not now" rather than "never": timed out, too many requests
RETRIED_CLIENT_ERRORS = frozenset({408, 429})
#: After the hub refused the device token, the next request waits a random time up to
#: BASE * 2**refusals, capped (full jitter): a refusal does not heal by itself (the device was
#: revoked, or its credentials file is not the one the hub issued), and a fleet whose tokens
#: a restored hub database no longer knows must not come back in lockstep.
TOKEN_REFUSED_BASE_S = 60.0
#: Answers to a data upload that do not blame the batch, so it stays in the spool (within its
#: quota) instead of being dropped: a refused token (401) is the device's credentials, and 404
#: or 405 is a hub older than the upload route (devices are upgraded first).
LATER_FOR_DATA = frozenset({401, 404, 405})
TOKEN_REFUSED_CAP_S = 3600.0

log = logging.getLogger(__name__)


class TokenRefused(ConfigError):
    """The hub refused this device's token (401/403 for its desired state): only enrolling the
    device again, or pointing the agent at the right credentials file, cures it."""


@dataclass(frozen=True)
class DesiredFetch:
    """What ``GET /device/desired`` gave: new bytes, or nothing new (304) or nothing yet;
    ``hub_time`` is the hub's clock when it answered (its ``Date`` header), so a state that
    expired only by the device's clock is blamed on the clock."""

    data: bytes | None
    etag: str | None
    hub_time: datetime | None = None


class HubHttp:
    def __init__(
        self,
        credentials: DeviceCredentials,
        *,
        timeout_s: float = 30.0,
        credentials_path: Path | None = None,
        refused_base_s: float = TOKEN_REFUSED_BASE_S,
        refused_cap_s: float = TOKEN_REFUSED_CAP_S,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < refused_base_s <= refused_cap_s:
            raise ValueError("refused_base_s must be positive and at most refused_cap_s")
        url = urllib.parse.urlsplit(credentials.hub_url)
        self.device_id = credentials.device_id
        self.credentials_path = credentials_path
        self._refused_base_s, self._refused_cap_s = refused_base_s, refused_cap_s
        self._clock, self._rand = clock, rand
        self._refusals = 0  # in a row: the exponent of the backoff
        self._refused_until = 0.0
        self.base = credentials.hub_url.rstrip("/")
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._timeout = timeout_s
        self._tls = client_context(credentials) if self._https else None
        self._headers = {
            "Authorization": f"Bearer {credentials.token}",
            "User-Agent": f"edgepack-agent/{__version__}",
        }
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []
        #: Set when the hub's answer for the desired state says the credentials are to rotate;
        #: ``rotation_requested`` is when that rotation was asked (the header's value).
        self.rotation_asked = threading.Event()
        self.rotation_requested: str | None = None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    # --- requests ----------------------------------------------------------------------------

    def desired(self, etag: str | None) -> DesiredFetch:
        """This device's signed desired state, unless it is still ``etag`` (304)."""
        path = "/api/v1/device/desired"
        self._check_not_refused()
        headers = {"If-None-Match": etag} if etag else {}
        with self._open(path, headers) as response:
            if response.status in (401, 403):
                self._token_refused(response, path)
            self._token_accepted()
            if asked := response.getheader(ROTATE_HEADER):
                self.rotation_requested = asked[:64]
                self.rotation_asked.set()
            if response.status == 304:
                return DesiredFetch(None, etag)
            if response.status == 404:
                _read_error(response)
                return DesiredFetch(None, None)  # enrolled, nothing issued yet
            self._check(response, path)
            data = _read_bounded(response, MAX_MANIFEST_BYTES, "desired state")
            return DesiredFetch(data, response.getheader("etag"), _hub_time(response.getheader("date")))

    def manifest(self, digest: str) -> bytes:
        path = f"/api/v1/device/manifests/{digest}"
        with self._open(path, {}) as response:
            self._check(response, path)
            return _read_bounded(response, MAX_MANIFEST_BYTES, f"manifest {digest}")

    @contextlib.contextmanager
    def blob(self, digest: str, offset: int) -> Iterator[tuple[int, Iterator[bytes]]]:
        """Open blob ``digest`` from byte ``offset``; yields the offset the body starts at (0
        when the hub sent the whole blob instead of the range) and the chunks."""
        path = f"/api/v1/device/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._open(path, headers) as response:
            self._check(response, path)
            start = offset if response.status == 206 else 0
            yield start, self._chunks(response, digest)

    def put_batch(self, digest: str, key: BatchKey, body: bytes, records: int) -> int:
        """Upload one batch of collected data (``manifests.data``); returns 201 (stored) or 200
        (stored before). Raises :class:`HubUnavailable` for "later" (the network, 5xx, 408,
        429, and :data:`LATER_FOR_DATA`) and :class:`HubRefused` for any other 4xx (sending it
        again cannot succeed)."""
        # the data contract only with the first batch: an idle agent does not carry it
        from manifests.data import CONTENT_TYPE, RECORDS_HEADER, UPLOAD_PATH

        path = f"{UPLOAD_PATH}/{digest}?{key.query()}"
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Content-Encoding": "gzip",
            RECORDS_HEADER: str(records),
        }
        with self._open(path, headers, method="PUT", body=body) as response:
            status = response.status
            if status in (200, 201):
                response.read(MAX_ERROR_BYTES)
                return status
            if status in LATER_FOR_DATA:
                why = _read_error(response)
                raise HubUnavailable(f"hub {self.base} answered {status} for {path}: {why}")
            if status < 500 and status not in RETRIED_CLIENT_ERRORS:
                raise HubRefused(f"hub {self.base} answered {status} for {path}: {_read_error(response)}")
            self._check(response, path)
            raise HubUnavailable(f"hub {self.base} answered {status} for {path}")

    # --- credential rotation (manifests.rotation) ----------------------------------------------

    def use_token(self, token: str) -> None:
        """Authenticate every request from now on with ``token`` (rotated credentials)."""
        self._headers = {**self._headers, "Authorization": f"Bearer {token}"}

    def request_rotation(self, body: bytes) -> RotationAnswer:
        """Send the signed rotation request (with the current token); the hub's answer.
        :class:`HubRefused` for a refusal that asking again will not change."""
        headers = {"Content-Type": "application/json"}
        with self._open(REQUEST_PATH, headers, method="POST", body=body) as response:
            self._check(response, REQUEST_PATH)
            data = _read_bounded(response, MAX_ERROR_BYTES, "rotation answer")
        try:
            return RotationAnswer.model_validate_json(data)
        except ValueError:
            raise HubUnavailable("the hub's answer to the rotation request is not one") from None

    def confirm_rotation(self) -> None:
        """Tell the hub the device now uses its new credentials (sent with the new token)."""
        with self._open(CONFIRM_PATH, {}, method="POST", body=b"") as response:
            self._check(response, CONFIRM_PATH)
            response.read(MAX_ERROR_BYTES)

    def _chunks(self, response: http.client.HTTPResponse, digest: str) -> Iterator[bytes]:
        try:
            while chunk := response.read(CHUNK):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            why = type(exc).__name__
            raise HubUnavailable(f"download of {digest} from {self.base} broke off ({why})") from None

    # --- a refused token ----------------------------------------------------------------------

    def _check_not_refused(self) -> None:
        """Within the backoff after a refusal: refuse again without asking the hub."""
        with self._lock:
            wait = self._refused_until - self._clock()
        if wait > 0:
            raise TokenRefused(
                f"the hub refused the device token; not asking again for {wait:.0f}s (see the error logged)"
            )

    def _token_refused(self, response: http.client.HTTPResponse, path: str) -> None:
        message = f"hub {self.base} answered {response.status} for {path}: {_read_error(response)}"
        with self._lock:
            delay = full_jitter(
                self._refusals, self._rand(), base_s=self._refused_base_s, cap_s=self._refused_cap_s
            )
            self._refusals += 1
            self._refused_until = self._clock() + delay
        path_named = self.credentials_path
        where = f"'{path_named}'" if path_named is not None else "that agent.toml names"
        # An error, not a retry note: nothing on the device changes until someone acts.
        log.error(
            "%s. The hub refuses device %s's token: the device was revoked, or the credentials file "
            "%s is not the one the hub issued for it. Enroll it again where the hub runs "
            "('edgepack device enroll %s --out %s.json'), copy that file here and point agent.toml's "
            "'credentials' at it (or fix that path); asking again in %.0fs",
            message,
            self.device_id,
            where,
            self.device_id,
            self.device_id,
            delay,
        )
        raise TokenRefused(f"{message}; the device token was refused: enroll the device again")

    def _token_accepted(self) -> None:
        with self._lock:
            refused, self._refusals, self._refused_until = self._refusals, 0, 0.0
        if refused:
            log.info("the hub accepts device %s's token again", self.device_id)

    # --- connections -------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._tls
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock, contextlib.suppress(ValueError):
                self._all.remove(conn)

    def post_json(self, path: str, body: dict[str, object]) -> dict[str, object]:
        """POST a JSON body, return the JSON answer (a small one: at most 4 MB)."""
        data = json.dumps(body).encode()
        with self._open(path, {"Content-Type": "application/json"}, method="POST", body=data) as response:
            self._check(response, path)
            answer = json.loads(_read_bounded(response, MAX_MANIFEST_BYTES, f"answer of {path}"))
        if not isinstance(answer, dict):
            raise HubUnavailable(f"hub {self.base} answered {path} with something other than an object")
        return answer

    @contextlib.contextmanager
    def _open(
        self, path: str, headers: dict[str, str], *, method: str = "GET", body: bytes | None = None
    ) -> Iterator[http.client.HTTPResponse]:
        """One request on this thread's connection; a kept-alive connection the hub closed in
        the meantime is replaced once. The connection is dropped unless the body was read whole."""
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request(method, self._prefix + path, body=body, headers={**self._headers, **headers})
                response = conn.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                self._drop()
                if reused and attempt == 1:
                    continue
                raise HubUnavailable(f"hub {self.base} unreachable ({type(exc).__name__}: {exc})") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise HubUnavailable(f"hub {self.base} unreachable ({type(exc).__name__}: {exc})") from None
        try:
            yield response
        finally:
            # Only a response read to its end leaves the connection fit for the next request.
            if not response.isclosed() or response.will_close:
                self._drop()

    def _check(self, response: http.client.HTTPResponse, path: str) -> None:
        status = response.status
        if status < 400:
            return
        message = f"hub {self.base} answered {status} for {path}: {_read_error(response)}"
        if status in (401, 403, 404):
            # 403 for a file: the hub no longer names it for this device (its state moved on).
            raise NotFoundError(message)
        if status < 500 and status not in RETRIED_CLIENT_ERRORS:
            raise HubRefused(message)
        retry_after = response.getheader("retry-after") or ""
        # isascii() too: isdigit() takes '²' and other digits float() refuses.
        delay = float(retry_after) if retry_after.isascii() and retry_after.isdigit() else None
        raise HubUnavailable(message, retry_after_s=delay)


def _read_bounded(response: http.client.HTTPResponse, limit: int, what: str) -> bytes:
    declared = response.getheader("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HubUnavailable(f"{what} from the hub is {declared} bytes, over the {limit} allowed")
    try:
        data = response.read(limit + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise HubUnavailable(f"{what}: the transfer broke off ({type(exc).__name__})") from None
    if len(data) > limit:
        raise HubUnavailable(f"{what} from the hub exceeds {limit} bytes")
    return data


def _read_error(response: http.client.HTTPResponse) -> str:
    try:
        data = response.read(MAX_ERROR_BYTES)
    except (OSError, http.client.HTTPException):
        return response.reason
    try:
        return str(json.loads(data)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return data[:300].decode("utf-8", errors="replace") or response.reason


def _hub_time(header: str | None) -> datetime | None:
    """The hub's clock from an HTTP ``Date`` header (RFC 9110, second resolution); ``None``
    when it is missing or unreadable (then only the device's clock judges expiry)."""
    if not header:
        return None
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return when.astimezone(UTC) if when.tzinfo is not None else when.replace(tzinfo=UTC)
