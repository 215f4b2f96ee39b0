"""The rotation request's pure checks (``manifests.rotation``) and the broker accounts a
rotation in flight implies: what a device may ask, and what an attacker's request is."""

from __future__ import annotations

import json
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.broker.mosquitto import BrokerUser, render_acl, render_password_file
from cloud_hub.fleet.rotation import ROTATED, ROTATION_REFUSED, ROTATION_REQUESTED
from cloud_hub.webhooks.catalog import check_types, event_type, subject_of
from edge_agent.uplink.rotation import KEY_FILE, load_or_make_key
from manifests.desired import DEVICE_ID_PATTERN
from manifests.device import DeviceCredentials, MqttEndpoint
from manifests.errors import TrustError
from manifests.join import derive_secrets
from manifests.rotation import (
    MAX_ROTATION_REQUEST_BYTES,
    RotationAnswer,
    broker_username,
    effective_credentials,
    make_rotation_request,
    rotated_credentials,
    rotated_file_bytes,
    verify_rotation_request,
)
from manifests.signing import envelope_bytes, sign_payload
from tests.factory import Forge

NOW = datetime(2026, 12, 8, 1, 0, tzinfo=UTC)
HUB = "a" * 64


def _request(key: Ed25519PrivateKey, device_id: str = "edge-1", *, now: datetime = NOW) -> bytes:
    return make_rotation_request(key, device_id=device_id, hub_keyid=HUB, nonce="0" * 32, now=now)


def _verify(data: bytes, device_id: str = "edge-1") -> object:
    return verify_rotation_request(data, device_id=device_id, hub_keyid=HUB, now=NOW, max_age_s=300)


def test_a_request_signed_by_its_new_key_is_accepted_and_carries_only_verifiers() -> None:
    key = Ed25519PrivateKey.generate()
    data = _request(key)
    request = _verify(data)
    secrets = derive_secrets(key)
    assert request.device_id == "edge-1"
    # The secrets themselves never travel.
    assert secrets.token.encode() not in data and secrets.mqtt_password.encode() not in data


def test_another_devices_request_is_refused_even_with_a_valid_signature() -> None:
    data = _request(Ed25519PrivateKey.generate(), device_id="edge-2")
    with pytest.raises(TrustError, match="rotates only its own credentials"):
        _verify(data, device_id="edge-1")


def test_a_request_signed_by_another_key_than_it_names_is_refused() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = json.loads(_request(key))["signed"]
    forged = envelope_bytes(sign_payload(signed, [other]))
    with pytest.raises(TrustError, match="exactly one signature, by the key it names"):
        _verify(forged)


def test_a_changed_verifier_breaks_the_signature() -> None:
    document = json.loads(_request(Ed25519PrivateKey.generate()))
    document["signed"]["token_sha256"] = "f" * 64
    with pytest.raises(TrustError):
        _verify(json.dumps(document).encode())


@pytest.mark.parametrize("skew", [timedelta(seconds=301), timedelta(seconds=-301)])
def test_a_stale_or_future_request_is_refused(skew: timedelta) -> None:
    with pytest.raises(TrustError, match="the device's clock is wrong"):
        _verify(_request(Ed25519PrivateKey.generate(), now=NOW - skew))


def test_a_request_for_another_hub_or_oversized_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    data = make_rotation_request(key, device_id="edge-1", hub_keyid="b" * 64, nonce="0" * 32, now=NOW)
    with pytest.raises(TrustError, match="another hub"):
        _verify(data)
    with pytest.raises(TrustError, match=f"at most {MAX_ROTATION_REQUEST_BYTES}"):
        _verify(b" " * (MAX_ROTATION_REQUEST_BYTES + 1))


def test_broker_user_names_never_collide_with_device_ids() -> None:
    assert broker_username("edge-1", 0) == "edge-1"
    assert broker_username("edge-1", 2) == "edge-1~r2"
    assert not re.fullmatch(DEVICE_ID_PATTERN, broker_username("edge-1", 1))


