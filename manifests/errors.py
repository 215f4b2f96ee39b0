"""The edgepack error tree.

Few roots, specific leaves (as python-tuf does it): a caller catches the category it can act
on. Every message says what went wrong *and* what to do next.

Each class also says whether trying again later can succeed (:attr:`EdgepackError.temporary`,
as kopf's ``TemporaryError`` and ``PermanentError`` do). The agent's reaction follows from the
class alone: a temporary error (hub or registry unreachable, broker down, not enough room yet)
is retried with backoff; a permanent one (bad signature, ``init()`` raises, image missing) ends
that module version as ``Failed`` until the hub names another one.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Root of every error edgepack raises on purpose."""

    #: process exit code the CLI uses for this category
    exit_code: int = 1
    #: True when the same operation may succeed if retried later, unchanged
    temporary: bool = False

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: a hint from whoever raised a temporary error (e.g. a server's Retry-After)
        self.retry_after_s = retry_after_s


class ConfigError(EdgepackError):
    """A configuration or input file is malformed, misspelled or inconsistent."""

    exit_code = 2


class TrustError(EdgepackError):
    """Something signed is not trustworthy: bad or missing signature, tampered content,
    untrusted key, rollback, expiry, unsafe archive path. Never retried: the same bytes will
    fail the same way."""

    exit_code = 3


class FetchError(EdgepackError):
    """A transfer failed (network, HTTP status, truncated download). Usually temporary."""

    exit_code = 4
    temporary = True


class HubUnavailable(FetchError):
    """The hub did not answer, or answered with a server error."""


class BrokerUnavailable(FetchError):
    """The MQTT broker is unreachable or refused the connection for now."""


class RegistryUnavailable(FetchError):
    """The container registry did not answer."""


class NotFoundError(FetchError):
    """The server says the thing asked for does not exist (HTTP 404). Permanent for that
    name: asking again returns the same answer until someone publishes it."""

    temporary = False


class HubRefused(FetchError):
    """The hub refused a request in a way that asking again will not change (a 4xx other than
    401/403/404/408/429: the request is wrong, or what the hub holds is, e.g. a stored blob
    whose bytes no longer match its digest). Permanent for that request until someone changes
    the hub's side (pushes the module again)."""

    temporary = False


class CacheError(EdgepackError):
    """The device's module cache could not be read or written (a full disk, an I/O error, a
    file removed underneath). Temporary: nothing is wrong with the module, and the same
    operation succeeds once the disk is fixed or freed."""

    temporary = True


class RuntimeFailure(EdgepackError):
    """A module could not be started or kept running (init() failed, port taken, crash).
    Permanent for that module version."""

    exit_code = 5


class ModuleStartFailure(RuntimeFailure):
    """The module's entry script could not be loaded or its ``init()`` raised.

    The message is the one-line cause; ``traceback`` and ``log_lines`` (what the instance
    wrote last) are the detail, when the caller has them."""

    def __init__(
        self, message: str = "", *, traceback: str | None = None, log_lines: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.traceback = traceback
        self.log_lines = list(log_lines or [])


class ImageUnavailable(RuntimeFailure):
    """The runtime image is not in the registry, its digest is not the pinned one, or it
    cannot run the scoring server (no compatible ``python3``, packages missing)."""


class Unschedulable(EdgepackError):
    """The module cannot be placed on this device now: a runtime the device does not have,
    requirements it cannot satisfy, too little disk or memory, a port held by another program.
    Re-evaluated when the desired state or the device changes, and periodically."""

    exit_code = 5
    temporary = True
