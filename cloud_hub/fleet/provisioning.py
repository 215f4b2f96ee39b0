"""Provisioning tokens and the joins they allow (zero-touch enrolment, docs/enrolment.md).

An admin makes a token (``edgepack device token create``) and bakes it into a device image; a
device joins with it by sending a signed :class:`~manifests.join.JoinRequest`. The token is
shown once and kept as its sha256. Its uses are counted by one conditional UPDATE, so two
joins (in one process, two replicas, SQLite or PostgreSQL) never spend the same last use.

:func:`join_devices` runs inside a fleet change (:func:`cloud_hub.fleet.desired.change_fleet`,
under the fleet lock): each join is checked against the table first and written only when
every check passed, so a refused join leaves no device row and no broker account, and a
refusal never undoes the other joins of its batch.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, Forbidden, NotFound, Unauthorized
from cloud_hub.events import record_event
from cloud_hub.fleet.devices import clear_rotation
from cloud_hub.fleet.tables import Device, PendingJoin, ProvisioningToken
from cloud_hub.fleet.targeting import check_tags, format_selector
from manifests.bounds import escape_controls
from manifests.errors import ConfigError, EdgepackError
from manifests.join import PROVISIONING_TOKEN_PREFIX, JoinRequest

#: The most devices one token may enrol, and the longest it may live: a leaked image's token
#: must run out. Both are the admin's choice below these.
MAX_TOKEN_USES = 100_000
MAX_TOKEN_LIFETIME_S = 366 * 24 * 3600
#: Tokens that may exist at once (revoked and expired ones are purged by 'token revoke' and
#: count until then): the list stays one page, the table small.
MAX_TOKENS = 1000
#: The placeholder a token's tag value may hold: the joining device's id.
ID_PLACEHOLDER = "{id}"
JOIN_REFUSED = "device.join-refused"
#: Waiting joins one listing shows (each spent a use of an approval token, so they are bounded
#: by the tokens' uses too).
MAX_PENDING_LISTED = 1000


def provisioning_hash(token: str) -> str:
    # 256 bits of entropy: an unsalted fast hash is enough and allows a direct lookup.
    return hashlib.sha256(token.encode()).hexdigest()


def render_tags(template: Mapping[str, str], device_id: str) -> dict[str, str]:
    """The token's tags for one device: ``{id}`` in a value becomes the device's id."""
    return check_tags({k: v.replace(ID_PLACEHOLDER, device_id) for k, v in template.items()})


def check_tag_template(tags: Mapping[str, str]) -> dict[str, str]:
    """A token's tags, checked as they will be for a device (with a one-letter id)."""
    render_tags(tags, "x")
    return {str(k): str(v) for k, v in tags.items()}


@dataclass(frozen=True)
class NewToken:
    row: ProvisioningToken
    token: str


def create_token(
    session: Session,
    *,
    tags: Mapping[str, str],
    max_uses: int,
    lifetime_s: float,
    now: datetime,
    approval: bool = False,
) -> NewToken:
    if not 1 <= max_uses <= MAX_TOKEN_USES:
        raise ConfigError(f"uses must be from 1 to {MAX_TOKEN_USES}, got {max_uses}")
    if not 60 <= lifetime_s <= MAX_TOKEN_LIFETIME_S:
        raise ConfigError(f"a token must live from 1 minute to {MAX_TOKEN_LIFETIME_S // 86400} days")
    if len(list(session.scalars(select(ProvisioningToken.id).limit(MAX_TOKENS)))) >= MAX_TOKENS:
        raise Conflict(
            f"{MAX_TOKENS} provisioning tokens exist; revoke some with 'edgepack device token revoke'"
        )
    template = check_tag_template(tags)
    token = PROVISIONING_TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ProvisioningToken(
        id=secrets.token_hex(6), token_hash=provisioning_hash(token), tags=template, max_uses=max_uses,
        used=0, expires=now + timedelta(seconds=lifetime_s), revoked=False, approval=approval, created_at=now,
    )  # fmt: skip
    session.add(row)
    record_event(
        session, "token-created",
        f"provisioning token {row.id} made: {max_uses} use(s) until {row.expires:%Y-%m-%d %H:%M} UTC, "
        f"tags {format_selector(template) or '(none)'}",
    )  # fmt: skip
    return NewToken(row, token)


