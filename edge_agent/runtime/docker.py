"""The ``docker`` runtime: each instance is a container of the module's pinned runtime image.

- The image comes from a registry **by digest**: the signed manifest records
  ``runtime.image_digest``, the agent pulls ``<repository>@<digest>`` (the engine checks the
  content against it) and refuses a module that pins nothing. Pull progress is reported in
  ``Transitioning``; a pull that is still running is never reported as a failure.
- Any image with a compatible ``python3`` serves, not only edgepack's runtime image: the
  agent's own scoring server (its ``edge_agent`` and ``manifests`` package folders) is mounted
  read-only at ``/opt/edgepack-scoring`` and run with the image's ``python3``, so the server
  is always the agent's version. Before a module's first start in an image, a short check
  container (``edge_agent.scoring.image_check``) tells whether that Python is new enough and
  the packages the server, the model and the module's requirements need import; a missing one
  fails the version with a one-line reason naming them, and the version serving stays.
- The module folder is mounted read-only at ``/module``; the instance's run folder at
  ``/run/edgepack`` (the scoring server's state file); a service that collects data gets its
  spool at ``/var/lib/edgepack/data`` (``docs/data-collection.md``). These two are the only
  writable places: the root file system is read-only with a small ``/tmp``.
- Host networking: the public port is the device's own, shared with ``SO_REUSEPORT`` between
  two versions during an update, exactly as with the process runtime.
- CPU and memory limits from the deployment settings (``containerResourceRequirements``).
- Labels (``edgepack.device``, ``edgepack.service``, ``edgepack.instance``) let a restarted
  agent adopt its containers and remove any that no record names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import Mount

import edge_agent
import manifests
from edge_agent.cache.modules import InstalledModule
from edge_agent.download.module import Cancelled
from edge_agent.runtime.base import (
    CONTAINER_UID,
    STATE_FILE,
    LaunchSpec,
    Liveness,
    Progress,
    Usage,
    instance_arguments,
    requirement_names,
)
from edge_agent.runtime.endpoint_files import (
    TlsMaterial,
    data_environment,
    endpoint_environment,
    write_keys,
    write_tls,
)
from edge_agent.scoring.image_check import BOOTSTRAP, MIN_PYTHON, MODEL_PACKAGES, SEPARATOR, SERVER_PACKAGES
from edge_agent.state.records import InstanceRecord
from manifests.desired import EndpointAuth, ModuleAssignment, RuntimeKind
from manifests.device import AgentConfig
from manifests.errors import ImageUnavailable, ModuleStartFailure, RegistryUnavailable, RuntimeFailure
from manifests.image_ref import parse_image_ref

log = logging.getLogger(__name__)

MODULE_MOUNT = "/module"
RUN_MOUNT = "/run/edgepack"
#: the service's data spool (read-write), when its deployment collects data
DATA_MOUNT = "/var/lib/edgepack/data"
LABEL_DEVICE = "edgepack.device"
LABEL_SERVICE = "edgepack.service"
LABEL_INSTANCE = "edgepack.instance"
#: where the agent's own scoring code is mounted (read-only) in every container
CODE_MOUNT = "/opt/edgepack-scoring"
#: the packages of ours the scoring server imports: mounted from the agent's installation
CODE_PACKAGES = (edge_agent, manifests)
#: Seconds the image check may take (importing onnxruntime on a busy device takes a few); it
#: ends sooner when the start's own deadline comes first. A check that does not finish fails
#: the version like a server that is not ready in time.
IMAGE_CHECK_TIMEOUT_S = 120.0
#: Images (by id, with what was asked of them) that passed the check; at most this many are
#: remembered, so a restart or a second service on the same image does not check it again.
IMAGE_CHECKS_KEPT = 256
_CHECK_POLL_S = 0.05
#: Cut of each list of package names in a reason (the missing ones, the broken ones), and of
#: the image's name: a reported reason holds 2000 characters.
REASON_LIST_CHARS = 600
REASON_IMAGE_CHARS = 200
#: Cut of the check's output quoted in a reason when it printed no verdict, and how many of
#: its last lines are read at all (the verdict is the last).
_CHECK_OUTPUT_CHARS = 300
_CHECK_OUTPUT_LINES = 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def code_mounts() -> list[Mount]:
    """The agent's own ``edge_agent`` and ``manifests`` package folders, read-only, under
    :data:`CODE_MOUNT`: the scoring server every container runs is the agent's."""
    mounts = []
    for package in CODE_PACKAGES:
        folder = Path(package.__file__ or "").resolve().parent
        mounts.append(Mount(f"{CODE_MOUNT}/{package.__name__}", str(folder), type="bind", read_only=True))
    return mounts


