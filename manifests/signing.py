"""Ed25519 keys, key ids and the signature envelope ``{"signed": ..., "signatures": [...]}``.

Everything here takes bytes and returns values or verdicts; reading key files and bundles is
the caller's job. Verification always runs over the canonical JSON of the ``signed`` object
*as received*, never over a re-serialisation of a parsed model, so fields this version does
not know about are still covered by the signature.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.canonical import canonical_json
from manifests.errors import ConfigError, TrustError

KEYID_PATTERN = r"^[0-9a-f]{64}$"


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keyid: str = Field(pattern=KEYID_PATTERN, description="sha256 of the raw public key")
    sig: str = Field(pattern=r"^[0-9a-f]{128}$", description="Ed25519 signature, hex")


class Envelope(BaseModel):
    """A signed document: the payload and its signatures."""

    model_config = ConfigDict(extra="forbid")

    signed: dict[str, Any]
    signatures: list[Signature] = Field(min_length=1)


class TrustedKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keyid: str = Field(pattern=KEYID_PATTERN)
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="raw Ed25519 key, hex")
    name: str = ""


class TrustStore(BaseModel):
    """The publisher keys a verifier trusts, and how many must have signed."""

    model_config = ConfigDict(extra="forbid")

    keys: list[TrustedKey] = Field(default_factory=list)
    threshold: int = Field(default=1, ge=1)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        out: dict[str, Ed25519PublicKey] = {}
        for entry in self.keys:
            pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry.public_key))
            if key_id(pub) != entry.keyid:
                raise ConfigError(
                    f"trust store entry {entry.name or entry.keyid[:12]}: keyid does not match "
                    "its public key; re-add the key with 'edgepack trust add'"
                )
            out[entry.keyid] = pub
        return out

    def merged(self, other: TrustStore) -> TrustStore:
        """Both stores' keys (each key id once) with the stricter of the two thresholds."""
        known = {k.keyid for k in self.keys}
        keys = [*self.keys, *(k for k in other.keys if k.keyid not in known)]
        return TrustStore(keys=keys, threshold=max(self.threshold, other.threshold))

    def with_key(self, pub: Ed25519PublicKey, name: str = "") -> TrustStore:
        kid = key_id(pub)
        if any(k.keyid == kid for k in self.keys):
            return self
        entry = TrustedKey(keyid=kid, public_key=raw_public_bytes(pub).hex(), name=name)
        return TrustStore(keys=[*self.keys, entry], threshold=self.threshold)


# --- keys -----------------------------------------------------------------------------------


