"""Per-device desired state: what the hub wants a device to run, signed by the hub.

:func:`verify_desired` is the one chain every receiver runs on the raw bytes of a desired
state (from MQTT or HTTP): size, envelope, the hub's signature, the model, then
:func:`check_desired` (for this device, newer than what was applied, not expired). Nothing
else in edgepack may accept a desired state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from manifests.bounds import MAX_INT63, MAX_TAGS, EnvMap, Port, finite
from manifests.digests import DIGEST_PATTERN
from manifests.errors import ConfigError, TrustError
from manifests.module import NAME_PATTERN, VERSION_PATTERN
from manifests.signing import KEYID_PATTERN, TrustStore, parse_envelope, verify_envelope

DESIRED_SCHEMA = "edgepack.desired/v1"
#: Limits no edge device comes near: one module on 1024 cores or 1 TiB of memory.
MAX_CPUS = 1024
MAX_MEMORY_MB = 1 << 20
DEVICE_ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$"
#: A device tag's key and value (selectors match them); the hub and the CLI check both.
DEVICE_TAG_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})$"
DEVICE_TAG_VALUE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,126})$"
_TAG_KEY_RE = re.compile(DEVICE_TAG_KEY_PATTERN)
_TAG_VALUE_RE = re.compile(DEVICE_TAG_VALUE_PATTERN)
#: Tags one device carries at most (and pairs in one selector): the bound of every tagged object.
MAX_DEVICE_TAGS = MAX_TAGS


def check_tag(key: str, value: str) -> None:
    """A :class:`ConfigError` saying which half of a device tag breaks the patterns above
    (callers put the tag or the file row in front of the message)."""
    if not _TAG_KEY_RE.fullmatch(key):
        raise ConfigError(
            f"key {key!r} must start with a letter or digit and use only "
            "letters, digits, '.', '_', '-', '/' (at most 63 characters)"
        )
    if not _TAG_VALUE_RE.fullmatch(value):
        raise ConfigError(
            f"value {value!r} must start with a letter or digit and use only "
            "letters, digits, '.', '_', '-', ':' (at most 127 characters)"
        )


def check_tag_count(count: int, what: str = "tags") -> None:
    """A :class:`ConfigError` when ``count`` tags are more than a device may carry. Every path
    that sets a device's tags (enrolment, bulk enrolment, a change of tags, the CLI's device
    file) and every selector is held to this one bound."""
    if count > MAX_DEVICE_TAGS:
        raise ConfigError(f"{count:,} {what}; a device carries at most {MAX_DEVICE_TAGS} tags")


#: Services one device runs at most (each needs its own port and process).
MAX_MODULES = 256
#: Keys that may sign one module name (its owner plus the keys granted to it).
MAX_MODULE_SIGNERS = 16


class RuntimeKind(StrEnum):
    DOCKER = "docker"
    PROCESS = "process"


class RestartPolicy(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


#: An HTTP path a probe may ask for: printable ASCII, no spaces.
PROBE_PATH_PATTERN = r"^/[\x21-\x7e]{0,255}$"


class HealthProbe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(default="/healthz", pattern=PROBE_PATH_PATTERN)
    period_s: float = finite(default=10, gt=0, le=3600)
    initial_delay_s: float = finite(default=0, ge=0, le=3600)
    timeout_s: float = finite(default=2, gt=0, le=600)
    failure_threshold: int = Field(default=3, strict=True, ge=1, le=1000)
    start_timeout_s: float = Field(
        default=120,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="how long a new version may take to become ready before it is abandoned",
    )


#: The hex sha256 of an endpoint key.
KEY_SHA256_PATTERN = r"^[0-9a-f]{64}$"


class EndpointAuth(BaseModel):
    """An endpoint that needs a key (Azure's ``authEnabled``): the hex sha256 of each accepted
    key (primary, secondary). The keys themselves stay on the hub; the agent writes these
    hashes to the scoring server's keys file (``EDGEPACK_AUTH_KEYS_FILE``)."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: list[Annotated[str, Field(pattern=KEY_SHA256_PATTERN)]] = Field(min_length=1, max_length=2)


class EndpointTLS(BaseModel):
    """An endpoint that serves HTTPS (Azure's ``sslEnabled``). The agent obtains its certificate
    from the hub's endpoint CA (``issuer``) and gives the scoring server its paths
    (``EDGEPACK_TLS_CERT``, ``EDGEPACK_TLS_KEY``)."""

    model_config = ConfigDict(extra="forbid")

    issuer: Literal["hub-endpoint-ca"] = "hub-endpoint-ca"


#: The largest request body a scoring endpoint takes unless its deployment says otherwise: a
#: few MiB hold the input of most models (a 224 by 224 RGB image as a JSON list is about 0.6 MB).
DEFAULT_MAX_BODY_BYTES = 8 << 20
#: Without an explicit budget, one worker holds at most this many bodies of the largest size.
BODIES_IN_FLIGHT = 4
MAX_BODY_BYTES_BOUND = 1 << 30
MAX_BODY_BYTES_IN_FLIGHT_BOUND = 16 << 30


class EndpointLimits(BaseModel):
    """How the scoring server treats hostile clients (``EDGEPACK_MAX_CONNECTIONS``,
    ``EDGEPACK_HEADER_TIMEOUT_S``, ``EDGEPACK_BODY_TIMEOUT_S``, ``EDGEPACK_RUN_TIMEOUT_S``,
    ``EDGEPACK_MAX_BODY_BYTES``, ``EDGEPACK_MAX_BODY_BYTES_IN_FLIGHT``)."""

    model_config = ConfigDict(extra="forbid")

    max_connections: int = Field(default=512, strict=True, ge=1, le=100_000)
    header_timeout_s: float = finite(default=10, gt=0, le=3600)
    body_timeout_s: float = finite(default=60, gt=0, le=3600)
    run_timeout_s: float | None = finite(default=60, gt=0, le=3600)
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        strict=True,
        ge=1,
        le=MAX_BODY_BYTES_BOUND,
        description="the largest request body; larger ones are answered 413 unread",
    )
    max_body_bytes_in_flight: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=MAX_BODY_BYTES_IN_FLIGHT_BOUND,
        description=f"the bytes of all request bodies one worker holds at once (beyond: 503); "
        f"null: {BODIES_IN_FLIGHT} times max_body_bytes",
    )

    @model_validator(mode="after")
    def _a_body_fits_the_budget(self) -> EndpointLimits:
        in_flight = self.max_body_bytes_in_flight
        if in_flight is not None and in_flight < self.max_body_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({in_flight}) is less than max_body_bytes "
                f"({self.max_body_bytes}): no body of the largest size could ever be taken"
            )
        return self