def required_packages(module: InstalledModule) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the image must hold for ``module``: the import names the scoring server and the
    model need, and the distribution names of the module's declared requirements."""
    imports = list(SERVER_PACKAGES)
    for entry in module.manifest.files:
        for suffix, package in MODEL_PACKAGES.items():
            if entry.path.endswith(suffix) and package not in imports:
                imports.append(package)
    wanted = requirement_names(module.manifest.runtime.python.requirements)
    return tuple(imports), tuple(name for name in wanted if name not in imports)


def _clean(value: object, limit: int = REASON_LIST_CHARS) -> str:
    """Text the image printed, as a reason may quote it: one line without control characters
    (a reported reason that holds one is refused whole), cut to ``limit``."""
    text = " ".join(_CONTROL.sub(" ", str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(names: list[str], separator: str) -> str:
    """``names`` joined, within :data:`REASON_LIST_CHARS` (a module may declare a thousand
    requirements)."""
    kept: list[str] = []
    size = 0
    for name in names:
        if kept and size + len(separator) + len(name) > REASON_LIST_CHARS:
            return separator.join(kept) + f" and {len(names) - len(kept)} more"
        kept.append(name)
        size += len(separator) + len(name)
    return separator.join(kept)


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _shown(image: str) -> str:
    """An image's name as a reason quotes it (a manifest allows 1024 characters)."""
    return image if len(image) <= REASON_IMAGE_CHARS else image[: REASON_IMAGE_CHARS - 1] + "…"


def image_problem(image: str, answer: dict[str, Any]) -> str | None:
    """The one-line reason why ``image`` cannot run the module, from the check's verdict
    (``edge_agent.scoring.image_check``), or None when it can."""
    image = _shown(image)
    python = _clean(answer.get("python", "?"), 40)
    minimum = ".".join(str(p) for p in MIN_PYTHON)
    if answer.get("code"):
        folders = ", ".join(m["Source"] for m in code_mounts())
        return (
            f"image {image}: the agent's scoring code mounted at {CODE_MOUNT} does not import "
            f"({_clean(answer['code'])}); its folders ({folders}) must be readable by uid {CONTAINER_UID}"
        )
    if "missing" not in answer:  # the bootstrap stopped at the version
        return f"image {image} has Python {python}; edgepack needs >= {minimum}"
    missing = sorted(_clean(m) for m in _as_list(answer.get("missing")))
    broken = [_clean(b) for b in _as_list(answer.get("broken"))]
    problems = []
    if missing:
        listed = _listed(missing, ", ")
        problems.append(f"image {image} lacks python packages: {listed} (pip install them into the image)")
    if broken:
        problems.append(f"image {image} has python packages that do not import: {_listed(broken, '; ')}")
    if problems:
        return "; ".join(problems)
    if answer.get("server"):
        why = _clean(answer["server"])
        return f"image {image}: edgepack's scoring server does not import with its Python {python}: {why}"
    return None


class DockerRuntime:
    kind = RuntimeKind.DOCKER

    def __init__(
        self,
        client: Any,
        device_id: str,
        runs_root: Path,
        *,
        pull_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self._client = client
        self._device = device_id
        self.runs_root = runs_root
        self._pull_timeout = pull_timeout_s
        self._stop_timeout = stop_timeout_s
        self._pull_lock = threading.Lock()
        self._checks_lock = threading.Lock()
        self._checked: dict[tuple[str, tuple[str, ...], tuple[str, ...]], None] = {}

    @classmethod
    def connect(cls, config: AgentConfig, runs_root: Path, device_id: str) -> DockerRuntime:
        client = docker.DockerClient(base_url=config.docker.url) if config.docker.url else docker.from_env()
        return cls(
            client,
            device_id,
            runs_root,
            pull_timeout_s=config.docker.pull_timeout_s,
            stop_timeout_s=config.docker.stop_timeout_s,
        )

    # --- checks ------------------------------------------------------------------------------

    def unschedulable(self, module: InstalledModule, assignment: ModuleAssignment) -> str | None:
        if assignment.settings.runtime is None and module.manifest.runtime.image_digest is None:
            # Left to the device: a module without a pinned image is not one for docker.
            return f"module {module.manifest.ref} pins no runtime image, so the docker runtime cannot run it"
        try:
            self._client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            return f"the Docker Engine does not answer ({type(exc).__name__}); start dockerd"
        return None

    def _reference(self, module: InstalledModule) -> str:
        runtime = module.manifest.runtime
        if runtime.image_digest is None:
            raise ImageUnavailable(
                f"module {module.manifest.ref} does not pin its runtime image {runtime.image!r} by digest; "
                "the docker runtime runs only pinned images: rebuild it with "
                "'edgepack build --runtime-image REGISTRY/edgepack/runtime@sha256:...'"
            )
        try:
            # The tag is not trusted: only the digest the publisher signed names the image.
            return parse_image_ref(runtime.image).pinned(runtime.image_digest)
        except ValueError as exc:
            raise ImageUnavailable(f"module {module.manifest.ref}: {exc}") from None

    # --- lifecycle ---------------------------------------------------------------------------

    def prepare(
        self, spec: LaunchSpec, progress: Progress, cancelled: Callable[[], bool], deadline: float
    ) -> None:
        """Pull the pinned image unless the engine holds it already (checked by digest), then
        check that it can run the module (:meth:`_check_image`). A pull that is still going is
        reported as progress, never as a failure, until ``deadline``."""
        reference = self._reference(spec.module)
        self._pull(spec, reference, progress, cancelled, deadline)
        self._check_image(spec, reference, cancelled, deadline)

    def _pull(
        self,
        spec: LaunchSpec,
        reference: str,
        progress: Progress,
        cancelled: Callable[[], bool],
        deadline: float,
    ) -> None:
        with self._pull_lock:  # two services on one image pull it once
            if self._holds(reference):
                return
            log.info("pulling %s for %s", reference, spec.service)
            layers: dict[str, tuple[int, int]] = {}
            try:
                for event in self._client.api.pull(reference, stream=True, decode=True):
                    if cancelled():
                        raise _PullCancelled
                    if time.monotonic() > deadline:
                        raise RegistryUnavailable(
                            f"pulling {reference} did not finish within its deadline; retrying later"
                        )
                    if "error" in event:
                        raise ImageUnavailable(f"pulling {reference} failed: {event['error']}")
                    detail = event.get("progressDetail") or {}
                    if event.get("id") and "total" in detail:
                        layers[event["id"]] = (int(detail.get("current", 0)), int(detail["total"]))
                        done = sum(c for c, _ in layers.values())
                        total = sum(t for _, t in layers.values())
                        progress("pull", done, total)
            except _PullCancelled:
                raise Cancelled(f"pull of {reference}") from None
            except docker.errors.NotFound as exc:
                raise ImageUnavailable(
                    f"image {reference} is not in its registry ({exc.explanation})"
                ) from None
            except docker.errors.APIError as exc:
                text = str(exc.explanation or exc)
                if "manifest unknown" in text or "not found" in text:
                    raise ImageUnavailable(f"image {reference} is not in its registry ({text})") from None
                raise RegistryUnavailable(f"pulling {reference} failed ({text}); retrying") from None
            except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
                why = type(exc).__name__
                raise RegistryUnavailable(f"pulling {reference} failed ({why}); retrying") from None
            if not self._holds(reference):
                raise ImageUnavailable(
                f"the engine pulled {reference} but does not hold that digest; refused"
            )

    def _check_image(
        self, spec: LaunchSpec, reference: str, cancelled: Callable[[], bool], deadline: float
    ) -> None:
        """Run the image check in a short container of the image (no network, the instance's
        user and limits, the agent's code mounted read-only); raise :class:`ImageUnavailable`
        with the reason when the image cannot run the module. An image that passed once for
        the same packages is not checked again."""
        imports, distributions = required_packages(spec.module)
        try:
            image = self._client.images.get(reference)
        except docker.errors.ImageNotFound:
            raise ImageUnavailable(f"image {reference} vanished before it could be checked") from None
        key = (str(image.id), imports, distributions)
        with self._checks_lock:
            if key in self._checked:
                return
        name = _shown(spec.module.manifest.runtime.image)
        output, exit_code = self._run_check(spec, reference, image, [*imports, SEPARATOR, *distributions],
                                            cancelled, deadline)  # fmt: skip
        answer = _verdict_line(output)
        if answer is None:
            quoted = _clean(output[-_CHECK_OUTPUT_CHARS:]) or "no output"
            raise ImageUnavailable(
                f"image {name}: checking its python3 failed (exit code {exit_code}): {quoted}; "
                f"edgepack needs python3 >= {'.'.join(map(str, MIN_PYTHON))} on the image's PATH"
            )
        problem = image_problem(name, answer)
        if problem is not None:
            raise ImageUnavailable(problem)
        log.info("image %s can run %s: Python %s with %s", name, spec.module.manifest.ref, answer["python"],
                 ", ".join((*imports, *distributions)))  # fmt: skip
        with self._checks_lock:
            if len(self._checked) >= IMAGE_CHECKS_KEPT:
                self._checked.pop(next(iter(self._checked)))  # the oldest
            self._checked[key] = None

    def _run_check(
        self,
        spec: LaunchSpec,
        reference: str,
        image: Any,
        args: list[str],
        cancelled: Callable[[], bool],
        deadline: float,
    ) -> tuple[str, int]:
        """The check container's output and exit code."""
        name = _shown(spec.module.manifest.runtime.image)
        settings = spec.assignment.settings
        options: dict[str, Any] = {}
        if settings.memory_mb is not None:
            options["mem_limit"] = f"{settings.memory_mb}m"
        try:
            container = self._client.containers.create(
                reference,
                entrypoint=["python3", "-c", BOOTSTRAP],
                command=args,
                name=f"edgepack-{self._device}-{spec.service}-{spec.instance_id}-check",
                labels={  # an agent that dies meanwhile removes it on its next start
                    LABEL_DEVICE: self._device,
                    LABEL_SERVICE: spec.service,
                    LABEL_INSTANCE: f"{spec.instance_id}-check",
                },
                network_mode="none",
                user=f"{CONTAINER_UID}:{CONTAINER_UID}",
                read_only=True,
                tmpfs={"/tmp": "size=64m"},
                mounts=code_mounts(),
                environment=self._code_environment(image),
                log_config={"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
                **options,
            )
        except docker.errors.APIError as exc:
            why = exc.explanation or exc
            raise RuntimeFailure(f"the engine refused to check image {name}: {why}") from None
        try:
            try:
                container.start()
            except docker.errors.APIError as exc:
                text = str(exc.explanation or exc)
                if "python3" in text and ("not found" in text or "no such file" in text):
                    raise ImageUnavailable(
                        f"image {name} has no python3 on its PATH; edgepack runs its scoring server "
                        f"with the image's python3 (>= {'.'.join(map(str, MIN_PYTHON))})"
                    ) from None
                raise RuntimeFailure(f"the engine refused to check image {name}: {text}") from None
            limit = min(deadline, time.monotonic() + IMAGE_CHECK_TIMEOUT_S)
            while True:
                container.reload()
                if container.status == "exited":
                    break
                if cancelled():
                    raise Cancelled(f"check of image {name}")
                if time.monotonic() > limit:
                    raise ModuleStartFailure(
                        f"image {name}: checking its python3 and packages did not finish within "
                        f"{IMAGE_CHECK_TIMEOUT_S:g}s or the start's deadline"
                    )
                time.sleep(_CHECK_POLL_S)
            exit_code = int(container.attrs.get("State", {}).get("ExitCode", -1))
            data: bytes = container.logs(stdout=True, stderr=True, tail=_CHECK_OUTPUT_LINES)
            output = data.decode("utf-8", errors="replace")
            return output, exit_code
        finally:
            try:
                container.remove(force=True)
            except docker.errors.APIError as exc:
                log.warning("removing the image check container of %s: %s", spec.service, exc)

    def _code_environment(self, image: Any) -> dict[str, str]:
        """``PYTHONPATH`` with the agent's code first (before whatever the image sets, so that
        an ``edge_agent`` installed in the image is not the one that runs)."""
        env = image.attrs.get("Config", {}).get("Env") or []
        own = dict(item.split("=", 1) for item in env if "=" in item)
        path = CODE_MOUNT + (f":{own['PYTHONPATH']}" if own.get("PYTHONPATH") else "")
        return {"PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}

    def _holds(self, reference: str) -> bool:
        try:
            image = self._client.images.get(reference)
        except docker.errors.ImageNotFound:
            return False
        return reference in (image.attrs.get("RepoDigests") or [])

    def launch(self, spec: LaunchSpec) -> InstanceRecord:
        settings = spec.assignment.settings
        reference = self._reference(spec.module)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        os.chown(spec.run_dir, CONTAINER_UID, CONTAINER_UID)
        (spec.run_dir / STATE_FILE).unlink(missing_ok=True)
        command = instance_arguments(spec, f"{RUN_MOUNT}/{STATE_FILE}")
        write_keys(spec.run_dir, settings.auth, spec.agent_key, owner=CONTAINER_UID)
        if spec.tls is not None:
            write_tls(spec.run_dir, spec.tls, owner=CONTAINER_UID)
        options: dict[str, Any] = {}
        if settings.cpu is not None:
            options["nano_cpus"] = int(settings.cpu * 1e9)
        if settings.memory_mb is not None:
            options["mem_limit"] = f"{settings.memory_mb}m"
        data_mounts = []
        if spec.data_dir is not None:
            # The service's spool, the one other folder the container may write: the agent
            # reads it as untrusted (edge_agent.data.spool).
            spec.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chown(spec.data_dir, CONTAINER_UID, CONTAINER_UID)
            data_mounts.append(Mount(DATA_MOUNT, str(spec.data_dir), type="bind", read_only=False))
        try:
            image = self._client.images.get(reference)
            container = self._client.containers.run(
                reference,
                # The image's python3 runs the agent's own scoring server (mounted below), so
                # any image with a compatible Python serves, whatever its own entry point.
                entrypoint=["python3", "-m", "edge_agent.scoring", "--module-dir", MODULE_MOUNT],
                command=command,
                detach=True,
                name=f"edgepack-{self._device}-{spec.service}-{spec.instance_id}",
                labels={
                    LABEL_DEVICE: self._device,
                    LABEL_SERVICE: spec.service,
                    LABEL_INSTANCE: spec.instance_id,
                },
                network_mode="host",
                user=f"{CONTAINER_UID}:{CONTAINER_UID}",
                read_only=True,
                tmpfs={"/tmp": "size=64m"},
                mounts=[
                    Mount(MODULE_MOUNT, str(spec.module.dir), type="bind", read_only=True),
                    Mount(RUN_MOUNT, str(spec.run_dir), type="bind", read_only=False),
                    *data_mounts,
                    *code_mounts(),
                ],
                environment={
                    **settings.env,
                    **endpoint_environment(spec.assignment, RUN_MOUNT),
                    **data_environment(spec.assignment, DATA_MOUNT if data_mounts else None),
                    **self._code_environment(image),
                },
                log_config={"type": "json-file", "config": {"max-size": "8m", "max-file": "2"}},
                **options,
            )
        except docker.errors.ImageNotFound as exc:
            gone = f"image {reference} vanished before its container started: {exc}"
            raise ImageUnavailable(gone) from None
        except docker.errors.APIError as exc:
            why = exc.explanation or exc
            raise RuntimeFailure(f"the engine refused to start {spec.service}: {why}") from None
        return InstanceRecord(
            id=spec.instance_id,
            assignment=spec.assignment,
            key=spec.key,
            runtime=self.kind,
            run_dir=str(spec.run_dir),
            started_at=datetime.now(UTC),
            container_id=container.id,
            agent_key=spec.agent_key,
        )

    def _container(self, instance: InstanceRecord) -> Any | None:
        if instance.container_id is None:
            return None
        try:
            return self._client.containers.get(instance.container_id)
        except docker.errors.NotFound:
            return None

    def liveness(self, instance: InstanceRecord) -> Liveness:
        try:
            container = self._container(instance)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return Liveness(True)  # the engine is busy or restarting: not a verdict on the module
        if container is None:
            return Liveness(False)
        if container.status in ("running", "created", "restarting"):
            return Liveness(True)
        return Liveness(False, int(container.attrs.get("State", {}).get("ExitCode", -1)))

    def stop(self, instance: InstanceRecord, *, grace_s: float) -> None:
        container = self._container(instance)
        if container is None:
            return
        try:
            if grace_s <= 0:
                container.kill()  # no time to drain: it leaves the port at once
            else:
                container.stop(timeout=max(1, int(grace_s)))
        except docker.errors.APIError as exc:
            log.warning("stopping container of %s: %s", instance.id, exc)
        try:
            container.remove(force=True)
        except docker.errors.APIError as exc:
            log.warning("removing container of %s: %s", instance.id, exc)

    def log_tail(self, instance: InstanceRecord, lines: int) -> list[str]:
        container = self._container(instance)
        if container is None:
            return []
        try:
            data: bytes = container.logs(tail=lines)
        except docker.errors.APIError:
            return []
        return data.decode("utf-8", errors="replace").splitlines()[-lines:]

    def usage(self, instance: InstanceRecord) -> Usage | None:
        container = self._container(instance)
        if container is None:
            return None
        try:
            stats = container.stats(stream=False, one_shot=True)
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return None
        cpu_ns = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage")
        memory = stats.get("memory_stats", {}).get("usage")
        if cpu_ns is None or memory is None:
            return None
        return Usage(cpu_s=cpu_ns / 1e9, memory_mb=memory / 2**20)

    def update_endpoint(
        self, instance: InstanceRecord, auth: EndpointAuth | None, tls: TlsMaterial | None
    ) -> None:
        write_keys(Path(instance.run_dir), auth, instance.agent_key, owner=CONTAINER_UID)
        if tls is not None:
            write_tls(Path(instance.run_dir), tls, owner=CONTAINER_UID)

    def maintain(self, instance: InstanceRecord) -> None:
        return None  # the engine rotates container logs (json-file max-size)

    def reap_orphans(self, known: set[str]) -> list[str]:
        stopped = []
        try:
            mine = {"label": f"{LABEL_DEVICE}={self._device}"}
            containers = self._client.containers.list(all=True, filters=mine)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("cannot list containers to adopt (%s)", exc)
            return []
        for container in containers:
            instance_id = container.labels.get(LABEL_INSTANCE)
            if instance_id in known:
                continue
            log.warning("removing container %s that no record names", container.name)
            try:
                container.stop(timeout=int(self._stop_timeout))
                container.remove(force=True)
            except docker.errors.APIError as exc:
                log.warning("removing %s: %s", container.name, exc)
            stopped.append(str(instance_id))
        return stopped


class _PullCancelled(Exception):
    pass


def _verdict_line(output: str) -> dict[str, Any] | None:
    """The check's JSON verdict: its last line that is a JSON object with ``python``."""
    for line in reversed(output.splitlines()):
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and "python" in answer:
            return answer
    return None
