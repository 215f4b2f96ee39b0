"""What the hub serves devices that install from it, when its agent bundle on disk is not the
one a trusted publisher signed (security.md §18): nothing of it is served, so no ``install.sh``
pins it (the device checks the signature too, before any of the bundle's code runs:
``test_install_device_check.py``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from manifests.canonical import canonical_json
from tests.conftest import Publisher, make_publisher
from tests.hub.test_install_endpoints import write_bundle

SERVED = ("/install.sh", "/agent-bundle/bundle.json", "/agent-bundle/amd64/edgepack-0.1.0-py3-none-any.whl")


def _replace_edgepack(folder: Path) -> None:
    """Another edgepack wheel listed in the signed part, the signature left as it was."""
    evil = b"import os; os.system('id')"
    (folder / "amd64" / "edgepack-0.1.0-py3-none-any.whl").write_bytes(evil)
    envelope = json.loads((folder / "bundle.json").read_bytes())
    for wheel in envelope["signed"]["wheels"]["amd64"]:
        if wheel["name"].startswith("edgepack-"):
            wheel.update(size=len(evil), digest="sha256:" + hashlib.sha256(evil).hexdigest())
    (folder / "bundle.json").write_bytes(canonical_json(envelope))


@pytest.mark.parametrize("case", ["another publisher signed it", "changed after signing"])
def test_a_bundle_no_trusted_publisher_signed_is_not_served(
    hub: Any, publisher: Publisher, tmp_path: Path, case: str
) -> None:
    folder = tmp_path / "bundle"
    if case == "another publisher signed it":
        write_bundle(folder, make_publisher())
    else:
        write_bundle(folder, publisher)
        _replace_edgepack(folder)
    running = hub(agent_bundle=folder)
    for path in SERVED:
        answer = httpx.get(f"{running.url}{path}")
        assert answer.status_code == 404, (path, answer.text[:200])
        assert (
            "not an agent bundle signed by a publisher this hub trusts" in answer.json()["error"]["message"]
        )


def test_the_bundle_a_trusted_publisher_signed_is_served(
    hub: Any, publisher: Publisher, tmp_path: Path
) -> None:
    write_bundle(tmp_path / "bundle", publisher)
    running = hub(agent_bundle=tmp_path / "bundle")
    assert [httpx.get(f"{running.url}{path}").status_code for path in SERVED] == [200, 200, 200]
