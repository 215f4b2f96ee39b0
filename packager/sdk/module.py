"""``Module``: a signed module, built here (``.edgepack``) or held by the hub.

:meth:`Module.build` is ``edgepack build``, :meth:`Module.push` is ``edgepack push``;
``Module(hub, name, version)`` and :meth:`Module.list` read the hub's module registry.
"""

from __future__ import annotations

import builtins
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from manifests.bundle import write_bundle
from manifests.digests import digest_hex, sha256_digest
from manifests.errors import TrustError
from manifests.module import ModuleManifest
from manifests.signing import KEYID_PATTERN
from packager.build import build_module, spec_from_configs
from packager.files import atomic_output
from packager.home import default_key_path
from packager.keys import read_private_key
from packager.runtime_image.pinning import ImagePin, pin_base_image, pin_image
from packager.sdk.answers import Deleted, ModuleDetail, ModuleRecord, ModuleSigners, PushResult, SignerChange
from packager.sdk.blobs import download_blobs, read_chunks
from packager.sdk.configs import DeploymentConfig, InferenceConfig
from packager.sdk.errors import BadArgument
from packager.sdk.hub import Hub
from packager.sdk.model import check_name, string_map
from packager.sdk.progress import ProgressOption, Tracker, reporting


@dataclass(frozen=True)
class BuiltModule:
    """A module bundle written by :meth:`Module.build`."""

    path: Path
    manifest: ModuleManifest
    manifest_digest: str
    total_bytes: int
    #: how the docker runtime's image was pinned, when one was given
    image_pin: ImagePin | None = None


def split_ref(ref: str, what: str = "module") -> tuple[str, str]:
    """``"name:version"`` → ``("name", "version")``; anything else is a BadArgument."""
    if not isinstance(ref, str):
        raise BadArgument(f"{what} must be 'NAME:VERSION', not {type(ref).__name__}")
    name, sep, version = ref.partition(":")
    if not name or not sep or not version:
        raise BadArgument(f"{ref!r} is not NAME:VERSION")
    return name, version


