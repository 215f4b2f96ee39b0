"""Fetching a module's log through the hub: a request/response over per-device MQTT topics.

The hub publishes a :class:`LogRequest` on ``<prefix>/devices/<id>/logs-request`` (only the
hub may write there, only that device may read it) and waits for the :class:`LogResponse` the
device publishes on ``.../logs-response`` with the same ``request_id``. Neither is retained.
The broker's ACL, not a signature, keeps other devices out of both topics.

What a device answers is text a module wrote, and it ends up on an operator's terminal: every
line (and the error) has its control characters escaped as it is parsed
(:func:`manifests.bounds.escape_controls`), so an escape sequence arrives as the visible text
``\\x1b[2J``, never as an action. A device is not trusted to keep the other bounds either: the
hub cuts every answer with :func:`bound_response` to the tail it asked for, a line length and a
size (:class:`LogLimits`) before passing it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from manifests.bounds import escape_controls
from manifests.desired import DEVICE_ID_PATTERN
from manifests.module import NAME_PATTERN, VERSION_PATTERN

REQUEST_ID_PATTERN = r"^[0-9a-f]{16,64}$"
MAX_TAIL = 10_000
MAX_LINE_CHARS = 4096
#: A response stays well under the broker's 1 MiB packet limit.
MAX_RESPONSE_CHARS = 768 * 1024
#: What follows a line the hub cut to its length limit.
CUT_MARKER = " [... {n:,} more characters cut]"

#: A line of a module's log as it may be shown: its control characters escaped.
LogLine = Annotated[str, AfterValidator(escape_controls)]


class LogRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.logs-request/v1"] = Field(
        default="edgepack.logs-request/v1", alias="schema"
    )
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    service: str = Field(pattern=NAME_PATTERN)
    tail: int = Field(default=100, ge=1, le=MAX_TAIL)
    failed: bool = Field(
        default=False,
        description="the log the service's last failed instance left on the device, instead of "
        "the serving instance's (sent only when true: an agent older than this field refuses it)",
    )

    def payload(self) -> bytes:
        """The request as published: ``failed`` only when set, so that agents from before it
        still read every plain log request."""
        return self.model_dump_json(by_alias=True, exclude=None if self.failed else {"failed"}).encode()


class LogResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.logs-response/v1"] = Field(
        default="edgepack.logs-response/v1", alias="schema"
    )
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    service: str = Field(pattern=NAME_PATTERN)
    lines: list[LogLine] = Field(default_factory=list, max_length=MAX_TAIL)
    truncated: bool = Field(default=False, description="older lines were left out to fit")
    version: Annotated[str, Field(pattern=VERSION_PATTERN)] | None = Field(
        default=None, description="the module version whose log the lines are"
    )
    failed_version: Annotated[str, Field(pattern=VERSION_PATTERN)] | None = Field(
        default=None, description="the version whose failed instance left a log here (see 'failed')"
    )
    error: Annotated[str, Field(max_length=2000), AfterValidator(escape_controls)] | None = None


@dataclass(frozen=True, kw_only=True)
class LogLimits:
    """What the hub accepts of a device's answer (the hub's ``log_*`` settings).

    ``payload_bytes`` bounds the MQTT message before it is parsed; ``line_chars`` each line
    (a longer one is cut, with :data:`CUT_MARKER` saying how much went); ``answer_bytes`` the
    UTF-8 size of all lines passed on (the oldest go first).
    """

    payload_bytes: int = 1 << 20
    line_chars: int = MAX_LINE_CHARS
    answer_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.payload_bytes < 1024 or self.line_chars < 80 or self.answer_bytes < 1024:
            raise ValueError("log limits: payload and answer at least 1024 bytes, lines 80 characters")


def _cut(line: str, limit: int) -> str:
    if len(line) <= limit:
        return line
    return line[:limit] + CUT_MARKER.format(n=len(line) - limit)


def bound_response(response: LogResponse, *, tail: int, limits: LogLimits) -> LogResponse:
    """``response`` within what was asked and ``limits``: at most the last ``tail`` lines, each
    cut to ``limits.line_chars``, together at most ``limits.answer_bytes``; ``truncated`` when
    lines were left out (here or by the device)."""
    if tail < 1:
        raise ValueError(f"tail must be at least 1, not {tail}")  # lines[-0:] would be all of them
    kept: list[str] = []
    size = 0
    for line in reversed(response.lines[-tail:]):
        line = _cut(line, limits.line_chars)
        size += len(line.encode("utf-8", "surrogatepass")) + 1
        if size > limits.answer_bytes:
            break
        kept.append(line)
    kept.reverse()
    return response.model_copy(
        update={"lines": kept, "truncated": response.truncated or len(kept) < len(response.lines)}
    )
