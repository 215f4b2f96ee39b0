"""Where a hub keeps its TLS material, and the rule that TLS is on outside loopback.

``<data_dir>/tls/`` holds the installation's CA (``ca.crt``, ``ca.key``), the hub's HTTPS
certificate (``hub.crt``, ``hub.key``) and the endpoint CA that signs scoring endpoints'
certificates (``endpoint-ca.crt``, ``endpoint-ca.key``). The broker's certificate goes into the
broker dir, which Mosquitto reads. The endpoint CA is a separate CA on purpose: a certificate
a device obtains for its scoring endpoint must never be one a client of the hub or the broker
would accept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud_hub.settings import HubSettings
from cloud_hub.tls.ca import issue_server_cert, load_or_make_ca, write_issued
from manifests.errors import ConfigError

TLS_DIR = "tls"
HUB_CERT = "hub.crt"
HUB_KEY = "hub.key"
BROKER_CERT = "broker.crt"
BROKER_KEY = "broker.key"
CA_IN_BROKER_DIR = "ca.crt"


def tls_dir(settings: HubSettings) -> Path:
    return settings.data_dir / TLS_DIR


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_default_tls(settings: HubSettings) -> HubSettings:
    """``settings`` with the hub's own certificate filled in when it has one and none was given;
    refuses plain HTTP on an address other than loopback unless explicitly allowed."""
    if settings.tls_cert is None and settings.tls_key is None:
        cert, key = tls_dir(settings) / HUB_CERT, tls_dir(settings) / HUB_KEY
        if cert.is_file() and key.is_file():
            settings = settings.model_copy(update={"tls_cert": cert, "tls_key": key})
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key (EDGEPACK_HUB_TLS_CERT, EDGEPACK_HUB_TLS_KEY)")
    if settings.tls_cert is None and not is_loopback(settings.host) and not settings.allow_plain_http:
        raise ConfigError(
            f"the hub would serve plain HTTP on {settings.host}: device tokens and the admin token "
            "would cross the network in clear. Make certificates with 'edgepack hub broker-config "
            "--tls --hub-host NAME' (or pass --tls-cert/--tls-key), or pass --allow-plain-http"
        )
    return settings


def ca_pem(settings: HubSettings) -> str | None:
    """The CA certificate devices get at enrolment, to verify the hub and the broker."""
    for path in (settings.tls_ca, settings.mqtt_tls_ca, tls_dir(settings) / "ca.crt"):
        if path is not None and path.is_file():
            return path.read_text()
    return None


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    hub_cert: Path
    hub_key: Path
    broker_cert: Path
    broker_key: Path
    broker_ca: Path


def make_tls_material(
    settings: HubSettings, *, hub_hosts: Sequence[str], broker_hosts: Sequence[str], broker_dir: Path
) -> TlsFiles:
    """The installation's CA (made once), and fresh hub and broker certificates for their hosts."""
    directory = tls_dir(settings)
    ca = load_or_make_ca(directory)
    load_or_make_ca(directory / "endpoint")  # signs scoring endpoints only (see module doc)
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        hub_cert=directory / HUB_CERT,
        hub_key=directory / HUB_KEY,
        broker_cert=broker_dir / BROKER_CERT,
        broker_key=broker_dir / BROKER_KEY,
        broker_ca=broker_dir / CA_IN_BROKER_DIR,
    )
    write_issued(issue_server_cert(ca, "edgepack hub", hub_hosts), files.hub_cert, files.hub_key)
    write_issued(issue_server_cert(ca, "edgepack broker", broker_hosts), files.broker_cert, files.broker_key)
    files.broker_ca.write_bytes(ca.cert_pem)
    return files
