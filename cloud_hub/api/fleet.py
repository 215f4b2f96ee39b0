"""Routes: devices, deployments (services), the hub's public key, and the device API.

Every route that lists or changes anything needs the admin token; ``/api/v1/hub/key`` is
public (devices need it to verify desired states) and ``/api/v1/device/...`` takes a device
token (see ``api.device_auth``). Changes to what devices run go through ``Fleet``
(:class:`cloud_hub.fleet.changes.FleetChanges`), which re-issues, signs and stores desired
states and has their effects (publishes, broker accounts) applied; no route does either itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.api import device_auth
from cloud_hub.api.deps import Admin, Core, Fleet, Link
from cloud_hub.core import HubCore
from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, DeviceOffline, NotFound
from cloud_hub.fleet.changes import Outcome
from cloud_hub.fleet.deployments import (
    ModuleRef,
    check_service_name,
    delete_deployment,
    get_deployment,
    roll_back_deployment,
    settings_from_request,
    upsert_deployment,
    with_endpoint_keys,
)
from cloud_hub.fleet.desired import (
    current_plan,
    deployment_views,
    device_changed_at,
    service_changed_at,
    stored_state,
)
from cloud_hub.fleet.devices import (
    MAX_BULK,
    Credentials,
    Enrolment,
    check_enrolments,
    enroll_device,
    enroll_devices,
    get_device,
    retag_device,
    revoke_device,
)
from cloud_hub.fleet.endpoint_keys import KeyName, auth_of, get_keys, regenerate
from cloud_hub.fleet.plan import DeviceView, Plan, assignments_for, devices_running
from cloud_hub.fleet.rotation import request_rotation
from cloud_hub.fleet.status import seen_text
from cloud_hub.fleet.tables import Deployment, Device, DeviceDesired, ServiceKeys
from cloud_hub.fleet.targeting import check_tags, parse_selector, parse_target, selector_matches
from cloud_hub.ingest.state import device_module_statuses, service_statuses
from cloud_hub.ingest.tables import DeviceReport
from cloud_hub.registry.modules import get_module
from cloud_hub.rollouts.store import (
    ACTIONS,
    VersionRef,
    assigned,
    end_staging,
    operate,
    previous_version,
    released,
    start_rollout,
)
from cloud_hub.rollouts.store import Limits as RolloutLimits
from cloud_hub.rollouts.store import status_line as rollout_status
from cloud_hub.rollouts.tables import Rollout
from cloud_hub.rollup import DeviceState, device_state, service_state, state_on_device
from cloud_hub.tls.material import ca_pem
from manifests.desired import ModuleAssignment
from manifests.device import DeviceCredentials, MqttEndpoint
from manifests.errors import ConfigError
from manifests.logs import MAX_TAIL
from manifests.reported import FailureDetail, ModuleStatus, Progress
from manifests.rollout import parse_rollout
from manifests.rotation import broker_username
from manifests.signing import TrustedKey, public_key_pem, raw_public_bytes
from manifests.states import ServiceState, StateOnDevice

router = APIRouter()
admin = APIRouter(prefix="/api/v1", dependencies=[Admin])


# --- response and request bodies ---------------------------------------------------------


class HubKey(BaseModel):
    keyid: str
    public_key: str = Field(description="raw Ed25519 public key, hex")
    pem: str


class DeviceOut(BaseModel):
    id: str
    tags: dict[str, str]
    revoked: bool
    online: bool
    last_seen: datetime | None
    agent_version: str | None
    created_at: datetime
    generation: int = 0
    services: list[str] = Field(default_factory=list)


class DeviceCredentialsState(BaseModel):
    """The device's credentials: how often rotated, when last, a rotation in flight."""

    generation: int = Field(description="rotations done; names the broker user")
    mqtt_username: str
    rotated_at: datetime | None = None
    rotation_requested: datetime | None = Field(default=None, description="in flight since")
    rotation_stage: str | None = Field(
        default=None, description="'requested' (the device has not asked yet) or 'both-valid' "
        "(new credentials issued, old ones retired when the device confirms)"
    )


class ServiceOnDevice(BaseModel):
    service: str
    state: StateOnDevice = Field(description="its state here; Pending until the device reported it")
    reason: str | None


