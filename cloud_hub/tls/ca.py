"""A small certificate authority for one edgepack installation (``cryptography``).

``edgepack hub broker-config --tls`` makes it once: the CA (its key never leaves the hub's data
directory), a server certificate for the broker and one for the hub's HTTPS listener. Devices
receive the CA certificate at enrolment and verify both servers against it, so no public CA and
no network is needed, and a certificate from anywhere else is refused.

Keys are ECDSA P-256 (small, fast handshakes on devices); certificates name their hosts in the
subjectAltName (DNS names and IP addresses), which is what TLS clients check.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from manifests.durable import write_durable
from manifests.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 10 * 365
SERVER_DAYS = 2 * 365


@dataclass(frozen=True)
class Issued:
    """PEM bytes of a certificate (chain: itself) and its private key."""

    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(common_name: str = "edgepack CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_server_cert(
    ca: Issued, common_name: str, hosts: Sequence[str], *, days: int = SERVER_DAYS
) -> Issued:
    """A TLS server certificate for ``hosts`` (names or IP addresses), signed by ``ca``."""
    if not hosts:
        raise ConfigError("a server certificate needs at least one host name or address")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an ECDSA key made by edgepack")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def load_or_make_ca(directory: Path) -> Issued:
    """The CA kept in ``directory`` (``ca.crt``, ``ca.key`` 0600), made on first use."""
    cert, key = directory / CA_CERT, directory / CA_KEY
    if cert.exists() and key.exists():
        return Issued(cert.read_bytes(), key.read_bytes())
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    write_durable(key, ca.key_pem, mode=0o600)
    write_durable(cert, ca.cert_pem, mode=0o644)
    return ca


def write_issued(issued: Issued, cert_path: Path, key_path: Path) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(key_path, issued.key_pem, mode=0o600)
    write_durable(cert_path, issued.cert_pem, mode=0o644)


#: A certificate request is a few hundred bytes.
MAX_CSR_BYTES = 16 << 10


def sign_request(
    ca: Issued, csr_pem: bytes, *, allowed_dns: Callable[[str], bool], days: int = SERVER_DAYS
) -> bytes:
    """A server certificate for the key and names in a PEM certificate request, signed by ``ca``.

    The request must be signed by its own key (proof that the requester holds it), name at
    least one host, and every DNS name in it must pass ``allowed_dns``; IP addresses are taken
    as given. Raises ConfigError naming what is wrong.
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise ConfigError("certificate request is too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ConfigError("not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise ConfigError("the certificate request is not signed by its own key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError("the certificate request's key is of a kind edgepack does not sign")
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ConfigError("the certificate request names no host (subjectAltName)") from None
    dns = names.get_values_for_type(x509.DNSName)
    ips = names.get_values_for_type(x509.IPAddress)
    if not dns and not ips:
        raise ConfigError("the certificate request names no host (subjectAltName)")
    refused = [n for n in dns if not allowed_dns(n)]
    if refused:
        raise ConfigError(
            f"the certificate request names host {refused[0]!r}, which this device may not use"
        )
    common_name = dns[0] if dns else str(ips[0])
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an ECDSA key made by edgepack")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, ips)]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
