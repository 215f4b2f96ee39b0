"""What the hub serves devices that install the agent from it: ``/install.sh`` pinned to the
served ``bundle.json``, and only the wheels that bundle lists (no token needed, no other file)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from manifests.agent_bundle import AgentBundle, BundleWheel
from manifests.errors import TrustError
from manifests.signing import envelope_bytes, sign_payload
from packager.agent_bundle import check_agent_bundle
from tests.conftest import Publisher, make_publisher

WHEELS = {"pip-24.0-py3-none-any.whl": b"pip's bytes", "edgepack-0.1.0-py3-none-any.whl": b"agent"}


def write_bundle(folder: Path, publisher: Publisher) -> bytes:
    (folder / "amd64").mkdir(parents=True)
    listed = []
    for name, data in WHEELS.items():
        (folder / "amd64" / name).write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        listed.append(BundleWheel(name=name, size=len(data), digest=digest))
    bundle = AgentBundle(version="0.1.0", created=datetime.now(UTC), python="3.11", wheels={"amd64": listed})
    raw = envelope_bytes(sign_payload(bundle.model_dump(mode="json", by_alias=True), [publisher.key]))
    (folder / "bundle.json").write_bytes(raw)
    return raw


def test_a_hub_without_a_bundle_says_how_to_make_one(hub: Any) -> None:
    running = hub()
    answer = httpx.get(f"{running.url}/install.sh")
    assert answer.status_code == 404
    assert answer.json()["error"]["message"].startswith("this hub serves no agent bundle: build one with")


def test_install_sh_pins_the_served_bundle_and_only_listed_wheels_are_served(
    hub: Any, publisher: Publisher, tmp_path: Path
) -> None:
    folder = tmp_path / "bundle"
    raw = write_bundle(folder, publisher)
    (folder / "amd64" / "secret.whl").write_bytes(b"not listed")
    running = hub(agent_bundle=folder)

    script = httpx.get(f"{running.url}/install.sh")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/x-shellscript")
    assert f"\nHUB_URL={running.url}\n" in script.text
    assert f"\nBUNDLE_DIGEST=sha256:{hashlib.sha256(raw).hexdigest()}\n" in script.text
    # The publisher keys the hub trusts, which check the bundle on a device without credentials.
    pinned = re.search(r"\nPUBLISHERS='([^']*)'\n", script.text)
    assert pinned is not None
    keys = [k["public_key"] for k in json.loads(pinned.group(1))["keys"]]
    assert keys == [publisher.trust.keys[0].public_key]
    assert httpx.get(f"{running.url}/agent-bundle/bundle.json").content == raw
    assert httpx.get(f"{running.url}/agent-bundle/amd64/pip-24.0-py3-none-any.whl").content == b"pip's bytes"
    for path in ("amd64/secret.whl", "arm64/pip-24.0-py3-none-any.whl", "amd64/..%2Fbundle.json"):
        answer = httpx.get(f"{running.url}/agent-bundle/{path}")
        assert answer.status_code == 404, path
        assert answer.json()["error"]["type"] == "NotFound"


def test_a_device_checks_the_signature_with_its_keys_and_every_wheel(
    publisher: Publisher, tmp_path: Path
) -> None:
    write_bundle(tmp_path, publisher)
    assert check_agent_bundle(tmp_path, publisher.trust, "amd64").version == "0.1.0"
    with pytest.raises(TrustError):
        check_agent_bundle(tmp_path, make_publisher().trust, "amd64")
    (tmp_path / "amd64" / "edgepack-0.1.0-py3-none-any.whl").write_bytes(b"agenT")
    with pytest.raises(TrustError, match="not the wheel"):
        check_agent_bundle(tmp_path, publisher.trust, "amd64")
    signed = json.loads((tmp_path / "bundle.json").read_text())
    signed["signed"]["version"] = "0.2.0"
    (tmp_path / "bundle.json").write_text(json.dumps(signed))
    with pytest.raises(TrustError):
        check_agent_bundle(tmp_path, publisher.trust, "amd64")