class DeviceDetail(DeviceOut):
    desired_issued: datetime | None = None
    desired_expires: datetime | None = None
    applied_generation: int | None = Field(default=None, description="as the device last reported")
    last_error: str | None = Field(default=None, description="e.g. why it refused a desired state")
    modules: list[ModuleStatus] = Field(
        default_factory=list, description="each module as the device last reported it"
    )
    state: DeviceState = Field(
        description="the worst of its services' states (as on the dashboard); Idle with none"
    )
    credentials: DeviceCredentialsState | None = None
    service_states: list[ServiceOnDevice] = Field(
        default_factory=list, description="each service assigned to it, with its state here"
    )


class CredentialsOut(BaseModel):
    mqtt_username: str
    mqtt_password: str
    token: str


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a default

    id: str
    tags: dict[str, str] = Field(default_factory=dict)


class BulkEnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[EnrollRequest] = Field(max_length=MAX_BULK)


class BulkEnrollOut(BaseModel):
    enrolled: int
    issued: int = Field(description="desired states issued: one per new device, naming what targets it")
    published: bool | None = Field(description="None when the hub runs without a broker")
    device_credentials: list[DeviceCredentials] = Field(description="in the order asked; shown once")


class EnrollOut(BaseModel):
    device: DeviceOut
    credentials: CredentialsOut = Field(description="shown once; the hub keeps only hashes")
    hub_url: str
    mqtt_host: str | None
    mqtt_port: int
    topic_prefix: str
    hub_keyid: str
    device_credentials: DeviceCredentials = Field(
        description="the whole document the device's agent needs (edgepack device enroll --out)"
    )


class TagUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)
    replace: bool = Field(default=False, description="drop every tag not in 'set'")


class ChangeOut(BaseModel):
    issued: dict[str, int] = Field(description="device id → new desired-state generation")
    published: bool | None = Field(description="None when the hub runs without a broker")
    publish_errors: list[str] = Field(default_factory=list)


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: str
    version: str
    deployment_config: dict[str, Any] | None = Field(
        default=None, description="an Azure ML deploymentconfig.json, as it is"
    )
    settings: dict[str, Any] | None = Field(
        default=None, description="edgepack DeploymentSettings (instead of deployment_config)"
    )
    target: dict[str, Any] = Field(description='{"devices": [ids]} or {"selector": "k=v,..."}')
    rollout: dict[str, Any] | None = Field(
        default=None,
        description='how the change reaches its devices: {"strategy": "all"} (default) or '
        '{"waves": "1%,10%,50%,100%", "bake": "2m", "gates": ["error_rate<1%", "p95_ms<1.5x"], '
        '"on_failure": "rollback", "spread_by": "site"} (docs/rollouts.md)',
    )


class RolloutOut(BaseModel):
    state: str = Field(description="running, halted, rolled-back, completed, aborted or superseded")
    status: str = Field(
        description="one line, e.g. 'Halted: wave 1 (50 devices): error rate 5.2% vs 0.0% on 1'"
    )
    wave: int = Field(description="the wave released last, from 1")
    waves: list[float] = Field(description="cumulative shares of the devices, in percent")
    devices_on_new: int = Field(description="devices assigned the new version now")
    bake_s: float
    gates: list[str]
    on_failure: str
    spread_by: str | None
    from_version: str
    to_version: str
    wave_started_at: datetime
    bake_started_at: datetime | None
    reason: str | None


class DeviceServiceOut(BaseModel):
    device_id: str
    online: bool
    last_seen: datetime | None = Field(
        default=None, description="the device's last message to the hub (None: never heard from)"
    )
    state: StateOnDevice = Field(description="its state there; Pending until the device reported it")
    reason: str | None = Field(description="one line: why it is in this state (e.g. the failure's cause)")
    failure: FailureDetail | None = Field(
        default=None, description="while Failed: the failed version's traceback and log tail"
    )
    endpoint: str | None = Field(default=None, description="where the device serves it (its report)")
    serving_version: str | None = None
    progress: Progress | None = Field(default=None, description="download/pull progress while Transitioning")
    generation: int | None = Field(
        default=None,
        description="the desired-state generation the device's report is about: a wait for a change "
        "compares it with the generation the change issued to that device",
    )


