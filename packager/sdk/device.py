"""``Device``: an enrolled edge device, its tags and its credentials.

Enrolling answers the device's credentials document once (the hub keeps only hashes of its
secrets): write it with :func:`save_credentials` and give it to the device's agent
(``edgepack agent init --credentials FILE``). A device's tags decide which selector-targeted
services it runs; changing them re-issues its desired state.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from manifests.device import DeviceCredentials
from manifests.errors import HubUnavailable
from manifests.reported import ModuleStatus
from packager.files import atomic_output
from packager.sdk.answers import DeviceDetail, DeviceRecord, FleetChange
from packager.sdk.errors import BadArgument
from packager.sdk.hub import Hub
from packager.sdk.model import string_map
from packager.sdk.targets import Selector, check_device_id


def save_credentials(credentials: DeviceCredentials, path: str | Path) -> Path:
    """Write a device's credentials for its agent (atomically, mode 0600: they are secret)."""
    target = Path(path)
    document = credentials.model_dump(mode="json", by_alias=True, exclude_none=True)
    with atomic_output(target, mode=0o600) as fh:
        fh.write(json.dumps(document, indent=2).encode() + b"\n")
    return target


class Device:
    """An enrolled device: ``Device(hub, "edge-1")``. Attributes ``id``, ``tags``, ``online``,
    ``revoked``, ``services``; ``detail`` adds each module's reported state and the device's
    last error (a :class:`DeviceDetail`)."""

    def __init__(self, workspace: Hub, id: str) -> None:
        self.workspace = workspace
        self.id = check_device_id(id)
        self.record: DeviceRecord = self._read()

    def _read(self) -> DeviceDetail:
        return DeviceDetail.of(self.workspace.transport.get(f"/api/v1/devices/{self.id}"))

    @classmethod
    def _of(cls, workspace: Hub, record: DeviceRecord) -> Device:
        device = cls.__new__(cls)
        device.workspace, device.id, device.record = workspace, record.id, record
        return device

    @property
    def tags(self) -> dict[str, str]:
        """The device's tags (selectors match them)."""
        return dict(self.record.tags)

    @property
    def online(self) -> bool:
        """Whether the device's agent is connected to the broker."""
        return self.record.online

    @property
    def revoked(self) -> bool:
        """Whether its credentials were revoked."""
        return self.record.revoked

    @property
    def services(self) -> list[str]:
        """The services its desired state names."""
        return list(self.record.services)

    @property
    def detail(self) -> DeviceDetail:
        """The device with its desired-state times, last error and modules (read once)."""
        if not isinstance(self.record, DeviceDetail):
            self.record = self._read()
        assert isinstance(self.record, DeviceDetail)
        return self.record

    @property
    def modules(self) -> list[ModuleStatus]:
        """Each module's state as the device last reported it."""
        return list(self.detail.modules)

    def refresh(self) -> Device:
        """Read the device from the hub again."""
        self.record = self._read()
        return self

    def __repr__(self) -> str:
        return f"Device({self.id!r}, tags={self.record.tags}, online={self.online})"

    @staticmethod
    def enroll(workspace: Hub, id: str, tags: Mapping[str, str] | None = None) -> DeviceCredentials:
        """Enroll device ``id`` with ``tags``; its credentials document, shown this once.

        The hub's answer is checked against the credentials contract before it is returned, so
        what an agent reads is exactly what was validated here.
        """
        check_device_id(id)
        body = {"id": id, "tags": string_map(tags, "tags")}
        answer = workspace.transport.send("POST", "/api/v1/devices", body)
        try:
            return DeviceCredentials.model_validate(answer["device_credentials"])
        except (ValidationError, KeyError, TypeError) as exc:
            raise HubUnavailable(f"the hub's credentials for {id} are not a valid document ({exc})") from None

    @staticmethod
    def enroll_many(
        workspace: Hub, devices: Sequence[tuple[str, Mapping[str, str]]]
    ) -> builtins.list[DeviceCredentials]:
        """Enroll every ``(id, tags)`` in one request, all or none (the hub reloads its broker
        once); their credentials documents in the same order, shown this once.

        The hub checks every entry before it stores anything: an invalid or repeated id, a bad
        tag or a device already enrolled refuses the whole list, naming the entry (1 = first).
        """
        body = {"devices": [{"id": check_device_id(i), "tags": string_map(t, "tags")} for i, t in devices]}
        answer = workspace.transport.send("POST", "/api/v1/devices/bulk", body)
        try:
            documents = [DeviceCredentials.model_validate(d) for d in answer["device_credentials"]]
        except (ValidationError, KeyError, TypeError) as exc:
            raise HubUnavailable(f"the hub's credentials are not valid documents ({exc})") from None
        if [d.device_id for d in documents] != [i for i, _ in devices]:
            raise HubUnavailable("the hub answered credentials for other devices than were enrolled")
        return documents

    @staticmethod
    def list(
        workspace: Hub, selector: str | Selector | None = None, *, include_revoked: bool = False
    ) -> builtins.list[Device]:
        """Enrolled devices by id, those whose tags match ``selector`` when given."""
        params: dict[str, Any] = {"include_revoked": include_revoked}
        if selector is not None:
            params["selector"] = str(selector if isinstance(selector, Selector) else Selector(selector))
        answer = workspace.transport.get("/api/v1/devices", params=params)
        return [Device._of(workspace, DeviceRecord.of(d)) for d in answer["devices"]]

    def tag(
        self,
        tags: Mapping[str, str] | None = None,
        *,
        remove: Sequence[str] = (),
        replace: bool = False,
    ) -> FleetChange:
        """Set ``tags``, remove the keys in ``remove``; with ``replace`` drop every other tag.
        The services the device runs follow its new tags."""
        if isinstance(remove, str) or not all(isinstance(k, str) for k in remove):
            raise BadArgument("Device.tag: remove must be a list of tag keys")
        body = {"set": string_map(tags, "tags"), "remove": list(remove), "replace": replace}
        change = FleetChange.of(self.workspace.transport.send("PATCH", f"/api/v1/devices/{self.id}", body))
        self.refresh()
        return change

    def rotate_credentials(self) -> datetime:
        """Mark the device's credentials for rotation (docs/enrolment.md): it asks for new
        ones over its current session, switches to them and confirms; the old ones work until
        then. Returns when the rotation was requested; a second one in flight is a conflict."""
        answer = self.workspace.transport.send("POST", f"/api/v1/devices/{self.id}/rotate")
        return datetime.fromisoformat(str(answer["rotation_requested"]))

    def revoke(self) -> FleetChange:
        """Refuse the device's credentials and withdraw its desired state."""
        change = FleetChange.of(self.workspace.transport.send("POST", f"/api/v1/devices/{self.id}/revoke"))
        self.record = self.record.model_copy(update={"revoked": True})
        return change
