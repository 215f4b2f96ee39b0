"""Building a signed module bundle from an entry script, a model and a signing key.

The same inputs give the same bytes: files are sorted, the tar carries no owners or times,
``created`` comes from ``SOURCE_DATE_EPOCH`` or the newest input file, and Ed25519
signatures are deterministic.

:func:`assemble_module` signs the same manifest without writing a bundle, over model files
named by their digests (a model registered on the hub, whose bytes need not be here): the
SDK's ``Model.deploy`` then uploads only the source files the hub lacks.
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
    #: the model file or folder; None when :func:`assemble_module` is given the model's files
    model: Path | None
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


@dataclass
class AssembledModule:
    """A signed manifest and where each of its local files' bytes are (by digest)."""

    manifest: ModuleManifest
    manifest_bytes: bytes
    manifest_digest: str
    sources: dict[str, Path]


def spec_from_configs(
    *,
    name: str,
    version: str,
    model: Path | None,
    inference_config: InferenceConfig | None,
    ic_path: Path | None,
    entry_script: Path | None,
    source_dir: Path | None,
    deployment_config: DeploymentConfig | None,
    base_dir: Path | None = None,
) -> BuildSpec:
    """Resolve paths the way Azure ML does: relative to the inferenceconfig's folder (or
    ``base_dir``, where a config made in Python was made)."""
    base = ic_path.parent if ic_path else (base_dir or Path.cwd())
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
        model=model.resolve() if model is not None else None,
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
    if spec.model is not None and not spec.model.exists():
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
    model = spec.model.resolve() if spec.model is not None else None
    pairs: list[tuple[str, Path]] = []
    if spec.source_dir is not None:
        src_root = spec.source_dir.resolve()
        for p in _walk(src_root, skip):
            # A model inside the source folder stays there too: a script that loads it from
            # its own folder must find it. The bytes are one blob in the bundle all the same.
            pairs.append((f"{SRC_ROOT}/{p.relative_to(src_root).as_posix()}", p))
    else:
        pairs.append((f"{SRC_ROOT}/{spec.entry_script.name}", spec.entry_script))
    if model is None:
        pass  # the model's files are named by digest (assemble_module)
    elif model.is_dir():
        model_files = _walk(model, skip)
        if not model_files:
            raise ConfigError(f"{model}: model folder is empty")
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


def _hash_inputs(pairs: list[tuple[str, Path]], tick: Callable[[int], None]) -> list[_Input]:
    inputs: list[_Input] = []
    for mpath, src in pairs:
        size, digest = _hash_file(src, tick)
        inputs.append(_Input(mpath, src, size, digest))
    return inputs


def _entry_path(spec: BuildSpec, inputs: list[_Input]) -> str:
    entry_rel = spec.entry_script.resolve()
    entry = next((i.path for i in inputs if i.source.resolve() == entry_rel), None)
    if entry is None:
        raise ConfigError(f"{spec.entry_script}: entry script was excluded from the module")
    return entry


def _manifest(spec: BuildSpec, entry: str, files: list[FileEntry], created: datetime) -> ModuleManifest:
    try:
        return ModuleManifest(
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
            files=sorted(files, key=lambda f: f.path),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = ".".join(str(p) for p in err["loc"]) or "module"
        raise ConfigError(f"module {field_name}: {err['msg']}") from None


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
    if spec.model is None:
        raise ConfigError("a module bundle needs a model file or folder")
    pairs = collect_files(spec)
    total = sum(p.stat().st_size for _, p in pairs) * 2
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    inputs = _hash_inputs(pairs, tick)
    entry = _entry_path(spec, inputs)
    created = spec.created or _default_created([src for _, src in pairs])
    files = [FileEntry(path=i.path, size=i.size, digest=i.digest) for i in inputs]
    manifest = _manifest(spec, entry, files, created)
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


def assemble_module(
    spec: BuildSpec,
    key: Ed25519PrivateKey,
    model_files: list[FileEntry],
    *,
    progress: Callable[[int], None] | None = None,
) -> AssembledModule:
    """Sign the manifest of the module ``spec`` describes, without writing a bundle.

    The source files are hashed here; the model's files are ``model_files`` as given (paths
    under ``model/``, digests and sizes as the hub's registry lists them). ``spec.model`` must
    be None. ``progress(n)`` is called with the bytes of each chunk hashed.
    """
    if spec.model is not None:
        raise ConfigError("assemble_module takes the model's files, not a model path")
    pairs = collect_files(spec)
    inputs = _hash_inputs(pairs, progress or (lambda _n: None))
    entry = _entry_path(spec, inputs)
    created = spec.created or _default_created([src for _, src in pairs])
    files = [FileEntry(path=i.path, size=i.size, digest=i.digest) for i in inputs]
    manifest = _manifest(spec, entry, files + list(model_files), created)
    manifest_bytes = envelope_bytes(sign_payload(manifest.payload(), [key]))
    return AssembledModule(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        manifest_digest="sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
        sources={i.digest: i.source for i in inputs},
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