class DeploymentOut(BaseModel):
    name: str
    module: str
    version: str
    manifest_digest: str
    settings: dict[str, Any]
    target: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    state: ServiceState = Field(description="rolled up over the devices (Unschedulable if none)")
    devices: list[DeviceServiceOut] = Field(default_factory=list)
    rollout: RolloutOut | None = Field(default=None, description="the last deploy's rollout, if it had waves")


class DeployOut(ChangeOut):
    created: bool
    deployment: DeploymentOut
    warnings: list[str] = Field(
        default_factory=list, description="documented Azure keys in the config that have no effect here"
    )


class KeysOut(BaseModel):
    primary: str
    secondary: str


class RegenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: KeyName


class RegeneratedOut(ChangeOut):
    keys: KeysOut


# --- helpers ---------------------------------------------------------------------------------


def _device_out(device: Device, desired: DeviceDesired | None) -> DeviceOut:
    services: list[str] = []
    if desired is not None and desired.payload is not None:
        services = [m.service for m in stored_state(desired.payload).modules]
    return DeviceOut(
        id=device.id,
        tags=dict(device.tags or {}),
        revoked=device.revoked,
        online=device.online,
        last_seen=device.last_seen,
        agent_version=device.agent_version,
        created_at=device.created_at,
        generation=desired.generation if desired is not None else 0,
        services=services,
    )


def _change_out(change: Outcome[Any]) -> dict[str, Any]:
    return {
        "issued": change.issued,
        "published": change.applied.published,
        "publish_errors": change.applied.publish_errors,
    }


@dataclass(frozen=True)
class _FleetView:
    """What every deployment's summary needs, read once per request."""

    plan: Plan
    online: frozenset[str]
    last_seen: dict[str, datetime | None]

    @classmethod
    def read(cls, session: Session) -> _FleetView:
        rows = session.execute(select(Device.id, Device.online, Device.last_seen)).all()
        online = frozenset(id_ for id_, is_online, _ in rows if is_online)
        return cls(current_plan(session), online, {id_: seen for id_, _, seen in rows})


def _deployment_out(session: Session, row: Deployment, view: _FleetView) -> DeploymentOut:
    reported = service_statuses(session, row.name)
    changed = service_changed_at(session, row.name)
    rows: list[DeviceServiceOut] = []
    for device_id in devices_running(view.plan, row.name):
        status = reported.get(device_id)
        # Under a rollout a device's version is its wave's, so judge it by its own assignment.
        mine = [m.manifest_digest for m in view.plan[device_id] if m.service == row.name]
        wanted = mine[0] if mine else row.manifest_digest
        here = state_on_device(status, wanted, changed.get(device_id))
        moving = status is not None and here.state is StateOnDevice.TRANSITIONING
        rows.append(
            DeviceServiceOut(
                device_id=device_id,
                online=device_id in view.online,
                last_seen=view.last_seen.get(device_id),
                state=here.state,
                reason=here.reason,
                failure=status.failure if status is not None and here.state is StateOnDevice.FAILED else None,
                endpoint=status.endpoint if status is not None else None,
                serving_version=status.serving_version if status is not None else None,
                progress=status.progress if status is not None and moving else None,
                generation=status.generation if status is not None else None,
            )
        )
    return DeploymentOut(
        name=row.name,
        module=row.module_name,
        version=row.module_version,
        manifest_digest=row.manifest_digest,
        settings=row.settings,
        target=row.target,
        created_at=row.created_at,
        updated_at=row.updated_at,
        state=service_state(r.state for r in rows),
        devices=rows,
        rollout=_rollout_out(
            session.get(Rollout, row.name), lambda r: len(assigned(view.plan, r.service, r.to_digest))
        ),
    )


def _rollout_out(row: Rollout | None, count: Callable[[Rollout], int]) -> RolloutOut | None:
    """The rollout's answer; ``count`` says how many devices it gives the new version."""
    if row is None:
        return None
    on_new = count(row)
    return RolloutOut(
        state=row.state,
        status=rollout_status(row, on_new),
        wave=row.wave + 1,
        waves=list(row.waves),
        devices_on_new=on_new,
        bake_s=row.bake_s,
        gates=list(row.gates),
        on_failure=row.on_failure,
        spread_by=row.spread_by,
        from_version=row.from_version,
        to_version=row.to_version,
        wave_started_at=row.wave_started_at,
        bake_started_at=row.bake_started_at,
        reason=row.reason,
    )


