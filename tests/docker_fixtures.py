"""A real Docker Engine, a real container registry and the real runtime image, for any test
package (star-import it into a ``conftest.py``: ``from tests.docker_fixtures import *``).

- ``docker_engine`` (session): a ``docker.DockerClient`` that answered a ping. No engine fails
  the test with what to do (``bash scripts/test.sh`` starts ``dockerd``); it never skips.
  At the end it removes every container a test labelled with ``docker_labels`` and left.
- ``docker_labels`` (session): labels to put on every container a test starts, so a test
  that dies cannot leave one running past the session.
- ``registry`` (session, so one per xdist worker): Debian's ``docker-registry`` serving a
  generated config with tmp storage on an ephemeral loopback port. The engine pushes to and
  pulls from it over plain HTTP, as it does for any registry on 127.0.0.0/8.
- ``runtime_image`` (session): the runtime image built by the code of
  ``edgepack runtime-image build`` and pushed to this worker's ``registry``; a
  :class:`PushedRuntimeImage` with the pinned reference and the local image id. The base is
  cached in the engine by its input hash, across sessions and workers; the cache folder's
  lock makes a second worker (or a second checkout's tests) wait instead of building it too.
  A fresh machine builds it once (about a minute); later sessions take a second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from packager.runtime_image.builder import BuildOptions, RuntimeImage, build_runtime_image
from tests.conftest import REPO
from tests.engines import ENGINE_START_ATTEMPTS, EngineFailed, start_on_free_ports

__all__ = [
    "DOCKER_REGISTRY",
    "RUNTIME_CACHE",
    "RUNTIME_TAG",
    "PushedRuntimeImage",
    "Registry",
    "docker_engine",
    "docker_labels",
    "registry",
    "runtime_image",
    "start_registry",
]

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")
#: Shared by every test session on the machine (and every checkout): the lock file and the
#: Debian packages and wheels live here; the images themselves are cached in the engine.
RUNTIME_CACHE = Path(os.environ.get("EDGEPACK_TEST_RUNTIME_CACHE", "/var/tmp/edgepack-test/runtime-image"))
#: The tests' tag of edgepack/runtime, so they never move a user's ``py311``.
RUNTIME_TAG = "pytest"
LABEL_SESSION = "org.edgepack.test.session"
ENGINE_HINT = (
    "start one as root ('dockerd &'; bash scripts/test.sh installs docker.io and starts it) "
    "or point DOCKER_HOST at one"
)


@pytest.fixture(scope="session")
def docker_labels() -> dict[str, str]:
    return {LABEL_SESSION: uuid.uuid4().hex}


@pytest.fixture(scope="session")
def docker_engine(docker_labels: dict[str, str]) -> Iterator[Any]:
    """A Docker Engine that answers, or a failure saying how to start one."""
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    problem = None
    try:
        client = docker.from_env(timeout=900)
        client.ping()
    except docker.errors.DockerException as exc:
        problem = str(exc).removeprefix("Error while fetching server API version: ")
    if problem is not None:  # outside the except: the failure is one line, not a traceback
        pytest.fail(f"no Docker engine answers at {where} ({problem}): {ENGINE_HINT}", pytrace=False)
    yield client
    label = f"{LABEL_SESSION}={docker_labels[LABEL_SESSION]}"
    for container in client.containers.list(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.DockerException):
            container.remove(force=True)
    client.close()


@dataclass
class Registry:
    """A running ``docker-registry``; ``host`` is what image references start with."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    root: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def registry_config(storage: Path, port: int) -> str:
    """A registry without auth on loopback, storing on disk, deletes allowed."""
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )


def _answers(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/", timeout=1).status_code == 200:
                return True
        time.sleep(0.05)
    return False


def start_registry(workdir: Path, *, attempts: int = ENGINE_START_ATTEMPTS) -> Registry:
    """``docker-registry serve`` on a free loopback port (another one if that was taken)."""
    if not DOCKER_REGISTRY.is_file():
        pytest.fail(
            f"{DOCKER_REGISTRY} not found: install Debian's docker-registry (apt-get install "
            "docker-registry, as scripts/test.sh does)",
            pytrace=False,
        )
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    log = workdir / "registry.log"

    def launch(ports: list[int]) -> Registry:
        port = ports[0]
        config = workdir / "config.yml"
        config.write_text(registry_config(storage, port))
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(DOCKER_REGISTRY), "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        if _answers(f"http://127.0.0.1:{port}", process, timeout=20):
            return Registry(f"127.0.0.1:{port}", port, process, workdir, log)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        raise EngineFailed(log.read_text(errors="replace"))

    return start_on_free_ports("docker-registry", 1, launch, attempts=attempts)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real container registry on loopback, one per test session (per xdist worker)."""
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()
    shutil.rmtree(running.root / "storage", ignore_errors=True)


@dataclass(frozen=True)
class PushedRuntimeImage:
    """The runtime image in this worker's registry."""

    #: ``127.0.0.1:PORT/edgepack/runtime@sha256:…``: what a module records and a device pulls
    pinned: str
    #: ``127.0.0.1:PORT/edgepack/runtime:pytest``
    tagged: str
    digest: str
    #: the local image id (``sha256:…``) of the same image
    image_id: str
    build: RuntimeImage


@pytest.fixture(scope="session")
def runtime_image(docker_engine: Any, registry: Registry) -> Iterator[PushedRuntimeImage]:
    """The runtime image, built (or found in the engine's cache) and pushed to ``registry``."""
    options = BuildOptions(cache_dir=RUNTIME_CACHE, tag=RUNTIME_TAG, push=registry.host, source_dir=REPO)
    built = build_runtime_image(options, client=docker_engine)
    assert built.pinned_ref is not None and built.pushed_ref is not None and built.digest is not None
    yield PushedRuntimeImage(
        pinned=built.pinned_ref,
        tagged=built.pushed_ref,
        digest=built.digest,
        image_id=built.image_id,
        build=built,
    )
    # The registry is gone after the session: drop its names, keep the image (the cache).
    for name in (built.pushed_ref, built.pinned_ref):
        with contextlib.suppress(docker.errors.DockerException):
            docker_engine.images.remove(name, noprune=True)
