"""Certificates for scoring endpoints that serve TLS (``sslEnabled``; ``docs/security.md`` §2).

The key pair is made on the device (ECDSA P-256) and never leaves it; the hub's endpoint CA
signs a request naming the device's hosts. Each service keeps its key and certificate in
``<state_dir>/tls/<service>/`` (0600), renewed once two thirds of its lifetime have passed.
``cryptography``'s X.509 support is imported only here, when a service needs it.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.runtime.endpoint_files import CERT_FILE, KEY_FILE, TlsMaterial
from edge_agent.uplink.http import HubHttp
from manifests.durable import write_durable
from manifests.errors import HubUnavailable

log = logging.getLogger(__name__)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class EndpointCertificates:
    def __init__(self, hub: HubHttp, device_id: str, store: Path, hosts: list[str]) -> None:
        self._hub = hub
        self._device = device_id
        self._store = store
        # The hub signs DNS names that start with the device id, and IP addresses as given.
        self._dns = [device_id, *(h for h in hosts if not _is_ip(h) and h.split(".")[0] == device_id)]
        self._ips = sorted({"127.0.0.1", *(h.strip("[]") for h in hosts if _is_ip(h))})

    def material(self, service: str) -> TlsMaterial:
        """The service's key and certificate, obtained from the hub when missing or due."""
        held = self._held(service)
        if held is not None and not self._due(held.cert_pem):
            return held
        return self._request(service)

    def due(self, service: str) -> bool:
        held = self._held(service)
        return held is None or self._due(held.cert_pem)

    def _held(self, service: str) -> TlsMaterial | None:
        folder = self._store / service
        try:
            return TlsMaterial((folder / CERT_FILE).read_bytes(), (folder / KEY_FILE).read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def _due(cert_pem: bytes) -> bool:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return True
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return datetime.now(UTC) >= start + (end - start) * 2 / 3

    def _request(self, service: str) -> TlsMaterial:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in self._dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in self._ips]
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._device)]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256())
        )
        answer = self._hub.post_json(
            "/api/v1/device/certificates",
            {"service": service, "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode()},
        )
        cert_pem = answer.get("cert_pem")
        if not isinstance(cert_pem, str):
            raise HubUnavailable("the hub's certificate answer holds no certificate")
        material = TlsMaterial(
            cert_pem.encode(),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        folder = self._store / service
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_durable(folder / KEY_FILE, material.key_pem, mode=0o600)
        write_durable(folder / CERT_FILE, material.cert_pem, mode=0o600)
        log.info("certificate for %s obtained from the hub's endpoint CA", service)
        return material