# --- public ----------------------------------------------------------------------------------


@router.get("/api/v1/hub/key", response_model=HubKey, tags=["hub"])
def hub_key(core: Core) -> HubKey:
    """The hub's public key: devices verify their desired states with it (no auth needed)."""
    pub = core.hub_key.public_key()
    return HubKey(
        keyid=core.hub_key_id, public_key=raw_public_bytes(pub).hex(), pem=public_key_pem(pub).decode()
    )


# --- devices ---------------------------------------------------------------------------------


def _credentials_document(core: HubCore, creds: Credentials, ca: str | None) -> DeviceCredentials:
    """The whole document a device's agent needs, with the secrets shown this once."""
    settings = core.settings
    pub = core.hub_key.public_key()
    return DeviceCredentials(
        device_id=creds.device_id,
        hub_url=settings.base_url(),
        token=creds.token,
        mqtt=MqttEndpoint(
            host=settings.mqtt_public_host or settings.mqtt_host,
            port=settings.mqtt_public_port or settings.mqtt_port,
            username=creds.mqtt_username,
            password=creds.mqtt_password,
            topic_prefix=settings.topic_prefix,
            tls=settings.mqtt_tls_ca is not None,
        ),
        ca_pem=ca,
        hub_key=TrustedKey(keyid=core.hub_key_id, public_key=raw_public_bytes(pub).hex(), name="hub"),
        # The device checks every module against these itself: a hub compromised later can
        # make it run nothing that these publishers did not sign.
        publishers=core.trust,
    )


@admin.post("/devices", status_code=201, response_model=EnrollOut, tags=["devices"])
def enroll(core: Core, fleet: Fleet, body: EnrollRequest) -> EnrollOut:
    """Enroll a device; its credentials are in the answer, once."""
    if body.id == core.settings.mqtt_username:
        # Its MQTT username would be the hub's own: the broker files leave it out, so the
        # credentials printed once could never connect.
        raise Conflict(f"device id {body.id!r} is the hub's own broker user name; choose another id")
    tags = check_tags(body.tags)
    change = fleet.change(lambda s: enroll_device(s, body.id, tags))
    creds = change.result
    with core.sessions.begin() as s:
        device = _device_out(get_device(s, body.id), s.get(DeviceDesired, body.id))
    document = _credentials_document(core, creds, ca_pem(core.settings))
    return EnrollOut(
        device=device,
        credentials=CredentialsOut(
            mqtt_username=creds.mqtt_username, mqtt_password=creds.mqtt_password, token=creds.token
        ),
        hub_url=document.hub_url,
        mqtt_host=document.mqtt.host,
        mqtt_port=document.mqtt.port,
        topic_prefix=document.mqtt.topic_prefix,
        hub_keyid=core.hub_key_id,
        device_credentials=document,
    )


@admin.post("/devices/bulk", status_code=201, response_model=BulkEnrollOut, tags=["devices"])
def enroll_many(core: Core, fleet: Fleet, body: BulkEnrollRequest) -> BulkEnrollOut:
    """Enroll many devices in one transaction, all or none; one broker reload for them all.

    Every entry is checked before anything is stored; the first bad one (an invalid id or tag,
    an id listed twice or already enrolled) refuses the whole list with its position.
    """
    entries = check_enrolments(
        [Enrolment(e.id, e.tags) for e in body.devices], reserved=core.settings.mqtt_username
    )
    change = fleet.change(lambda s: enroll_devices(s, entries))
    ca = ca_pem(core.settings)
    documents = [_credentials_document(core, creds, ca) for creds in change.result]
    return BulkEnrollOut(
        enrolled=len(documents), issued=len(change.issued), published=change.applied.published,
        device_credentials=documents,
    )  # fmt: skip


