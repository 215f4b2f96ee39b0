"""What the hub serves so that a device that reaches only the hub can install the agent:
``install.sh`` (rendered with this hub's URL and the digest of its agent bundle) and the bundle
that ``edgepack hub agent-bundle build`` wrote (docs/agent.md, "Install from the hub")."""

from __future__ import annotations

import hashlib
import logging
import shlex
from importlib.resources import files
from pathlib import Path

from cloud_hub.errors import NotFound
from manifests.agent_bundle import MAX_BUNDLE_JSON_BYTES, AgentBundle, verify_agent_bundle
from manifests.errors import TrustError
from manifests.signing import TrustStore

log = logging.getLogger(__name__)

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


def trusted_bundle(folder: Path | None, trust: TrustStore) -> tuple[bytes, AgentBundle]:
    """The served ``bundle.json`` and what it says, once a publisher key this hub trusts is
    found to have signed it; :class:`NotFound` otherwise. The device checks that signature
    too, before any of its code runs; a bundle replaced on the hub's disk is stopped here
    already, before an ``install.sh`` pins it."""
    data = read_bundle_json(folder)
    assert folder is not None
    try:
        return data, verify_agent_bundle(data, trust, source=str(folder / BUNDLE_JSON))
    except TrustError as exc:
        log.warning("agent bundle not served: %s", exc)
        raise NotFound(
            f"{folder / BUNDLE_JSON} is not an agent bundle signed by a publisher this hub trusts: "
            "not served (rebuild it with 'edgepack hub agent-bundle build')"
        ) from None


def served_wheel(folder: Path | None, trust: TrustStore, arch: str, name: str) -> Path:
    """The file of wheel ``name`` for ``arch``, only if the trusted bundle lists it (so no
    request names any other file of the hub's disk)."""
    _, bundle = trusted_bundle(folder, trust)
    assert folder is not None
    if not any(w.name == name for w in bundle.wheels.get(arch, [])):  # type: ignore[call-overload]
        raise NotFound(f"the agent bundle has no wheel {name!r} for {arch!r}")
    return folder / arch / name


def install_script(hub_url: str, bundle_json: bytes, trust: TrustStore) -> str:
    """``install.sh`` for devices of the hub at ``hub_url``: it pins the digest of
    ``bundle_json``, so everything it installs is checked against what this hub serves now,
    and the publisher keys of ``trust``, which check the bundle's signature on a device that
    has no credentials file yet (one that joins with a token)."""
    template = files("cloud_hub.install").joinpath("install.sh").read_text()
    digest = "sha256:" + hashlib.sha256(bundle_json).hexdigest()
    values = {
        "@HUB_URL@": hub_url.rstrip("/"),
        "@BUNDLE_DIGEST@": digest,
        "@PUBLISHERS@": trust.model_dump_json(),
    }
    for name, value in values.items():
        template = template.replace(name, shlex.quote(value))
    return template
