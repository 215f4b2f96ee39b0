"""Signed modules, bundles and desired states, sound or with one chosen defect.

A real system in miniature, as python-tuf's ``RepositorySimulator`` is for TUF: real Ed25519
keys, real canonical-JSON signatures, real tar archives. Tests of the packager, the hub and
the agent ask it for a good artefact or for one that carries exactly the defect an attacker
or a broken disk would produce, and check that the part under test refuses it and names why.

    forge = Forge()
    good = forge.bundle()                         # bytes of a valid .edgepack
    bad = forge.bundle(Defect.SYMLINK)            # the same module with a symlink member
    verify_bundle(io.BytesIO(bad), forge.trust)   # raises TrustError naming Defect.SYMLINK.reason
    state = forge.desired_bytes(forge.desired_state("dev-1", 7, [forge.assignment(...)]))
    stale = forge.bad_desired(DesiredDefect.REPLAYED, device_id="dev-1", applied_generation=7)
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.bundle import BLOB_PREFIX, MANIFEST_NAME
from manifests.canonical import canonical_json
from manifests.desired import (
    MAX_DESIRED_BYTES,
    DeploymentSettings,
    DesiredRefusal,
    DesiredState,
    ModuleAssignment,
    RuntimeKind,
)
from manifests.digests import digest_hex, sha256_digest
from manifests.module import FileEntry, ModuleManifest
from manifests.signing import (
    Envelope,
    Signature,
    TrustStore,
    envelope_bytes,
    generate_private_key,
    key_id,
    parse_envelope,
    sign_payload,
)

#: A fixed creation time, so that the same forge call always gives the same bytes.
CREATED = datetime(2026, 1, 1, tzinfo=UTC)

#: A stock Azure-ML-style entry script that needs nothing beyond the standard library:
#: init() reads the model file, run() multiplies the posted numbers by its factor.
SCORE_PY = b'''\
import json
import os

factor = None


def init():
    global factor
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.json")) as fh:
        factor = json.load(fh)["factor"]


def run(raw_data):
    data = json.loads(raw_data)["data"]
    return {"result": [x * factor for x in data]}
'''

#: An entry script whose init() fails, for tests of crash handling and rollback.
FAILING_SCORE_PY = b'''\
def init():
    raise RuntimeError("model could not be loaded")


def run(raw_data):
    return raw_data
'''


def default_files(factor: int = 2) -> dict[str, bytes]:
    """The files of a small working module: an entry script and a one-number model."""
    return {
        "src/score.py": SCORE_PY,
        "model/model.json": canonical_json({"factor": factor}),
    }


class Defect(StrEnum):
    """One thing wrong with a bundle; :attr:`reason` is what a refusal must mention."""

    TAMPERED_BYTE = "tampered-byte"  # one byte of a blob changed after signing
    TAMPERED_MANIFEST = "tampered-manifest"  # the signed payload changed after signing
    ADDED_MEMBER = "added-member"  # a blob the manifest does not name
    REMOVED_MEMBER = "removed-member"  # a blob the manifest names is absent
    DOTDOT_PATH = "dotdot-path"  # a member named ../something
    ABSOLUTE_PATH = "absolute-path"  # a member named /etc/something
    SYMLINK = "symlink"  # a symbolic-link member
    HARDLINK = "hardlink"  # a hard-link member
    UNTRUSTED_KEY = "untrusted-key"  # signed only by a key the verifier does not trust
    WRONG_KEY = "wrong-key"  # carries a trusted key id, but another key made the signature
    UNSIGNED = "unsigned"  # module.json has no signatures at all
    DUPLICATE_BLOB = "duplicate-blob"  # the same blob stored twice
    OVERSIZE = "oversize"  # a blob member larger than the manifest says
    MANIFEST_NOT_FIRST = "manifest-not-first"  # a blob before module.json
    UNSAFE_MANIFEST_PATH = "unsafe-manifest-path"  # the signed file list names ../../x

    @property
    def reason(self) -> str:
        return _REASONS[self]


_REASONS: dict[Defect, str] = {
    Defect.TAMPERED_BYTE: "does not match its digest",
    Defect.TAMPERED_MANIFEST: "does not match the content",
    Defect.ADDED_MEMBER: "not named by the signed manifest",
    Defect.REMOVED_MEMBER: "is missing",
    Defect.DOTDOT_PATH: "unsafe path",
    Defect.ABSOLUTE_PATH: "unsafe path",
    Defect.SYMLINK: "symlink",
    Defect.HARDLINK: "hard link",
    Defect.UNTRUSTED_KEY: "untrusted key",
    Defect.WRONG_KEY: "does not match the content",
    Defect.UNSIGNED: "not a signed envelope",
    Defect.DUPLICATE_BLOB: "appears twice",
    Defect.OVERSIZE: "the manifest says",
    Defect.MANIFEST_NOT_FIRST: "expected module.json",
    Defect.UNSAFE_MANIFEST_PATH: "unsafe path",
}


class DesiredDefect(StrEnum):
    """One thing wrong with a desired state as a device receives it."""

    OTHER_DEVICE = "other-device"  # addressed to another device
    REPLAYED = "replayed"  # generation not newer than the one applied
    EXPIRED = "expired"  # past its expiry
    UNTRUSTED_KEY = "untrusted-key"  # signed by a key the agent does not trust
    TAMPERED = "tampered"  # generation raised after signing
    UNSIGNED = "unsigned"  # no signatures at all
    MALFORMED = "malformed"  # correctly signed, but the payload breaks the contract
    NOT_JSON = "not-json"  # bytes that are no JSON at all
    OVERSIZE = "oversize"  # a signed state far larger than any real one
    DEEPLY_NESTED = "deeply-nested"  # 100,000 nested arrays: deeper than any parser's stack

    @property
    def reason(self) -> str:
        return _DESIRED_REASONS[self]

    @property
    def refusal(self) -> DesiredRefusal:
        """The check of ``manifests.desired.verify_desired`` that must refuse it."""
        return _DESIRED_REFUSALS[self]


_DESIRED_REASONS: dict[DesiredDefect, str] = {
    DesiredDefect.OTHER_DEVICE: "is for device",
    DesiredDefect.REPLAYED: "not newer than the applied generation",
    DesiredDefect.EXPIRED: "expired",
    DesiredDefect.UNTRUSTED_KEY: "untrusted key",
    DesiredDefect.TAMPERED: "does not match the content",
    DesiredDefect.UNSIGNED: "not a signed envelope",
    DesiredDefect.MALFORMED: "signed but invalid",
    DesiredDefect.NOT_JSON: "not valid JSON",
    DesiredDefect.OVERSIZE: "exceeds",
    DesiredDefect.DEEPLY_NESTED: "nests deeper than",
}

_DESIRED_REFUSALS: dict[DesiredDefect, DesiredRefusal] = {
    DesiredDefect.OTHER_DEVICE: DesiredRefusal.OTHER_DEVICE,
    DesiredDefect.REPLAYED: DesiredRefusal.NOT_NEWER,
    DesiredDefect.EXPIRED: DesiredRefusal.EXPIRED,
    DesiredDefect.UNTRUSTED_KEY: DesiredRefusal.HUB_SIGNATURE,
    DesiredDefect.TAMPERED: DesiredRefusal.HUB_SIGNATURE,
    DesiredDefect.UNSIGNED: DesiredRefusal.MALFORMED,
    DesiredDefect.MALFORMED: DesiredRefusal.MALFORMED,
    DesiredDefect.NOT_JSON: DesiredRefusal.MALFORMED,
    DesiredDefect.OVERSIZE: DesiredRefusal.MALFORMED,
    DesiredDefect.DEEPLY_NESTED: DesiredRefusal.MALFORMED,
}


@dataclass
class Member:
    """One tar member as the forge will write it."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


