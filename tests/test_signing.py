"""Canonical JSON, key ids and the signature envelope, with real Ed25519 keys."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.canonical import canonical_json
from manifests.errors import ConfigError, TrustError
from manifests.signing import (
    Envelope,
    Signature,
    TrustedKey,
    TrustStore,
    envelope_bytes,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    parse_envelope,
    parse_trust,
    private_key_pem,
    public_key_pem,
    raw_public_bytes,
    sign_payload,
    signed_envelope_bytes,
    verify_envelope,
)

PAYLOAD = {"name": "digits", "version": "1", "files": [{"path": "src/score.py", "size": 3}]}


def trusting(*keys: Ed25519PrivateKey) -> TrustStore:
    store = TrustStore()
    for k in keys:
        store = store.with_key(k.public_key())
    return store


# --- canonical JSON -------------------------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level_and_drops_whitespace() -> None:
    doc = {"b": 1, "a": {"z": [3, {"y": 2, "x": 1}], "c": None}}
    assert canonical_json(doc) == b'{"a":{"c":null,"z":[3,{"x":1,"y":2}]},"b":1}'


def test_canonical_json_is_independent_of_insertion_order() -> None:
    one = {"x": 1, "y": [1, 2], "z": {"q": True}}
    two = {"z": {"q": True}, "y": [1, 2], "x": 1}
    assert canonical_json(one) == canonical_json(two)


def test_canonical_json_writes_unicode_as_utf8_not_escapes() -> None:
    out = canonical_json({"name": "Grüße ✓", "emoji": "🙂"})
    assert out == '{"emoji":"🙂","name":"Grüße ✓"}'.encode()
    assert b"\\u" not in out
    assert json.loads(out) == {"name": "Grüße ✓", "emoji": "🙂"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_canonical_json_refuses_nan_and_infinity(value: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": value})


# --- keys -----------------------------------------------------------------------------------


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    key = generate_private_key()
    raw = raw_public_bytes(key.public_key())
    assert len(raw) == 32
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()
    assert key_id(key.public_key()) != key_id(generate_private_key().public_key())


def test_key_pem_round_trip_keeps_the_key_id() -> None:
    key = generate_private_key()
    again = load_private_key(private_key_pem(key))
    assert key_id(again.public_key()) == key_id(key.public_key())
    pub = load_public_key(public_key_pem(key.public_key()))
    assert key_id(pub) == key_id(key.public_key())
    raw_hex = raw_public_bytes(key.public_key()).hex().encode()
    assert key_id(load_public_key(raw_hex)) == key_id(key.public_key())


def test_garbage_key_files_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="edgepack keygen"):
        load_private_key(b"-----BEGIN NOTHING-----\n", source="k.key")
    with pytest.raises(ConfigError, match=r"k\.pub"):
        load_public_key(b"hello", source="k.pub")


# --- sign / verify --------------------------------------------------------------------------


def test_sign_then_verify_round_trip_through_bytes() -> None:
    key = generate_private_key()
    data = envelope_bytes(sign_payload(PAYLOAD, [key]))
    envelope = parse_envelope(data)
    assert envelope.signed == PAYLOAD
    assert verify_envelope(envelope, trusting(key)) == [key_id(key.public_key())]


def test_envelope_bytes_are_canonical_so_the_digest_is_stable() -> None:
    key = generate_private_key()
    first = envelope_bytes(sign_payload(PAYLOAD, [key]))
    # Ed25519 is deterministic: signing the same payload again gives the same bytes.
    assert envelope_bytes(sign_payload(dict(reversed(PAYLOAD.items())), [key])) == first
    assert first == canonical_json(json.loads(first))


@pytest.mark.parametrize(
    "payload",
    [PAYLOAD, {"ünïcode": "日本", "nested": {"b": [1, 2.5, None, True], "a": {}}}, {}],
)
def test_one_pass_envelope_is_byte_for_byte_the_model_envelope(payload: dict[str, object]) -> None:
    keys = [generate_private_key(), generate_private_key()]
    fast = signed_envelope_bytes(payload, keys)
    assert fast == envelope_bytes(sign_payload(payload, keys))
    assert len(verify_envelope(parse_envelope(fast), trusting(*keys))) == 2


def test_one_pass_envelope_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one"):
        signed_envelope_bytes(PAYLOAD, [])


def test_every_changed_payload_byte_breaks_the_signature() -> None:
    key = generate_private_key()
    envelope = sign_payload(PAYLOAD, [key])
    tampered = Envelope(
        signed={**PAYLOAD, "version": "2"}, signatures=envelope.signatures
    )
    with pytest.raises(TrustError, match="does not match the content"):
        verify_envelope(tampered, trusting(key))


def test_a_flipped_byte_in_the_wire_form_is_refused() -> None:
    key = generate_private_key()
    data = envelope_bytes(sign_payload(PAYLOAD, [key]))
    at = data.index(b"digits")
    damaged = data[:at] + b"e" + data[at + 1 :]  # "eigits": still valid JSON
    with pytest.raises(TrustError, match="does not match the content"):
        verify_envelope(parse_envelope(damaged), trusting(key))


def test_signature_by_an_untrusted_key_is_refused_naming_it() -> None:
    stranger = generate_private_key()
    envelope = sign_payload(PAYLOAD, [stranger])
    with pytest.raises(TrustError, match="untrusted key") as err:
        verify_envelope(envelope, trusting(generate_private_key()), what="module.json")
    assert key_id(stranger.public_key())[:16] in str(err.value)
    assert str(err.value).startswith("module.json:")


def test_empty_trust_store_says_to_pass_trust() -> None:
    envelope = sign_payload(PAYLOAD, [generate_private_key()])
    with pytest.raises(TrustError, match="--trust"):
        verify_envelope(envelope, TrustStore())


def test_threshold_counts_distinct_trusted_signers() -> None:
    a, b, c = (generate_private_key() for _ in range(3))
    store = trusting(a, b).model_copy(update={"threshold": 2})
    assert sorted(verify_envelope(sign_payload(PAYLOAD, [a, b]), store)) == sorted(
        [key_id(a.public_key()), key_id(b.public_key())]
    )
    with pytest.raises(TrustError, match="1 trusted signature"):
        verify_envelope(sign_payload(PAYLOAD, [a, c]), store)
    # The same trusted key twice is still one signer.
    doubled = sign_payload(PAYLOAD, [a, a])
    with pytest.raises(TrustError, match="2 required"):
        verify_envelope(doubled, store)


def test_a_bad_signature_among_good_ones_still_meets_a_threshold_of_one() -> None:
    a, b = generate_private_key(), generate_private_key()
    good = sign_payload(PAYLOAD, [a])
    forged = Signature(keyid=key_id(b.public_key()), sig="00" * 64)
    envelope = Envelope(signed=PAYLOAD, signatures=[forged, *good.signatures])
    assert verify_envelope(envelope, trusting(a, b)) == [key_id(a.public_key())]


def test_trust_store_entry_whose_keyid_does_not_match_its_key_is_refused() -> None:
    real, other = generate_private_key(), generate_private_key()
    entry = TrustedKey(
        keyid=key_id(other.public_key()),
        public_key=raw_public_bytes(real.public_key()).hex(),
        name="swapped",
    )
    with pytest.raises(ConfigError, match="swapped: keyid does not match"):
        verify_envelope(sign_payload(PAYLOAD, [real]), TrustStore(keys=[entry]))


def test_with_key_adds_a_key_once() -> None:
    key = generate_private_key()
    store = TrustStore().with_key(key.public_key(), name="me")
    assert store.with_key(key.public_key(), name="again").keys == store.keys


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"signed": {}}', "signatures"),
        (b'{"signed": {}, "signatures": []}', "signatures"),
        (b'{"signed": {}, "signatures": [{"keyid": "ab", "sig": "cd"}]}', "keyid"),
        (b'{"signed": {}, "signatures": [], "extra": 1}', "not a signed envelope"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),  # past the parser's stack
        (b'{"signed": ' + b"[" * 900 + b"]" * 900 + b"}", "nests deeper than 64 levels"),  # within it
        (b'{"signed": {"a": NaN}, "signatures": []}', "not valid JSON"),  # canonical JSON has no NaN
        (b"1" * 5000, "not valid JSON"),  # an integer longer than Python converts
    ],
)
def test_parse_envelope_refuses_damaged_documents(data: bytes, reason: str) -> None:
    with pytest.raises(TrustError, match=reason):
        parse_envelope(data, what="desired state")


def test_parse_trust_reads_a_public_key_or_a_trust_store_and_merges_strictly() -> None:
    a, b = generate_private_key(), generate_private_key()
    from_pem = parse_trust(public_key_pem(a.public_key()), source="a.pub", name="a")
    assert [k.name for k in from_pem.keys] == ["a"]
    two = TrustStore(threshold=2).with_key(a.public_key()).with_key(b.public_key())
    from_json = parse_trust(two.model_dump_json().encode(), source="team.json")
    merged = from_pem.merged(from_json)
    assert [k.keyid for k in merged.keys] == [key_id(a.public_key()), key_id(b.public_key())]
    assert merged.threshold == 2  # the stricter threshold wins


def test_parse_trust_refuses_a_store_whose_keyid_does_not_match_its_key() -> None:
    key = generate_private_key()
    store = json.loads(TrustStore().with_key(key.public_key()).model_dump_json())
    store["keys"][0]["keyid"] = "0" * 64
    with pytest.raises(ConfigError, match="keyid does not match"):
        parse_trust(json.dumps(store).encode(), source="evil.json")
    with pytest.raises(ConfigError, match="not a valid trust store"):
        parse_trust(b"{not json", source="broken.json")