def list_tokens(session: Session) -> list[ProvisioningToken]:
    return list(session.scalars(select(ProvisioningToken).order_by(ProvisioningToken.created_at)))


def revoke_token(session: Session, token_id: str) -> ProvisioningToken:
    row = session.get(ProvisioningToken, token_id)
    if row is None:
        raise NotFound(f"provisioning token {token_id!r} does not exist; see 'edgepack device token list'")
    if not row.revoked:
        row.revoked = True
        record_event(
            session, "token-revoked", f"provisioning token {row.id} revoked ({row.used} use(s) spent)"
        )
    return row


class JoinRefused(EdgepackError):
    """Carries the error the joining device gets; the route raises ``error``."""

    def __init__(self, error: EdgepackError) -> None:
        super().__init__(str(error))
        self.error = error


UNKNOWN_TOKEN = "provisioning token is not valid (unknown to this hub); ask the admin for one"


def _token_row(session: Session, token: str) -> ProvisioningToken | None:
    return session.scalar(
        select(ProvisioningToken).where(ProvisioningToken.token_hash == provisioning_hash(token))
    )


def usable_token(session: Session, token: str, now: datetime) -> ProvisioningToken:
    """The token's row if a device may join with it now; else the refusal to send."""
    row = _token_row(session, token)
    if row is None:
        raise Unauthorized(UNKNOWN_TOKEN)
    if row.revoked:
        raise Forbidden(f"provisioning token {row.id} was revoked; ask the admin for a new one")
    if row.expires <= now:
        raise Forbidden(
            f"provisioning token {row.id} expired at {row.expires:%Y-%m-%d %H:%M} UTC; ask for a new one"
        )
    if row.used >= row.max_uses:
        raise Forbidden(f"provisioning token {row.id} is used up ({row.max_uses} device(s) joined with it)")
    return row


def take_uses(session: Session, row: ProvisioningToken, wanted: int, now: datetime) -> int:
    """Spend up to ``wanted`` uses; how many were spent. One conditional UPDATE: it matches only
    while that many uses are left and the token is still valid, so two joins (or batches, or
    replicas) cannot both spend the last use."""
    fresh = session.execute(select(ProvisioningToken.used).where(ProvisioningToken.id == row.id)).scalar_one()
    granted = max(0, min(wanted, row.max_uses - fresh))
    if granted == 0:
        return 0
    result = session.execute(
        update(ProvisioningToken)
        .where(
            ProvisioningToken.id == row.id,
            ProvisioningToken.used + granted <= ProvisioningToken.max_uses,
            ProvisioningToken.revoked.is_(False),
            ProvisioningToken.expires > now,
        )
        .values(used=ProvisioningToken.used + granted)
        .execution_options(synchronize_session=False)
    )
    return granted if result.rowcount == 1 else 0  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Joined:
    """What a device joined as: its tags and the token's id."""

    tags: dict[str, str]
    token_id: str


@dataclass(frozen=True)
class Pending:
    """A join waiting for the admin's approval (no device yet)."""

    device_id: str
    token_id: str


@dataclass(frozen=True)
class Join:
    """One verified request and the token it came with."""

    request: JoinRequest
    token: str


