"""What the hub serves so that a device that reaches only the hub can install the agent:
``install.sh`` (rendered with this hub's URL and the digest of its agent bundle) and the bundle
that ``edgepack hub agent-bundle build`` wrote (docs/agent.md, "Install from the hub")."""

from __future__ import annotations

import hashlib
import shlex
from importlib.resources import files
from pathlib import Path

from pydantic import ValidationError

from cloud_hub.errors import NotFound
from manifests.agent_bundle import MAX_BUNDLE_JSON_BYTES, AgentBundle
from manifests.errors import TrustError
from manifests.signing import parse_envelope

BUNDLE_JSON = "bundle.json"
NO_BUNDLE = (
    "this hub serves no agent bundle: build one with 'edgepack hub agent-bundle build --out DIR' "
    "and start the hub with --agent-bundle DIR"
)


def read_bundle_json(folder: Path | None) -> bytes:
    """The bytes of the served ``bundle.json``, read afresh (a rebuilt bundle is served at
    once); :class:`NotFound` when the hub serves none."""
    if folder is None:
        raise NotFound(NO_BUNDLE)
    try:
        with (folder / BUNDLE_JSON).open("rb") as f:
            data = f.read(MAX_BUNDLE_JSON_BYTES + 1)
    except FileNotFoundError:
        raise NotFound(NO_BUNDLE) from None
    if len(data) > MAX_BUNDLE_JSON_BYTES:
        raise NotFound(f"{folder / BUNDLE_JSON} is larger than {MAX_BUNDLE_JSON_BYTES} bytes: not served")
    return data


def served_wheel(folder: Path | None, arch: str, name: str) -> Path:
    """The file of wheel ``name`` for ``arch``, only if the bundle lists it (so no request
    names any other file of the hub's disk)."""
    data = read_bundle_json(folder)
    assert folder is not None
    try:
        bundle = AgentBundle.model_validate(parse_envelope(data, what=BUNDLE_JSON).signed)
    except (TrustError, ValidationError):
        raise NotFound(f"{folder / BUNDLE_JSON} is not an agent bundle: not served") from None
    if not any(w.name == name for w in bundle.wheels.get(arch, [])):  # type: ignore[call-overload]
        raise NotFound(f"the agent bundle has no wheel {name!r} for {arch!r}")
    return folder / arch / name


def install_script(hub_url: str, bundle_json: bytes) -> str:
    """``install.sh`` for devices of the hub at ``hub_url``: it pins the digest of
    ``bundle_json``, so everything it installs is checked against what this hub serves now."""
    template = files("cloud_hub.install").joinpath("install.sh").read_text()
    digest = "sha256:" + hashlib.sha256(bundle_json).hexdigest()
    return template.replace("@HUB_URL@", shlex.quote(hub_url.rstrip("/"))).replace(
        "@BUNDLE_DIGEST@", shlex.quote(digest)
    )
