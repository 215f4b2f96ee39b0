"""What every device should run, decided from data alone (no database, no clock, no keys).

``plan_fleet`` turns devices x deployments into each device's list of module assignments;
``port_conflicts`` finds two services that would bind one port on one device (refused up front,
before anything is stored); ``changed_devices`` says whose desired state must be re-issued;
``desired_payload`` is the document the hub signs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cloud_hub.fleet.targeting import Target
from cloud_hub.rollouts.waves import wave_of
from manifests.canonical import canonical_json
from manifests.desired import DeploymentSettings, DesiredState, ModuleAssignment
from manifests.digests import sha256_digest


@dataclass(frozen=True)
class DeviceView:
    id: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Staged:
    """A deployment under a rollout: devices of waves after ``wave`` keep the previous module
    (``module``, ``version``, ``manifest_digest``, signed by ``signers``)."""

    rollout_id: str
    wave: int
    waves: tuple[float, ...]
    thresholds: Mapping[str, Sequence[float]]
    spread_by: str | None
    module: str
    version: str
    manifest_digest: str
    signers: tuple[str, ...] = ()

    def keeps_previous(self, device: DeviceView) -> bool:
        wave = wave_of(
            self.rollout_id,
            device.id,
            device.tags,
            waves=self.waves,
            thresholds=self.thresholds,
            spread_by=self.spread_by,
        )
        return wave > self.wave


@dataclass(frozen=True)
class DeploymentView:
    name: str
    module: str
    version: str
    manifest_digest: str
    settings: DeploymentSettings
    target: Target
    signers: tuple[str, ...] = ()  # the keys allowed to sign the module's name
    staged: Staged | None = None  # under a rollout (cloud_hub.rollouts)

    def assignment(self, device: DeviceView | None = None) -> ModuleAssignment:
        """What ``device`` runs of this service: the deployment's module, or under a rollout
        the previous one while the device's wave is not released."""
        staged = self.staged
        if staged is not None and device is not None and staged.keeps_previous(device):
            module, version, digest, signers = (
                staged.module, staged.version, staged.manifest_digest, staged.signers
            )  # fmt: skip
        else:
            module, version, digest, signers = self.module, self.version, self.manifest_digest, self.signers
        return ModuleAssignment(
            service=self.name,
            module=module,
            version=version,
            manifest_digest=digest,
            settings=self.settings,
            signers=list(signers) or None,
        )


Plan = dict[str, list[ModuleAssignment]]


def assignments_for(device: DeviceView, deployments: Iterable[DeploymentView]) -> list[ModuleAssignment]:
    """The services a device runs, sorted by service name (so equal plans compare equal)."""
    chosen = [d for d in deployments if d.target.includes(device.id, device.tags)]
    return [d.assignment(device) for d in sorted(chosen, key=lambda d: d.name)]


def plan_fleet(devices: Iterable[DeviceView], deployments: Sequence[DeploymentView]) -> Plan:
    """Every device's full list of assignments (an empty list when nothing targets it)."""
    return {device.id: assignments_for(device, deployments) for device in devices}


@dataclass(frozen=True)
class PortConflict:
    device_id: str
    port: int
    services: tuple[str, ...]

    def message(self) -> str:
        names = " and ".join(repr(s) for s in self.services)
        return (
            f"port {self.port} on device {self.device_id!r} would be bound by both {names}; "
            "give one of them another port (deploymentconfig.json 'port') or another target"
        )


def port_conflicts(plan: Mapping[str, Sequence[ModuleAssignment]]) -> list[PortConflict]:
    """Every (device, port) that more than one service would bind, in a stable order."""
    found: list[PortConflict] = []
    for device_id in sorted(plan):
        by_port: dict[int, list[str]] = {}
        for a in plan[device_id]:
            by_port.setdefault(a.settings.port, []).append(a.service)
        for port in sorted(by_port):
            if len(by_port[port]) > 1:
                found.append(PortConflict(device_id, port, tuple(sorted(by_port[port]))))
    return found


def assignments_digest(modules: Sequence[ModuleAssignment]) -> str:
    """A digest of a device's assignments, stored beside its desired state to spot changes."""
    return sha256_digest(canonical_json([m.model_dump(mode="json") for m in modules]))


def changed_devices(issued: Mapping[str, str | None], plan: Plan) -> list[str]:
    """Devices of ``plan`` whose assignments differ from what they were last issued.

    ``issued`` maps a device to the :func:`assignments_digest` of its current desired state
    (absent or None: never issued). Comparing with what was *issued*, rather than with a plan
    computed before the change, keeps a device from being skipped because a concurrent change
    moved it in between.
    """
    return sorted(d for d, mods in plan.items() if issued.get(d) != assignments_digest(mods))


def devices_running(plan: Mapping[str, Sequence[ModuleAssignment]], service: str) -> list[str]:
    return sorted(d for d, mods in plan.items() if any(m.service == service for m in mods))


def desired_payload(
    device_id: str,
    generation: int,
    modules: Sequence[ModuleAssignment],
    *,
    issued: datetime,
    expires: datetime,
) -> dict[str, object]:
    """The JSON-ready ``signed`` document of a device's desired state (validated on the way)."""
    state = DesiredState(
        device_id=device_id,
        generation=generation,
        issued=issued,
        expires=expires,
        modules=list(modules),
        hub_reads_newer=True,
    )
    return state.model_dump(mode="json", by_alias=True)