class Module:
    """A module version on the hub: ``Module(hub, "digits", "1")``. Attributes ``name``,
    ``version``, ``id`` (``name:version``), ``manifest_digest``, ``files``, ``manifest``."""

    def __init__(self, workspace: Hub, name: str, version: str) -> None:
        check_name(name, "module")
        if not isinstance(version, str) or not version:
            raise BadArgument(f"Module {name}: version must be a non-empty string such as '1'")
        self.workspace = workspace
        self.record: ModuleRecord = ModuleDetail.of(
            workspace.transport.get(f"/api/v1/modules/{name}/versions/{version}")
        )

    @classmethod
    def _of(cls, workspace: Hub, record: ModuleRecord) -> Module:
        module = cls.__new__(cls)
        module.workspace, module.record = workspace, record
        return module

    @property
    def name(self) -> str:
        """The module's name."""
        return self.record.name

    @property
    def version(self) -> str:
        """Its version."""
        return self.record.version

    @property
    def id(self) -> str:
        """``name:version``."""
        return self.record.ref

    @property
    def manifest_digest(self) -> str:
        """The sha256 of its signed ``module.json``: what devices are told to run."""
        return self.record.manifest_digest

    @property
    def manifest(self) -> ModuleManifest:
        """The signed manifest (fetched once when this object came from a listing)."""
        if not isinstance(self.record, ModuleDetail):
            self.record = ModuleDetail.of(
                self.workspace.transport.get(f"/api/v1/modules/{self.name}/versions/{self.version}")
            )
        assert isinstance(self.record, ModuleDetail)
        return self.record.manifest

    def __repr__(self) -> str:
        return f"Module({self.id!r}, {self.manifest_digest[:19]}…)"

    @staticmethod
    def build(
        model_path: str | Path,
        name: str,
        version: str,
        inference_config: InferenceConfig | None = None,
        deployment_config: DeploymentConfig | None = None,
        *,
        entry_script: str | Path | None = None,
        source_directory: str | Path | None = None,
        key: str | Path | None = None,
        out_dir: str | Path = "dist",
        runtime_image: str | None = None,
        requirements: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
        created: datetime | None = None,
        progress: ProgressOption = None,
    ) -> BuiltModule:
        """Build and sign ``out_dir/NAME-VERSION.edgepack`` (``edgepack build``).

        The entry script comes from ``inference_config`` or ``entry_script`` (with
        ``source_directory``); ``runtime_image`` is recorded for the docker runtime, pinned to
        its digest when Docker can resolve a tag (``image_pin`` says how). Without it, the
        inference configuration's ``environment.docker.baseImage`` is the runtime image, and
        one that cannot be pinned is refused (``ConfigError``). The same inputs give the same
        bytes; nothing is written unless every input checks out.
        """
        if inference_config is not None and not isinstance(inference_config, InferenceConfig):
            raise BadArgument("Module.build: inference_config must be an InferenceConfig")
        if deployment_config is not None and not isinstance(deployment_config, DeploymentConfig):
            raise BadArgument("Module.build: deployment_config must be a DeploymentConfig")
        key_path = Path(key) if key is not None else default_key_path()
        signing_key = read_private_key(key_path)
        spec = spec_from_configs(
            name=name,
            version=version,
            model=Path(model_path),
            inference_config=inference_config.document if inference_config else None,
            ic_path=None,
            base_dir=inference_config.base_dir if inference_config else None,
            entry_script=Path(entry_script).resolve() if entry_script else None,
            source_dir=Path(source_directory).resolve() if source_directory else None,
            deployment_config=deployment_config.document if deployment_config else None,
        )
        pin = None
        base_image = inference_config.document.docker_image() if inference_config else None
        if runtime_image is not None:
            pin = pin_image(runtime_image)
        elif base_image is not None:
            pin = pin_base_image(base_image)
        if pin is not None:
            spec.image, spec.image_digest = pin.image, pin.digest
        spec.requirements += list(requirements)
        spec.tags = string_map(tags, "tags")
        spec.exclude.add(key_path)
        if created is not None:
            spec.created = created if created.tzinfo else created.astimezone()
        with reporting(progress) as report:
            tracker = Tracker(report, f"building {name}:{version}", None)
            result = build_module(spec, signing_key, Path(out_dir), progress=tracker.update)
        return BuiltModule(result.path, result.manifest, result.manifest_digest, result.total_bytes, pin)

    @staticmethod
    def push(workspace: Hub, path: str | Path, *, progress: ProgressOption = None) -> PushResult:
        """Upload a signed ``.edgepack``; the hub verifies every signature and digest before it
        stores anything. Pushing the very same module again changes nothing (``created``
        False); another module under the same name and version is refused."""
        bundle = Path(path)
        if not bundle.is_file():
            raise BadArgument(f"{bundle}: no such bundle; build one with 'edgepack build'")
        size = bundle.stat().st_size
        with reporting(progress if progress is not None else workspace.progress) as report:
            tracker = Tracker(report, "pushing", size)
            answer = workspace.transport.request(
                "POST",
                "/api/v1/modules",
                content=read_chunks(bundle, tracker.advance),
                headers={"Content-Length": str(size), "Content-Type": "application/vnd.edgepack.module+tar"},
            )
        return PushResult.of(answer.json())

    @staticmethod
    def list(workspace: Hub, name: str | None = None) -> builtins.list[Module]:
        """The modules on the hub (of one ``name``), oldest first."""
        if name is not None:
            check_name(name, "module")
        answer = workspace.transport.get("/api/v1/modules", params={"name": name} if name else None)
        return [Module._of(workspace, ModuleRecord.of(m)) for m in answer]

    def download(self, target_dir: str | Path = ".", *, progress: ProgressOption = None) -> Path:
        """Write this module as ``target_dir/NAME-VERSION.edgepack``, the very bytes
        ``edgepack build`` wrote (manifest and every blob checked against its digest)."""
        out = Path(target_dir)
        target = out / f"{self.name}-{self.version}.edgepack"
        transport = self.workspace.transport
        path = f"/api/v1/modules/{self.name}/versions/{self.version}"
        manifest_bytes = transport.request("GET", f"{path}/manifest").content
        if sha256_digest(manifest_bytes) != self.manifest_digest:
            raise TrustError(f"module {self.id}: the manifest served does not match its digest; try again")
        sizes = {f.digest: f.size for f in self.record.files}
        with (
            reporting(progress if progress is not None else self.workspace.progress) as report,
            tempfile.TemporaryDirectory(
                prefix=".edgepack-download-", dir=out if out.is_dir() else None
            ) as tmp,
        ):
            tracker = Tracker(report, "downloading", sum(sizes.values()))
            download_blobs(transport, [(d, Path(tmp) / digest_hex(d)) for d in sizes], tracker)
            blobs = [(d, size, _opener(Path(tmp) / digest_hex(d))) for d, size in sizes.items()]
            with atomic_output(target) as fh:
                write_bundle(fh, manifest_bytes, blobs)
        return target

    def delete(self) -> Deleted:
        """Delete this version (refused while a deployment uses it)."""
        answer = self.workspace.transport.request(
            "DELETE", f"/api/v1/modules/{self.name}/versions/{self.version}"
        )
        return Deleted.of(answer.json())

    # --- who may sign a module name (the hub's admin decides) ------------------------------

    @staticmethod
    def signers(workspace: Hub, name: str) -> ModuleSigners:
        """The keys that may sign new versions of module ``name``: the key that pushed it
        first (its owner) and the keys granted it."""
        check_name(name, "module")
        return ModuleSigners.of(workspace.transport.get(f"/api/v1/modules/{name}/signers"))

    @staticmethod
    def grant(workspace: Hub, name: str, keyid: str) -> SignerChange:
        """Let ``keyid`` (a publisher key the hub trusts) sign versions of module ``name`` too;
        the hub records it as an event, and the devices running the name are told."""
        check_name(name, "module")
        path = f"/api/v1/modules/{name}/signers/{_check_keyid(keyid)}"
        return SignerChange.of(workspace.transport.send("PUT", path))

    @staticmethod
    def revoke(workspace: Hub, name: str, keyid: str) -> SignerChange:
        """Withdraw a grant: new versions signed only by ``keyid`` are refused, by the hub and by
        the devices (the owner's key cannot be revoked)."""
        check_name(name, "module")
        path = f"/api/v1/modules/{name}/signers/{_check_keyid(keyid)}"
        return SignerChange.of(workspace.transport.send("DELETE", path))


def _check_keyid(keyid: object) -> str:
    if not isinstance(keyid, str) or not re.fullmatch(KEYID_PATTERN, keyid):
        raise BadArgument(
            f"key id {keyid!r} is invalid: 64 lowercase hex characters, as 'edgepack keygen' "
            "printed (or the hub's refusal of a push names it)"
        )
    return keyid


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")
