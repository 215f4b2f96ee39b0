"""A newer agent under an older hub: it sends only what that hub reads.

Agents are upgraded first (an older agent refuses a newer hub's desired states, which carry
fields it does not know), so for a while a newer agent reports to an older hub. A hub from
before lenient reading (the last release, 2fab72d) refuses a whole report, telemetry sample or
log answer that carries a field it does not know: the device would look silent. The agent
holds those fields back until its applied desired state says the hub reads them
(``hub_reads_newer``, which every hub of this release sets).

``OLD_HUB_READS`` is what that hub's models declare (frozen here: the old code is not part of
a checkout). A field added to these messages later must either be listed in
``manifests.compat.HELD_BACK`` or be something the old hub reads, or this test fails.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from cloud_hub.fleet.plan import desired_payload
from manifests.compat import encode_for_hub, parse_lenient
from manifests.logs import LogResponse
from manifests.reported import FailureDetail, ModuleMetrics, ModuleStatus, Progress, ReportedState, Telemetry
from manifests.states import ServiceState

#: The fields the hub of the last release declares (manifests/reported.py, manifests/logs.py at 2fab72d).
OLD_HUB_READS: dict[str, set[str]] = {
    "ReportedState": {
        "agent_version", "applied_generation", "device_id", "last_error", "modules", "reported_at",
        "runtimes", "schema",
    },
    "ModuleStatus": {
        "endpoint", "generation", "manifest_digest", "port", "progress", "reason", "restarts", "runtime",
        "service", "serving_digest", "serving_version", "since", "state", "version",
    },
    "Progress": {"done_bytes", "phase", "total_bytes"},
    "Telemetry": {"agent_memory_mb", "cpu_percent", "device_id", "memory_mb", "modules", "schema", "ts"},
    "ModuleMetrics": {
        "cpu_percent", "errors_total", "memory_mb", "p50_ms", "p99_ms", "requests_per_s", "requests_total",
        "service",
    },
    "LogResponse": {"device_id", "error", "lines", "request_id", "schema", "service", "truncated"},
}  # fmt: skip
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64


def full_report() -> ReportedState:
    """A report with every field this agent can send set."""
    status = ModuleStatus(
        service="digits",
        manifest_digest=DIGEST,
        version="3",
        generation=7,
        state=ServiceState.FAILED,
        reason="score.py:18 RuntimeError: cannot open the feature store",
        failure=FailureDetail(traceback="Traceback (most recent call last): ...", log_tail="loading\n"),
        since=NOW,
        runtime="process",
        port=8890,
        restarts=2,
        serving_digest=DIGEST,
        serving_version="2",
        progress=Progress(phase="download", done_bytes=1, total_bytes=2),
        endpoint="http://10.0.0.5:8890",
    )
    return ReportedState(
        device_id="edge-1",
        reported_at=NOW,
        agent_version="1.0",
        applied_generation=7,
        runtimes=["process"],
        last_error="a refused token",
        link_problem="another client connects with this device's id",
        modules=[status],
    )


def full_telemetry() -> Telemetry:
    metrics = ModuleMetrics(
        service="digits", requests_total=10, errors_total=1, requests_per_s=2.0, p50_ms=1.0, p95_ms=2.0,
        p99_ms=3.0, cpu_percent=5.0, memory_mb=50.0,
    )  # fmt: skip
    return Telemetry(
        device_id="edge-1", ts=NOW, cpu_percent=1.0, memory_mb=2.0, agent_memory_mb=3.0, modules=[metrics]
    )


def full_log_answer() -> LogResponse:
    return LogResponse(
        request_id="0" * 16, device_id="edge-1", service="digits", lines=["a"], truncated=True,
        version="2", failed_version="3", error=None,
    )  # fmt: skip


def without_new_fields(message: Any) -> Any:
    if isinstance(message, ReportedState):
        modules = [m.model_copy(update={"failure": None}) for m in message.modules]
        return message.model_copy(update={"link_problem": None, "modules": modules})
    if isinstance(message, Telemetry):
        metrics = [m.model_copy(update={"p95_ms": None}) for m in message.modules]
        return message.model_copy(update={"modules": metrics})
    return message.model_copy(update={"version": None, "failed_version": None})


def keys_beyond(kind: str, document: dict[str, Any]) -> set[str]:
    """The keys of ``document`` (a ``kind``) and of the models inside it the old hub does not declare."""
    extra = {f"{kind}.{k}" for k in document if k not in OLD_HUB_READS[kind]}
    inner = {("ReportedState", "modules"): "ModuleStatus", ("ModuleStatus", "progress"): "Progress",
             ("Telemetry", "modules"): "ModuleMetrics"}  # fmt: skip
    for (outer, field), nested in inner.items():
        if outer != kind or document.get(field) is None:
            continue
        items = document[field] if isinstance(document[field], list) else [document[field]]
        for item in items:
            extra |= keys_beyond(nested, item)
    return extra


def test_an_older_hub_gets_only_the_fields_it_reads() -> None:
    for kind, message in (
        ("ReportedState", full_report()),
        ("Telemetry", full_telemetry()),
        ("LogResponse", full_log_answer()),
    ):
        held = json.loads(encode_for_hub(message, hub_reads_newer=False))
        assert keys_beyond(kind, held) == set(), kind
        # What is held back is only what is new: everything else arrives as it is.
        assert type(message).model_validate(held) == without_new_fields(message), kind


def test_a_hub_that_reads_newer_messages_gets_all_of_them() -> None:
    report = encode_for_hub(full_report(), hub_reads_newer=True)
    assert parse_lenient(ReportedState, report) == full_report()
    assert b'"failure"' in report and b'"link_problem"' in report
    assert b'"p95_ms"' in encode_for_hub(full_telemetry(), hub_reads_newer=True)
    assert b'"failed_version"' in encode_for_hub(full_log_answer(), hub_reads_newer=True)


def test_every_hub_of_this_release_says_it_reads_newer_messages() -> None:
    payload = desired_payload("edge-1", 1, [], issued=NOW, expires=NOW.replace(hour=13))
    assert payload["hub_reads_newer"] is True
