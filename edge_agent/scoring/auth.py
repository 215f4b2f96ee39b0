"""Scoring endpoint keys, as Azure ML's ``authEnabled`` services have them.

The server never holds a key, only the sha256 of each accepted one, in a small JSON file
whose path it is given (``EDGEPACK_AUTH_KEYS_FILE``)::

    {"sha256": ["<64 hex>", "<64 hex>"]}

The agent writes that file from the hashes in the service's signed desired state (primary and
secondary key) and replaces it atomically when they change; the server looks at the file at
most once a second and picks up a rotation without a restart. A missing, unreadable or
malformed file accepts no key at all: authentication fails closed.

A request presents ``Authorization: Bearer <key>``; the key is hashed and compared with each
accepted hash in constant time. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("edge_agent.scoring")

AUTH_KEYS_ENV = "EDGEPACK_AUTH_KEYS_FILE"
#: How often (seconds) the keys file is looked at again.
RELOAD_INTERVAL_S = 1.0
#: A keys file is a few hashes; anything larger is not one.
MAX_KEYS_FILE_BYTES = 64 << 10
_HEX64 = re.compile(r"[0-9a-f]{64}")


def key_hash(key: str) -> str:
    """The hex sha256 of a key, as the hub puts it into the desired state."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys_file(data: bytes) -> tuple[str, ...]:
    """The accepted hashes in a keys file; raises ValueError naming what is wrong."""
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise ValueError("keys file is too large")
    doc = json.loads(data)
    hashes = doc.get("sha256") if isinstance(doc, dict) else None
    if not isinstance(hashes, list) or not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes):
        raise ValueError('expected {"sha256": ["<64 lowercase hex>", ...]}')
    return tuple(hashes)


class EndpointKeys:
    """The accepted key hashes of one server, re-read from ``path`` when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hashes: tuple[str, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._reload()

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            self._hashes = parse_keys_file(self.path.read_bytes())
            self._stamp = stamp
            log.info("endpoint keys loaded from %s (%d accepted)", self.path, len(self._hashes))
        except (OSError, ValueError) as exc:
            if self._hashes or self._stamp is not None:
                log.warning("endpoint keys file %s unusable (%s): every key is refused", self.path, exc)
            self._hashes = ()
            self._stamp = None

    def accepted(self, now: float) -> Sequence[str]:
        if now - self._checked >= RELOAD_INTERVAL_S:
            self._checked = now
            self._reload()
        return self._hashes

    def allows(self, authorization: bytes | None, now: float) -> bool:
        """True when ``authorization`` is ``Bearer <key>`` for an accepted key."""
        if not authorization:
            return False
        scheme, _, key = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not key.strip():
            return False
        presented = hashlib.sha256(key.strip()).hexdigest().encode()
        if self._matches(presented, self.accepted(now)):
            return True
        # A key just made (regen_key returns once the device applied it) is honoured at once:
        # a refusal looks at the file again (one stat) before it stands. A replaced key stops
        # working within RELOAD_INTERVAL_S.
        self._checked = now
        self._reload()
        return self._matches(presented, self._hashes)

    @staticmethod
    def _matches(presented: bytes, hashes: Sequence[str]) -> bool:
        ok = False
        for accepted in hashes:
            # Every accepted hash is compared, so the time taken says nothing about which.
            ok |= hmac.compare_digest(presented, accepted.encode())
        return ok