def join_devices(
    session: Session, joins: Sequence[Join], *, now: datetime, reserved: str | None
) -> list[Joined | Pending | EdgepackError]:
    """Enrol each join that passes every check; per join, what it joined as or the refusal (recorded as a
    ``device.join-refused`` event). Runs under the fleet lock, so nothing else enrols meanwhile.

    Two passes: every join is checked against the table (nothing written), then each token's
    uses are spent for the joins that passed, in their order, with one conditional UPDATE per
    token, and only then are the devices written.
    """
    with session.no_autoflush:  # one flush at the end, not one per join
        known_ids = _devices_by_id(session, [j.request.device_id for j in joins])
        known_keys = _present(session, Device.public_key, [j.request.public_key for j in joins])
        taken = _present(session, Device.token_hash, [j.request.token_sha256 for j in joins])
        waiting = _pending_by_id(session, [j.request.device_id for j in joins])
        # A key or verifier waiting for approval is taken as well.
        known_keys |= _present(session, PendingJoin.public_key, [j.request.public_key for j in joins])
        taken |= _present(session, PendingJoin.token_hash, [j.request.token_sha256 for j in joins])
        tokens: dict[str, ProvisioningToken | EdgepackError] = {}
        outcomes: list[EdgepackError | None] = []
        passed: dict[str, list[int]] = {}
        retried: dict[int, Joined | Pending | EdgepackError] = {}
        known: dict[str, ProvisioningToken | None] = {}
        for number, join in enumerate(joins):
            request = join.request
            again: Joined | Pending | EdgepackError | None = None
            if join.token not in known:
                known[join.token] = _token_row(session, join.token)
            if known[join.token] is None:
                # Before anything of the id or the key is looked at: a request without a token
                # of this hub learns nothing of which devices are enrolled or waiting.
                outcomes.append(None)
                retried[number] = Unauthorized(UNKNOWN_TOKEN)
                continue
            pending = waiting.get(request.device_id)
            if pending is not None and pending.rejected and pending.public_key != request.public_key:
                # A rejected join holds its id no longer (else anyone holding an approval token
                # could burn the ids of devices to come): another key may join as it.
                pending = None
            if pending is not None:
                again = _still_waiting(pending, request)
            else:
                again = _answered_again(session, join, known_ids.get(request.device_id))
            if again is not None:
                outcomes.append(None)
                retried[number] = again
                continue
            try:
                problem = _conflict(request, reserved, known_ids.get(request.device_id), known_keys, taken)
                if problem is not None:
                    raise problem
                if join.token not in tokens:
                    try:
                        tokens[join.token] = usable_token(session, join.token, now)
                    except (Forbidden, Unauthorized) as exc:
                        tokens[join.token] = exc
                row = tokens[join.token]
                if isinstance(row, EdgepackError):
                    raise row
                revoked = known_ids.get(request.device_id)
                if revoked is not None and revoked.revoked and not row.approval:
                    # The token is in the device's image: a device revoked for being compromised
                    # holds it too, and must not undo its revocation by joining again.
                    raise Conflict(
                        f"device {request.device_id!r} was revoked: it joins again only with a token "
                        f"that needs approval, or the admin enrols it ('edgepack device enroll "
                        f"{request.device_id}')"
                    )
                render_tags(row.tags or {}, request.device_id)
            except (Conflict, Forbidden, Unauthorized, ConfigError) as exc:
                outcomes.append(exc)
                continue
            outcomes.append(None)
            passed.setdefault(join.token, []).append(number)
            # A later join of this batch with the same id, key or verifier is a repeat of this one.
            known_ids[request.device_id] = Device(id=request.device_id, revoked=False)
            known_keys.add(request.public_key)
            taken.add(request.token_sha256)
        for token, numbers in passed.items():
            row = tokens[token]
            assert isinstance(row, ProvisioningToken)
            granted = take_uses(session, row, len(numbers), now)
            for number in numbers[granted:]:
                outcomes[number] = Forbidden(
                    f"provisioning token {row.id} is used up ({row.max_uses} device(s) joined with it)"
                )
        existing = _devices_by_id(session, [j.request.device_id for j in joins])
        results: list[Joined | Pending | EdgepackError] = []
        for number, (join, outcome) in enumerate(zip(joins, outcomes, strict=True)):
            if number in retried:
                kept = retried[number]
                if isinstance(kept, EdgepackError):
                    record_refusal(session, join.request.device_id, str(kept))
                results.append(kept)
                continue
            if outcome is not None:
                record_refusal(session, join.request.device_id, str(outcome))
                results.append(outcome)
                continue
            row = tokens[join.token]
            assert isinstance(row, ProvisioningToken)
            rejected = waiting.get(join.request.device_id)
            if rejected is not None:
                session.delete(rejected)  # only a rejected one of another key gets here
            if row.approval:
                results.append(_wait_for_approval(session, join.request, row))
            else:
                device = existing.get(join.request.device_id)
                results.append(_enrol(session, device, _Verifiers.of(join.request), row.id, row.tags or {}))
    return results


