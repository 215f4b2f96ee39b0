"""Answering the hub's log requests (``edgepack service logs``): the serving instance's last
lines (or, with ``--failed``, those kept of the last failed instance), bounded, published on
the device's logs topic from a thread of its own so that a slow runtime (``docker logs``)
never holds up the reconcile loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pydantic import ValidationError

from edge_agent.runtime.base import Runtime
from edge_agent.state.failed_logs import FailedLogs
from edge_agent.state.records import InstanceRecord
from manifests.compat import encode_for_hub, parse_lenient
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
    failed_logs: FailedLogs | None = None,
    hub_reads_newer: bool,
) -> None:
    """Parse a log request and answer it in the background (a malformed one is ignored).

    ``serving`` names the instance serving a service (None when none does); it is called on
    the caller's thread, so the records are read where they are owned. A request with
    ``failed`` gets the log ``failed_logs`` kept of the service's last failed instance; every
    answer names the version its lines are from and the version of a kept failed log."""
    try:
        request = parse_lenient(LogRequest, payload)  # a newer hub's fields are not a reason to refuse
    except ValidationError:
        log.warning("ignoring a malformed log request")
        return
    instance = None if request.failed else serving(request.service)
    name = request.service

    def answer() -> None:
        kept = failed_logs.read(name) if failed_logs is not None else None
        failed_version = kept.version if kept is not None else None
        common = {"request_id": request.request_id, "device_id": device_id, "service": name}
        if request.failed:
            if kept is None:
                error = f"no failed instance of service {name!r} has left a log on {device_id}"
                response = LogResponse(**common, error=error)
            else:
                lines, truncated = bounded(kept.lines[-request.tail :])
                response = LogResponse(
                    **common,
                    lines=lines,
                    truncated=truncated or kept.truncated or len(kept.lines) > request.tail,
                    version=kept.version,
                    failed_version=failed_version,
                )
        elif instance is None:
            error = f"service {name!r} does not run on {device_id}"
            if kept is not None:
                error += f"; version {kept.version} failed there and left a log (ask with --failed)"
            response = LogResponse(**common, error=error, failed_version=failed_version)
        else:
            lines, truncated = bounded(runtime_of(instance).log_tail(instance, request.tail))
            response = LogResponse(
                **common,
                lines=lines,
                truncated=truncated,
                version=instance.version,
                failed_version=failed_version,
            )
        publish(encode_for_hub(response, hub_reads_newer=hub_reads_newer))

    threading.Thread(target=answer, name="edgepack-logs", daemon=True).start()
