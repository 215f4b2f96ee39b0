"""``edgepack runtime-image build``: the docker runtime's image, built offline, optionally pushed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from manifests.errors import ConfigError
from manifests.image_ref import parse_image_ref
from packager.app import app, console, err_console
from packager.home import edgepack_home
from packager.runtime_image.recipe import DEFAULT_TAG

runtime_app = typer.Typer(
    help="The container image the docker runtime runs modules in.", no_args_is_help=True
)
app.add_typer(runtime_app, name="runtime-image")


def default_cache_dir() -> Path:
    return edgepack_home() / "runtime-image"


class RichReporter:
    """Shows each step with a spinner (and a byte bar when it moves bytes) on ``out`` and
    keeps a line per finished step."""

    def __init__(self, out: Console) -> None:
        self._out = out
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=out,
            transient=True,
        )
        self._task: TaskID | None = None
        self._started = time.monotonic()

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def begin(self, step: str, total: int | None = None) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(step, total=total)
        self._started = time.monotonic()

    def advance(self, done: int, total: int | None = None) -> None:
        if self._task is not None:
            if total:
                self._progress.update(self._task, completed=done, total=total)
            else:
                self._progress.update(self._task, completed=done)

    def end(self, summary: str) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._out.print(f"[green]✓[/] {summary}", highlight=False, soft_wrap=True)


def _registry(value: str | None) -> str | None:
    """``--push``'s registry: ``HOST[:PORT]``, nothing else."""
    if value is None:
        return None
    host = value.strip().rstrip("/")
    for scheme in ("http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    try:
        ref = parse_image_ref(f"{host}/edgepack/runtime")
    except ValueError:
        ref = None
    if not host or ref is None or ref.registry != host:
        raise ConfigError(
            f"--push {value!r}: expected a registry as HOST:PORT (e.g. 127.0.0.1:5000), "
            "without a path"
        )
    return host


@runtime_app.command("build")
def build_cmd(
    push: Annotated[
        str | None, typer.Option("--push", help="registry HOST:PORT to push REGISTRY/edgepack/runtime:TAG to")
    ] = None,
    tag: Annotated[
        str, typer.Option("--tag", help="tag of edgepack/runtime (and of the pushed image)")
    ] = DEFAULT_TAG,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Debian packages, wheels, logs and the build lock "
            "(default: $EDGEPACK_HOME/runtime-image)",
        ),
    ] = None,
    mirror: Annotated[
        str | None,
        typer.Option("--mirror", help="Debian mirror for debootstrap [$EDGEPACK_DEBIAN_MIRROR]"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
) -> None:
    """Build the runtime image offline and print its reference (pinned by digest with --push).

    The base (Debian minbase + python3 + the pinned wheels) is built with debootstrap once per
    set of inputs, as root, and cached in the Docker engine; the thin layer with edgepack's
    code is rebuilt in seconds when the code changes. The last line is the reference to give
    'edgepack build --runtime-image'.
    """
    from packager.runtime_image.builder import BuildOptions, build_runtime_image
    from packager.runtime_image.engine import connect
    from packager.runtime_image.rootfs import DEFAULT_MIRROR

    try:
        parse_image_ref(f"edgepack/runtime:{tag}")
    except ValueError as exc:
        raise ConfigError(f"--tag {tag!r}: {exc}") from None
    options = BuildOptions(
        cache_dir=(cache_dir or default_cache_dir()).absolute(),
        tag=tag,
        push=_registry(push),
        mirror=mirror or os.environ.get("EDGEPACK_DEBIAN_MIRROR") or DEFAULT_MIRROR,
    )
    client = connect()
    # With --json, stdout carries only the JSON object: the steps go to stderr.
    with RichReporter(err_console if as_json else console) as reporter:
        result = build_runtime_image(options, reporter=reporter, client=client)
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    console.print(
        f"image  {result.local_ref}  {result.image_id[:19]}  {result.size / 1e6:.0f} MB"
        f"  (base {'built' if result.base_built else 'reused'}, "
        f"code layer {'built' if result.thin_built else 'reused'})",
        highlight=False,
        soft_wrap=True,
    )
    if result.pinned_ref is None:
        console.print(
            "not pushed: devices pull the image from a registry; pass --push HOST:PORT", highlight=False
        )
        console.print(result.local_ref, highlight=False, soft_wrap=True)
        return
    console.print(result.pinned_ref, highlight=False, soft_wrap=True)
