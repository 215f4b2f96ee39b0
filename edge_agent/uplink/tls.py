"""The TLS context both links use: the hub's CA from the credentials, or the system's."""

from __future__ import annotations

import ssl

from manifests.device import DeviceCredentials
from manifests.errors import ConfigError


def client_context(credentials: DeviceCredentials) -> ssl.SSLContext:
    """Verifies the server's certificate and host name against ``ca_pem`` when the
    credentials carry one (the hub's own CA), else against the system's trust store."""
    try:
        if credentials.ca_pem:
            return ssl.create_default_context(cadata=credentials.ca_pem)
        return ssl.create_default_context()
    except ssl.SSLError as exc:
        raise ConfigError(
            f"the CA certificate in the credentials of {credentials.device_id} is not usable ({exc}); "
            "enroll the device again"
        ) from None