@dataclass
class ModuleParts:
    """A signed module taken apart, the way a hub stores it and an agent fetches it."""

    manifest: ModuleManifest
    manifest_bytes: bytes
    blobs: dict[str, bytes]

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest_bytes)


@dataclass
class Forge:
    """Keys plus builders of signed artefacts. ``publisher`` signs modules, ``hub`` signs
    desired states, ``stranger`` is a key nobody trusts."""

    publisher: Ed25519PrivateKey = field(default_factory=generate_private_key)
    hub: Ed25519PrivateKey = field(default_factory=generate_private_key)
    stranger: Ed25519PrivateKey = field(default_factory=generate_private_key)

    @property
    def trust(self) -> TrustStore:
        """The trust store of a verifier that trusts the publisher."""
        return TrustStore().with_key(self.publisher.public_key(), name="publisher")

    @property
    def hub_trust(self) -> TrustStore:
        """The trust store of an agent that trusts the hub."""
        return TrustStore().with_key(self.hub.public_key(), name="hub")

    # --- modules -----------------------------------------------------------------------------

    def manifest(
        self,
        *,
        name: str = "demo",
        version: str = "1",
        files: Mapping[str, bytes] | None = None,
        entry_script: str = "src/score.py",
        created: datetime = CREATED,
        **extra: Any,
    ) -> ModuleManifest:
        contents = default_files() if files is None else files
        entries = [
            FileEntry(path=p, size=len(data), digest=sha256_digest(data))
            for p, data in sorted(contents.items())
        ]
        return ModuleManifest(
            name=name,
            version=version,
            created=created,
            entry_script=entry_script,
            files=entries,
            **extra,
        )

    def module(
        self,
        *,
        keys: list[Ed25519PrivateKey] | None = None,
        files: Mapping[str, bytes] | None = None,
        **manifest_args: Any,
    ) -> ModuleParts:
        """A correctly signed module as manifest bytes plus blobs by digest."""
        contents = default_files() if files is None else dict(files)
        manifest = self.manifest(files=contents, **manifest_args)
        envelope = sign_payload(manifest.payload(), keys or [self.publisher])
        blobs = {sha256_digest(data): data for data in contents.values()}
        return ModuleParts(manifest=manifest, manifest_bytes=envelope_bytes(envelope), blobs=blobs)

    def bundle(
        self,
        defect: Defect | None = None,
        *,
        files: Mapping[str, bytes] | None = None,
        **manifest_args: Any,
    ) -> bytes:
        """The bytes of a ``.edgepack`` bundle, valid unless ``defect`` is given."""
        contents = default_files() if files is None else dict(files)
        manifest_bytes = self._manifest_bytes(defect, contents, manifest_args)
        members = [Member(MANIFEST_NAME, manifest_bytes)]
        for digest, data in sorted({sha256_digest(d): d for d in contents.values()}.items()):
            members.append(Member(BLOB_PREFIX + digest_hex(digest), data))
        return tar_bytes(_apply(defect, members))

    def _manifest_bytes(
        self, defect: Defect | None, contents: dict[str, bytes], manifest_args: dict[str, Any]
    ) -> bytes:
        payload = self.manifest(files=contents, **manifest_args).payload()
        if defect is Defect.UNSAFE_MANIFEST_PATH:
            # Built as a plain dict: the model would refuse the path before it is signed.
            first = payload["files"][0]
            payload["files"].insert(0, {**first, "path": "model/../../etc/cron.d/evil"})
        if defect is Defect.UNTRUSTED_KEY:
            envelope = sign_payload(payload, [self.stranger])
        elif defect is Defect.WRONG_KEY:
            forged = self.stranger.sign(canonical_json(payload)).hex()
            envelope = Envelope(
                signed=payload,
                signatures=[Signature(keyid=key_id(self.publisher.public_key()), sig=forged)],
            )
        else:
            envelope = sign_payload(payload, [self.publisher])
        if defect is Defect.TAMPERED_MANIFEST:
            envelope.signed["description"] = "changed after signing"
        if defect is Defect.UNSIGNED:
            return canonical_json({"signed": payload, "signatures": []})
        return envelope_bytes(envelope)

    # --- desired state -----------------------------------------------------------------------

    def assignment(
        self,
        parts: ModuleParts,
        *,
        service: str | None = None,
        port: int = 8890,
        runtime: RuntimeKind = RuntimeKind.PROCESS,
        signers: list[str] | None = None,
        **settings: Any,
    ) -> ModuleAssignment:
        """One service on a device, running the module ``parts``.

        ``signers`` are the key ids the state allows to sign the module, by default the keys
        that did sign it (as the hub names the owner); name others to forge a state whose
        module is signed by a key it does not allow."""
        signed_by = [s.keyid for s in parse_envelope(parts.manifest_bytes).signatures]
        return ModuleAssignment(
            service=service or parts.manifest.name,
            module=parts.manifest.name,
            version=parts.manifest.version,
            manifest_digest=parts.manifest_digest,
            settings=DeploymentSettings(port=port, runtime=runtime, **settings),
            signers=signed_by if signers is None else signers,
        )

    def desired_state(
        self,
        device_id: str = "device-1",
        generation: int = 1,
        modules: list[ModuleAssignment] | None = None,
        *,
        issued: datetime | None = None,
        expires_in: timedelta = timedelta(hours=1),
    ) -> DesiredState:
        """A desired state; pass an old ``issued`` and a short ``expires_in`` for an expired one."""
        start = issued or datetime.now(UTC)
        return DesiredState(
            device_id=device_id,
            generation=generation,
            issued=start,
            expires=start + expires_in,
            modules=modules or [],
        )

    def desired_bytes(
        self,
        state: DesiredState,
        *,
        key: Ed25519PrivateKey | None = None,
        tamper: bool = False,
    ) -> bytes:
        """The signed envelope bytes as the hub publishes them (``key`` defaults to the hub's).

        ``tamper=True`` raises the generation after signing, as a forger would.
        """
        envelope = sign_payload(state.model_dump(mode="json", by_alias=True), [key or self.hub])
        if tamper:
            envelope.signed["generation"] = state.generation + 1000
        return envelope_bytes(envelope)


    def bad_desired(
        self,
        defect: DesiredDefect,
        *,
        device_id: str = "device-1",
        applied_generation: int = 1,
        modules: list[ModuleAssignment] | None = None,
        now: datetime | None = None,
    ) -> bytes:
        """Signed desired-state bytes that a device ``device_id`` which applied
        ``applied_generation`` must refuse, for the reason ``defect.reason``."""
        start = now or datetime.now(UTC)
        newer = applied_generation + 1
        state = self.desired_state(device_id, newer, modules, issued=start)
        match defect:
            case DesiredDefect.OTHER_DEVICE:
                state = self.desired_state(f"not-{device_id}"[:63], newer, modules, issued=start)
            case DesiredDefect.REPLAYED:
                state = self.desired_state(device_id, applied_generation, modules, issued=start)
            case DesiredDefect.EXPIRED:
                state = self.desired_state(
                    device_id, newer, modules,
                    issued=start - timedelta(hours=2), expires_in=timedelta(hours=1),
                )  # fmt: skip
            case DesiredDefect.UNTRUSTED_KEY:
                return self.desired_bytes(state, key=self.stranger)
            case DesiredDefect.TAMPERED:
                return self.desired_bytes(state, tamper=True)
            case DesiredDefect.UNSIGNED:
                payload = state.model_dump(mode="json", by_alias=True)
                return canonical_json({"signed": payload, "signatures": []})
            case DesiredDefect.MALFORMED:
                payload = state.model_dump(mode="json", by_alias=True)
                payload["generation"] = -1  # signed as a dict: the model would refuse it
                return envelope_bytes(sign_payload(payload, [self.hub]))
            case DesiredDefect.NOT_JSON:
                return b"\x00not json{"
            case DesiredDefect.OVERSIZE:
                payload = state.model_dump(mode="json", by_alias=True)
                payload["padding"] = "x" * (MAX_DESIRED_BYTES + 1)
                return envelope_bytes(sign_payload(payload, [self.hub]))
            case DesiredDefect.DEEPLY_NESTED:
                depth = 100_000  # 200 kB: within every size limit on the way
                return b'{"signed": ' + b"[" * depth + b"]" * depth + b', "signatures": []}'
        return self.desired_bytes(state)


