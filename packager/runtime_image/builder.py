"""Building the runtime image: the base when its recipe is new, the thin layer when edgepack's
code is new, then tag and (optionally) push. ``edgepack runtime-image build`` and the tests'
``runtime_image`` fixture both call :func:`build_runtime_image`.

Builds that share a cache folder take turns (an exclusive lock on ``CACHE/build.lock``): two
at once would debootstrap the same base twice, or race to tag it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from manifests.image_ref import parse_image_ref
from packager.runtime_image import engine, rootfs, source
from packager.runtime_image.recipe import (
    DEFAULT_TAG,
    LABEL_BASE_ID,
    LABEL_THIN_KEY,
    RUNTIME_REPOSITORY,
    BaseRecipe,
    base_changes,
    base_recipe,
    thin_dockerfile,
    thin_key,
)

_ROOTFS_PREFIX = "rootfs-"
_THIN_PREFIX = "thin-"


class Reporter(Protocol):
    """Where a build says what it is doing (the CLI shows it with rich; tests ignore it)."""

    def begin(self, step: str, total: int | None = None) -> None:
        """A step starts; ``total`` bytes when it moves bytes."""

    def advance(self, done: int, total: int | None = None) -> None:
        """Bytes done within the current step."""

    def end(self, summary: str) -> None:
        """The current step is over; ``summary`` is one line to keep."""


class QuietReporter:
    def begin(self, step: str, total: int | None = None) -> None:
        pass

    def advance(self, done: int, total: int | None = None) -> None:
        pass

    def end(self, summary: str) -> None:
        pass


@dataclass(frozen=True)
class BuildOptions:
    cache_dir: Path
    tag: str = DEFAULT_TAG
    #: ``HOST[:PORT]`` of a registry to push ``HOST[:PORT]/edgepack/runtime:TAG`` to
    push: str | None = None
    #: the edgepack checkout the thin layer is built from (default: the one running)
    source_dir: Path | None = None
    mirror: str = rootfs.DEFAULT_MIRROR
    recipe: BaseRecipe | None = None


@dataclass(frozen=True)
class RuntimeImage:
    """What a build made or found."""

    image_id: str
    local_ref: str
    base_id: str
    base_ref: str
    base_key: str
    thin_key: str
    base_built: bool
    thin_built: bool
    size: int
    pushed_ref: str | None = None
    digest: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def pinned_ref(self) -> str | None:
        """``REGISTRY/edgepack/runtime@sha256:…``, once pushed."""
        if self.pushed_ref is None or self.digest is None:
            return None
        return parse_image_ref(self.pushed_ref).pinned(self.digest)

    def as_json(self) -> dict[str, Any]:
        return {
            "image": self.local_ref,
            "image_id": self.image_id,
            "size_bytes": self.size,
            "base": self.base_ref,
            "base_id": self.base_id,
            "base_key": self.base_key,
            "base_built": self.base_built,
            "thin_built": self.thin_built,
            "pushed": self.pushed_ref,
            "digest": self.digest,
            "pinned": self.pinned_ref,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


@contextlib.contextmanager
def build_lock(cache_dir: Path, reporter: Reporter) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / "build.lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            reporter.begin(f"waiting for another runtime image build ({cache_dir / 'build.lock'})")
            fcntl.flock(fh, fcntl.LOCK_EX)
            reporter.end("the other build finished")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_runtime_image(
    options: BuildOptions, *, reporter: Reporter | None = None, client: Any | None = None
) -> RuntimeImage:
    """Build (or find) the runtime image, tag it ``edgepack/runtime:TAG``, and push it when
    ``options.push`` names a registry."""
    report = reporter or QuietReporter()
    recipe = options.recipe or base_recipe()
    src = options.source_dir or source.find_source_tree()
    docker_client = client or engine.connect()
    seconds: dict[str, float] = {}
    with build_lock(options.cache_dir, report):
        # We hold the lock: a build folder left here is from a build that was killed.
        for stale in options.cache_dir.glob(f"{_THIN_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        base, base_built = _base(docker_client, recipe, options, report, seconds)
        image, key, thin_built = _thin(docker_client, base, recipe, src, options, report, seconds)
        local_ref = f"{RUNTIME_REPOSITORY}:{options.tag}"
        image.tag(RUNTIME_REPOSITORY, options.tag)
    result = RuntimeImage(
        image_id=str(image.id),
        local_ref=local_ref,
        base_id=str(base.id),
        base_ref=recipe.tag,
        base_key=recipe.key,
        thin_key=key,
        base_built=base_built,
        thin_built=thin_built,
        size=int(image.attrs.get("Size", 0)),
        seconds=seconds,
    )
    if options.push is None:
        return result
    pushed = parse_image_ref(f"{options.push.rstrip('/')}/{RUNTIME_REPOSITORY}:{options.tag}")
    pushed_ref = pushed.name
    image.tag(pushed.repository, pushed.tag)
    started = time.monotonic()
    report.begin(f"pushing {pushed_ref}", total=result.size)
    digest = engine.push(docker_client, pushed_ref, progress=report.advance)
    seconds["push"] = time.monotonic() - started
    report.end(f"pushed {pushed_ref} ({seconds['push']:.1f} s)")
    return dataclasses.replace(result, pushed_ref=pushed_ref, digest=digest, seconds=seconds)


def _base(
    client: Any, recipe: BaseRecipe, options: BuildOptions, report: Reporter, seconds: dict[str, float]
) -> tuple[Any, bool]:
    found = engine.find_base(client, recipe.tag, recipe.key)
    if found is not None:
        report.end(f"base {recipe.tag} reused (its inputs are unchanged)")
        return found, False
    rootfs.require_tools()
    started = time.monotonic()
    cache = options.cache_dir
    log = cache / "logs" / f"base-{recipe.key[:16]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    # We hold the lock: a rootfs folder left here is from a build that was killed.
    for stale in cache.glob(f"{_ROOTFS_PREFIX}*"):
        rootfs.remove_root(stale)
    root = Path(tempfile.mkdtemp(prefix=_ROOTFS_PREFIX, dir=cache))
    try:
        report.begin(f"downloading the pinned wheels for {recipe.python_tag} {recipe.arch}")
        wheels = cache / "wheels" / f"{recipe.python_tag}-{recipe.wheel_platforms[0]}"
        requirements = rootfs.download_wheels(recipe, wheels, log)
        report.end(f"wheels ready in {wheels}")
        report.begin(f"debootstrap {recipe.suite} ({recipe.variant}) with {', '.join(recipe.packages)}")
        rootfs.debootstrap(recipe, root, mirror=options.mirror, debs=cache / "debs", log=log)
        report.end(f"debootstrap {recipe.suite} done")
        report.begin("installing the wheels in the image (--no-index)")
        rootfs.install_wheels(recipe, root, wheels, requirements, log)
        rootfs.add_user(root, log)
        rootfs.strip(root)
        report.end("wheels installed, user added, caches and docs stripped")
        total = rootfs.tree_size(root)
        report.begin(f"docker import {recipe.tag}", total=total)
        image = engine.import_base(
            client, rootfs.tar_stream(root), tag=recipe.tag, changes=base_changes(recipe),
            progress=report.advance, total=total,
        )  # fmt: skip
    finally:
        rootfs.remove_root(root)
    seconds["base"] = time.monotonic() - started
    report.end(f"base {recipe.tag} built in {seconds['base']:.1f} s")
    return image, True


def _thin(
    client: Any,
    base: Any,
    recipe: BaseRecipe,
    src: Path,
    options: BuildOptions,
    report: Reporter,
    seconds: dict[str, float],
) -> tuple[Any, str, bool]:
    files = source.source_files(src)
    dockerfile = thin_dockerfile(recipe.tag)
    digest = source.source_digest(src, files)
    key = thin_key(base_id=str(base.id), dockerfile=dockerfile, source_digest=digest)
    found = engine.find_thin(client, key)
    if found is not None:
        report.end(f"runtime layer reused (edgepack's code is unchanged: {key[:16]})")
        return found, key, False
    started = time.monotonic()
    log = options.cache_dir / "logs" / f"thin-{key[:16]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix=_THIN_PREFIX, dir=options.cache_dir) as tmp:
        context = Path(tmp)
        report.begin("building the edgepack wheel")
        source.build_wheel(src, files, context, log)
        (context / "Dockerfile").write_text(dockerfile)
        report.end("edgepack wheel built")
        report.begin(f"docker build FROM {recipe.tag}")
        built = engine.build_thin(
            client, context, labels={LABEL_THIN_KEY: key, LABEL_BASE_ID: str(base.id)}
        )
    with log.open("a") as fh:
        fh.write(built.log + "\n")
    seconds["thin"] = time.monotonic() - started
    report.end(f"runtime layer built in {seconds['thin']:.1f} s")
    return built.image, key, True
