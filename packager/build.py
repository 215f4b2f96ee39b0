"""Building a signed module bundle from an entry script, a model and a signing key.

The same inputs give the same bytes: files are sorted, the tar carries no owners or times,
``created`` comes from ``SOURCE_DATE_EPOCH`` or the newest input file, and Ed25519
signatures are deterministic.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from manifests.azureml import DeploymentConfig, InferenceConfig
from manifests.bundle import CHUNK, write_bundle
from manifests.errors import ConfigError
from manifests.module import (
    MODEL_ROOT,
    SRC_ROOT,
    FileEntry,
    ModuleManifest,
    PythonRuntime,
    Resources,
    Runtime,
)
from manifests.signing import envelope_bytes, sign_payload
from packager.files import atomic_output

DEFAULT_IMAGE = "edgepack/runtime:py311"
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", "dist", ".edgepack-cache",
              ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".edgepack", ".key"}


@dataclass
class BuildSpec:
    """Everything a build needs, already resolved to absolute paths."""

    name: str
    version: str
    entry_script: Path
    model: Path
    source_dir: Path | None = None
    description: str = ""
    image: str = DEFAULT_IMAGE
    #: the manifest digest that pins ``image`` (``sha256:…``), when known
    image_digest: str | None = None
    requirements: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    exclude: set[Path] = field(default_factory=set)


@dataclass
class _Input:
    path: str  # inside the module
    source: Path
    size: int
    digest: str


@dataclass
class BuildResult:
    path: Path
    manifest: ModuleManifest
    manifest_digest: str
    total_bytes: int


def spec_from_configs(
    *,
    name: str,
    version: str,
    model: Path,
    inference_config: InferenceConfig | None,
    ic_path: Path | None,
    entry_script: Path | None,
    source_dir: Path | None,
    deployment_config: DeploymentConfig | None,
) -> BuildSpec:
    """Resolve paths the way Azure ML does: relative to the inferenceconfig's folder."""
    base = ic_path.parent if ic_path else Path.cwd()
    if inference_config is not None:
        if inference_config.source_directory and source_dir is None:
            source_dir = (base / inference_config.source_directory).resolve()
        if entry_script is None:
            entry_script = ((source_dir or base) / inference_config.entry_script).resolve()
    if entry_script is None:
        raise ConfigError("no entry script: pass --inference-config or --entry-script")
    resources = Resources()
    res = deployment_config.container_resource_requirements if deployment_config else None
    if res is not None:
        resources = Resources(
            cpu=res.cpu or resources.cpu,
            memory_mb=int(res.memory_in_gb * 1024) if res.memory_in_gb else resources.memory_mb,
        )
    return BuildSpec(
        name=name,
        version=version,
        entry_script=entry_script,
        model=model.resolve(),
        source_dir=source_dir,
        description=(inference_config.description or "") if inference_config else "",
        requirements=inference_config.pip_requirements() if inference_config else [],
        environment=inference_config.environment_variables() if inference_config else {},
        resources=resources,
    )


def _check_inputs(spec: BuildSpec) -> None:
    if not spec.entry_script.is_file():
        raise ConfigError(f"{spec.entry_script}: entry script not found")
    if spec.source_dir is not None:
        if not spec.source_dir.is_dir():
            raise ConfigError(f"{spec.source_dir}: source directory not found")
        if not spec.entry_script.resolve().is_relative_to(spec.source_dir.resolve()):
            raise ConfigError(
                f"{spec.entry_script}: entry script must lie inside the source directory "
                f"{spec.source_dir}"
            )
    if not spec.model.exists():
        raise ConfigError(f"{spec.model}: model file or folder not found")


def _walk(root: Path, skip: set[Path]) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if p.suffix in _SKIP_SUFFIXES or p.resolve() in skip:
                continue
            if p.is_symlink():
                raise ConfigError(f"{p}: symbolic links are not packed; copy the file instead")
            _check_packable(p)
            out.append(p)
    return out


#: PEM and OpenSSH private keys all carry this in their armour line.
_PRIVATE_KEY_MARK = b"PRIVATE KEY-----"


