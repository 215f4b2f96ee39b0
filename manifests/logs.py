"""Fetching a module's log through the hub: a request/response over per-device MQTT topics.

The hub publishes a :class:`LogRequest` on ``<prefix>/devices/<id>/logs-request`` (only the
hub may write there, only that device may read it) and waits for the :class:`LogResponse` the
device publishes on ``.../logs-response`` with the same ``request_id``. Neither is retained.
The broker's ACL, not a signature, keeps other devices out of both topics.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from manifests.desired import DEVICE_ID_PATTERN
from manifests.module import NAME_PATTERN

REQUEST_ID_PATTERN = r"^[0-9a-f]{16,64}$"
MAX_TAIL = 10_000
MAX_LINE_CHARS = 4096
#: A response stays well under the broker's 1 MiB packet limit.
MAX_RESPONSE_CHARS = 768 * 1024


class LogRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.logs-request/v1"] = Field(
        default="edgepack.logs-request/v1", alias="schema"
    )
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    service: str = Field(pattern=NAME_PATTERN)
    tail: int = Field(default=100, ge=1, le=MAX_TAIL)


class LogResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.logs-response/v1"] = Field(
        default="edgepack.logs-response/v1", alias="schema"
    )
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    service: str = Field(pattern=NAME_PATTERN)
    lines: list[str] = Field(default_factory=list, max_length=MAX_TAIL)
    truncated: bool = Field(default=False, description="older lines were left out to fit")
    error: str | None = Field(default=None, max_length=2000)
