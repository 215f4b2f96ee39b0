"""``Service.run`` on a service deployed with ``auth_enabled`` and ``ssl_enabled``, served by a
real agent: it sends the service's key and verifies its HTTPS with the hub's endpoint CA, by
itself; a rotated key takes over without anyone restarting anything."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from edge_agent.scoring.auth import RELOAD_INTERVAL_S
from manifests.errors import FetchError
from packager.sdk import DeploymentConfig, Module, Selector
from tests.agent.conftest import Fleet, free_port
from tests.factory import Forge
from tests.sdk.conftest import sdk_hub

SCRIPT = b"def init():\n    pass\n\n\ndef run(raw_data):\n    return {'ok': True}\n"


def test_run_sends_the_key_and_verifies_the_endpoint_ca(
    fleet: Fleet, forge: Forge, sdk_home: Path, tmp_path: Path
) -> None:
    fleet.device("dev-k", tags={"site": "lab"}).start()
    h = sdk_hub(fleet.hub)
    bundle = tmp_path / "keyed-1.edgepack"
    bundle.write_bytes(forge.bundle(name="keyed", files={"src/score.py": SCRIPT, "model/m.bin": b"x"}))
    Module.push(h, bundle)
    port = free_port()
    config = DeploymentConfig(port=port, auth_enabled=True, ssl_enabled=True, runtime="process")
    service = h.deploy("keyed", "keyed:1", config, Selector(site="lab"))
    assert service.settings.auth is not None and service.settings.tls is not None
    service.wait_for_deployment(timeout=120)

    assert service.scoring_uri == f"https://127.0.0.1:{port}/score"
    assert service.run({"data": [1]}) == {"ok": True}  # over HTTPS, with the primary key, by itself
    with pytest.raises(FetchError, match="401"):
        service.run({"data": [1]}, key="not-a-key")
    primary, secondary = service.get_keys()
    assert service.run("{}", key=secondary) == {"ok": True}
    # Without the hub's endpoint CA nobody trusts the device's certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.post(
            f"https://127.0.0.1:{port}/score", json={}, headers={"Authorization": f"Bearer {secondary}"}
        )

    rotated = service.regen_key("Primary")
    assert rotated.keys.primary != primary and rotated.keys.secondary == secondary
    assert list(rotated.issued) == ["dev-k"]
    # regen_key returns once dev-k applied the change: run() finds the device Healthy and the
    # new primary works at once; the replaced one stops working within the server's reload
    # interval.
    assert service.run("{}") == {"ok": True}  # the new primary, fetched again
    refused_by = time.monotonic() + RELOAD_INTERVAL_S + 0.5
    while True:
        try:
            service.run("{}", key=primary)
        except FetchError as exc:
            assert "401" in str(exc), exc
            break
        assert time.monotonic() < refused_by, "the replaced primary key still works"
        time.sleep(0.1)
    assert service.run("{}", device="dev-k", key=secondary) == {"ok": True}  # the other kept working