@admin.get("/devices", tags=["devices"])
def list_devices(
    core: Core,
    selector: str | None = Query(default=None, description="only devices matching k=v,..."),
    include_revoked: bool = False,
) -> dict[str, list[DeviceOut]]:
    wanted = parse_selector(selector) if selector is not None else None
    with core.sessions.begin() as s:
        desired = {d.device_id: d for d in s.scalars(select(DeviceDesired))}
        out = [
            _device_out(d, desired.get(d.id))
            for d in s.scalars(select(Device).order_by(Device.id))
            if (include_revoked or not d.revoked)
            and (wanted is None or selector_matches(wanted, d.tags or {}))
        ]
    return {"devices": out}


@admin.get("/devices/{device_id}", response_model=DeviceDetail, tags=["devices"])
def show_device(core: Core, device_id: str) -> DeviceDetail:
    with core.sessions.snapshot() as s:
        device = get_device(s, device_id)
        desired = s.get(DeviceDesired, device_id)
        report = s.get(DeviceReport, device_id)
        modules = device_module_statuses(s, device_id)
        # Judged against what the deployments ask for now, as the dashboard judges them.
        assigned: list[ModuleAssignment] = []
        if not device.revoked:
            # Under a rollout, a device of a wave not yet released is judged by the version it keeps.
            assigned = assignments_for(DeviceView(device.id, dict(device.tags or {})), deployment_views(s))
        reported = {m.service: m for m in modules}
        changed = device_changed_at(s, device_id)
        states = []
        for assignment in assigned:
            service = assignment.service
            here = state_on_device(reported.get(service), assignment.manifest_digest, changed.get(service))
            states.append(ServiceOnDevice(service=assignment.service, state=here.state, reason=here.reason))
        return DeviceDetail(
            **_device_out(device, desired).model_dump(),
            desired_issued=desired.issued if desired is not None else None,
            desired_expires=desired.expires if desired is not None else None,
            applied_generation=report.applied_generation if report is not None else None,
            last_error=report.last_error if report is not None else None,
            modules=modules,
            state=device_state(x.state for x in states),
            service_states=states,
            credentials=_credentials_out(device),
        )


def _credentials_out(device: Device) -> DeviceCredentialsState:
    stage = None
    if device.rotation_requested is not None:
        stage = "requested" if device.next_token_hash is None else "both-valid"
    return DeviceCredentialsState(
        generation=device.credentials_generation,
        mqtt_username=broker_username(device.id, device.credentials_generation),
        rotated_at=device.credentials_rotated_at,
        rotation_requested=device.rotation_requested,
        rotation_stage=stage,
    )


@admin.patch("/devices/{device_id}", response_model=ChangeOut, tags=["devices"])
def update_tags(fleet: Fleet, device_id: str, body: TagUpdate) -> dict[str, Any]:
    """Change a device's tags; the services it runs follow its new tags."""
    tags = check_tags(body.set)
    change = fleet.change(
        lambda s: retag_device(s, device_id, set_tags=tags, remove=body.remove, replace=body.replace),
    )
    return _change_out(change)


@admin.post("/devices/{device_id}/revoke", response_model=ChangeOut, tags=["devices"])
def revoke(fleet: Fleet, device_id: str) -> dict[str, Any]:
    """Refuse the device's credentials and withdraw its desired state (retained message too)."""
    change = fleet.change(lambda s: revoke_device(s, device_id))
    return _change_out(change)


@admin.post("/devices/{device_id}/rotate", tags=["devices"])
def rotate(core: Core, device_id: str) -> dict[str, Any]:
    """Mark the device's credentials for rotation: it asks for new ones over its current
    session and switches to them; the old ones work until it confirms. One at a time."""
    # Nothing the device runs nor any broker account changes yet: no fleet change.
    with core.sessions.begin() as s:
        requested = request_rotation(s, device_id, now=utcnow()).rotation_requested
    return {"device_id": device_id, "rotation_requested": requested}


# --- deployments -----------------------------------------------------------------------------


