"""What a scoring endpoint enforces: endpoint keys, TLS, and the hostile-client limits.

All three come by path or number from options / ``EDGEPACK_*`` variables, so the agent (or a
container runtime) configures them without touching the module:

- ``EDGEPACK_AUTH_KEYS_FILE``: JSON ``{"sha256": [...]}`` of the accepted keys' hashes
  (:mod:`edge_agent.scoring.auth`); re-read when it changes;
- ``EDGEPACK_TLS_CERT`` / ``EDGEPACK_TLS_KEY``: PEM certificate chain and key; with them the
  endpoint (and its probe port) speaks only HTTPS, and a replaced pair is loaded for new
  connections within :data:`TLS_RELOAD_INTERVAL_S`, without a restart;
- ``EDGEPACK_MAX_CONNECTIONS``, ``EDGEPACK_HEADER_TIMEOUT_S``, ``EDGEPACK_BODY_TIMEOUT_S``,
  ``EDGEPACK_RUN_TIMEOUT_S`` (:class:`edge_agent.scoring.limits.ServingLimits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.scoring.limits import ServingLimits
from manifests.errors import ConfigError

log = logging.getLogger("edge_agent.scoring")

TLS_RELOAD_INTERVAL_S = 5.0


@dataclass(frozen=True)
class EndpointOptions:
    keys_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: ServingLimits = field(default_factory=ServingLimits)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both a TLS certificate and its key (EDGEPACK_TLS_CERT, EDGEPACK_TLS_KEY)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _stamp(*paths: Path) -> tuple[tuple[int, int], ...]:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_mtime_ns))
    return tuple(out)


class ReloadingTLS:
    """A server-side SSL context whose certificate is replaced when its files change.

    ``load_cert_chain`` on a live context applies to every handshake after it, so a rotated
    certificate needs no restart and no new listening socket.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self.context.load_cert_chain(cert, key)
            self._stamp = _stamp(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use TLS certificate {cert} with key {key}: {exc}") from None

    def reload_if_changed(self) -> bool:
        try:
            stamp = _stamp(self.cert, self.key)
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            # Half-written files during a rotation: keep the old certificate, try again later.
            log.warning("TLS certificate %s not reloaded (%s); keeping the current one", self.cert, exc)
            return False
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(TLS_RELOAD_INTERVAL_S)
            with contextlib.suppress(Exception):
                self.reload_if_changed()
