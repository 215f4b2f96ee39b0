"""``GET /install.sh`` and ``GET /agent-bundle/...``: a device installs the agent from the hub.

No token: a device has none yet when it installs, and what is served is public code: only a
bundle signed by a publisher this hub trusts, checked on the device against the digest the
script pins and the signature its credentials trust.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from cloud_hub.api.deps import Core
from cloud_hub.install import install_script, served_wheel, trusted_bundle

router = APIRouter(tags=["install"])


@router.get("/install.sh", response_class=Response)
async def get_install_script(core: Core) -> Response:
    data, _ = trusted_bundle(core.settings.agent_bundle_dir(), core.trust)
    script = install_script(core.settings.base_url(), data, core.trust)
    return Response(script, media_type="text/x-shellscript; charset=utf-8")


@router.get("/agent-bundle/bundle.json", response_class=Response)
async def get_bundle_json(core: Core) -> Response:
    data, _ = trusted_bundle(core.settings.agent_bundle_dir(), core.trust)
    return Response(data, media_type="application/json")


@router.get("/agent-bundle/{arch}/{name}", response_class=FileResponse)
async def get_wheel(arch: str, name: str, core: Core) -> FileResponse:
    path = served_wheel(core.settings.agent_bundle_dir(), core.trust, arch, name)
    return FileResponse(path, media_type="application/octet-stream")
