"""``Service``: a deployed service across its devices, as Azure ML's ``Webservice`` is.

``service.state`` is the state rolled up over every device (worst first: Failed >
Unschedulable > Unhealthy > Transitioning > Healthy; a device that has not reported yet is
Pending, which counts as Transitioning), ``service.devices`` each device's own
state, reason and endpoint, as of the last time the service was read from the hub (at
construction, after a wait, or :meth:`Service.refresh`).
"""

from __future__ import annotations

import builtins
import ssl
import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manifests.desired import DeploymentSettings
from manifests.errors import FetchError, RuntimeFailure
from manifests.logs import MAX_TAIL
from manifests.module import tagged_models
from manifests.rollout import RolloutSpec
from manifests.states import ServiceState, StateOnDevice
from packager.sdk.answers import (
    Deployed,
    DeviceServiceState,
    FleetChange,
    KeysRegenerated,
    RolledBack,
    ServiceKeys,
    ServiceLogs,
    ServiceRecord,
    seen_text,
)
from packager.sdk.configs import DeploymentConfig
from packager.sdk.data import (
    DataDownload,
    DataFilter,
    DataListing,
    delete_service_data,
    download_service_data,
    list_batches,
)
from packager.sdk.errors import BadArgument, DeploymentFailed, DeploymentTimeout, DevicesOffline
from packager.sdk.hub import Hub
from packager.sdk.live import show_output_view, target_text
from packager.sdk.model import check_name
from packager.sdk.progress import ProgressEvent, ProgressOption, reporting
from packager.sdk.scoring import decode_answer, post_score, request_bytes
from packager.sdk.targets import Target, check_device_id, check_target

if TYPE_CHECKING:
    from packager.sdk.configs import InferenceConfig
    from packager.sdk.model import Model
    from packager.sdk.module import Module


#: How long a wait polls before it gives up on devices that are all offline: an agent started
#: just before the deploy may not have told the hub it is online yet.
OFFLINE_GRACE_S = 10.0


