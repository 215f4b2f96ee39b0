"""Zero-touch enrolment: the signing request a device sends when it joins by itself.

A device holds only a fleet-wide provisioning token. It makes its own Ed25519 key, derives its
HTTP token and broker password from that key, and sends the hub a :class:`JoinRequest` signed
with the key: its id, its public key, and only *verifiers* of its secrets (the sha256 of the
token, the broker's password hashes). The signature is the proof of possession: the hub
refuses a request whose signature does not verify with the public key it carries, so nothing
in it can be changed on the way. The private key and the secrets never leave the device; the
hub's answer is the credentials document without them, which the device completes.

Pure: keys, bytes and the time go in, requests and verdicts come out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from manifests.broker_passwords import hash_password, mosquitto_hash_problem, rabbit_hash, rabbit_hash_problem
from manifests.desired import DEVICE_ID_PATTERN
from manifests.device import DeviceCredentials, MqttEndpoint
from manifests.errors import TrustError
from manifests.signing import (
    KEYID_PATTERN,
    TrustedKey,
    TrustStore,
    envelope_bytes,
    key_id,
    parse_envelope,
    raw_public_bytes,
    sign_payload,
    verify_envelope,
)

JOIN_SCHEMA = "edgepack.join-request/v1"
PROVISIONING_TOKEN_PREFIX = "ep_join_"
DEVICE_TOKEN_PREFIX = "ep_dev_"
#: A join request is a few hundred bytes; anything much larger is not one.
MAX_JOIN_REQUEST_BYTES = 8 * 1024


class KeyRequest(BaseModel):
    """A device's signed request for credentials of a key it made: what a joining device and a
    rotating one both send (the ``signed`` part of the envelope)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    hub_keyid: str = Field(
        pattern=KEYID_PATTERN, description="the hub asked (its key id): a request for another hub is refused"
    )
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="the device's raw Ed25519 key, hex")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the device's HTTP token")
    mqtt_password_hash: str = Field(max_length=255, description="Mosquitto $7$ hash of its broker password")
    rabbitmq_password_hash: str = Field(
        max_length=64, description="RabbitMQ sha256 hash of the same password"
    )
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    issued: AwareDatetime


R = TypeVar("R", bound=KeyRequest)


class JoinRequest(KeyRequest):
    """What a joining device asks the hub to enrol (the ``signed`` part of its envelope)."""

    schema_: Literal["edgepack.join-request/v1"] = Field(default="edgepack.join-request/v1", alias="schema")


class DeviceSecrets(BaseModel):
    """The secrets a device derives from its key: they are only ever on the device."""

    model_config = ConfigDict(frozen=True)

    token: str
    mqtt_password: str


def token_sha256(token: str) -> str:
    """The verifier the hub keeps of a device token (256 bits of entropy: a fast hash will do)."""
    return hashlib.sha256(token.encode()).hexdigest()


def derive_secrets(key: Ed25519PrivateKey) -> DeviceSecrets:
    """The device's HTTP token and broker password, derived from its private key (HMAC with a
    label each), so the key file is the one secret the device keeps and the two never repeat."""
    seed = key.private_bytes_raw()

    def derive(label: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.digest(seed, label, "sha256")).decode().rstrip("=")

    return DeviceSecrets(
        token=DEVICE_TOKEN_PREFIX + derive(b"edgepack device http token"),
        mqtt_password=derive(b"edgepack device broker password"),
    )


def make_join_request(
    key: Ed25519PrivateKey, *, device_id: str, hub_keyid: str, nonce: str, now: datetime
) -> bytes:
    """The signed join request's bytes (``nonce``: 16 random bytes, hex, from the caller)."""
    return make_key_request(JoinRequest, key, device_id=device_id, hub_keyid=hub_keyid, nonce=nonce, now=now)


def make_key_request(
    model: type[KeyRequest],
    key: Ed25519PrivateKey,
    *,
    device_id: str,
    hub_keyid: str,
    nonce: str,
    now: datetime,
) -> bytes:
    """A ``model`` request for ``key``'s credentials, signed by ``key`` (proof of possession):
    only verifiers of the secrets derived from it go in."""
    secrets = derive_secrets(key)
    request = model(
        device_id=device_id,
        hub_keyid=hub_keyid,
        public_key=raw_public_bytes(key.public_key()).hex(),
        token_sha256=token_sha256(secrets.token),
        mqtt_password_hash=hash_password(secrets.mqtt_password),
        rabbitmq_password_hash=rabbit_hash(secrets.mqtt_password),
        nonce=nonce,
        issued=now,
    )
    return envelope_bytes(sign_payload(request.model_dump(mode="json", by_alias=True), [key]))


