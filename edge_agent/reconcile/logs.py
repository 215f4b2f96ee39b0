"""Answering the hub's log requests (``edgepack service logs``): the serving instance's last
lines, bounded, published on the device's logs topic from a thread of its own so that a slow
runtime (``docker logs``) never holds up the reconcile loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pydantic import ValidationError

from edge_agent.runtime.base import Runtime
from edge_agent.state.records import InstanceRecord
from manifests.logs import MAX_LINE_CHARS, MAX_RESPONSE_CHARS, LogRequest, LogResponse

log = logging.getLogger("edge_agent")


def bounded(lines: list[str]) -> tuple[list[str], bool]:
    """``lines`` cut to what one response may carry (newest kept), and whether any was cut."""
    lines = [line[:MAX_LINE_CHARS] for line in lines]
    truncated = False
    while lines and sum(len(line) + 4 for line in lines) > MAX_RESPONSE_CHARS:
        lines = lines[len(lines) // 10 + 1 :]
        truncated = True
    return lines, truncated


def answer_log_request(
    payload: bytes,
    *,
    device_id: str,
    serving: Callable[[str], InstanceRecord | None],
    runtime_of: Callable[[InstanceRecord], Runtime],
    publish: Callable[[bytes], None],
) -> None:
    """Parse a log request and answer it in the background (a malformed one is ignored).

    ``serving`` names the instance serving a service (None when none does); it is called on
    the caller's thread, so the records are read where they are owned."""
    try:
        request = LogRequest.model_validate_json(payload)
    except ValidationError:
        log.warning("ignoring a malformed log request")
        return
    instance = serving(request.service)

    def answer() -> None:
        if instance is None:
            response = LogResponse(
                request_id=request.request_id,
                device_id=device_id,
                service=request.service,
                error=f"service {request.service!r} does not run on {device_id}",
            )
        else:
            lines, truncated = bounded(runtime_of(instance).log_tail(instance, request.tail))
            response = LogResponse(
                request_id=request.request_id,
                device_id=device_id,
                service=request.service,
                lines=lines,
                truncated=truncated,
            )
        publish(response.model_dump_json(by_alias=True).encode())

    threading.Thread(target=answer, name="edgepack-logs", daemon=True).start()