#: The most a service's data spool may hold on a device: collection never fills a device's disk.
MAX_DATA_SPOOL_MB = 64 * 1024
DEFAULT_DATA_SPOOL_MB = 256


class DataCollection(BaseModel):
    """Production data the module collects (Azure's ``ModelDataCollector``), spooled on the
    device and uploaded to the hub in batches (see :mod:`manifests.data`)."""

    model_config = ConfigDict(extra="forbid")

    # The share of collect() calls kept (Azure keeps all: 1.0).
    sample_rate: float = finite(default=1.0, gt=0, le=1)
    spool_quota_mb: int = Field(
        default=DEFAULT_DATA_SPOOL_MB,
        strict=True,
        ge=1,
        le=MAX_DATA_SPOOL_MB,
        description="what the device keeps while the hub is out of reach; beyond it the oldest "
        "records are dropped and counted",
    )


class DeploymentSettings(BaseModel):
    """How one module runs on a device."""

    model_config = ConfigDict(extra="forbid")

    port: Port
    env: EnvMap = Field(default_factory=dict)
    runtime: RuntimeKind | None = Field(
        default=None,
        description="docker or process; unset: each device picks the first of its runtimes that can run it",
    )
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    workers: int = Field(default=1, strict=True, ge=1, le=64)
    cpu: float | None = finite(default=None, gt=0, le=MAX_CPUS)
    memory_mb: int | None = Field(default=None, strict=True, gt=0, le=MAX_MEMORY_MB)
    health: HealthProbe = Field(default_factory=HealthProbe)
    auth: EndpointAuth | None = None
    tls: EndpointTLS | None = None
    limits: EndpointLimits = Field(default_factory=EndpointLimits)
    data_collection: DataCollection | None = Field(
        default=None, description="null: collect() calls in the module do nothing (Azure's default)"
    )