def verify_join_request(data: bytes, *, hub_keyid: str, now: datetime, max_age_s: float) -> JoinRequest:
    """The join request in ``data`` if this hub may act on it (see :func:`verify_key_request`)."""
    return verify_key_request(
        data, JoinRequest, what="join request", max_bytes=MAX_JOIN_REQUEST_BYTES,
        hub_keyid=hub_keyid, now=now, max_age_s=max_age_s,
    )  # fmt: skip


def verify_key_request(
    data: bytes, model: type[R], *, what: str, max_bytes: int, hub_keyid: str, now: datetime, max_age_s: float
) -> R:
    """The ``model`` request in ``data`` if it is one this hub may act on; :class:`TrustError`
    naming the first check that failed otherwise: size, envelope, shape, proof of possession
    (signed by the key it carries and by no other), this hub, freshness (``issued`` within
    ``max_age_s`` either side of ``now``), the hashes' formats."""
    if len(data) > max_bytes:
        raise TrustError(f"{what} is {len(data)} bytes; at most {max_bytes}")
    envelope = parse_envelope(data, what=what)
    try:
        request = model.model_validate(envelope.signed)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise TrustError(f"{what}: {loc}: {first['msg']}") from None
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(request.public_key))
    own = TrustedKey(keyid=key_id(public), public_key=request.public_key, name=request.device_id)
    if [s.keyid for s in envelope.signatures] != [own.keyid]:
        raise TrustError(f"{what}: it must carry exactly one signature, by the key it names")
    verify_envelope(
        envelope, TrustStore(keys=[own]), what=what,
        untrusted_hint="the request was not signed by the key it carries",
    )  # fmt: skip
    if request.hub_keyid != hub_keyid:
        raise TrustError(f"{what} was made for another hub (its hub key id differs); use this hub's URL")
    age = now - request.issued
    if abs(age) > timedelta(seconds=max_age_s):
        raise TrustError(
            f"{what} was made {age.total_seconds():+.0f} s from the hub's time (at most "
            f"±{max_age_s:.0f} s): it is a replay, or the device's clock is wrong (fix it with NTP)"
        )
    for field, problem in (
        ("mqtt_password_hash", mosquitto_hash_problem(request.mqtt_password_hash)),
        ("rabbitmq_password_hash", rabbit_hash_problem(request.rabbitmq_password_hash)),
    ):
        if problem is not None:
            raise TrustError(f"{what}: {field}: {problem}")
    return request


class JoinAnswer(BaseModel):
    """The hub's answer to a join: the device's credentials document without its two secrets
    (the token and the broker password), which the device has and the hub never had."""

    model_config = ConfigDict(extra="ignore")  # a newer hub may say more

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    hub_url: str = Field(max_length=2048)
    mqtt_host: str | None = Field(default=None, max_length=253)
    mqtt_port: int = Field(ge=1, le=65535)
    mqtt_username: str = Field(min_length=1, max_length=128)
    topic_prefix: str = Field(max_length=64)
    mqtt_tls: bool = False
    ca_pem: str | None = Field(default=None, max_length=64 * 1024)
    hub_key: TrustedKey
    publishers: TrustStore
    tags: dict[str, str] = Field(default_factory=dict)
    token_id: str = Field(max_length=16, description="the provisioning token it joined with")


def credentials_from_answer(answer: JoinAnswer, secrets: DeviceSecrets) -> DeviceCredentials:
    """The whole credentials document: the hub's answer plus the device's own secrets."""
    return DeviceCredentials(
        device_id=answer.device_id,
        hub_url=answer.hub_url,
        token=secrets.token,
        mqtt=MqttEndpoint(
            host=answer.mqtt_host,
            port=answer.mqtt_port,
            username=answer.mqtt_username,
            password=secrets.mqtt_password,
            topic_prefix=answer.topic_prefix,
            tls=answer.mqtt_tls,
        ),
        ca_pem=answer.ca_pem,
        hub_key=answer.hub_key,
        publishers=answer.publishers,
    )
