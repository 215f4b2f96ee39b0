"""The alert rules' compact form and one rule's evaluation (pure: no hub, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cloud_hub.alerts.evaluate import FIRED, RESOLVED, Reading, Rule, Track, evaluate
from cloud_hub.alerts.rules import Condition, Metric, check_rule_name, check_severity, parse_condition
from cloud_hub.settings import HubSettings
from manifests.errors import ConfigError

pytestmark = pytest.mark.sql_independent  # pure logic: no database

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("error_rate > 1% for 5m", Condition(Metric.ERROR_RATE, ">", 1.0, 300)),
        ("error_rate>0.5%", Condition(Metric.ERROR_RATE, ">", 0.5, 0)),
        ("p95_ms > 50 for 10m", Condition(Metric.P95_MS, ">", 50.0, 600)),
        ("run_p95_ms > 20 for 10m", Condition(Metric.RUN_P95_MS, ">", 20.0, 600)),
        ("p50_ms >= 20 for 30s", Condition(Metric.P50_MS, ">=", 20.0, 30)),
        ("requests_per_s < 1 for 1h", Condition(Metric.REQUESTS_PER_S, "<", 1.0, 3600)),
        ("device offline > 15m", Condition(Metric.DEVICE_OFFLINE, ">", 900.0)),
        ("device_offline > 90s", Condition(Metric.DEVICE_OFFLINE, ">", 90.0)),
        ("state == Failed", Condition(Metric.STATE, "==", 0.0, 0, "Failed")),
        ("state != healthy for 2m", Condition(Metric.STATE, "!=", 0.0, 120, "Healthy")),
        ("  error_rate   >  1%   for   5m ", Condition(Metric.ERROR_RATE, ">", 1.0, 300)),
    ],
)
def test_the_compact_form_parses(text: str, expected: Condition) -> None:
    assert parse_condition(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("error_rate > 1% for 5 fortnights", "not understood"),
        ("cpu > 50", "not understood"),
        ("p95_ms > 50%", "only error_rate is in percent"),
        ("error_rate > 150%", "at most 100%"),
        ("p95_ms > 50 for 2d", "not understood"),
        ("p95_ms > 50 for 25h", "longer than 24h"),
        ("p95_ms > 99999999999", "above"),
        ("state == Sleepy", "one of Failed"),
        ("device offline < 5m", "not understood"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_a_bad_condition_is_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_condition(text)
    message = str(caught.value)
    assert says in message and "\n" not in message and len(message) < 300


def test_the_normalised_text_parses_back_to_the_same_condition() -> None:
    for text in ("error_rate > 1% for 5m", "p95_ms > 50 for 10m", "device offline > 15m", "state == Failed"):
        condition = parse_condition(text)
        assert condition.text() == text
        assert parse_condition(condition.text()) == condition


def test_names_and_severities_are_checked() -> None:
    assert check_rule_name("digits-errors") == "digits-errors"
    assert check_severity("critical").value == "critical"
    for bad in ("", "Digits", "a" * 64, "a b", "digits\n"):
        with pytest.raises(ConfigError):
            check_rule_name(bad)
    with pytest.raises(ConfigError, match="use one of info, warning, critical"):
        check_severity("panic")


ERRORS = Rule("errors", parse_condition("error_rate > 1% for 30s"), "warning")


def _run(rule: Rule, steps: list[tuple[int, float | None]]) -> list[tuple[int, str]]:
    """Evaluate ``rule`` on one service at each (second, value) (None: no data); the transitions."""
    tracks: dict[str, Track] = {}
    seen = []
    for second, value in steps:
        readings = [] if value is None else [Reading("service:digits", value, service="digits")]
        tracks, moved = evaluate(rule, readings, tracks, T0 + timedelta(seconds=second))
        seen += [(second, t.kind) for t in moved]
    return seen


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # held for the whole duration: fires once, however long it goes on
        ([(0, 5.0), (10, 5.0), (30, 5.0), (40, 5.0)], [(30, FIRED)]),
        # broken before the duration: never fires, and the clock starts again
        ([(0, 5.0), (20, 0.0), (30, 5.0), (50, 5.0), (60, 5.0)], [(60, FIRED)]),
        # resolves when the value drops, and fires again only after a new full duration
        (
            [(0, 5.0), (30, 5.0), (40, 0.5), (50, 5.0), (70, 5.0), (80, 5.0)],
            [(30, FIRED), (40, RESOLVED), (80, FIRED)],
        ),
        # no data any more (no requests, the service deleted) resolves
        ([(0, 5.0), (30, 5.0), (35, None)], [(30, FIRED), (35, RESOLVED)]),
        # exactly the threshold is not above it
        ([(0, 1.0), (60, 1.0)], []),
    ],
)
def test_a_rule_fires_after_its_duration_and_resolves(
    steps: list[tuple[int, float | None]], expected: list[tuple[int, str]]
) -> None:
    assert _run(ERRORS, steps) == expected


def test_a_rule_without_duration_fires_at_once_and_messages_say_what_happened() -> None:
    rule = Rule("digits-errors", parse_condition("error_rate > 1%"), "critical", service="digits")
    tracks, moved = evaluate(rule, [Reading("service:digits", 5.0, service="digits")], {}, T0)
    assert [t.kind for t in moved] == [FIRED]
    fired = moved[0]
    assert fired.service == "digits" and fired.device_id is None
    assert fired.message == (
        "alert digits-errors (critical) fired on service digits: 5%, condition error_rate > 1%"
    )
    _, moved = evaluate(
        rule, [Reading("service:digits", 0.0, service="digits")], tracks, T0 + timedelta(seconds=9)
    )
    assert moved[0].kind == RESOLVED
    assert moved[0].message == (
        "alert digits-errors resolved on service digits: now 0% (firing since 2026-01-01 12:00:00Z)"
    )


def test_a_stored_firing_alert_does_not_fire_again() -> None:
    """What a restarted hub (or another replica) reads back from the database."""
    stored = {"service:digits": Track("service:digits", T0, firing=True, fired_at=T0, service="digits")}
    tracks, moved = evaluate(
        ERRORS, [Reading("service:digits", 9.0, service="digits")], stored, T0 + timedelta(hours=1)
    )
    assert moved == [] and tracks["service:digits"].firing


def test_device_offline_and_state_rules_fire_per_subject() -> None:
    offline = Rule("gone", parse_condition("device offline > 15m"), "warning")
    readings = [Reading("device:a", 0.0, device_id="a"), Reading("device:b", 901.0, device_id="b")]
    _, moved = evaluate(offline, readings, {}, T0)
    assert [(t.kind, t.device_id) for t in moved] == [(FIRED, "b")]
    assert "device b: offline 901s" in moved[0].message

    failed = Rule("failed", parse_condition("state == Failed"), "critical")
    readings = [Reading("service:x", "Failed", service="x"), Reading("service:y", "Healthy", service="y")]
    _, moved = evaluate(failed, readings, {}, T0)
    assert [(t.kind, t.service) for t in moved] == [(FIRED, "x")]


def test_a_short_metrics_token_is_refused() -> None:
    # An empty one (an unset variable in a compose file) would open /metrics to anyone.
    with pytest.raises(ValueError, match="at least 16"):
        HubSettings(metrics_token="")
    assert HubSettings(metrics_token="x" * 16).metrics_token is not None
