"""The options several commands take, and how their values are read.

Command modules share these instead of importing each other: where the hub is (``--hub``,
``--token``, ``--json``), which keys to trust (``--trust``), where the module cache is
(``--cache``), and the small value syntaxes (``NAME:VERSION``, ``key=value``, ``device:ID``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from manifests.errors import ConfigError
from packager.app import console
from packager.sdk import Devices, Hub, RichBars, Selector
from packager.sdk.config import HubConfig

HubOption = Annotated[str | None, typer.Option("--hub", help="hub URL (default: from 'edgepack login')")]
TokenOption = Annotated[str | None, typer.Option("--token", help="admin token (default: from login)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
TrustOption = Annotated[
    list[Path] | None,
    typer.Option("--trust", "-t", help="trusted publisher key (.pub) or trust store; repeatable"),
]
CacheOption = Annotated[
    Path | None,
    typer.Option("--cache", help="module cache folder (default: $EDGEPACK_HOME/cache)"),
]


def bars() -> RichBars:
    """Progress bars on the CLI's console, gone when the step ends."""
    return RichBars(console)


def connect(hub: str | None, token: str | None) -> Hub:
    """The SDK's hub for ``--hub`` / ``--token`` (else the environment, else the login)."""
    config = HubConfig.resolve(hub, token)
    connected = Hub(config.url, config.token, ca=config.ca, progress=bars())
    return connected


def confirm(question: str, action: str) -> None:
    """Ask ``question`` at a terminal (a no aborts). Elsewhere nobody can answer: refuse
    ``action`` naming ``--yes``, rather than abort with a bare "Aborted."."""
    if not sys.stdin.isatty():
        raise ConfigError(
            f"{action}: input is not a terminal, so it cannot be confirmed; "
            f"pass --yes to {action.split()[0]} without being asked"
        )
    typer.confirm(question, abort=True)


def split_ref(ref: str, *, need_version: bool, kind: str = "model", hint: str = "") -> tuple[str, str]:
    """``NAME:VERSION`` of a ``kind`` (model or module), or ``NAME`` = latest when the version
    may be omitted; ``hint`` is added to the message for a missing version."""
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise ConfigError(f"{ref!r} is not NAME:VERSION")
    if not sep:
        if need_version:
            raise ConfigError(
                f"give the {kind}'s exact version: {ref}:VERSION, e.g. {ref}:1 "
                f"('edgepack {kind} list --name {ref}' shows them){hint}"
            )
        version = "latest"
    return name, version


def model_version(version: str) -> int | None:
    """A model version from the command line: a number, or None for ``latest``."""
    if version == "latest":
        return None
    if not version.isdigit():
        raise ConfigError(f"model version {version!r} is not a number ('edgepack model list' shows them)")
    return int(version)


def parse_pairs(texts: list[str] | None, what: str) -> dict[str, str]:
    """Repeated ``--WHAT key=value`` options as a dict."""
    pairs: dict[str, str] = {}
    for text in texts or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {text!r} is not key=value; write it like --{what} stage=prod")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_target(targets: list[str] | None, selector: str | None) -> Devices | Selector:
    """``--target device:ID`` (repeatable) or ``--selector k=v,...``: exactly one."""
    if (targets is None) == (selector is None):
        raise ConfigError("give either --target device:ID (repeatable) or --selector k=v,...")
    if selector is not None:
        return Selector(selector)
    ids: list[str] = []
    for text in targets or []:
        kind, sep, value = text.partition(":")
        if kind != "device" or not sep or not value:
            raise ConfigError(f"--target {text!r}: write it as device:ID (repeat for several devices)")
        ids.append(value)
    return Devices(ids)


def request_body(data: str | None, file: Path | None) -> bytes:
    """The request body from ``--data`` or ``--file``; it must be JSON, as scoring expects."""
    if (data is None) == (file is None):
        raise ConfigError("pass exactly one of --data JSON or --file FILE")
    if file is not None:
        try:
            body = file.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{file}: request file not found") from None
        what = str(file)
    else:
        assert data is not None
        body, what = data.encode(), "--data"
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not valid JSON ({exc})") from None
    return body
