"""The TLS context both links use: the hub's CA from the credentials, or the system's."""

from __future__ import annotations

import functools
import ssl

from manifests.device import DeviceCredentials
from manifests.errors import ConfigError


def client_context(credentials: DeviceCredentials) -> ssl.SSLContext:
    """Verifies the server's certificate and host name against ``ca_pem`` when the
    credentials carry one (the hub's own CA), else against the system's trust store.
    Both links get the same context (one per CA): each OpenSSL context with its trust store
    holds about 1 MB, and neither link changes it."""
    try:
        return _context(credentials.ca_pem or None)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"the CA certificate in the credentials of {credentials.device_id} is not usable ({exc}); "
            "enroll the device again"
        ) from None


@functools.cache
def _context(ca_pem: str | None) -> ssl.SSLContext:
    if ca_pem:
        return ssl.create_default_context(cadata=ca_pem)
    return ssl.create_default_context()