def _check_packable(path: Path) -> None:
    """Refuse what must not (or cannot) go into a module: a private key, a FIFO or device,
    a file that cannot be read. Opening a FIFO would block the build forever."""
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a pipe, socket or device); remove it from the folder")
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); fix or remove it") from None
    if _PRIVATE_KEY_MARK in head:
        raise ConfigError(
            f"{path}: looks like a private key and would be shipped to every device; "
            "move it out of the source and model folders"
        )


def collect_files(spec: BuildSpec) -> list[tuple[str, Path]]:
    """(module path, source file) pairs, sorted by module path."""
    _check_inputs(spec)
    skip = {p.resolve() for p in spec.exclude}
    model = spec.model.resolve()
    pairs: list[tuple[str, Path]] = []
    if spec.source_dir is not None:
        src_root = spec.source_dir.resolve()
        for p in _walk(src_root, skip):
            if p.resolve() == model or p.resolve().is_relative_to(model):
                continue  # the model goes under model/, not twice
            pairs.append((f"{SRC_ROOT}/{p.relative_to(src_root).as_posix()}", p))
    else:
        pairs.append((f"{SRC_ROOT}/{spec.entry_script.name}", spec.entry_script))
    if model.is_dir():
        model_files = _walk(model, skip)
        if not model_files:
            raise ConfigError(f"{spec.model}: model folder is empty")
        for p in model_files:
            rel = p.relative_to(model.parent).as_posix()
            pairs.append((f"{MODEL_ROOT}/{rel}", p))
    else:
        pairs.append((f"{MODEL_ROOT}/{model.name}", model))
    pairs.sort()
    return pairs


def _hash_file(path: Path, progress: Callable[[int], None] | None) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return size, "sha256:" + h.hexdigest()


def build_module(
    spec: BuildSpec,
    key: Ed25519PrivateKey,
    out_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Hash, sign and write ``out_dir/<name>-<version>.edgepack``.

    ``progress(done, total)`` is called as bytes are hashed and written (total counts both).
    Nothing is written until every input has been checked; a failure leaves no file behind.
    """
    pairs = collect_files(spec)
    total = sum(p.stat().st_size for _, p in pairs) * 2
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    inputs: list[_Input] = []
    for mpath, src in pairs:
        size, digest = _hash_file(src, tick)
        inputs.append(_Input(mpath, src, size, digest))
    entry_rel = spec.entry_script.resolve()
    entry = next((i.path for i in inputs if i.source.resolve() == entry_rel), None)
    if entry is None:
        raise ConfigError(f"{spec.entry_script}: entry script was excluded from the module")
    created = spec.created or _default_created([src for _, src in pairs])
    try:
        manifest = ModuleManifest(
            name=spec.name,
            version=spec.version,
            created=created,
            description=spec.description,
            entry_script=entry,
            runtime=Runtime(
                image=spec.image,
                image_digest=spec.image_digest,
                python=PythonRuntime(requirements=spec.requirements),
                environment=spec.environment,
            ),
            resources=spec.resources,
            tags=spec.tags,
            files=[FileEntry(path=i.path, size=i.size, digest=i.digest) for i in inputs],
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = ".".join(str(p) for p in err["loc"]) or "module"
        raise ConfigError(f"module {field_name}: {err['msg']}") from None
    envelope = sign_payload(manifest.payload(), [key])
    manifest_bytes = envelope_bytes(envelope)
    blobs: dict[str, tuple[str, int, Callable[[], IO[bytes]]]] = {}
    for i in inputs:
        blobs.setdefault(i.digest, (i.digest, i.size, _opener(i.source)))
    # Duplicated content is written once, so progress must not wait for the copies.
    total -= sum(i.size for i in inputs) - sum(b[1] for b in blobs.values())
    out_path = out_dir / f"{spec.name}-{spec.version}.edgepack"
    with atomic_output(out_path) as fh:
        write_bundle(fh, manifest_bytes, list(blobs.values()), progress=tick)
    return BuildResult(
        path=out_path,
        manifest=manifest,
        manifest_digest="sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
        total_bytes=out_path.stat().st_size,
    )


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def _default_created(sources: list[Path]) -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), tz=UTC)
        except ValueError:
            raise ConfigError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number") from None
    newest = max(int(p.stat().st_mtime) for p in sources)
    return datetime.fromtimestamp(newest, tz=UTC)