def raw_public_bytes(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes_raw()


def key_id(pub: Ed25519PublicKey) -> str:
    """The key id: hex sha256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_bytes(pub)).hexdigest()


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


# PEM needs cryptography's serialization module, which costs a long-running verifier (the
# agent, which only ever sees raw keys) about 2.5 MB: it is imported where PEM is used.


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(pub: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(data: bytes, *, source: str = "private key") -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{source}: not an unencrypted PEM private key ({exc}); create one with "
            "'edgepack keygen'"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{source}: not an Ed25519 key; create one with 'edgepack keygen'")
    return key


def load_public_key(data: bytes, *, source: str = "public key") -> Ed25519PublicKey:
    """Load a PEM public key, or a raw key given as 64 hex characters."""
    text = data.strip()
    if len(text) == 64:
        try:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
        except ValueError:
            pass
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: not a PEM public key; use the .pub file written by 'edgepack keygen'"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source}: not an Ed25519 public key")
    return key


def parse_trust(data: bytes, *, source: str, name: str = "") -> TrustStore:
    """A trust store from a file's bytes: trust-store JSON, or one public key (PEM or hex)."""
    if data.lstrip().startswith(b"{"):
        try:
            store = TrustStore.model_validate_json(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: not a valid trust store ({exc.__class__.__name__})") from None
        store.public_keys()  # checks every keyid against its key
        return store
    return TrustStore().with_key(load_public_key(data, source=source), name=name)


# --- envelopes ------------------------------------------------------------------------------


def sign_payload(payload: dict[str, Any], keys: list[Ed25519PrivateKey]) -> Envelope:
    """Sign ``payload`` (a JSON-ready dict) with every key in ``keys``."""
    if not keys:
        raise ValueError("at least one signing key is needed")
    message = canonical_json(payload)
    sigs = [
        Signature(keyid=key_id(k.public_key()), sig=k.sign(message).hex()) for k in keys
    ]
    return Envelope(signed=payload, signatures=sigs)


def envelope_bytes(envelope: Envelope) -> bytes:
    """The on-the-wire form of an envelope: canonical JSON, so that its digest is stable."""
    return canonical_json(envelope.model_dump(mode="json"))


def signed_envelope_bytes(payload: dict[str, Any], keys: list[Ed25519PrivateKey]) -> bytes:
    """``envelope_bytes(sign_payload(payload, keys))`` in one serialisation of the payload.

    Canonical JSON of an object is its sorted members' canonical JSON joined, so the signed
    bytes sit verbatim in the envelope's; a hub signing a desired state per device saves the
    second serialisation and the model round trip (``tests/test_signing.py`` checks they agree).
    """
    if not keys:
        raise ValueError("at least one signing key is needed")
    message = canonical_json(payload)
    sigs = [{"keyid": key_id(k.public_key()), "sig": k.sign(message).hex()} for k in keys]
    # "signatures" sorts before "signed".
    return b'{"signatures":' + canonical_json(sigs) + b',"signed":' + message + b"}"


#: How deep a signed document may nest. A desired state nests 6 levels, a module manifest 5;
#: the bound keeps a hostile document far from the interpreter's recursion limit, so neither
#: the parser nor the canonical serialiser that checks the signature can run out of stack.
MAX_JSON_DEPTH = 64


def parse_envelope(data: bytes, *, what: str = "document") -> Envelope:
    """The envelope in ``data``; :class:`TrustError` for anything that is not one: not JSON
    (including NaN/Infinity, which canonical JSON cannot express), nested deeper than
    :data:`MAX_JSON_DEPTH`, or not shaped like an envelope."""
    try:
        raw = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise TrustError(
            f"{what} nests deeper than {MAX_JSON_DEPTH} levels; it is damaged or hostile"
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        raise TrustError(f"{what} is not valid JSON ({exc.__class__.__name__}); it is damaged") from None
    if _depth_exceeds(raw, MAX_JSON_DEPTH):
        raise TrustError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels; it is damaged or hostile")
    try:
        return Envelope.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise TrustError(f"{what} is not a signed envelope: {loc}: {first['msg']}") from None


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


UNTRUSTED_HINT = "add the publisher's public key to the trust store (--trust KEY.pub) if you trust it"


def verify_envelope(
    envelope: Envelope,
    trust: TrustStore,
    *,
    what: str = "document",
    untrusted_hint: str = UNTRUSTED_HINT,
) -> list[str]:
    """Check that at least ``trust.threshold`` distinct trusted keys signed the payload.

    Returns the key ids whose signatures verified. Raises :class:`TrustError` otherwise.
    """
    trusted = trust.public_keys()
    message = canonical_json(envelope.signed)
    good: list[str] = []
    bad: list[str] = []
    for sig in envelope.signatures:
        pub = trusted.get(sig.keyid)
        if pub is None or sig.keyid in good:
            continue
        try:
            pub.verify(bytes.fromhex(sig.sig), message)
        except InvalidSignature:
            bad.append(sig.keyid)
            continue
        good.append(sig.keyid)
    if len(good) >= trust.threshold:
        return good
    if bad:
        raise TrustError(
            f"{what}: signature by key {bad[0][:16]} does not match the content; "
            "it was modified after signing"
        )
    if not trusted:
        raise TrustError(
            f"{what}: no trusted keys configured; pass the publisher's public key with --trust"
        )
    signers = ", ".join(s.keyid[:16] for s in envelope.signatures)
    if not good:
        raise TrustError(
            f"{what}: signed by untrusted key(s) {signers}; {untrusted_hint}"
        )
    raise TrustError(
        f"{what}: {len(good)} trusted signature(s), {trust.threshold} required"
    )