@admin.put("/deployments/{name}", response_model=DeployOut, tags=["deployments"])
def deploy(core: Core, fleet: Fleet, name: str, body: DeployRequest, response: Response) -> dict[str, Any]:
    """Create or update a service; every affected device gets a new signed desired state."""
    check_service_name(name)
    requested = settings_from_request(body.deployment_config, body.settings)
    target = parse_target(body.target)
    spec = parse_rollout(body.rollout)
    settings = core.settings
    limits = RolloutLimits(
        health_timeout_s=settings.rollout_health_timeout_s,
        max_spread_values=settings.rollout_max_spread_values,
        max_running=settings.rollout_max_running,
    )

    def mutate(s: Session) -> bool:
        module = get_module(s, body.module, body.version)
        ref = ModuleRef(module.name, module.version, module.manifest_digest)
        previous = previous_version(s, s.get(Deployment, name))
        if spec.staged and previous is None:
            raise Conflict(
                f"service {name} is new: a rollout in waves needs a previous version for the other "
                "devices to keep; deploy it to all devices first (no --waves)"
            )
        row, created = upsert_deployment(s, name, ref, requested.settings, target)
        s.flush()  # the keys row refers to the deployment's
        row.settings = with_endpoint_keys(s, name, requested).model_dump(mode="json")
        if previous is not None and previous.digest != ref.manifest_digest:
            if spec.staged:
                to = VersionRef(ref.name, ref.version, ref.manifest_digest)
                start_rollout(
                    s, service=name, previous=previous, to=to, spec=spec, target=target, limits=limits
                )
            else:
                end_staging(s, name, f"deploy of {ref.version} to every device at once")
        return created

    change = fleet.change(mutate)
    response.status_code = 201 if change.result else 200
    with core.sessions.snapshot() as s:
        out = _deployment_out(s, get_deployment(s, name), _FleetView.read(s))
    return {
        **_change_out(change),
        "created": change.result,
        "deployment": out,
        "warnings": list(requested.warnings),
    }


class RolloutActionOut(ChangeOut):
    deployment: DeploymentOut


@admin.get("/deployments/{name}/rollout", response_model=RolloutOut, tags=["deployments"])
def show_rollout(core: Core, name: str) -> RolloutOut:
    """The service's rollout (404 when its last deploys had no waves)."""
    check_service_name(name)
    with core.sessions.snapshot() as s:
        get_deployment(s, name)
        out = _rollout_out(s.get(Rollout, name), lambda r: len(released(s, r)))
    if out is None:
        raise NotFound(f"service {name} has no rollout; deploy with --waves to start one")
    return out


@admin.post("/deployments/{name}/rollout/{action}", response_model=RolloutActionOut, tags=["deployments"])
def rollout_action(core: Core, fleet: Fleet, name: str, action: str) -> dict[str, Any]:
    """``resume`` a halted rollout (its wave is judged again), ``promote`` the next wave now,
    or ``abort`` (every device back on the previous version)."""
    check_service_name(name)
    if action not in ACTIONS:
        raise ConfigError(f"rollout action {action[:40]!r}: use resume, promote or abort")
    change = fleet.change(lambda s: operate(s, name, action))
    with core.sessions.snapshot() as s:
        out = _deployment_out(s, get_deployment(s, name), _FleetView.read(s))
    return {**_change_out(change), "deployment": out}


class RollbackOut(ChangeOut):
    version: str = Field(description="the module version the service runs now")
    deployment: DeploymentOut


@admin.post("/deployments/{name}/rollback", response_model=RollbackOut, tags=["deployments"])
def rollback(core: Core, fleet: Fleet, name: str) -> dict[str, Any]:
    """Redeploy the service's previous module version: the newest version of its module pushed
    before the one it runs now, with the same settings and target. 409 when there is none."""
    check_service_name(name)

    def mutate(s: Session) -> ModuleRef:
        # A rollout still staging devices ends: every device gets the version rolled back to.
        end_staging(s, name, "the service was rolled back ('edgepack service rollback')")
        return roll_back_deployment(s, name)

    change = fleet.change(mutate)
    with core.sessions.snapshot() as s:
        out = _deployment_out(s, get_deployment(s, name), _FleetView.read(s))
    return {**_change_out(change), "version": change.result.version, "deployment": out}


