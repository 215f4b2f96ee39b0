"""Which digests a device may download, remembered per hub process (the download fast path).

A download is decided by two facts: *which device* sent the token, and *which manifests* its
current desired state names (a blob is allowed when one of those modules has it). Asking the
database both per request was most of a download's cost, so :class:`DownloadGrants` keeps
the answer per token:

- **a digest the grant does not hold is asked for again** at once: a device that has just
  been given a new module gets it without waiting, and a refusal is always fresh;
- **a grant older than ``ttl_s`` is asked for again**: a device revoked, or a module
  withdrawn, on *another* replica is refused within ``ttl_s`` (docs/security.md);
- on *this* replica, :meth:`forget` drops a device's grant when it is revoked or given a new
  desired state, so there the refusal is immediate.

What a module contains never changes (manifests are content-addressed), so the blobs of a
module are kept without an age, in a bounded table of their own. Both tables drop their least
recently used entry at their bound. Nothing here does I/O: the caller loads what is missing
(:class:`GrantSource`) and hands it in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class Verdict(Enum):
    ALLOWED = "allowed"
    #: the cached grant does not say yes: load it afresh, then decide with ``fresh=True``
    ASK_AGAIN = "ask-again"
    REFUSED = "refused"


@dataclass(frozen=True)
class Grant:
    """A device and the manifest digests its current desired state names (``None``: the
    device has no desired state yet)."""

    device_id: str
    manifests: frozenset[str] | None
    loaded_at: float


class GrantSource(Protocol):
    """Where grants come from (the database): called off the event loop, on a miss."""

    def grant(self, token_hash: str) -> tuple[str, frozenset[str] | None] | None:
        """The device with this token hash (not revoked) and its named manifests, or None."""

    def module_blobs(self, manifests: Iterable[str]) -> dict[str, frozenset[str]]:
        """The blob digests of each of these modules (a manifest not in the registry: absent)."""


class DownloadGrants:
    """Grants per token hash and blobs per module, bounded; safe to use from several threads."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_devices: int,
        max_modules: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._max_devices = max_devices
        self._max_modules = max_modules
        self._clock = clock
        self._grants: OrderedDict[str, Grant] = OrderedDict()
        self._by_device: dict[str, str] = {}
        self._blobs: OrderedDict[str, frozenset[str]] = OrderedDict()
        # Devices of a rollout are given the same modules: one shared set, not one each.
        self._interned: dict[frozenset[str], frozenset[str]] = {}
        self._prune_at = 1024
        self._lock = threading.Lock()
        # Raised by every forget(): a grant read from the database before a forget may be
        # older than it, so it is used for that request but not remembered (see remember()).
        self._epoch = 0

    # --- reading -------------------------------------------------------------------------------

    def cached(self, token_hash: str) -> Grant | None:
        """The grant for this token if it is younger than ``ttl_s``."""
        with self._lock:
            grant = self._grants.get(token_hash)
            if grant is None:
                return None
            if self._clock() - grant.loaded_at >= self.ttl_s:
                self._drop(token_hash)
                return None
            self._grants.move_to_end(token_hash)
            return grant

    def manifest_verdict(self, grant: Grant, digest: str, *, fresh: bool) -> Verdict:
        if grant.manifests is not None and digest in grant.manifests:
            return Verdict.ALLOWED
        return Verdict.REFUSED if fresh else Verdict.ASK_AGAIN

    def blob_verdict(self, grant: Grant, digest: str, *, fresh: bool) -> Verdict:
        """ALLOWED when a module of the grant has the blob; a module whose blobs are not
        known here yet makes the answer ASK_AGAIN (the caller loads them)."""
        unknown = False
        with self._lock:
            for manifest in grant.manifests or ():
                blobs = self._blobs.get(manifest)
                if blobs is None:
                    unknown = True
                elif digest in blobs:
                    self._blobs.move_to_end(manifest)
                    return Verdict.ALLOWED
        return Verdict.ASK_AGAIN if unknown or not fresh else Verdict.REFUSED

    def missing_modules(self, grant: Grant) -> list[str]:
        with self._lock:
            return [m for m in grant.manifests or () if m not in self._blobs]

    # --- filling -------------------------------------------------------------------------------

    def now(self) -> float:
        """The grants' clock: read it before a load and hand it to :meth:`remember` as
        ``loaded_at``, so that a grant's age counts from when the database was read."""
        return self._clock()

    @property
    def epoch(self) -> int:
        """Read before loading grants; hand it to :meth:`remember`."""
        return self._epoch

    def remember(
        self,
        token_hash: str,
        device_id: str,
        manifests: frozenset[str] | None,
        *,
        as_of: int,
        loaded_at: float | None = None,
    ) -> Grant:
        """The grant for what was loaded; kept only when nothing was forgotten since ``as_of``
        (else a revocation here during the load could be undone until the TTL ran out).
        ``loaded_at``: :meth:`now` before the database was read (default: now)."""
        with self._lock:
            return self._remember(token_hash, device_id, manifests, as_of, loaded_at)

    def remember_many(
        self,
        loaded: list[tuple[str, str, frozenset[str] | None]],
        *,
        as_of: int,
        loaded_at: float | None = None,
    ) -> int:
        """Grants loaded ahead of the downloads (a rollout's devices); how many were kept."""
        with self._lock:
            if as_of != self._epoch:
                return 0
            for token_hash, device_id, manifests in loaded[: self._max_devices]:
                self._remember(token_hash, device_id, manifests, as_of, loaded_at)
            return min(len(loaded), self._max_devices)

    def _remember(
        self,
        token_hash: str,
        device_id: str,
        manifests: frozenset[str] | None,
        as_of: int,
        loaded_at: float | None,
    ) -> Grant:
        if manifests is not None:
            self._prune_interned()
            manifests = self._interned.setdefault(manifests, manifests)
        # The TTL bounds how old the database's answer may be, so it counts from the read, not
        # from when a slow load (a rollout's thousands of devices) got round to keeping it.
        grant = Grant(device_id, manifests, self._clock() if loaded_at is None else loaded_at)
        if as_of != self._epoch:
            return grant
        self._drop(token_hash)
        self._grants[token_hash] = grant
        self._by_device[device_id] = token_hash
        while len(self._grants) > self._max_devices:
            self._drop(next(iter(self._grants)))
        return grant

    def remember_blobs(self, blobs: dict[str, frozenset[str]]) -> None:
        with self._lock:
            for manifest, digests in blobs.items():
                self._blobs[manifest] = digests
                self._blobs.move_to_end(manifest)
            while len(self._blobs) > self._max_modules:
                self._blobs.popitem(last=False)

    def forget(self, device_ids: Iterable[str]) -> None:
        """Drop these devices' grants (revoked, or given a new desired state on this replica)."""
        with self._lock:
            self._epoch += 1
            for device_id in device_ids:
                token_hash = self._by_device.get(device_id)
                if token_hash is not None:
                    self._drop(token_hash)

    def __len__(self) -> int:
        return len(self._grants)

    def _drop(self, token_hash: str) -> None:
        grant = self._grants.pop(token_hash, None)
        if grant is None:
            return
        if self._by_device.get(grant.device_id) == token_hash:
            del self._by_device[grant.device_id]

    def _prune_interned(self) -> None:
        """Rollouts come and go: keep only the shared sets that grants still use. Runs when
        the table has doubled since the last pruning, so its cost is spread over the fills."""
        if len(self._interned) < self._prune_at:
            return
        live = {id(g.manifests) for g in self._grants.values()}
        self._interned = {k: v for k, v in self._interned.items() if id(v) in live}
        self._prune_at = max(2 * len(self._interned), 1024)