#: Values in one IN list (bounded, as bulk enrolment does).
_CHUNK = 500


def _devices_by_id(session: Session, ids: list[str]) -> dict[str, Device]:
    out: dict[str, Device] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        out.update((d.id, d) for d in session.scalars(select(Device).where(Device.id.in_(chunk))))
    return out


def _present(session: Session, column: Any, values: list[str]) -> set[str]:
    """Which of ``values`` a device already holds in ``column``."""
    out: set[str] = set()
    for start in range(0, len(values), _CHUNK):
        out.update(session.scalars(select(column).where(column.in_(values[start : start + _CHUNK]))))
    return out


def _pending_by_id(session: Session, ids: list[str]) -> dict[str, PendingJoin]:
    out: dict[str, PendingJoin] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        out.update(
            (p.device_id, p)
            for p in session.scalars(select(PendingJoin).where(PendingJoin.device_id.in_(chunk)))
        )
    return out


def _still_waiting(pending: PendingJoin, request: JoinRequest) -> Pending | EdgepackError:
    """A device asking again while its join waits: the same key and verifier, a newer request."""
    if (
        pending.public_key != request.public_key or pending.token_hash != request.token_sha256
        or request.issued <= pending.issued
    ):  # fmt: skip
        return Conflict(
            f"device {request.device_id!r} has a join waiting for approval already "
            "(with another key, or a newer request)"
        )
    if pending.rejected:
        return Forbidden(f"the admin rejected the join of device {request.device_id!r}")
    pending.issued = request.issued
    return Pending(device_id=pending.device_id, token_id=pending.token_id)


def _wait_for_approval(session: Session, request: JoinRequest, token: ProvisioningToken) -> Pending:
    session.add(
        PendingJoin(
            device_id=request.device_id, token_id=token.id, public_key=request.public_key,
            token_hash=request.token_sha256, mqtt_password_hash=request.mqtt_password_hash,
            rabbitmq_password_hash=request.rabbitmq_password_hash, issued=request.issued, rejected=False,
        )
    )  # fmt: skip
    record_event(
        session, "join-pending",
        f"device {request.device_id} asks to join with token {token.id}; "
        f"'edgepack device approve {request.device_id}' lets it",
    )  # fmt: skip
    return Pending(device_id=request.device_id, token_id=token.id)


def list_pending(session: Session) -> list[PendingJoin]:
    return list(
        session.scalars(select(PendingJoin).order_by(PendingJoin.created_at).limit(MAX_PENDING_LISTED))
    )


def approve_join(session: Session, device_id: str) -> Joined:
    """Enrol the device whose join waits (its verifiers as it sent them)."""
    pending = session.get(PendingJoin, device_id)
    if pending is None or pending.rejected:
        raise NotFound(f"no join of device {device_id!r} waits for approval; see 'edgepack device pending'")
    token = session.get(ProvisioningToken, pending.token_id)
    device = session.get(Device, device_id)
    if device is not None and not device.revoked:
        raise Conflict(f"device {device_id!r} is enrolled already; reject this join")
    session.delete(pending)
    # The token's tags as they are now (a token deleted meanwhile: none).
    template = dict(token.tags or {}) if token is not None else {}
    return _enrol(session, device, _Verifiers.of(pending), pending.token_id, template)