@admin.get("/deployments/{name}/keys", response_model=KeysOut, tags=["deployments"])
def show_keys(core: Core, name: str) -> KeysOut:
    """The service's endpoint keys (Azure's "get keys"); devices only ever see their hashes."""
    with core.sessions.begin() as s:
        keys = get_keys(s, name)
        return KeysOut(primary=keys.primary, secondary=keys.secondary)


@admin.post("/deployments/{name}/keys/regenerate", response_model=RegeneratedOut, tags=["deployments"])
def regenerate_key(fleet: Fleet, name: str, body: RegenerateRequest) -> dict[str, Any]:
    """Replace one key; every device running the service gets the new hashes (the other key
    keeps working throughout)."""

    def mutate(s: Session) -> ServiceKeys:
        row = get_deployment(s, name)
        keys = regenerate(s, name, body.key)
        row.settings = {**row.settings, "auth": auth_of(keys).model_dump(mode="json")}
        row.updated_at = utcnow()
        return keys

    change = fleet.change(mutate)
    keys = change.result
    return {**_change_out(change), "keys": KeysOut(primary=keys.primary, secondary=keys.secondary)}


@admin.get("/deployments", tags=["deployments"])
def list_deployments(core: Core) -> dict[str, list[DeploymentOut]]:
    with core.sessions.snapshot() as s:
        rows = list(s.scalars(select(Deployment).order_by(Deployment.name)))
        view = _FleetView.read(s)
        return {"deployments": [_deployment_out(s, r, view) for r in rows]}


@admin.get("/deployments/{name}", response_model=DeploymentOut, tags=["deployments"])
def show_deployment(core: Core, name: str) -> DeploymentOut:
    with core.sessions.snapshot() as s:
        return _deployment_out(s, get_deployment(s, name), _FleetView.read(s))


class LogsOut(BaseModel):
    device_id: str
    service: str
    lines: list[str]
    truncated: bool = Field(
        description="older lines were left out: beyond the tail asked, or to fit the device's message "
        "or the hub's limits (EDGEPACK_HUB_LOG_*)"
    )
    failed: bool = Field(default=False, description="the lines are the log the last failed instance left")
    version: str | None = Field(default=None, description="the module version the lines are from")
    failed_version: str | None = Field(
        default=None, description="a failed version left a log on the device: ask with failed=true"
    )


@admin.get("/deployments/{name}/logs", response_model=LogsOut, tags=["deployments"])
def service_logs(
    core: Core,
    link: Link,
    name: str,
    device: str = Query(description="the device whose module log to fetch"),
    tail: int = Query(default=100, ge=1, le=MAX_TAIL),
    failed: bool = Query(
        default=False, description="the log the service's last failed instance left on the device"
    ),
) -> LogsOut:
    """A module's last log lines, fetched from the device over MQTT (request and answer on
    per-device topics only that device can use): those of the instance serving, or with
    ``failed`` those the last failed instance left (after a rollback, or when none started)."""
    with core.sessions.begin() as s:
        get_deployment(s, name)
        row = get_device(s, device, active=True)
        if device not in devices_running(current_plan(s), name):
            raise NotFound(
                f"service {name!r} is not deployed to device {device!r}; see 'edgepack service show {name}'"
            )
        if not row.online:
            # Asking would only wait out the timeout: the device's retained ``online`` topic
            # (its last will when it dropped) says it is not connected.
            raise DeviceOffline(
                f"device {device!r} is offline (last seen {seen_text(row.last_seen)}); its log can "
                "be fetched once its agent reconnects ('edgepack device show' says when)"
            )
    if link is None:
        raise Conflict("the hub runs without a broker, so it cannot reach devices for their logs")
    answer = link.request_logs(device, name, tail, failed=failed)
    if answer.error:
        raise NotFound(answer.error)
    return LogsOut(
        device_id=device,
        service=name,
        lines=answer.lines,
        truncated=answer.truncated,
        failed=failed,
        version=answer.version,
        failed_version=answer.failed_version,
    )


@admin.delete("/deployments/{name}", response_model=ChangeOut, tags=["deployments"])
def delete(fleet: Fleet, name: str) -> dict[str, Any]:
    """Delete a service; its devices get a desired state without it."""
    change = fleet.change(lambda s: delete_deployment(s, name))
    return _change_out(change)


router.include_router(admin)
router.include_router(device_auth.router)