class ModuleAssignment(BaseModel):
    """One deployment (service) as it applies to one device."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN, description="deployment (service) name")
    module: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    manifest_digest: str = Field(pattern=DIGEST_PATTERN)
    settings: DeploymentSettings
    signers: list[Annotated[str, Field(pattern=KEYID_PATTERN)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MODULE_SIGNERS,
        description=(
            "key ids allowed to sign this module name (its owner and the keys the admin granted "
            "it); the device runs the module only if one of them signed its manifest. Absent "
            "only in states of a hub older than module ownership."
        ),
    )

    @model_validator(mode="after")
    def _distinct_signers(self) -> ModuleAssignment:
        if self.signers is not None and len(set(self.signers)) != len(self.signers):
            raise ValueError("a key id is listed twice in signers")
        return self


def check_module_signers(assignment: ModuleAssignment, signed_by: Sequence[str]) -> None:
    """Refuse (:class:`TrustError`) a module whose manifest none of the keys the desired state
    allows for its name has signed (``signed_by``: the key ids whose signatures verified).

    The hub names, per assignment, the owner of the module name and the keys granted to it (as
    a TUF delegation names the keys of a delegated role); a publisher the device trusts that
    signs another publisher's module name is refused here, on the device, whatever the hub let
    through. A state without ``signers`` (issued by an older hub) leaves the check to the
    device's publisher keys alone.
    """
    allowed = assignment.signers
    if allowed is None or any(k in allowed for k in signed_by):
        return
    keys = ", ".join(k[:16] for k in signed_by) or "no trusted key"
    raise TrustError(
        f"module {assignment.module}:{assignment.version} is signed by {keys}, which may not sign "
        f"module {assignment.module!r} (allowed: {', '.join(k[:16] for k in allowed)}); the hub's "
        f"admin allows a key with 'edgepack module grant {assignment.module} KEYID'"
    )


class DesiredState(BaseModel):
    """The ``signed`` payload of a desired-state envelope."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.desired/v1"] = Field(default="edgepack.desired/v1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    generation: int = Field(strict=True, ge=1, le=MAX_INT63)
    issued: datetime
    expires: datetime
    modules: list[ModuleAssignment] = Field(default_factory=list, max_length=MAX_MODULES)
    hub_reads_newer: bool = Field(
        default=False,
        description="the issuing hub drops the fields it does not know from what devices send "
        "(reports, telemetry, log answers) instead of refusing the message, so the agent may send "
        "all of its own; an older hub omits it and gets only the fields it reads "
        "(manifests.compat.encode_for_hub)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        services = [m.service for m in self.modules]
        if len(set(services)) != len(services):
            raise ValueError("a service is listed twice")
        ports = [m.settings.port for m in self.modules]
        if len(set(ports)) != len(ports):
            raise ValueError("two modules bind the same port")
        if self.expires <= self.issued:
            raise ValueError("expires must be after issued")
        return self


#: A desired state lists a device's services; hundreds fit in far less than this.
MAX_DESIRED_BYTES = 512 * 1024


class DesiredRefusal(StrEnum):
    """Why a desired state was refused (the ``reason`` of :class:`DesiredStateRefused`)."""

    MALFORMED = "malformed"  # not JSON, not an envelope, too large, or an invalid payload
    HUB_SIGNATURE = "hub-signature"  # not signed by the hub key the device trusts
    OTHER_DEVICE = "other-device"  # addressed to another device
    NOT_NEWER = "not-newer"  # generation not above the applied one: a replay or rollback
    EXPIRED = "expired"  # past its expiry
    CLOCK_SKEW = "clock-skew"  # still valid by the hub's clock, expired by the device's


class DesiredStateRefused(TrustError):
    """A desired state that must not be applied; :attr:`reason` says which check failed."""

    def __init__(self, message: str, reason: DesiredRefusal) -> None:
        super().__init__(message)
        self.reason = reason


def check_desired(
    state: DesiredState,
    *,
    device_id: str,
    applied_generation: int,
    now: datetime,
    hub_now: datetime | None = None,
) -> None:
    """Refuse a desired state that is for another device, replayed/rolled back, or expired.

    ``hub_now`` is the hub's clock as the device last saw it (the ``Date`` of the hub's last
    HTTP answer, moved on by the device's elapsed time), when known: an expiry the hub's clock
    does not see is the device clock's fault, and the refusal says by how much it is off.
    """
    if state.device_id != device_id:
        raise DesiredStateRefused(
            f"desired state is for device {state.device_id!r}, not {device_id!r}; refused",
            DesiredRefusal.OTHER_DEVICE,
        )
    if state.generation <= applied_generation:
        raise DesiredStateRefused(
            f"desired state generation {state.generation} is not newer than the applied "
            f"generation {applied_generation}; refused as a replay or rollback",
            DesiredRefusal.NOT_NEWER,
        )
    if now >= state.expires:
        raise _expired(state, now, hub_now)


def _expired(state: DesiredState, now: datetime, hub_now: datetime | None) -> DesiredStateRefused:
    """The refusal of a state past its expiry by the device's clock, blaming what is wrong.

    The hub renews every state before half its lifetime has passed, so a state it sends was
    issued at most half a lifetime ago by the hub's clock. Expired by the device's clock, it is
    either stale (the hub could not renew it for that long) or the device clock runs ahead.
    """
    generation, issued, expires = state.generation, state.issued, state.expires
    if hub_now is not None and hub_now < expires:
        return DesiredStateRefused(
            f"desired state generation {generation} is valid until {expires.isoformat()} by the "
            f"hub's clock, but the device clock is {format_span(now - hub_now)} ahead of the "
            f"hub's (device {now.isoformat()}, hub {hub_now.isoformat()}, issued "
            f"{issued.isoformat()}); fix the device's time (NTP)",
            DesiredRefusal.CLOCK_SKEW,
        )
    if hub_now is not None:
        return DesiredStateRefused(
            f"desired state generation {generation} expired at {expires.isoformat()}, by the "
            "hub's clock too; the hub must re-issue it",
            DesiredRefusal.EXPIRED,
        )
    # The device clock alone: the state is as old as it says, or the clock is off by at least
    # the age beyond half a lifetime (the most a renewing hub lets a state age).
    age, half_life = now - issued, (expires - issued) / 2
    return DesiredStateRefused(
        f"desired state generation {generation} expired at {expires.isoformat()}: issued "
        f"{issued.isoformat()}, {format_span(age)} before the device clock's {now.isoformat()}. "
        f"A running hub renews a state within {format_span(half_life)}, so either the device "
        f"clock is {format_span(age - half_life)} to {format_span(age)} ahead of the hub's "
        "(fix the device's time, NTP) or the hub could not renew it (the hub must re-issue it)",
        DesiredRefusal.EXPIRED,
    )


def format_span(span: timedelta) -> str:
    """A duration for people: ``3 d 4 h``, ``2 h 03 min``, ``5 min 07 s``, ``42 s``."""
    seconds = int(abs(span.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def verify_desired(
    data: bytes,
    *,
    hub_trust: TrustStore,
    device_id: str,
    applied_generation: int,
    now: datetime,
    hub_now: datetime | None = None,
) -> DesiredState:
    """The verified desired state in ``data`` (the exact bytes from MQTT or HTTP).

    Raises :class:`DesiredStateRefused` (a :class:`TrustError`) naming the first check that
    failed: malformed, hub signature, other device, not newer, expired, clock skew (expired
    only by the device's clock; ``hub_now``, see :func:`check_desired`). Every failure to read
    the bytes, however hostile, is a ``malformed`` refusal. Pure: no clock, no I/O.
    """
    what = "desired state"
    if len(data) > MAX_DESIRED_BYTES:
        raise DesiredStateRefused(
            f"{what} of {len(data)} bytes exceeds {MAX_DESIRED_BYTES}; refused",
            DesiredRefusal.MALFORMED,
        )
    try:
        envelope = parse_envelope(data, what=what)
    except TrustError as exc:
        raise DesiredStateRefused(str(exc), DesiredRefusal.MALFORMED) from None
    try:
        verify_envelope(
            envelope,
            hub_trust,
            what=what,
            untrusted_hint=(
                "it was not signed by this device's hub; enroll the device again if the hub key changed"
            ),
        )
    except TrustError as exc:
        raise DesiredStateRefused(str(exc), DesiredRefusal.HUB_SIGNATURE) from None
    try:
        state = DesiredState.model_validate(envelope.signed)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DesiredStateRefused(
            f"{what} is signed but invalid: {loc}: {first['msg']}", DesiredRefusal.MALFORMED
        ) from None
    check_desired(
        state, device_id=device_id, applied_generation=applied_generation, now=now, hub_now=hub_now
    )
    return state
