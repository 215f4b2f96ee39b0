"""Endpoint keys of services deployed with ``authEnabled``, as Azure ML makes them.

Each such service has a primary and a secondary key. The hub keeps the keys (an admin can
show them: ``edgepack service keys SERVICE``) and puts only their sha256 hashes into the
service's settings, so the signed desired state, the retained MQTT message and every device
see hashes, never a key. Regenerating one key changes the hashes, which re-issues the desired
state of every device running the service; the other key keeps working meanwhile, so callers
can move over without an outage, as on Azure.
"""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum

from sqlalchemy.orm import Session

from cloud_hub.db.base import utcnow
from cloud_hub.errors import NotFound
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import ServiceKeys
from manifests.desired import EndpointAuth


class KeyName(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


def new_key() -> str:
    return secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def auth_of(keys: ServiceKeys) -> EndpointAuth:
    """What the desired state carries: the hashes of both keys."""
    return EndpointAuth(key_sha256=[key_sha256(keys.primary), key_sha256(keys.secondary)])


def ensure_keys(
    session: Session, service: str, *, primary: str | None = None, secondary: str | None = None
) -> ServiceKeys:
    """The service's keys, made now if it has none; keys given (Azure's ``keys``) replace them."""
    row = session.get(ServiceKeys, service)
    if row is None:
        row = ServiceKeys(service=service, primary=primary or new_key(), secondary=secondary or new_key())
        session.add(row)
        record_event(session, "keys", f"endpoint keys made for {service}", service=service)
        return row
    changed = False
    for name, value in ((KeyName.PRIMARY, primary), (KeyName.SECONDARY, secondary)):
        if value is not None and getattr(row, name.value) != value:
            setattr(row, name.value, value)
            changed = True
    if changed:
        row.updated_at = utcnow()
        record_event(session, "keys", f"endpoint keys of {service} replaced from its config", service=service)
    return row


def get_keys(session: Session, service: str) -> ServiceKeys:
    row = session.get(ServiceKeys, service)
    if row is None:
        raise NotFound(
            f"service {service!r} has no endpoint keys; deploy it with 'authEnabled: true' "
            "in its deploymentconfig.json"
        )
    return row


def regenerate(session: Session, service: str, which: KeyName) -> ServiceKeys:
    row = get_keys(session, service)
    setattr(row, which.value, new_key())
    row.updated_at = utcnow()
    record_event(session, "keys", f"{which.value} endpoint key of {service} regenerated", service=service)
    return row


def drop_keys(session: Session, service: str) -> None:
    row = session.get(ServiceKeys, service)
    if row is not None:
        session.delete(row)