class Service:
    """A deployed service: ``Service(hub, "digits-svc")``."""

    def __init__(self, workspace: Hub, name: str) -> None:
        if not isinstance(workspace, Hub):
            raise BadArgument(f"Service: the first argument is a Hub, not {type(workspace).__name__}")
        self.workspace = workspace
        self.name = check_name(name, "service")
        self.record = self._read()
        #: the module version ``Model.deploy`` built for this service (None otherwise)
        self.module_version: str | None = None
        #: what the deployment that made this object changed, with its warnings
        self.deployed: Deployed | None = None

    @classmethod
    def _of(cls, workspace: Hub, record: ServiceRecord) -> Service:
        service = cls.__new__(cls)
        service.workspace, service.name, service.record = workspace, record.name, record
        service.module_version, service.deployed = None, None
        return service

    def _read(self) -> ServiceRecord:
        return ServiceRecord.of(self.workspace.transport.get(f"/api/v1/deployments/{self.name}"))

    @classmethod
    def list(cls, workspace: Hub) -> builtins.list[Service]:
        """Every service on the hub, by name."""
        answer = workspace.transport.get("/api/v1/deployments")
        return [cls._of(workspace, ServiceRecord.of(s)) for s in answer["deployments"]]

    @property
    def state(self) -> ServiceState:
        """The rolled-up state (Unschedulable while the service targets no device)."""
        return self.record.state

    @property
    def devices(self) -> builtins.list[DeviceServiceState]:
        """Each device's state, reason, endpoint and serving version."""
        return list(self.record.devices)

    @property
    def module(self) -> str:
        """The module version deployed, ``name:version``."""
        return f"{self.record.module}:{self.record.version}"

    @property
    def settings(self) -> DeploymentSettings:
        """What each device runs the service with: port, runtime, resources, probe."""
        return self.record.settings

    @property
    def scoring_uri(self) -> str | None:
        """The scoring URL of the first Healthy device (each device has its own)."""
        return self._healthy_uri("/score")

    @property
    def swagger_uri(self) -> str | None:
        """The OpenAPI document of the first Healthy device's endpoint (Azure's ``swagger_uri``)."""
        return self._healthy_uri("/swagger.json")

    def _healthy_uri(self, path: str) -> str | None:
        device = next((d for d in self._healthy()), None)
        if device is None or device.endpoint is None:
            return None
        return f"{self._url(device.endpoint)}{path}"

    def _url(self, endpoint: str) -> str:
        # A TLS service answers HTTPS where the device says it listens.
        return "https://" + endpoint.split("://", 1)[-1] if self.settings.tls is not None else endpoint

    def __repr__(self) -> str:
        return f"Service({self.name!r}, {self.module}, {self.state})"

    def refresh(self) -> Service:
        """Read the service's state from the hub again."""
        self.record = self._read()
        return self

    update_deployment_state = refresh

    def wait_for_deployment(
        self,
        show_output: bool = False,
        timeout: float | None = None,
        *,
        timeout_sec: float | None = None,
        interval: float = 1.0,
        progress: ProgressOption = None,
        wait_offline: bool = False,
        offline_grace: float = OFFLINE_GRACE_S,
    ) -> None:
        """Poll until every device is Healthy or Failed; raise unless all are Healthy.

        ``show_output=True`` shows each device's state as it changes (a live table in a
        terminal, a line per change elsewhere); otherwise a terminal shows a bar of how many
        devices are final. ``progress`` receives an event per poll whose ``service`` is the
        service as polled. Gives up after ``timeout`` seconds (Azure's
        ``timeout_sec``; default 600) with :class:`DeploymentTimeout`; a device that ended
        Failed raises :class:`DeploymentFailed`. Both carry every device's state. When every
        device still waited for is offline (as the hub knows from its ``online`` topic) once
        ``offline_grace`` seconds have passed (an agent started just before may still be
        connecting), it stops with :class:`DevicesOffline` (``edge-2 is offline (last seen
        …)``): nothing changes until one reconnects. ``wait_offline=True`` keeps waiting.
        """
        limit = timeout if timeout is not None else timeout_sec if timeout_sec is not None else 600.0
        if not isinstance(limit, int | float) or limit <= 0:
            raise BadArgument(
                f"wait_for_deployment: timeout must be a positive number of seconds, not {limit!r}"
            )
        if not isinstance(offline_grace, int | float) or offline_grace < 0:
            raise BadArgument(
                f"wait_for_deployment: offline_grace must be >= 0 seconds, not {offline_grace!r}"
            )
        if not isinstance(interval, int | float) or interval <= 0:
            raise BadArgument(f"wait_for_deployment: interval must be positive, not {interval!r}")
        if progress is None:
            progress = show_output_view() if show_output else self.workspace.progress
        start = time.monotonic()
        self.refresh()
        if not self.record.devices:
            raise DeploymentFailed(
                f"service {self.name} targets no device ({target_text(self.record.target)}); "
                "enroll or tag a device so that it matches",
                [],
            )
        with reporting(progress) as report:
            self._report(report)
            while not self._settled() and time.monotonic() - start < limit:
                if not wait_offline and time.monotonic() - start >= offline_grace:
                    self._raise_if_all_offline()
                time.sleep(interval)
                self.refresh()
                self._report(report)
        if not self._settled():
            pending = [
                d.device_id if d.online else f"{d.device_id} (offline, last seen {seen_text(d.last_seen)})"
                for d in self.record.devices
                if not self._final(d)
            ]
            raise DeploymentTimeout(
                f"service {self.name} did not settle within {limit:g}s: still {self.state} on "
                f"{', '.join(pending)}; check 'edgepack device show' for those devices",
                self.devices,
            )
        failed = [d for d in self.record.devices if d.state is not StateOnDevice.HEALTHY]
        if failed:
            first = failed[0]
            raise DeploymentFailed(
                f"service {self.name} is {self.state}: {len(failed)} device(s) failed, first "
                f"{first.device_id}: {first.reason or 'no reason reported'}"
                + (
                    f" (traceback: 'edgepack service show {self.name}'; its log: 'edgepack service logs "
                    f"{self.name} --device {first.device_id} --failed')"
                    if first.failure is not None
                    else ""
                ),
                self.devices,
            )

    def _raise_if_all_offline(self) -> None:
        pending = [d for d in self.record.devices if not self._final(d)]
        if not pending or any(d.online for d in pending):
            return
        raise DevicesOffline(
            f"service {self.name} cannot settle now: {'; '.join(d.offline_text for d in pending)}; "
            "each gets the change when its agent reconnects (wait for it with "
            "'edgepack service wait --wait-offline', wait_offline=True)",
            self.devices,
            pending,
        )

    def _settled(self) -> bool:
        return bool(self.record.devices) and all(self._final(d) for d in self.record.devices)

    def _final(self, device: DeviceServiceState) -> bool:
        # After a change made through this object, a device's report on an earlier generation
        # is the state from before it (a settings change keeps the module's digest, so nothing
        # else tells the two apart): wait for the generation the change issued to the device.
        issued = self.deployed.issued.get(device.device_id) if self.deployed is not None else None
        return device.final_for(issued)

    def _report(self, report: Any) -> None:
        if report is not None:
            done = sum(1 for d in self.record.devices if self._final(d))
            report(
                ProgressEvent(
                    f"waiting for {self.name}", done, len(self.record.devices), "devices", self.record
                )
            )

    def _healthy(self) -> builtins.list[DeviceServiceState]:
        return [d for d in self.record.devices if d.state is StateOnDevice.HEALTHY and d.endpoint]

    def _device(self, device: str | None, what: str) -> str:
        """The device a call is about: the one named, or the service's only device."""
        if device is not None:
            return check_device_id(device)
        ids = [d.device_id for d in self.record.devices]
        if len(ids) == 1:
            return ids[0]
        raise BadArgument(
            f"{what}: service {self.name} runs on {len(ids)} devices ({', '.join(ids) or 'none'}); "
            "name one with device='ID'"
        )

    def logs(self, device: str | None = None, tail: int = 100, *, failed: bool = False) -> ServiceLogs:
        """A module's last ``tail`` log lines on ``device`` (the only device when omitted),
        fetched from the device through the hub: the serving instance's, or with ``failed``
        those the service's last failed instance left (after a rollback, or when it never
        started)."""
        if not isinstance(tail, int) or isinstance(tail, bool) or not 1 <= tail <= MAX_TAIL:
            raise BadArgument(f"get_logs: tail must be a whole number from 1 to {MAX_TAIL}, not {tail!r}")
        if not isinstance(failed, bool):
            raise BadArgument(f"get_logs: failed must be True or False, not {failed!r}")
        device_id = self._device(device, "get_logs")
        params: dict[str, str | int] = {"device": device_id, "tail": tail}
        if failed:
            params["failed"] = "true"
        answer = self.workspace.transport.get(f"/api/v1/deployments/{self.name}/logs", params=params)
        return ServiceLogs.of(answer)

    def get_logs(
        self,
        device: str | None = None,
        tail: int | None = None,
        *,
        num_lines: int | None = None,
        failed: bool = False,
    ) -> str:
        """The module's last ``tail`` log lines on one device as text (Azure's ``num_lines``
        works too; default 5,000, as in Azure ML): what fits one message from the device.
        ``failed=True``: the log of the service's last failed instance instead."""
        lines = tail if tail is not None else num_lines if num_lines is not None else 5000
        return "\n".join(self.logs(device, lines, failed=failed).lines)

    def run(
        self, input_data: Any, device: str | None = None, *, key: str | None = None, timeout: float = 30.0
    ) -> Any:
        """Score ``input_data`` on one device's endpoint and return the answer (its JSON).

        ``input_data`` is a JSON string (as Azure ML scripts pass it) or any JSON-ready value.
        ``device`` defaults to the first Healthy device. A service deployed with
        ``auth_enabled`` is called with ``key``, else with its primary key (fetched from the
        hub); one deployed with ``ssl_enabled`` over HTTPS, verified with the hub's endpoint CA.
        """
        body = request_bytes(input_data)
        if device is not None:
            check_device_id(device)
        self.refresh()
        if device is None:
            healthy = self._healthy()
            if not healthy:
                states = ", ".join(f"{d.device_id}: {d.state}" for d in self.record.devices)
                raise RuntimeFailure(
                    f"service {self.name} is Healthy on no device ({states or 'no device'}); "
                    "wait_for_deployment() first"
                )
            target = healthy[0]
        else:
            found = next((d for d in self.record.devices if d.device_id == device), None)
            if found is None:
                raise BadArgument(
                    f"service {self.name} does not run on device {device!r} "
                    f"(it runs on {', '.join(d.device_id for d in self.record.devices) or 'no device'})"
                )
            target = found
        if not target.endpoint:
            raise FetchError(
                f"device {target.device_id} reports no endpoint for {self.name} "
                f"(state {target.state}); wait until it is Healthy"
            )
        if key is None and self.settings.auth is not None:
            key = self.get_keys()[0]
        verify: ssl.SSLContext | bool = True
        if self.settings.tls is not None:
            # Its certificate comes from the hub's endpoint CA, which no public CA vouches for.
            verify = self.workspace.endpoint_ca()
        return decode_answer(
            post_score(self._url(target.endpoint), body, key=key, verify=verify, timeout=timeout)
        )

    def keys(self) -> ServiceKeys:
        """The endpoint keys of a service deployed with ``auth_enabled``."""
        return ServiceKeys.of(self.workspace.transport.get(f"/api/v1/deployments/{self.name}/keys"))

    def get_keys(self) -> tuple[str, str]:
        """``(primary, secondary)``: the keys callers of an ``auth_enabled`` service send
        (Azure ML's ``get_keys``). ``run`` sends the primary one by itself."""
        keys = self.keys()
        return keys.primary, keys.secondary

    def regen_key(self, key: str, *, timeout: float = 60.0) -> KeysRegenerated:
        """Replace the ``"primary"`` or ``"secondary"`` key (Azure ML's ``regen_key``); the other
        keeps working, and devices switch to the new one without restarting the service.

        Returns once every online device the change went to has applied it (so the new key
        works and the old one is refused there, and ``run()`` finds the device Healthy);
        an offline device switches when it reconnects and is not waited for. Raises
        :class:`DeploymentTimeout` when an online device has not applied it in ``timeout``
        seconds (the keys are replaced all the same)."""
        which = key.lower() if isinstance(key, str) else key
        if which not in ("primary", "secondary"):
            raise BadArgument(f"regen_key: key {key!r}: give 'primary' or 'secondary'")
        answer = KeysRegenerated.of(
            self.workspace.transport.send(
                "POST", f"/api/v1/deployments/{self.name}/keys/regenerate", {"key": which}
            )
        )
        self._wait_applied(answer.issued, timeout, what=f"the new {which} key")
        return answer

    def _wait_applied(self, issued: Mapping[str, int], timeout: float, *, what: str) -> None:
        """Wait until every online device of ``issued`` reports the generation issued to it."""
        start = time.monotonic()
        while True:
            self.refresh()
            pending = [
                d
                for d in self.record.devices
                if d.device_id in issued and d.online and (d.generation or 0) < issued[d.device_id]
            ]
            if not pending:
                return
            if time.monotonic() - start >= timeout:
                names = ", ".join(d.device_id for d in pending)
                message = f"service {self.name}: {names} did not apply {what} within {timeout:g} s"
                raise DeploymentTimeout(message, self.record.devices)
            time.sleep(0.2)

    def update(
        self,
        *,
        models: Sequence[Model] | None = None,
        inference_config: InferenceConfig | None = None,
        deployment_config: DeploymentConfig | None = None,
        module: str | Module | None = None,
        target: Target | None = None,
        progress: ProgressOption = None,
        rollout: RolloutSpec | None = None,
    ) -> None:
        """Change what the service runs, how, or where; unnamed parts stay as they are.

        ``models`` with ``inference_config`` build and deploy a new module version (as
        :meth:`Model.deploy`); ``inference_config`` alone builds it with the models the
        service's module was built from; ``module`` deploys a pushed one;
        ``deployment_config`` replaces the settings; ``target`` the devices. ``rollout``
        (``Rollout.waves(...)``) stages a new module version in gated waves (a module given by
        ``module``; a new build deploys at once).
        :meth:`wait_for_deployment` afterwards waits for the states this change brings.
        """
        if models is not None and inference_config is None:
            raise BadArgument(
                "Service.update: models need the inference_config to build them with (the entry "
                "script is not kept on the hub)"
            )
        if inference_config is not None and module is not None:
            raise BadArgument("Service.update: give inference_config (a new build) or module, not both")
        if inference_config is not None and models is None:
            models = self._models_built_from()
        new_target = check_target(target, "Service.update") if target is not None else None
        if models is not None:
            from packager.sdk.deploy import deploy_models

            assert inference_config is not None
            updated = deploy_models(
                self.workspace,
                self.name,
                models,
                inference_config,
                deployment_config,
                new_target,
                overwrite=True,
                keep=self.record,
                progress=progress,
            )
            self.record, self.module_version, self.deployed = (
                updated.record,
                updated.module_version,
                updated.deployed,
            )
            return
        ref = module if module is not None else self.module
        updated = put_deployment(
            self.workspace, self.name, ref, deployment_config, new_target, keep=self.record, rollout=rollout
        )
        self.record, self.deployed = updated.record, updated.deployed

    def _models_built_from(self) -> builtins.list[Model]:
        """The registered models the service's module was built from, as its signed tags say."""
        from packager.sdk.model import Model
        from packager.sdk.module import Module

        module = Module(self.workspace, self.record.module, self.record.version)
        refs = tagged_models(module.manifest.tags)
        if not refs:
            raise BadArgument(
                f"Service.update: module {module.id} names no registered model it was built from "
                "(it was pushed, or built before edgepack recorded them); pass models=[...] too"
            )
        models = []
        for ref in refs:
            name, _, version = ref.rpartition(":")
            if not name or not version.isdigit():
                raise BadArgument(
                    f"Service.update: module {module.id} names a model as {ref!r}, not NAME:VERSION; "
                    "pass models=[...] too"
                )
            models.append(Model(self.workspace, name, int(version)))
        return models

    def rollout(self) -> dict[str, Any]:
        """The service's rollout as the hub reports it (``status`` is one line, e.g.
        ``Halted: wave 1 (50 devices): error rate 5.2% vs 0.0% on 1``)."""
        path = f"/api/v1/deployments/{self.name}/rollout"
        answer: dict[str, Any] = self.workspace.transport.send("GET", path)
        return answer

    def rollout_action(self, action: str) -> dict[str, Any]:
        """``"resume"`` a halted rollout, ``"promote"`` its next wave now, or ``"abort"`` it
        (every device back on the previous version); the rollout as it is after."""
        if action not in ("resume", "promote", "abort"):
            raise BadArgument(f"rollout action {action!r}: use resume, promote or abort")
        answer = self.workspace.transport.send("POST", f"/api/v1/deployments/{self.name}/rollout/{action}")
        self.record = ServiceRecord.model_validate(answer["deployment"])
        rollout: dict[str, Any] = answer["deployment"]["rollout"]
        return rollout

    def rollback(self) -> RolledBack:
        """Redeploy the service's previous module version: the newest version of its module
        pushed to the hub before the one it runs now, with the same settings and target.
        :class:`HubConflict` when there is none."""
        path = f"/api/v1/deployments/{self.name}/rollback"
        return RolledBack.of(self.workspace.transport.send("POST", path))

    def get_data(
        self,
        *,
        since: str | datetime | date | None = None,
        until: str | datetime | date | None = None,
        designation: str | None = None,
        model: str | None = None,
        device: str | None = None,
    ) -> DataListing:
        """The batches of production data the service's devices collected and the hub holds
        (Azure's ``ModelDataCollector`` data), oldest first, with each device's spool figures.
        ``since``/``until``: ``"1h"`` ago, a day, an ISO time or a datetime."""
        where = DataFilter.of(since=since, until=until, designation=designation, model=model, device=device)
        return list_batches(self.workspace.transport, self.name, where)

    def download_data(
        self,
        out_dir: str | Path,
        *,
        since: str | datetime | date | None = None,
        until: str | datetime | date | None = None,
        designation: str | None = None,
        model: str | None = None,
        device: str | None = None,
        progress: ProgressOption = None,
    ) -> DataDownload:
        """Write the collected data as JSON lines under ``out_dir``, in Azure's layout
        (``service/model/version/designation/YYYY/MM/DD/DEVICE-ID.jsonl``); only the records
        between ``since`` and ``until``. Every batch is checked against its digest first."""
        return download_service_data(
            self.workspace,
            self.name,
            out_dir,
            since=since,
            until=until,
            designation=designation,
            model=model,
            device=device,
            progress=progress,
        )

    def delete_data(self, *, device: str | None = None, until: str | datetime | date | None = None) -> int:
        """Delete the collected data the hub holds for this service (one device's, or what was
        received before ``until``); the number of batches deleted. Deleting the service keeps
        its data (until the hub's retention): this is how to remove it."""
        return delete_service_data(self.workspace, self.name, device=device, until=until)

    def delete(self) -> FleetChange:
        """Delete the service; its devices stop running it."""
        return FleetChange.of(
            self.workspace.transport.request("DELETE", f"/api/v1/deployments/{self.name}").json()
        )


