"""The agent bundle: the wheels a device installs the agent from, offline, served by the hub.

``bundle.json`` is a signed envelope (like ``module.json``) whose ``signed`` part is an
:class:`AgentBundle`: the ``edgepack`` version it installs, the Python it was built for and,
per device architecture, every wheel's name, size and digest. The hub serves it beside the
wheels (``GET /agent-bundle/...``) and its ``install.sh`` pins the digest of ``bundle.json``
itself and the publisher keys the hub trusts, so every byte a device installs is checked
before pip sees it: ``install.sh`` checks the signature (with Python's standard library and
the system's libcrypto) against the publisher keys of the device's credentials, or with a
token those it pins, before any of the bundle's code runs; the installed agent checks it again
(:func:`verify_agent_bundle`) before anything is configured or started.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from manifests.digests import DIGEST_PATTERN
from manifests.errors import TrustError
from manifests.signing import TrustStore, parse_envelope, verify_envelope

AGENT_BUNDLE_SCHEMA = "edgepack.agent-bundle/v1"
#: A wheel's file name: no folder, nothing a shell or a URL would read specially.
WHEEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl$"
#: Debian's names for the device architectures a bundle may carry.
ARCHES = ("amd64", "arm64")
#: The extras of ``edgepack`` a device may install with the agent (never the hub's).
DEVICE_EXTRAS = ("onnx", "docker")
#: The most wheels one architecture may list (the agent needs about 30).
MAX_WHEELS = 400
#: The largest ``bundle.json`` a device or the hub reads.
MAX_BUNDLE_JSON_BYTES = 1 << 20


class BundleWheel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=WHEEL_NAME_PATTERN)
    size: int = Field(ge=0, le=1 << 34)
    digest: str = Field(pattern=DIGEST_PATTERN)


class AgentBundle(BaseModel):
    """What ``edgepack hub agent-bundle build`` signed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["edgepack.agent-bundle/v1"] = Field(default="edgepack.agent-bundle/v1", alias="schema")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,62}$", description="edgepack's version")
    created: datetime
    python: str = Field(pattern=r"^3\.[0-9]{1,2}$", description="the Python the wheels are for")
    extras: list[Literal["onnx", "docker"]] = Field(
        default_factory=list, max_length=2, description="the extras of edgepack installed with it"
    )
    wheels: dict[Literal["amd64", "arm64"], list[BundleWheel]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_pip_one_edgepack_each(self) -> AgentBundle:
        for arch, wheels in self.wheels.items():
            if len(wheels) > MAX_WHEELS:
                raise ValueError(f"{arch}: {len(wheels)} wheels, more than {MAX_WHEELS}")
            names = [w.name for w in wheels]
            if len(set(names)) != len(names):
                raise ValueError(f"{arch}: a wheel is listed twice")
            for project in ("pip", "edgepack"):
                if sum(1 for n in names if _project(n) == project) != 1:
                    raise ValueError(f"{arch}: needs exactly one {project} wheel")
        return self

    def requirement(self) -> str:
        """What pip installs from the bundle: ``edgepack[onnx]==0.1.0``."""
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"edgepack{extras}=={self.version}"


def _project(wheel_name: str) -> str:
    return re.sub(r"[-_.]+", "-", wheel_name.split("-", 1)[0]).lower()


def verify_agent_bundle(data: bytes, trust: TrustStore, *, source: str = "bundle.json") -> AgentBundle:
    """The bundle ``data`` describes, once a key of ``trust`` is found to have signed it;
    :class:`TrustError` for anything else (nothing of it may be used then)."""
    if len(data) > MAX_BUNDLE_JSON_BYTES:
        raise TrustError(f"{source}: larger than {MAX_BUNDLE_JSON_BYTES} bytes")
    envelope = parse_envelope(data, what=source)
    verify_envelope(envelope, trust, what=source)
    try:
        return AgentBundle.model_validate(envelope.signed)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise TrustError(f"{source}: not an agent bundle ({where}: {err['msg']})") from None
