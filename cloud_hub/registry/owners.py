"""Who may publish a module name: its owner, and the keys the admin granted it.

Trusting a publisher key lets it publish; it does not let it publish *every* name. The key
(or keys) whose signatures verified on the first push of a name own it; a later version of
that name is accepted only when one of its verified signers is the owner or a key the admin
granted the name (``edgepack module grant NAME KEYID``). This is a TUF delegation by name:
the hub's signed desired state carries, per assignment, the keys allowed for its module
(:func:`signers_of`), and the device refuses a manifest none of them signed
(``manifests.desired.check_module_signers``), whatever the hub let through.

Everything here runs inside the caller's transaction: a push under the registry lock, a grant
or revoke inside a fleet change (so that every device running the name gets the new keys).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.errors import Conflict, Forbidden, NotFound
from cloud_hub.events import record_event
from cloud_hub.registry.tables import ModuleSigner
from manifests.desired import MAX_MODULE_SIGNERS
from manifests.errors import ConfigError
from manifests.module import NAME_PATTERN
from manifests.signing import KEYID_PATTERN, TrustStore

OWNER = "owner"
GRANTED = "granted"

_KEYID = re.compile(KEYID_PATTERN)
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class NameKeys:
    """The keys that may sign module ``name``: its owners and the keys granted it."""

    name: str
    owners: list[str]
    granted: list[str]


@dataclass(frozen=True)
class SignerChange:
    """What a grant or revoke did: the name's keys afterwards, and whether anything changed."""

    keys: NameKeys
    keyid: str
    changed: bool


def _rows(session: Session, name: str) -> list[ModuleSigner]:
    return list(
        session.scalars(select(ModuleSigner).where(ModuleSigner.name == name).order_by(ModuleSigner.keyid))
    )


def signers_of(session: Session, names: Collection[str]) -> dict[str, list[str]]:
    """Per module name, the sorted key ids allowed to sign it (owners and grants)."""
    if not names:
        return {}
    rows = session.execute(
        select(ModuleSigner.name, ModuleSigner.keyid)
        .where(ModuleSigner.name.in_(sorted(set(names))))
        .order_by(ModuleSigner.name, ModuleSigner.keyid)
    )
    out: dict[str, list[str]] = {}
    for name, keyid in rows:
        out.setdefault(name, []).append(keyid)
    return out


def check_publisher(session: Session, name: str, ref: str, signed_by: Sequence[str]) -> None:
    """Let a new version of ``name`` in only if one of its verified signers may sign the name;
    the first push of a name makes its signers the owners (with an event).

    The caller holds the registry lock, so two first pushes of one name cannot both claim it.
    Raises :class:`Forbidden` naming the owner and the command that grants the pushing key.
    """
    rows = _rows(session, name)
    if not rows:
        first = sorted(set(signed_by))[:MAX_MODULE_SIGNERS]
        session.add_all(ModuleSigner(name=name, keyid=k, role=OWNER) for k in first)
        owned = f"module name {name!r} is owned by key {', '.join(first)} (its first push)"
        record_event(session, "module_owned", owned)
        return
    allowed = {r.keyid for r in rows}
    if allowed.intersection(signed_by):
        return
    owner = ", ".join(r.keyid for r in rows if r.role == OWNER)
    key = signed_by[0]
    raise Forbidden(
        f"module {ref}: module name {name!r} belongs to key {owner}, and key {key} may not publish "
        f"it; if it should, the hub's admin runs 'edgepack module grant {name} {key}'"
    )


def _check(name: str, keyid: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{name!r} is not a module name")
    if not _KEYID.fullmatch(keyid):
        raise ConfigError(
            f"{keyid!r} is not a key id (64 lowercase hex characters, as 'edgepack keygen' prints)"
        )


def keys_of(session: Session, name: str) -> NameKeys:
    """Who may sign module ``name``; NotFound if it was never pushed."""
    rows = _rows(session, name)
    if not rows:
        raise NotFound(f"module {name!r} was never pushed; its first push makes the pushing key its owner")
    return NameKeys(
        name=name,
        owners=[r.keyid for r in rows if r.role == OWNER],
        granted=[r.keyid for r in rows if r.role == GRANTED],
    )


def grant(session: Session, trust: TrustStore, name: str, keyid: str) -> SignerChange:
    """Allow ``keyid`` (a key the hub trusts) to sign module ``name`` too; granting a key that
    may already sign it changes nothing."""
    _check(name, keyid)
    before = keys_of(session, name)
    if keyid in before.owners or keyid in before.granted:
        return SignerChange(before, keyid, changed=False)
    if keyid not in {k.keyid for k in trust.keys}:
        raise ConfigError(
            f"key {keyid} is not trusted by this hub; start it with '--trust KEY.pub' for that "
            "key, then grant it"
        )
    held = len(before.owners) + len(before.granted)
    if held >= MAX_MODULE_SIGNERS:
        raise Conflict(
            f"module {name!r} already has {held} keys allowed to sign it (at most "
            f"{MAX_MODULE_SIGNERS}); revoke one with 'edgepack module revoke {name} KEYID' first"
        )
    session.add(ModuleSigner(name=name, keyid=keyid, role=GRANTED))
    session.flush()
    record_event(session, "module_signer_granted", f"key {keyid} may now sign module {name!r}")
    return SignerChange(keys_of(session, name), keyid, changed=True)


def revoke(session: Session, name: str, keyid: str) -> SignerChange:
    """Withdraw a grant: ``keyid`` may no longer sign module ``name`` (an owner's key stays)."""
    _check(name, keyid)
    row = session.get(ModuleSigner, (name, keyid))
    if row is None:
        raise NotFound(f"key {keyid} has no grant on module {name!r}; nothing to revoke")
    if row.role == OWNER:
        raise Conflict(f"key {keyid} owns module {name!r}; an owner's key cannot be revoked")
    session.delete(row)
    session.flush()
    record_event(session, "module_signer_revoked", f"key {keyid} may no longer sign module {name!r}")
    return SignerChange(keys_of(session, name), keyid, changed=True)
