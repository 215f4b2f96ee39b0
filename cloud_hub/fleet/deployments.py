"""Deployments (services): a named module version, its settings, and its target.

Like ``fleet.devices``, these change rows inside :func:`cloud_hub.fleet.desired.change_fleet`,
which re-issues the desired state of every device the change affects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.events import record_event
from cloud_hub.fleet.endpoint_keys import auth_of, drop_keys, ensure_keys
from cloud_hub.fleet.tables import Deployment, Device
from cloud_hub.fleet.targeting import Target
from cloud_hub.registry.tables import Module
from manifests.azureml import AzureKeys, DeploymentConfig, parse_config
from manifests.desired import DeploymentSettings
from manifests.errors import ConfigError
from manifests.module import NAME_PATTERN
from manifests.validation import describe_validation_error

DEPLOYMENT_CONFIG = "deploymentconfig.json"


def check_service_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(
            f"service name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class RequestedSettings:
    """What a deploy request asks for: the settings, whether the endpoint needs keys (and any
    keys given in the config), and the documented Azure keys edgepack will not act on."""

    settings: DeploymentSettings
    auth: bool = False
    keys: AzureKeys | None = None
    warnings: tuple[str, ...] = ()


def settings_from_request(
    deployment_config: Mapping[str, Any] | None, settings: Mapping[str, Any] | None
) -> RequestedSettings:
    """Deployment settings from an Azure ``deploymentconfig.json`` or edgepack's own form.

    In edgepack's form, any ``auth`` asks for endpoint keys; the hub makes them and fills in
    their hashes (a client never chooses what a device accepts).
    """
    if deployment_config is not None and settings is not None:
        raise ConfigError("give either 'deployment_config' or 'settings', not both")
    if settings is not None:
        wants_auth = settings.get("auth") is not None
        body = {k: v for k, v in settings.items() if k != "auth"}
        try:
            return RequestedSettings(DeploymentSettings.model_validate(body), auth=wants_auth)
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(exc, source="settings", model=DeploymentSettings)
            ) from None
    config = parse_config(DeploymentConfig, dict(deployment_config or {}), source=DEPLOYMENT_CONFIG)
    warnings = tuple(
        f"{DEPLOYMENT_CONFIG}: '{key}' has no effect on edgepack devices" for key in config.ignored_keys()
    )
    return RequestedSettings(
        config.to_settings(), auth=bool(config.auth_enabled), keys=config.keys, warnings=warnings
    )


def with_endpoint_keys(session: Session, service: str, requested: RequestedSettings) -> DeploymentSettings:
    """The settings to store: with the hashes of the service's keys when it needs keys (made
    now if it has none), without them (and its keys dropped) when it does not."""
    if not requested.auth:
        drop_keys(session, service)
        return requested.settings
    given = requested.keys
    keys = ensure_keys(
        session,
        service,
        primary=given.primary_key if given else None,
        secondary=given.secondary_key if given else None,
    )
    return requested.settings.model_copy(update={"auth": auth_of(keys)})


@dataclass(frozen=True)
class ModuleRef:
    name: str
    version: str
    manifest_digest: str


def get_deployment(session: Session, name: str) -> Deployment:
    row = session.get(Deployment, name)
    if row is None:
        raise NotFound(f"service {name!r} does not exist; see 'edgepack service list'")
    return row


def check_target_devices(session: Session, target: Target) -> None:
    """Explicit device ids must be enrolled (a selector may match nothing yet)."""
    if target.devices is None:
        return
    known = set(
        session.scalars(select(Device.id).where(Device.id.in_(target.devices), Device.revoked.is_(False)))
    )
    missing = [d for d in target.devices if d not in known]
    if missing:
        raise NotFound(
            f"target device {missing[0]!r} is not enrolled (or was revoked); "
            "enroll it with 'edgepack device enroll' or use a selector"
        )


def upsert_deployment(
    session: Session,
    name: str,
    module: ModuleRef,
    settings: DeploymentSettings,
    target: Target,
) -> tuple[Deployment, bool]:
    """Create or update the service; returns the row and whether it was created."""
    check_target_devices(session, target)
    row = session.get(Deployment, name)
    created = row is None
    if row is None:
        row = Deployment(name=name)
        session.add(row)
    row.module_name = module.name
    row.module_version = module.version
    row.manifest_digest = module.manifest_digest
    row.settings = settings.model_dump(mode="json")
    row.target = target.model_dump(mode="json", exclude_none=True)
    row.updated_at = utcnow()
    verb = "created" if created else "updated"
    record_event(
        session,
        "deploy" if created else "redeploy",
        f"service {name} {verb}: {module.name}:{module.version} on port {settings.port} "
        f"to {target.describe()}",
        service=name,
    )
    return row, created


def delete_deployment(session: Session, name: str) -> None:
    row = get_deployment(session, name)
    session.delete(row)
    record_event(session, "undeploy", f"service {name} deleted", service=name)


def previous_module(session: Session, row: Deployment) -> Module | None:
    """The version a rollback returns to: of the service's module, the newest version pushed
    to the registry before the one it runs now (by push order, not by how the version strings
    compare), or None when the current one was pushed first."""
    current = session.scalar(select(Module.id).where(Module.manifest_digest == row.manifest_digest))
    if current is None:
        return None
    return session.scalar(
        select(Module)
        .where(Module.name == row.module_name, Module.id < current)
        .order_by(Module.id.desc())
        .limit(1)
    )


def roll_back_deployment(session: Session, name: str) -> ModuleRef:
    """Point the service at its previous module version (:func:`previous_module`), with its
    settings and target as they are; Conflict when there is none."""
    row = get_deployment(session, name)
    previous = previous_module(session, row)
    if previous is None:
        raise Conflict(
            f"service {name} runs {row.module_name}:{row.module_version}, and no earlier version of "
            f"{row.module_name} is in the registry: there is nothing to roll back to"
        )
    came_from = f"{row.module_name}:{row.module_version}"
    row.module_version = previous.version
    row.manifest_digest = previous.manifest_digest
    row.updated_at = utcnow()
    record_event(
        session, "rollback", f"service {name} rolled back from {came_from} to {previous.ref}", service=name
    )
    return ModuleRef(previous.name, previous.version, previous.manifest_digest)
