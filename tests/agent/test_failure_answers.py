"""What the agent answers and reports about a failed version (pure, with the real file store):
the kept log on request, the version every answer is about, and a report that stays within
its size however many services failed (issue 17, items 5 and 6)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.reconcile.logs import answer_log_request
from edge_agent.report.status import reported_state
from edge_agent.runtime.base import Runtime
from edge_agent.state.failed_logs import FailedLogs
from edge_agent.state.records import AgentRecord, InstanceRecord, ServiceRecord
from manifests.bounds import MAX_LOG_TAIL_CHARS, MAX_TRACEBACK_CHARS
from manifests.desired import DeploymentSettings, ModuleAssignment
from manifests.logs import LogRequest, LogResponse
from manifests.reported import MAX_REPORT_FAILURE_CHARS, FailureDetail
from manifests.states import ServiceState

AT = datetime(2026, 1, 1, tzinfo=UTC)


def ask(payload: bytes, logs: FailedLogs, serving: InstanceRecord | None = None) -> LogResponse:
    """The agent's answer to ``payload`` (published from its own thread)."""
    answers: list[bytes] = []
    done = threading.Event()

    def publish(body: bytes) -> None:
        answers.append(body)
        done.set()

    class Lines:
        def log_tail(self, instance: InstanceRecord, lines: int) -> list[str]:
            return ["version 1 serving"]

    def runtime_of(instance: InstanceRecord) -> Runtime:
        return Lines()  # type: ignore[return-value]  # only log_tail is asked for

    answer_log_request(
        payload, device_id="edge-1", serving=lambda _: serving, runtime_of=runtime_of, publish=publish,
        failed_logs=logs, hub_reads_newer=True,
    )  # fmt: skip
    assert done.wait(5), "no answer"
    return LogResponse.model_validate_json(answers[0])


def request(**fields: object) -> bytes:
    return json.dumps({"request_id": "0" * 16, "service": "demo", "tail": 100, **fields}).encode()


def assignment(service: str, version: str = "1") -> ModuleAssignment:
    return ModuleAssignment(
        service=service, module=service, version=version, manifest_digest="sha256:" + "1" * 64,
        settings=DeploymentSettings(port=9000),
    )  # fmt: skip


def test_the_failed_log_is_answered_with_its_version_and_a_plain_answer_points_to_it(tmp_path: Path) -> None:
    logs = FailedLogs(tmp_path / "failed-logs")
    none = ask(request(failed=True), logs)
    assert none.error == "no failed instance of service 'demo' has left a log on edge-1" and not none.lines
    logs.keep("demo", "2", ["connecting to the feature store", "RuntimeError: cannot open it"])
    failed = ask(request(failed=True, tail=1), logs)
    assert failed.lines == ["RuntimeError: cannot open it"]
    assert (failed.version, failed.failed_version) == ("2", "2")
    assert failed.truncated
    # Nothing serves (it never started): the error says a failed log is there.
    nothing = ask(request(), logs)
    assert nothing.error is not None and "version 2 failed there and left a log" in nothing.error
    serving = InstanceRecord(id="1-i", assignment=assignment("demo"), key="k", runtime="process",
                             run_dir=str(tmp_path), started_at=AT)  # fmt: skip
    plain = ask(request(), logs, serving)
    assert (plain.lines, plain.version, plain.failed_version) == (["version 1 serving"], "1", "2")


def test_a_request_from_a_newer_hub_is_answered_and_an_older_agent_still_reads_plain_requests(
    tmp_path: Path,
) -> None:
    logs = FailedLogs(tmp_path / "failed-logs")
    logs.keep("demo", "2", ["kept"])
    assert ask(request(failed=True, colour="never"), logs).lines == ["kept"]
    # The hub sends 'failed' only when it is set: an agent without the field reads the rest.
    plain = json.loads(LogRequest(request_id="0" * 16, service="demo").payload())
    assert "failed" not in plain
    asked = LogRequest(request_id="0" * 16, service="demo", failed=True)
    assert json.loads(asked.payload())["failed"] is True


def test_a_report_carries_failure_details_within_its_budget_and_keeps_every_reason() -> None:
    detail = FailureDetail(traceback="T" * MAX_TRACEBACK_CHARS, log_tail="L" * MAX_LOG_TAIL_CHARS)
    names = [f"svc-{i}" for i in range(12)]
    services = {
        name: ServiceRecord(name=name, since=AT, state=ServiceState.FAILED,
                            reason=f"{name}: boom\nsecond line", failure=detail)
        for name in names
    }  # fmt: skip
    record = AgentRecord(device_id="edge-1", applied_generation=1, services=services)
    report = reported_state(record, [assignment(n) for n in names], alive={}, runtimes=["process"],  # type: ignore[list-item]
                            agent_version="t", now=AT)  # fmt: skip
    sizes = [m.failure.size() for m in report.modules if m.failure is not None]
    assert sizes and sum(sizes) <= MAX_REPORT_FAILURE_CHARS < sum(sizes) + detail.size()
    assert all(m.reason == f"{m.service}: boom second line" for m in report.modules), "one line, every one"
    assert len(report.model_dump_json()) < 256 * 1024  # the hub's report size limit
    # A service that is no longer Failed reports no detail, whatever its record still holds.
    healthy = services["svc-0"].model_copy(update={"state": ServiceState.HEALTHY})
    record = record.model_copy(update={"services": {"svc-0": healthy}})
    again = reported_state(record, [assignment("svc-0")], alive={}, runtimes=[], agent_version="t", now=AT)
    assert again.modules[0].failure is None
