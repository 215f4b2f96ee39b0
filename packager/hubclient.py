"""Talking to a hub over HTTP: where it is, the token, and errors as one line.

The hub is found from ``--hub``/``--token``, then ``EDGEPACK_HUB_URL``/``EDGEPACK_TOKEN``,
then ``$EDGEPACK_HOME/config.json`` (written by ``edgepack login``). An HTTPS hub's certificate
is verified against the CA given with ``edgepack login --ca`` (or ``EDGEPACK_HUB_CA``), else
against the system's CAs; a certificate neither vouches for is refused.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from manifests.errors import ConfigError, EdgepackError, FetchError, TrustError
from packager.app import edgepack_home
from packager.files import atomic_output

#: The hub's error ``type`` → this CLI's exit code (manifests.errors: 2 config/input,
#: 3 trust, 4 transfer). The hub names the category, so the CLI never guesses from a status.
EXIT_CODES: dict[str, int] = {
    "ConfigError": 2,
    "ValidationError": 2,
    "NotFound": 2,
    "Conflict": 2,
    "TooLarge": 2,
    "Unauthorized": 2,
    "Forbidden": 2,
    "MethodNotAllowed": 2,
    "TrustError": 3,
    "FetchError": 4,
    "GatewayTimeout": 4,  # a device did not answer in time: a transfer that may work later
    "InternalError": 4,
}


class HubRequestError(EdgepackError):
    """The hub refused a request or failed; the message is the hub's, the exit code its type's."""

    def __init__(self, message: str, status: int, kind: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        # Without an edgepack error body something between us and the hub answered (a proxy's
        # 502 page, a hub too old to name its errors): only then does the status decide.
        self.exit_code = EXIT_CODES.get(kind or "", 4 if status >= 500 else 2)


def config_path() -> Path:
    return edgepack_home() / "config.json"


@dataclass
class HubConfig:
    url: str
    token: str | None
    ca: str | None = None  # PEM file of the CA that signed the hub's certificate

    @classmethod
    def resolve(cls, url: str | None = None, token: str | None = None) -> HubConfig:
        saved: dict[str, Any] = {}
        path = config_path()
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: invalid JSON ({exc.msg}); run 'edgepack login' again") from None
        url = url or os.environ.get("EDGEPACK_HUB_URL") or saved.get("hub_url")
        token = token or os.environ.get("EDGEPACK_TOKEN") or saved.get("token")
        ca = os.environ.get("EDGEPACK_HUB_CA") or saved.get("ca")
        if not url:
            raise ConfigError(
                "no hub configured: run 'edgepack login --hub URL --token TOKEN' "
                "or set EDGEPACK_HUB_URL and EDGEPACK_TOKEN"
            )
        return cls(url=url.rstrip("/"), token=token, ca=ca)

    def save(self) -> Path:
        path = config_path()
        with atomic_output(path, mode=0o600) as fh:
            doc = {"hub_url": self.url, "token": self.token, "ca": self.ca}
            fh.write(json.dumps(doc, indent=2).encode())
        return path


class HubClient:
    """A thin httpx wrapper: JSON in, JSON out, hub errors raised as one-line errors."""

    def __init__(self, config: HubConfig, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self.config = config
        verify: ssl.SSLContext | bool = True
        if config.ca is not None:
            try:
                verify = ssl.create_default_context(cafile=config.ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{config.ca}: not a usable CA certificate ({exc})") from None
        self.http = httpx.Client(base_url=config.url, headers=headers, timeout=timeout, verify=verify)

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise FetchError(
                    f"the hub at {self.config.url} has a certificate no trusted CA signed; "
                    "pass the hub's CA with 'edgepack login --ca ca.crt' (or EDGEPACK_HUB_CA)"
                ) from None
            raise FetchError(
                f"cannot reach the hub at {self.config.url} ({exc.__class__.__name__}); "
                "is 'edgepack hub serve' running and the URL right?"
            ) from None
        except httpx.TransportError as exc:
            raise FetchError(
                f"cannot reach the hub at {self.config.url} ({exc.__class__.__name__}); "
                "is 'edgepack hub serve' running and the URL right?"
            ) from None
        raise_for_hub_error(response)
        return response

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post_json(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs).json()


def hub_error(response: httpx.Response) -> tuple[str | None, str]:
    """``(type, message)`` of an error answer; type None when it is not the hub's error shape."""
    try:
        error = response.json()["error"]
        kind, message = error["type"], error["message"]
    except (ValueError, KeyError, TypeError):
        return None, response.text[:500] or response.reason_phrase
    if not isinstance(kind, str) or not isinstance(message, str):
        return None, response.text[:500]
    return kind, message


def raise_for_hub_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    kind, message = hub_error(response)
    if kind == "Unauthorized":
        message += "; run 'edgepack login --hub URL --token TOKEN' with the hub's admin token"
    if kind == "TrustError":
        raise TrustError(f"hub refused: {message}")
    raise HubRequestError(f"hub answered {response.status_code}: {message}", response.status_code, kind)
