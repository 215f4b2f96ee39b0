"""Hub-side error leaves; the API turns each into one HTTP status (see api/errors.py)."""

from __future__ import annotations

from manifests.errors import EdgepackError


class NotFound(EdgepackError):
    """The named model, module, device, deployment or blob does not exist."""


class Conflict(EdgepackError):
    """The request contradicts the current state (in use, port taken, already exists)."""


class TooLarge(EdgepackError):
    """An upload is larger than the hub accepts."""


class Unauthorized(EdgepackError):
    """No or wrong credentials."""


class Forbidden(EdgepackError):
    """Valid credentials that do not allow this."""


class Throttled(EdgepackError):
    """Too many attempts from this client; ``retry_after_s`` says when it may try again."""

    temporary = True


class GatewayTimeout(EdgepackError):
    """A device did not answer a request passed on to it in time."""


class DeviceOffline(EdgepackError):
    """A request that must reach a device now (its module's log) while the hub knows it is
    offline: answered at once instead of after a timeout."""

    temporary = True


class InvalidBatch(EdgepackError):
    """A batch of collected data whose content the hub does not accept (not gzip, a line that
    is not a record of the batch's key, a record count other than declared): refused for good."""
