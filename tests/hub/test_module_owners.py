"""Module names belong to publishers: a second trusted key cannot add versions to a name the
first one pushed, until the hub's admin grants it (``edgepack module grant NAME KEYID``).

Against a real hub that trusts two publisher keys, over HTTP and through the CLI as a user
runs it; the devices are told which keys may sign each module (their desired state names them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.signing import generate_private_key, key_id, public_key_pem
from tests.conftest import Publisher
from tests.factory import Forge, default_files
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import (
    PushedModule,
    deploy,
    desired_over_http,
    enroll,
    hub_trust,
    verified_state,
)

EDGEPACK = str(Path(sys.executable).parent / "edgepack")
BUNDLE_TYPE = {"Content-Type": "application/vnd.edgepack.module+tar"}
MANIFEST_TYPE = {"Content-Type": "application/vnd.edgepack.manifest+json"}


@dataclass
class TwoPublishers:
    """A hub that trusts two publisher keys: ``first`` (the test session's) and ``second``."""

    hub: RunningHub
    first: Forge
    second: Forge

    @property
    def first_id(self) -> str:
        return key_id(self.first.publisher.public_key())

    @property
    def second_id(self) -> str:
        return key_id(self.second.publisher.public_key())


@pytest.fixture
def two(hub: HubFactory, publisher: Publisher, tmp_path: Path) -> TwoPublishers:
    second: Ed25519PrivateKey = generate_private_key()
    keys = []
    for name, key in (("first", publisher.key), ("second", second)):
        path = tmp_path / f"{name}.pub"
        path.write_bytes(public_key_pem(key.public_key()))
        keys.append(path)
    return TwoPublishers(hub(trusted_keys=keys), Forge(publisher=publisher.key), Forge(publisher=second))


def push(hub: RunningHub, forge: Forge, name: str, version: str) -> httpx.Response:
    bundle = forge.bundle(name=name, version=version, files=default_files(int(version) + 1))
    with hub.client() as http:
        return http.post("/api/v1/modules", content=bundle, headers=BUNDLE_TYPE)


def versions(hub: RunningHub, name: str) -> list[str]:
    with hub.client() as http:
        return [m["version"] for m in http.get("/api/v1/modules", params={"name": name}).json()]


def events(hub: RunningHub) -> list[tuple[str, str]]:
    with hub.client() as http:
        return [(e["kind"], e["message"]) for e in http.get("/api/v1/dashboard/events").json()["events"]]


def test_a_second_trusted_key_cannot_add_a_version_to_the_first_ones_module(two: TwoPublishers) -> None:
    assert push(two.hub, two.first, "digits", "1").status_code == 201

    refused = push(two.hub, two.second, "digits", "2")
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["type"] == "Forbidden"
    assert two.first_id in error["message"]  # the owner
    assert f"edgepack module grant digits {two.second_id}" in error["message"]  # what to do
    assert versions(two.hub, "digits") == ["1"]  # nothing stored

    # The manifest-only way in is held to the same rule, blobs uploaded or not.
    parts = two.second.module(name="digits", version="2", files=default_files(3))
    with two.hub.client() as http:
        for digest, data in parts.blobs.items():
            assert http.put(f"/api/v1/blobs/{digest}", content=data).status_code in (200, 201)
        manifest_only = http.post("/api/v1/modules", content=parts.manifest_bytes, headers=MANIFEST_TYPE)
    assert manifest_only.status_code == 403, manifest_only.text
    assert versions(two.hub, "digits") == ["1"]

    # The same module pushed again by its owner is still the no-op it was.
    assert push(two.hub, two.first, "digits", "1").status_code == 200


def test_after_the_admins_grant_the_second_key_may_publish_and_a_revoke_ends_it(two: TwoPublishers) -> None:
    assert push(two.hub, two.first, "digits", "1").status_code == 201
    with two.hub.client() as http:
        granted = http.put(f"/api/v1/modules/digits/signers/{two.second_id}")
        assert granted.status_code == 200, granted.text
        body = granted.json()
        assert (body["owners"], body["granted"], body["changed"]) == ([two.first_id], [two.second_id], True)
        again = http.put(f"/api/v1/modules/digits/signers/{two.second_id}").json()
        assert again["changed"] is False  # granting twice changes nothing

    assert push(two.hub, two.second, "digits", "2").status_code == 201
    assert versions(two.hub, "digits") == ["1", "2"]
    kinds = [kind for kind, _ in events(two.hub)]
    assert "module_owned" in kinds and "module_signer_granted" in kinds

    with two.hub.client() as http:
        assert http.delete(f"/api/v1/modules/digits/signers/{two.second_id}").status_code == 200
        owner = http.delete(f"/api/v1/modules/digits/signers/{two.first_id}")
        assert owner.status_code == 409 and "owner" in owner.json()["error"]["message"]
    assert push(two.hub, two.second, "digits", "3").status_code == 403
    assert "module_signer_revoked" in [kind for kind, _ in events(two.hub)]


def test_a_grant_names_a_key_the_hub_trusts_on_a_name_that_exists(two: TwoPublishers) -> None:
    assert push(two.hub, two.first, "digits", "1").status_code == 201
    stranger = key_id(generate_private_key().public_key())
    with two.hub.client() as http:
        untrusted = http.put(f"/api/v1/modules/digits/signers/{stranger}")
        assert untrusted.status_code == 400
        assert "not trusted by this hub" in untrusted.json()["error"]["message"]
        unknown = http.put(f"/api/v1/modules/nothing/signers/{two.second_id}")
        assert unknown.status_code == 404 and "never pushed" in unknown.json()["error"]["message"]
        assert http.put("/api/v1/modules/digits/signers/not-a-key").status_code == 422
        assert http.get("/api/v1/modules/digits/signers").json() == {
            "name": "digits", "owners": [two.first_id], "granted": []
        }  # fmt: skip
    # Each key owns what it pushed first: the second key's own name is closed to the first.
    assert push(two.hub, two.second, "faces", "1").status_code == 201
    assert push(two.hub, two.first, "faces", "2").status_code == 403


def test_devices_are_told_which_keys_may_sign_each_module_and_a_grant_tells_them_again(
    two: TwoPublishers,
) -> None:
    assert push(two.hub, two.first, "digits", "1").status_code == 201
    pushed = PushedModule("digits", "1", two.first.module(name="digits", version="1", files=default_files(2)))
    with two.hub.client() as http:
        device = enroll(http, "edge-1")
        assert deploy(http, "digits", pushed, devices=["edge-1"]).status_code == 201
    trust = hub_trust(two.hub)
    before = verified_state(desired_over_http(two.hub, device.token), trust, "edge-1")
    assert before.modules[0].signers == [two.first_id]

    with two.hub.client() as http:
        granted = http.put(f"/api/v1/modules/digits/signers/{two.second_id}").json()
    assert granted["issued"] == {"edge-1": before.generation + 1}
    after = verified_state(desired_over_http(two.hub, device.token), trust, "edge-1", before.generation)
    assert after.modules[0].signers == sorted([two.first_id, two.second_id])


# --- the CLI, as the admin runs it --------------------------------------------------------------


def edgepack(home: Path, hub: RunningHub, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update({
        "EDGEPACK_HOME": str(home), "EDGEPACK_HUB_URL": hub.url, "EDGEPACK_TOKEN": hub.admin_token,
        "COLUMNS": "80", "NO_COLOR": "1",
    })  # fmt: skip
    return subprocess.run([EDGEPACK, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_cli_refuses_in_one_line_and_edgepack_module_grant_lets_the_push_in(
    two: TwoPublishers, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    assert push(two.hub, two.first, "digits", "1").status_code == 201
    bundle = tmp_path / "digits-2.edgepack"
    bundle.write_bytes(two.second.bundle(name="digits", version="2", files=default_files(3)))

    refused = edgepack(home, two.hub, "push", str(bundle))
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert two.first_id in refused.stderr
    assert f"edgepack module grant digits {two.second_id}" in refused.stderr

    bad = edgepack(home, two.hub, "module", "grant", "digits", "1234")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "key id" in bad.stderr

    granted = edgepack(home, two.hub, "module", "grant", "digits", two.second_id)
    assert granted.returncode == 0, granted.stderr
    assert f"granted  {two.second_id}" in granted.stdout
    pushed = edgepack(home, two.hub, "push", str(bundle))
    assert pushed.returncode == 0, pushed.stderr

    shown: Any = json.loads(edgepack(home, two.hub, "module", "signers", "digits", "--json").stdout)
    assert (shown["owners"], shown["granted"]) == ([two.first_id], [two.second_id])
    revoked = edgepack(home, two.hub, "module", "revoke", "digits", two.second_id)
    assert revoked.returncode == 0, revoked.stderr
    bundle.write_bytes(two.second.bundle(name="digits", version="3", files=default_files(4)))
    assert edgepack(home, two.hub, "push", str(bundle)).returncode != 0