def _apply(defect: Defect | None, members: list[Member]) -> list[Member]:
    """Members of a sound bundle, changed to carry ``defect`` (member-level defects only)."""
    manifest, blobs = members[0], members[1:]
    match defect:
        case Defect.TAMPERED_BYTE:
            victim = blobs[0]
            flipped = bytes([victim.data[0] ^ 0x01]) + victim.data[1:]
            return [manifest, replace(victim, data=flipped), *blobs[1:]]
        case Defect.ADDED_MEMBER:
            extra = b"not part of the module"
            return [*members, Member(BLOB_PREFIX + digest_hex(sha256_digest(extra)), extra)]
        case Defect.REMOVED_MEMBER:
            return [manifest, *blobs[1:]]
        case Defect.DOTDOT_PATH:
            return [*members, Member("blobs/sha256/../../../evil.sh", b"#!/bin/sh\n")]
        case Defect.ABSOLUTE_PATH:
            return [*members, Member("/etc/cron.d/evil", b"* * * * * root sh\n")]
        case Defect.SYMLINK:
            return [*members, Member("blobs/sha256/link", kind=tarfile.SYMTYPE, linkname="/etc")]
        case Defect.HARDLINK:
            return [
                *members,
                Member("blobs/sha256/hard", kind=tarfile.LNKTYPE, linkname="/etc/shadow"),
            ]
        case Defect.DUPLICATE_BLOB:
            return [*members, blobs[0]]
        case Defect.OVERSIZE:
            return [manifest, replace(blobs[0], data=blobs[0].data + b"\0" * 4096), *blobs[1:]]
        case Defect.MANIFEST_NOT_FIRST:
            return [*blobs, manifest]
    return members


def tar_bytes(members: list[Member]) -> bytes:
    """An uncompressed tar with fixed owners and times, member names taken verbatim."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.linkname = m.linkname
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    return out.getvalue()
