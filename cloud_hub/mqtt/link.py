"""MQTT link of the hub (placeholder until its owner fills it in)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud_hub.context import HubContext


class MqttLink:
    @classmethod
    def from_context(cls, ctx: HubContext) -> MqttLink:
        return cls()

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def publish_desired(self, device_id: str, payload: bytes) -> None: ...