def module_ref(module: object) -> tuple[str, str]:
    """A module given as ``"name:version"``, a Module or a (name, version) pair."""
    from packager.sdk.module import Module, split_ref

    if isinstance(module, Module):
        return module.name, module.version
    if isinstance(module, tuple) and len(module) == 2 and all(isinstance(p, str) for p in module):
        return module[0], module[1]
    if not isinstance(module, str):
        raise BadArgument(f"module must be 'NAME:VERSION' or a Module, not {type(module).__name__}")
    return split_ref(module)


def put_deployment(
    hub: Hub,
    name: str,
    module: object,
    deployment_config: DeploymentConfig | None,
    target: Target | None,
    *,
    keep: ServiceRecord | None = None,
    rollout: RolloutSpec | None = None,
) -> Service:
    """Create or update service ``name`` on the hub. With ``keep`` (the service as it is),
    what is not given stays: its settings and its target. ``rollout``: how the change
    reaches the devices (:class:`packager.sdk.rollout.Rollout`; default all at once)."""
    check_name(name, "service")
    mod_name, version = module_ref(module)
    if deployment_config is not None and not isinstance(deployment_config, DeploymentConfig):
        raise BadArgument(
            f"deploy: deployment_config must be a DeploymentConfig, not {type(deployment_config).__name__}"
        )
    body: dict[str, Any] = {"module": mod_name, "version": version}
    if target is not None:
        body["target"] = target.to_json()
    elif keep is not None:
        body["target"] = keep.target
    else:
        raise BadArgument("deploy: say where to deploy (target=Selector(...) or Devices([...]))")
    if deployment_config is not None:
        body["deployment_config"] = deployment_config.to_json()
    elif keep is not None:
        body["settings"] = keep.settings.model_dump(mode="json")
    if rollout is not None:
        if not isinstance(rollout, RolloutSpec):
            raise BadArgument(
                f"deploy: rollout must come from Rollout.waves(...), not {type(rollout).__name__}"
            )
        body["rollout"] = rollout.to_json()
    answer = Deployed.of(hub.transport.send("PUT", f"/api/v1/deployments/{name}", body))
    service = Service._of(hub, answer.deployment)
    service.deployed = answer
    return service
