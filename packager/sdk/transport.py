"""HTTP to the hub: one client per :class:`~packager.sdk.hub.Hub`, every error mapped once.

A request either returns the hub's successful answer or raises: an error answer as the
:class:`~packager.sdk.errors.HubError` leaf its type names, a hub that cannot be reached as
:class:`~manifests.errors.HubUnavailable`.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from manifests.errors import ConfigError, HubUnavailable
from packager.sdk.config import HubConfig
from packager.sdk.errors import raise_for_hub_error


class Transport:
    """An httpx client on one hub, with the admin token and the hub's CA."""

    def __init__(self, config: HubConfig, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        verify: ssl.SSLContext | bool = True
        if config.ca is not None:
            try:
                verify = ssl.create_default_context(cafile=config.ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{config.ca}: not a usable CA certificate ({exc})") from None
        self.config = config
        self.http = httpx.Client(base_url=config.url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self.http.close()

    def unreachable(self, exc: httpx.TransportError) -> HubUnavailable:
        """What a failed connection to the hub means, and what to check."""
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return HubUnavailable(
                f"the hub at {self.config.url} has a certificate no trusted CA signed; "
                "pass the hub's CA with 'edgepack login --ca ca.crt' (or EDGEPACK_HUB_CA)"
            )
        return HubUnavailable(
            f"cannot reach the hub at {self.config.url} ({exc.__class__.__name__}); "
            "is 'edgepack hub serve' running and the URL right?"
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; a successful answer, or the error it stands for."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        raise_for_hub_error(response)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` and decode its JSON answer."""
        return self.request("GET", path, **kwargs).json()

    def send(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """Send ``body`` as JSON with ``method`` and decode the JSON answer."""
        return self.request(method, path, json=body, **kwargs).json()

    def exists(self, path: str) -> bool:
        """Whether a HEAD of ``path`` finds it (200) or not (404); other answers raise."""
        try:
            response = self.http.head(path)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.status_code == 404:
            return False
        raise_for_hub_error(response)
        return True

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed answer whose body has not been read yet (downloads)."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_hub_error(response)
                yield response
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