def reject_join(session: Session, device_id: str) -> PendingJoin:
    """Refuse the waiting join; the device is told so when it asks again."""
    pending = session.get(PendingJoin, device_id)
    if pending is None:
        raise NotFound(f"no join of device {device_id!r} waits for approval; see 'edgepack device pending'")
    if not pending.rejected:
        pending.rejected = True
        record_refusal(session, device_id, "the admin rejected it")
    return pending


def _answered_again(session: Session, join: Join, device: Device | None) -> Joined | None:
    """What the device joined as, when ``join`` is a newer request of a device that joined
    already (its answer was lost): the same id, key, verifier and token, signed later than the
    request it joined with. Nothing is spent or changed but that time, so the earlier requests,
    replayed, are still refused; an answer holds no secret."""
    request = join.request
    if (
        device is None or device.revoked or device.public_key != request.public_key
        or device.token_hash != request.token_sha256 or device.join_issued is None
        or request.issued <= device.join_issued
    ):  # fmt: skip
        return None
    token = _token_row(session, join.token)
    if token is None or token.id != device.joined_with:
        return None
    device.join_issued = request.issued
    return Joined(tags=dict(device.tags or {}), token_id=token.id)


def _conflict(
    request: JoinRequest, reserved: str | None, device: Device | None, keys: set[str], verifiers: set[str]
) -> Conflict | None:
    if request.device_id == reserved:
        return Conflict(f"device id {request.device_id!r} is the hub's broker user name; choose another id")
    if request.public_key in keys:
        # The key joined before (this request replayed, or a device re-using its key).
        return Conflict(
            f"device key {request.public_key[:16]} has joined before; a join is not repeated "
            "(a device that lost its credentials makes a new key)"
        )
    if request.token_sha256 in verifiers:
        return Conflict("the device's token verifier is already in use; make a new key and join again")
    if device is not None and not device.revoked:
        return Conflict(
            f"device {request.device_id!r} is already enrolled; choose another id or revoke it first"
        )
    return None


@dataclass(frozen=True)
class _Verifiers:
    """What a device sent of itself: its key and the verifiers of its secrets."""

    device_id: str
    public_key: str
    token_sha256: str
    mqtt_password_hash: str
    rabbitmq_password_hash: str
    issued: datetime

    @classmethod
    def of(cls, r: JoinRequest | PendingJoin) -> _Verifiers:
        token = r.token_sha256 if isinstance(r, JoinRequest) else r.token_hash
        return cls(r.device_id, r.public_key, token, r.mqtt_password_hash, r.rabbitmq_password_hash, r.issued)


def _enrol(
    session: Session, device: Device | None, sent: _Verifiers, token_id: str, template: Mapping[str, str]
) -> Joined:
    tags = render_tags(template, sent.device_id)
    if device is None:
        device = Device(id=sent.device_id)
        session.add(device)
    else:
        # Enrolled again: its credentials are new now (their age counts from here).
        device.credentials_rotated_at = utcnow()
    device.tags = tags
    device.public_key = sent.public_key
    device.joined_with = token_id
    device.join_issued = sent.issued
    device.token_hash = sent.token_sha256
    device.mqtt_password_hash = sent.mqtt_password_hash
    device.rabbitmq_password_hash = sent.rabbitmq_password_hash
    # Enrolled afresh: the broker user is the device id again (rotations start over).
    device.credentials_generation = 0
    clear_rotation(device)
    device.revoked = False
    device.online = False
    record_event(
        session, "enrolled",
        f"device {sent.device_id} joined with token {token_id} ({format_selector(tags) or 'no tags'})",
        device_id=sent.device_id,
    )  # fmt: skip
    return Joined(tags=tags, token_id=token_id)


def record_refusal(session: Session, device_id: str | None, why: str) -> None:
    # device_id is what the request claimed: the event is kept apart from a real device's feed
    # only by its kind, so the message says "asked as".
    who = f"a device asking as {device_id!r}" if device_id else "a device"
    # The reason may quote the request (a field name it has no business sending), which
    # anyone reaching the port chooses: it reaches terminals and webhooks as text (§6a).
    record_event(session, JOIN_REFUSED, f"join refused for {who}: {escape_controls(why)}")
