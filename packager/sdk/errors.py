"""What can go wrong in an SDK call, as classes of the ``EdgepackError`` tree.

Three kinds, so that a script catches the one it can act on:

- :class:`BadArgument` — the call itself is wrong (an unknown keyword, a misspelt config
  field, a name the hub would refuse, a file that is not there). Raised before any request is
  sent.
- :class:`HubError` and its leaves — the hub answered with an error. The hub names the error
  in its body (``{"error": {"type", "message"}}``); :func:`hub_error` turns that type into one
  class, and the CLI's exit code is that class's ``exit_code``: the one mapping from the
  hub's errors to what a caller sees lives here and nowhere else.
- :class:`DeploymentFailed` / :class:`DeploymentTimeout` — a service did not become Healthy;
  both carry the per-device states (``devices``).

A hub that cannot be reached at all raises :class:`~manifests.errors.HubUnavailable`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httpx

from manifests.errors import (
    ConfigError,
    EdgepackError,
    HubUnavailable,
    NotFoundError,
    RuntimeFailure,
    TrustError,
)

if TYPE_CHECKING:
    from packager.sdk.answers import DeviceServiceState


class BadArgument(ConfigError):
    """An SDK call got an argument it cannot use; nothing was sent to the hub."""


def unknown_keywords(what: str, given: Iterable[str], known: Iterable[str]) -> BadArgument | None:
    """The error for keyword arguments ``what`` does not take (with a did-you-mean), if any."""
    known = sorted(known)
    for name in given:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            suffix = f"; did you mean '{hint[0]}'?" if hint else f"; it takes {', '.join(known)}"
            return BadArgument(f"{what}: unknown argument '{name}'{suffix}")
    return None


class HubError(EdgepackError):
    """The hub refused a request or failed; the message is the hub's.

    ``kind`` is the error type the hub named (``None`` when the answer did not come from an
    edgepack hub, e.g. a proxy's error page), ``status`` the HTTP status.
    """

    exit_code = 2

    def __init__(self, message: str, *, status: int, kind: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class HubRejected(HubError, ConfigError):
    """The hub found the request invalid (a field it refuses, an upload too large)."""


class HubNotFound(HubError, NotFoundError):
    """The model, module, service, device or blob named does not exist on the hub."""


class HubConflict(HubError):
    """The request contradicts what the hub holds (in use, already exists, port taken)."""


class HubUnauthorized(HubError):
    """No admin token, or a wrong one."""


class HubForbidden(HubError):
    """The token is valid but does not allow this."""


class HubTrustRefusal(HubError, TrustError):
    """The hub refused something signed: a bad signature, a digest that does not match, an
    untrusted publisher."""

    exit_code = 3


class HubFailure(HubError, HubUnavailable):
    """The hub (or something between it and us) failed; trying again later may succeed."""

    exit_code = 4


class HubDeviceOffline(HubFailure):
    """The request had to reach a device (a module's log) and the hub knows it is offline;
    it answers at once, naming when the device was last seen. Try again once it reconnects."""


#: The hub's error ``type`` (``cloud_hub/api/errors.py`` names each by its class) → ours.
_BY_TYPE: dict[str, type[HubError]] = {
    "ValidationError": HubRejected,
    "ConfigError": HubRejected,
    "TooLarge": HubRejected,
    "MethodNotAllowed": HubRejected,
    "NotFound": HubNotFound,
    "Conflict": HubConflict,
    "Unauthorized": HubUnauthorized,
    "Forbidden": HubForbidden,
    "TrustError": HubTrustRefusal,
    "FetchError": HubFailure,
    "GatewayTimeout": HubFailure,
    "DeviceOffline": HubDeviceOffline,
    "InternalError": HubFailure,
}


def _by_status(status: int) -> type[HubError]:
    # Only for an answer that names no type we know: something between us and the hub
    # answered (a proxy's 502 page), or a hub newer than this SDK.
    if status >= 500:
        return HubFailure
    return {401: HubUnauthorized, 403: HubForbidden, 404: HubNotFound, 409: HubConflict}.get(
        status, HubRejected
    )


def error_body(response: httpx.Response) -> tuple[str | None, str]:
    """``(type, message)`` of an error answer; type None when it is not the hub's error shape."""
    try:
        error = response.json()["error"]
        kind, message = error["type"], error["message"]
    except (ValueError, KeyError, TypeError):
        return None, response.text[:500] or response.reason_phrase
    if not isinstance(kind, str) or not isinstance(message, str):
        return None, response.text[:500]
    return kind, message


def hub_error(response: httpx.Response) -> HubError:
    """The error an answer with status >= 400 stands for, with the hub's own message."""
    kind, message = error_body(response)
    cls = _BY_TYPE.get(kind or "") or _by_status(response.status_code)
    if cls is HubUnauthorized:
        message += "; run 'edgepack login --hub URL --token TOKEN' with the hub's admin token"
    if cls is HubTrustRefusal:
        text = f"hub refused: {message}"
    else:
        text = f"hub answered {response.status_code}: {message}"
    return cls(text, status=response.status_code, kind=kind)


def raise_for_hub_error(response: httpx.Response) -> None:
    """Raise :func:`hub_error` for an error answer; do nothing for a success."""
    if response.status_code >= 400:
        raise hub_error(response)


class ScoringRunFailed(RuntimeFailure):
    """The scoring service was reached and its ``run()`` raised (HTTP 500 naming the
    exception): the module's own failure, not the transfer's, so exit code 5, not 4."""


class DeploymentFailed(RuntimeFailure):
    """A service ended in a final state other than Healthy on at least one device, or
    targets no device at all. ``devices`` holds every device's state and reason."""

    def __init__(self, message: str, devices: list[DeviceServiceState]) -> None:
        super().__init__(message)
        self.devices = devices


class DeploymentTimeout(DeploymentFailed):
    """``wait_for_deployment`` gave up before every device reached a final state;
    ``devices`` holds each one's state when it gave up."""


class DevicesOffline(DeploymentTimeout):
    """``wait_for_deployment`` stopped early: every device it still waited for is offline, so
    nothing can change until one reconnects (``wait_offline=True`` keeps waiting instead).
    ``devices`` holds each one's state, ``offline`` those it stopped for."""

    def __init__(
        self, message: str, devices: list[DeviceServiceState], offline: list[DeviceServiceState]
    ) -> None:
        super().__init__(message, devices)
        self.offline = offline


class ServiceExists(ConfigError):
    """``Model.deploy`` was asked to make a service whose name is taken (Azure ML's
    ``overwrite=False``); pass ``overwrite=True`` to update it."""
