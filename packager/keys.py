"""Key files and trust stores on the developer's disk."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.errors import ConfigError
from manifests.signing import (
    TrustStore,
    generate_private_key,
    key_id,
    load_private_key,
    parse_trust,
    private_key_pem,
    public_key_pem,
)
from packager.files import atomic_output


def keygen(private_path: Path, *, force: bool = False) -> tuple[Path, Path, str]:
    """Create an Ed25519 key pair: ``private_path`` (mode 0600) and ``<stem>.pub`` beside it."""
    public_path = private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise ConfigError(f"{p}: already exists; pass --force to replace it")
    key = generate_private_key()
    with atomic_output(private_path, mode=0o600) as fh:
        fh.write(private_key_pem(key))
    with atomic_output(public_path, mode=0o644) as fh:
        fh.write(public_key_pem(key.public_key()))
    return private_path, public_path, key_id(key.public_key())


def read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: signing key not found; create one with 'edgepack keygen {path}'"
        ) from None
    return load_private_key(data, source=str(path))


def read_trust(paths: list[Path]) -> TrustStore:
    """Build one trust store from ``.pub`` files, trust-store JSON files, or folders of them."""
    store = TrustStore()
    for path in paths:
        if path.is_dir():
            store = store.merged(read_trust(sorted(path.glob("*.pub")) + sorted(path.glob("*.json"))))
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{path}: trust file not found") from None
        store = store.merged(parse_trust(data, source=str(path), name=path.stem))
    return store
