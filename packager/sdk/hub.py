"""``Hub``: an edgepack hub, the ``Workspace`` of an Azure ML script.

Every other SDK object is reached through a hub: ``Model.register(hub, ...)``,
``Service(hub, name)``, ``Device.list(hub)``. A hub holds one HTTP client, made at first use;
close it with :meth:`Hub.close` or use the hub as a context manager.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from manifests.errors import HubUnavailable
from packager.home import default_key_path
from packager.sdk.config import HubConfig
from packager.sdk.errors import BadArgument
from packager.sdk.progress import ProgressOption
from packager.sdk.targets import Target, check_target
from packager.sdk.transport import Transport

if TYPE_CHECKING:
    from manifests.rollout import RolloutSpec
    from packager.sdk.alerts import Alerts
    from packager.sdk.configs import DeploymentConfig
    from packager.sdk.module import Module
    from packager.sdk.service import Service


class Hub:
    """A connection to one edgepack hub.

    ``url`` and ``token`` are the hub's address and admin token; ``ca`` the CA certificate an
    HTTPS hub's certificate is checked against (default: the system's). ``target`` is where
    deployments go when a call names none (Azure ML scripts name no devices:
    ``Hub.from_config(target=Selector("site=berlin"))`` makes them work unchanged).
    ``key`` is the signing key for modules the SDK builds (default: the one
    ``edgepack keygen`` made). ``progress`` is the default of every call's ``progress=``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ca: str | Path | None = None,
        target: Target | None = None,
        key: str | Path | None = None,
        progress: ProgressOption = None,
        timeout: float = 60.0,
    ) -> None:
        if not isinstance(url, str) or not url.strip():
            raise BadArgument("Hub: give the hub's URL, e.g. Hub('http://hub.example:8800', token)")
        self._init(HubConfig(url.rstrip("/"), token, str(ca) if ca else None), target, key, progress, timeout)

    def _init(
        self,
        config: HubConfig,
        target: Target | None,
        key: str | Path | None,
        progress: ProgressOption,
        timeout: float,
    ) -> None:
        self.config = config
        self.default_target = check_target(target, "Hub") if target is not None else None
        self.key_path = Path(key) if key is not None else default_key_path()
        self.progress: ProgressOption = progress
        self.timeout = timeout
        self._transport: Transport | None = None
        self._endpoint_ca: ssl.SSLContext | None = None

    @classmethod
    def from_config(
        cls,
        path: str | Path | None = None,
        *,
        target: Target | None = None,
        key: str | Path | None = None,
        progress: ProgressOption = None,
        timeout: float = 60.0,
    ) -> Hub:
        """The hub ``edgepack login`` saved (``path``: another such file), unless
        ``EDGEPACK_HUB_URL`` / ``EDGEPACK_TOKEN`` / ``EDGEPACK_HUB_CA`` say otherwise."""
        config = HubConfig.resolve(path=Path(path) if path is not None else None)
        hub = cls.__new__(cls)
        hub._init(config, target, key, progress, timeout)
        return hub

    @property
    def url(self) -> str:
        """The hub's address."""
        return self.config.url

    @property
    def transport(self) -> Transport:
        """The HTTP client (made at first use)."""
        if self._transport is None:
            self._transport = Transport(self.config, timeout=self.timeout)
        return self._transport

    @property
    def alerts(self) -> Alerts:
        """The hub's alert rules and the alerts firing now."""
        from packager.sdk.alerts import Alerts

        return Alerts(self)

    def close(self) -> None:
        """Close the HTTP connections (the hub object can be used again afterwards)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Hub({self.url!r})"

    def target_for(self, target: Target | None, what: str) -> Target:
        """``target``, else this hub's default; a BadArgument when neither is given."""
        if target is not None:
            return check_target(target, what)
        if self.default_target is None:
            raise BadArgument(
                f"{what}: say where to deploy: target=Selector('site=berlin') or "
                "Devices(['edge-1']), or give the hub a default (Hub.from_config(target=...))"
            )
        return self.default_target

    def deploy(
        self,
        name: str,
        module: str | Module,
        deployment_config: DeploymentConfig | None = None,
        target: Target | None = None,
        rollout: RolloutSpec | None = None,
    ) -> Service:
        """Deploy (or update) service ``name``: a pushed module (``"digits:1"`` or a
        :class:`Module`) with its configuration, to ``target`` (default: the hub's).
        ``rollout=Rollout.waves("1%,10%,100%", bake="2m", gates=[...])`` stages a new version
        of a running service in gated waves (docs/rollouts.md).

        Every device the target selects gets a new signed desired state; follow the rollout
        with ``service.wait_for_deployment()``.
        """
        from packager.sdk.service import put_deployment

        return put_deployment(
            self, name, module, deployment_config, self.target_for(target, "deploy"), rollout=rollout
        )

    def endpoint_ca(self) -> ssl.SSLContext:
        """What verifies the HTTPS of services deployed with ``ssl_enabled``: the hub's
        endpoint CA (public, fetched once)."""
        if self._endpoint_ca is None:
            pem = self.transport.request("GET", "/api/v1/hub/endpoint-ca").text
            try:
                self._endpoint_ca = ssl.create_default_context(cadata=pem)
            except ssl.SSLError as exc:
                raise HubUnavailable(f"the hub's endpoint CA is not a usable certificate ({exc})") from None
        return self._endpoint_ca

    def collect_garbage(self, grace_s: int = 3600) -> list[str]:
        """Delete the hub's blobs that no model or module uses and that are older than
        ``grace_s`` seconds (uploads never registered, failed pushes); the digests freed."""
        if not isinstance(grace_s, int) or isinstance(grace_s, bool) or grace_s < 0:
            raise BadArgument(f"collect_garbage: grace_s must be a whole number of seconds, not {grace_s!r}")
        answer = self.transport.send("POST", "/api/v1/registry/gc", params={"grace_s": grace_s})
        return [str(d) for d in answer["freed_blobs"]]
