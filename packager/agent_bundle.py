"""Build and check the agent bundle a hub serves to devices (``manifests.agent_bundle``).

Building (on the hub's machine, which reaches a package index): the ``edgepack`` wheel is made
from the project (``pip wheel``) or taken as given, then ``pip download`` fetches it with every
dependency and pip itself, as wheels only (nothing is compiled, nothing runs), for each device
architecture and the Python of Debian's ``python3``; ``bundle.json`` lists every wheel's size
and digest and is signed with a publisher key. Checking (on the device, after ``install.sh``):
the signature against the credentials' publisher keys, then every wheel of its architecture.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.agent_bundle import (
    DEVICE_EXTRAS,
    MAX_BUNDLE_JSON_BYTES,
    AgentBundle,
    BundleWheel,
    verify_agent_bundle,
)
from manifests.durable import write_durable
from manifests.errors import ConfigError, FetchError, TrustError
from manifests.signing import TrustStore, envelope_bytes, sign_payload
from packager.runtime_image.recipe import manylinux_platforms

BUNDLE_JSON = "bundle.json"
#: Debian bookworm's python3 and C library: what a device's bare system has.
DEVICE_PYTHON = "3.11"
DEVICE_GLIBC = (2, 36)
#: Debian architecture -> the machine name in wheel platform tags.
WHEEL_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class BundleSpec:
    out: Path
    key: Ed25519PrivateKey
    arches: tuple[str, ...] = ("amd64",)
    #: ONNX modules run by the process runtime need onnxruntime and numpy in the agent's venv
    extras: tuple[str, ...] = ("onnx",)
    project: Path | None = None
    wheel: Path | None = None


def _pip(args: list[str], *, what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise FetchError(f"{what} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


def default_project() -> Path | None:
    """The source tree this ``edgepack`` runs from, when it is one (an editable install)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


@contextlib.contextmanager
def _building(project: Path) -> Iterator[None]:
    """One wheel build from ``project`` at a time: setuptools builds in the tree (its
    ``build/`` and ``*.egg-info``), and two builds at once delete each other's files (two
    ``agent-bundle build`` from one checkout failed with "Failed to build one or more wheels")."""
    key = hashlib.sha256(str(project.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"edgepack-wheel-build-{key}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_edgepack_wheel(project: Path, dest: Path) -> Path:
    """The ``edgepack`` wheel of the source tree ``project``, written into ``dest``."""
    with _building(project):
        _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(project)],
             what=f"building the edgepack wheel from {project}")  # fmt: skip
    return next(dest.glob("edgepack-*.whl"))


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def build_agent_bundle(spec: BundleSpec) -> AgentBundle:
    """Write the bundle into ``spec.out`` (``bundle.json`` and one folder of wheels per
    architecture) and return what it signed."""
    unknown = sorted(set(spec.arches) - set(WHEEL_ARCH))
    if unknown or not spec.arches:
        given = ", ".join(unknown) or "(none)"
        raise ConfigError(f"architecture {given}: choose from {', '.join(WHEEL_ARCH)}")
    wrong = sorted(set(spec.extras) - set(DEVICE_EXTRAS))
    if wrong:
        raise ConfigError(f"extra {', '.join(wrong)}: a device installs only {', '.join(DEVICE_EXTRAS)}")
    with tempfile.TemporaryDirectory(prefix="edgepack-bundle-") as tmp:
        wheel = spec.wheel
        if wheel is None:
            project = spec.project or default_project()
            if project is None:
                raise ConfigError("no edgepack source tree here: pass --project DIR or --wheel FILE")
            wheel = build_edgepack_wheel(project, Path(tmp))
        elif not wheel.is_file():
            raise ConfigError(f"{wheel}: wheel not found")
        version = wheel.name.split("-")[1]
        extras = f"[{','.join(spec.extras)}]" if spec.extras else ""
        requirement = f"edgepack{extras} @ {wheel.resolve().as_uri()}"
        listed: dict[str, list[BundleWheel]] = {}
        for arch in spec.arches:
            folder = spec.out / arch
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            tags = manylinux_platforms(DEVICE_GLIBC, WHEEL_ARCH[arch])
            platforms = [a for tag in tags for a in ("--platform", tag)]
            _pip(
                ["download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
                 "--python-version", DEVICE_PYTHON, "--abi", "cp" + DEVICE_PYTHON.replace(".", ""),
                 *platforms, "--dest", str(folder), requirement, "pip"],
                what=f"pip download of the agent's wheels for {arch}",
            )  # fmt: skip
            listed[arch] = [
                BundleWheel(name=p.name, size=p.stat().st_size, digest=_digest(p))
                for p in sorted(folder.glob("*.whl"))
            ]
    bundle = AgentBundle(version=version, created=datetime.now(UTC).replace(microsecond=0),
                         python=DEVICE_PYTHON, extras=list(spec.extras), wheels=listed)  # fmt: skip
    envelope = sign_payload(bundle.model_dump(mode="json", by_alias=True), [spec.key])
    write_durable(spec.out / BUNDLE_JSON, envelope_bytes(envelope), mode=0o644)
    return bundle


def check_agent_bundle(folder: Path, trust: TrustStore, arch: str) -> AgentBundle:
    """The bundle in ``folder``, once its signature (by a key of ``trust``) and every wheel of
    ``arch`` (size and digest) were checked; :class:`TrustError` otherwise."""
    path = folder / BUNDLE_JSON
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BUNDLE_JSON_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    bundle = verify_agent_bundle(data, trust, source=str(path))
    wheels = bundle.wheels.get(arch)  # type: ignore[call-overload]
    if not wheels:
        raise TrustError(f"{path}: no wheels for {arch}")
    for wheel in wheels:
        file = folder / arch / wheel.name
        if not file.is_file() or file.stat().st_size != wheel.size or _digest(file) != wheel.digest:
            raise TrustError(f"{file}: not the wheel {path} signed (size or digest differs)")
    return bundle


def machine_arch() -> str:
    """This machine's Debian architecture name (``amd64``, ``arm64``)."""
    import platform

    machine = platform.machine()
    for arch, wheel_arch in WHEEL_ARCH.items():
        if machine in (arch, wheel_arch):
            return arch
    raise ConfigError(f"no agent bundle is built for machine {machine!r}; supported: {', '.join(WHEEL_ARCH)}")
