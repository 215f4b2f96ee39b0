"""What a device message means, or why it is dropped (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloud_hub.ingest.messages import Online, Rejected, Reported, TelemetryMessage, parse_message

pytestmark = pytest.mark.sql_independent  # pure logic: no database

AT = datetime(2026, 1, 1, tzinfo=UTC)
REPORTED = (
    b'{"schema": "edgepack.reported/v1", "device_id": "dev-1", "reported_at": "2026-01-01T00:00:00Z",'
    b' "agent_version": "0.1", "applied_generation": 3, "modules": []}'
)
TELEMETRY = b'{"device_id": "dev-1", "ts": "2026-01-01T00:00:00Z", "modules": []}'


def parse(topic: str, payload: bytes) -> object:
    return parse_message(
        f"ep/devices/{topic}", payload, prefix="ep", retained=False, received_at=AT, max_bytes=4096
    )


@pytest.mark.parametrize(
    ("topic", "payload", "kind", "reason"),
    [
        ("dev-1/reported", REPORTED, Reported, None),
        ("dev-1/telemetry", TELEMETRY, TelemetryMessage, None),
        ("dev-1/online", b"true", Online, None),
        ("dev-1/online", b" false\n", Online, None),
        ("dev-1/online", b"yes", Rejected, "must be 'true' or 'false'"),
        ("dev-1/reported", b"{not json", Rejected, "invalid reported message"),
        ("dev-1/reported", b'{"device_id": "dev-1"}', Rejected, "reported_at"),
        ("dev-2/reported", REPORTED, Rejected, "names device 'dev-1'"),
        ("dev-2/telemetry", TELEMETRY, Rejected, "names device 'dev-1'"),
        ("dev-1/telemetry", b"[" * 5000, Rejected, "exceeds 4096"),
        ("dev-1/reported", b"", type(None), None),  # a cleared retained message
        ("dev-1/desired", b"x", type(None), None),  # the hub's own topic
        ("dev-1/other", b"x", type(None), None),
    ],
)
def test_parse_message(topic: str, payload: bytes, kind: type, reason: str | None) -> None:
    result = parse(topic, payload)
    assert isinstance(result, kind)
    if reason is not None:
        assert isinstance(result, Rejected)
        assert reason in result.reason


def test_online_value() -> None:
    assert parse("dev-1/online", b"false") == Online("dev-1", False, False, AT)
    assert (
        parse_message("other/devices/dev-1/online", b"true", prefix="ep", retained=False, received_at=AT)
        is None
    )


NEWER_AGENT = (
    b'{"schema": "edgepack.reported/v1", "device_id": "dev-1", "reported_at": "2026-01-01T00:00:00Z",'
    b' "agent_version": "9.0", "applied_generation": 3, "battery": {"percent": 40},'
    b' "modules": [{"service": "demo", "state": "Failed", "since": "2026-01-01T00:00:00Z",'
    b' "reason": "score.py:6 RuntimeError: x", "failure": {"traceback": "T", "log_tail": "L", "core": 1},'
    b' "gpu": "busy"}]}'
)


def test_a_newer_agents_fields_are_dropped_not_its_report() -> None:
    """An agent one version ahead adds fields; the hub keeps what it knows of the report (the
    upgrade order is in docs/agent.md, 'Upgrading a fleet')."""
    result = parse("dev-1/reported", NEWER_AGENT)
    assert isinstance(result, Reported), result
    (module,) = result.state.modules
    assert module.reason == "score.py:6 RuntimeError: x"
    assert module.failure is not None and (module.failure.traceback, module.failure.log_tail) == ("T", "L")
    assert "gpu" not in module.model_dump() and "battery" not in result.state.model_dump()
    telemetry = parse("dev-1/telemetry", TELEMETRY[:-1] + b', "disk_percent": 3}')
    assert isinstance(telemetry, TelemetryMessage)


def test_a_known_field_that_is_wrong_still_refuses_a_report_with_unknown_ones() -> None:
    wrong = NEWER_AGENT.replace(b'"applied_generation": 3', b'"applied_generation": -1')
    result = parse("dev-1/reported", wrong)
    assert isinstance(result, Rejected) and "applied_generation" in result.reason