def test_rotated_credentials_hold_the_new_secrets_and_user_and_nothing_else_changes() -> None:
    forge = Forge()
    current = DeviceCredentials(
        device_id="edge-1", hub_url="http://hub:8800", token="ep_dev_" + "x" * 40,
        mqtt=MqttEndpoint(host="broker", username="edge-1", password="old-password"),
        hub_key=forge.hub_trust.keys[0], publishers=forge.trust,
    )  # fmt: skip
    key = Ed25519PrivateKey.generate()
    secrets = derive_secrets(key)
    new = rotated_credentials(current, secrets, RotationAnswer(device_id="edge-1", mqtt_username="edge-1~r1"))
    assert (new.token, new.mqtt.password) == (secrets.token, secrets.mqtt_password)
    assert new.mqtt.username == "edge-1~r1"
    assert new.hub_key == current.hub_key and new.publishers == current.publishers
    with pytest.raises(TrustError):
        rotated_credentials(current, secrets, RotationAnswer(device_id="edge-2", mqtt_username="x"))


def test_mid_rotation_both_users_of_a_device_get_its_topics_and_only_them() -> None:
    users = [
        BrokerUser("edge-1", "$7$h1", "edge-1"),
        BrokerUser("edge-1~r1", "$7$h2", "edge-1"),
        BrokerUser("edge-2", "$7$h3", "edge-2"),
    ]
    acl = render_acl(prefix="ep", hub_username="hub", device_ids=[], users=users)
    blocks = {b.split("\n")[0]: b for b in acl.split("\n\n")[1:]}
    assert set(blocks) == {"user edge-1", "user edge-1~r1", "user edge-2"}
    assert blocks["user edge-1~r1"].replace("edge-1~r1", "edge-1") == blocks["user edge-1"]
    assert "edge-2" not in blocks["user edge-1~r1"]
    assert render_password_file(users).splitlines() == ["edge-1:$7$h1", "edge-1~r1:$7$h2", "edge-2:$7$h3"]


def _credentials(device_id: str = "edge-1", password: str = "old-password") -> DeviceCredentials:
    forge = Forge()
    return DeviceCredentials(
        device_id=device_id, hub_url="http://hub:8800", token="ep_dev_" + "x" * 40,
        mqtt=MqttEndpoint(host="broker", username=device_id, password=password),
        hub_key=forge.hub_trust.keys[0], publishers=forge.trust,
    )  # fmt: skip


def test_rotated_credentials_are_used_only_while_they_replace_the_configured_file_as_it_is() -> None:
    configured = _credentials()
    configured_bytes = configured.model_dump_json(by_alias=True).encode()
    rotated = _credentials(password="new-password")
    file = rotated_file_bytes(configured_bytes, rotated)
    assert effective_credentials(configured, configured_bytes, file) == rotated
    assert effective_credentials(configured, configured_bytes, None) == configured
    # The operator put new credentials in place (enrolled again): the rotated ones are stale.
    replaced = configured_bytes + b" "
    assert effective_credentials(configured, replaced, file) == configured
    # Another device's, or a file that does not parse (a torn write cannot happen, a hand edit can).
    other = rotated_file_bytes(configured_bytes, _credentials("edge-2"))
    assert effective_credentials(configured, configured_bytes, other) == configured
    assert effective_credentials(configured, configured_bytes, b"{") == configured


def test_rotation_events_go_out_as_device_types_a_subscription_may_ask_for() -> None:
    for kind in (ROTATED, ROTATION_REQUESTED, ROTATION_REFUSED):
        full = event_type(kind)
        assert full == "edgepack." + kind
        assert check_types([kind]) == [full]
        assert subject_of(kind, "edge-1", None) == "devices/edge-1"


def test_the_rotation_key_is_kept_for_a_resumed_rotation_and_a_broken_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    key = load_or_make_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_make_key(path).private_bytes_raw() == key.private_bytes_raw()
    path.write_bytes(b"not a key")
    fresh = load_or_make_key(path)
    assert fresh.private_bytes_raw() != key.private_bytes_raw()
    assert load_or_make_key(path).private_bytes_raw() == fresh.private_bytes_raw()
