"""The API docs work offline: every asset /docs loads comes from the hub itself."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.hub.conftest import HubFactory

pytestmark = pytest.mark.sql_independent


def test_docs_page_loads_only_assets_the_hub_serves(hub: HubFactory) -> None:
    h = hub()
    page = httpx.get(f"{h.url}/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    for asset in assets:
        assert asset.startswith("/"), f"/docs loads {asset} from another origin"
        assert httpx.get(f"{h.url}{asset}").status_code == 200, asset
    spec = httpx.get(f"{h.url}/openapi.json").json()
    assert "/api/v1/modules" in spec["paths"]
