"""Grants from the hub's database (:class:`cloud_hub.fleet.grants.GrantSource`), and loading
them ahead of a rollout's downloads.

When a change issues new desired states, the devices will ask for their new modules within
moments, each one a grant miss (a query per device). :class:`GrantWarmer` drops what this
replica remembered of those devices and reads their new grants back in one query per
:data:`WARM_CHUNK` devices, on a thread of its own so that the change's answer does not wait.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence

from sqlalchemy import select

from cloud_hub.db.base import Sessions
from cloud_hub.fleet.devices import token_matches
from cloud_hub.fleet.grants import DownloadGrants
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.registry.tables import Module, ModuleFile

log = logging.getLogger(__name__)

#: Devices whose grants one query reads when a change issued them new states.
WARM_CHUNK = 1000


def _named(payload: bytes | None) -> frozenset[str] | None:
    if payload is None:
        return None
    # The hub wrote and signed these bytes itself: a plain JSON parse, no validation.
    return frozenset(m["manifest_digest"] for m in json.loads(payload)["signed"]["modules"])


class DatabaseGrants:
    """A :class:`cloud_hub.fleet.grants.GrantSource` in the hub's database (called off the
    event loop): who a token belongs to, what its desired state names, what a module holds."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def grant(self, token_hash: str) -> tuple[str, frozenset[str] | None] | None:
        with self._sessions.begin() as s:
            row = s.execute(
                select(Device.id, DeviceDesired.payload)
                .outerjoin(DeviceDesired, DeviceDesired.device_id == Device.id)
                .where(token_matches(token_hash))
            ).first()
        if row is None:
            return None
        device_id, payload = row
        return device_id, _named(payload)

    def grants_of(self, device_ids: Sequence[str]) -> list[tuple[str, str, frozenset[str] | None]]:
        """(token hash, device id, named manifests) of these devices that are not revoked, in
        queries of :data:`WARM_CHUNK`: what a rollout's downloads will ask for, read at once."""
        out = []
        for at in range(0, len(device_ids), WARM_CHUNK):
            chunk = device_ids[at : at + WARM_CHUNK]
            with self._sessions.begin() as s:
                rows = s.execute(
                    select(Device.token_hash, Device.id, DeviceDesired.payload)
                    .outerjoin(DeviceDesired, DeviceDesired.device_id == Device.id)
                    .where(Device.id.in_(chunk), Device.revoked.is_(False))
                ).all()
            out += [(hashed, device_id, _named(payload)) for hashed, device_id, payload in rows]
        return out

    def module_blobs(self, manifests: Iterable[str]) -> dict[str, frozenset[str]]:
        wanted = list(manifests)
        found: dict[str, set[str]] = {m: set() for m in wanted}
        with self._sessions.begin() as s:
            rows = s.execute(
                select(Module.manifest_digest, ModuleFile.digest)
                .join(ModuleFile, ModuleFile.module_id == Module.id)
                .where(Module.manifest_digest.in_(wanted))
            )
            for manifest, blob in rows:
                found[manifest].add(blob)
        # A module with no files (or not in the registry) allows no blob: an empty set says so.
        return {m: frozenset(blobs) for m, blobs in found.items()}

    def manifest(self, digest: str) -> bytes | None:
        with self._sessions.begin() as s:
            return s.scalar(select(Module.manifest).where(Module.manifest_digest == digest))



class GrantWarmer:
    """The executor's ``on_issued``: forget the devices' grants, then load them afresh."""

    def __init__(self, grants: DownloadGrants, source: DatabaseGrants) -> None:
        self._grants = grants
        self._source = source

    def __call__(self, device_ids: Iterable[str]) -> None:
        devices = list(device_ids)
        self._grants.forget(devices)
        as_of = self._grants.epoch
        threading.Thread(
            target=self._warm, args=(devices, as_of), name="download-grants-warm", daemon=True
        ).start()

    def _warm(self, devices: list[str], as_of: int) -> None:
        # A chunk at a time, each kept as of when it was read: a large rollout's last chunk
        # comes long after its first, whose grants must not live longer for it.
        for at in range(0, len(devices), WARM_CHUNK):
            chunk = devices[at : at + WARM_CHUNK]
            loaded_at = self._grants.now()
            try:
                loaded = self._source.grants_of(chunk)
            except Exception:  # the downloads load what they need themselves
                log.warning("download grants of %d device(s) not loaded ahead", len(chunk), exc_info=True)
                return
            if not self._grants.remember_many(loaded, as_of=as_of, loaded_at=loaded_at) and loaded:
                return  # a change since: what is read now would be dropped too
