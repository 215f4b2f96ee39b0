"""What every device should run, decided from data alone (no database, no clock, no keys).

``plan_fleet`` turns devices x deployments into each device's list of module assignments;
``port_conflicts`` finds two services that would bind one port on one device (refused up front,
before anything is stored); ``changed_devices`` says whose desired state must be re-issued;
``desired_payload`` is the document the hub signs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cloud_hub.fleet.targeting import Target
from cloud_hub.rollouts.waves import wave_of
from manifests.bounds import MAX_INT63
from manifests.canonical import canonical_json
from manifests.desired import DEVICE_ID_PATTERN, DeploymentSettings, DesiredState, ModuleAssignment
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

    def keeps_previous(self, device: DeviceView) -> bool:
        """Under a rollout: ``device``'s wave is not released, it keeps the previous module."""
        return self.staged is not None and self.staged.keeps_previous(device)

    def assignment(
        self, device: DeviceView | None = None, *, previous: bool | None = None
    ) -> ModuleAssignment:
        """What ``device`` runs of this service: the deployment's module, or under a rollout
        the previous one while the device's wave is not released (``previous`` says which
        without a device)."""
        staged = self.staged
        if previous is None:
            previous = device is not None and self.keeps_previous(device)
        if staged is not None and previous:
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
    """Every device's full list of assignments (an empty list when nothing targets it).

    Devices that run the same services share one list of the same assignment objects (read
    them, never change them): a fleet-wide change then digests and renders each distinct list
    once (:func:`plan_digests`), not once per device.
    """
    # Each service's assignment, and under a rollout the previous one too: a device gets the
    # one its wave says, and the key of its shared list says which it got.
    ordered = [
        (d, d.assignment(previous=False), d.assignment(previous=True) if d.staged is not None else None)
        for d in sorted(deployments, key=lambda d: d.name)
    ]
    shared: dict[tuple[tuple[str, bool], ...], list[ModuleAssignment]] = {}
    plan: Plan = {}
    for device in devices:
        chosen: list[tuple[tuple[str, bool], ModuleAssignment]] = []
        for d, current, previous in ordered:
            if not d.target.includes(device.id, device.tags):
                continue
            if previous is not None and d.keeps_previous(device):
                chosen.append(((d.name, True), previous))
            else:
                chosen.append(((d.name, False), current))
        key = tuple(name for name, _ in chosen)
        if key not in shared:
            shared[key] = [a for _, a in chosen]
        plan[device.id] = shared[key]
    return plan


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


def plan_digests(plan: Mapping[str, Sequence[ModuleAssignment]]) -> dict[str, str]:
    """Every device's :func:`assignments_digest`, computed once per distinct list of assignment
    objects (shared by :func:`plan_fleet`; the plan holds them, so their ids stay unique)."""
    by_objects: dict[tuple[int, ...], str] = {}
    out: dict[str, str] = {}
    for device_id, modules in plan.items():
        key = tuple(map(id, modules))
        if key not in by_objects:
            by_objects[key] = assignments_digest(modules)
        out[device_id] = by_objects[key]
    return out


def changed_devices(issued: Mapping[str, str | None], plan: Plan) -> list[str]:
    """Devices of ``plan`` whose assignments differ from what they were last issued.

    ``issued`` maps a device to the :func:`assignments_digest` of its current desired state
    (absent or None: never issued). Comparing with what was *issued*, rather than with a plan
    computed before the change, keeps a device from being skipped because a concurrent change
    moved it in between.
    """
    digests = plan_digests(plan)
    return sorted(d for d in plan if issued.get(d) != digests[d])


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


def desired_payloads(
    plan: Mapping[str, Sequence[ModuleAssignment]],
    generations: Mapping[str, int],
    *,
    issued: datetime,
    expires: datetime,
) -> dict[str, dict[str, object]]:
    """:func:`desired_payload` of every device in ``generations`` (its modules from ``plan``).

    The document is validated once per distinct list of assignments (:func:`plan_fleet` shares
    them); each device's copy then gets its own id and generation, checked as the model checks
    them. Copies share the rendered ``modules``: serialise them, never change them.
    """
    templates: dict[tuple[int, ...], dict[str, object]] = {}
    out: dict[str, dict[str, object]] = {}
    for device_id, generation in generations.items():
        modules = plan.get(device_id, [])
        key = tuple(map(id, modules))
        if key not in templates:
            templates[key] = desired_payload(device_id, generation, modules, issued=issued, expires=expires)
        if not re.fullmatch(DEVICE_ID_PATTERN, device_id) or not 1 <= generation <= MAX_INT63:
            # The model's own refusal, with its message.
            desired_payload(device_id, generation, modules, issued=issued, expires=expires)
        out[device_id] = {**templates[key], "device_id": device_id, "generation": generation}
    return out
