"""Alert rules: what one says, and the one parser of its compact form (pure).

A rule is a condition on a metric of a service (or of every service, fleet-wide), held for a
duration before it fires::

    error_rate > 1% for 5m      the share of requests that failed, in percent
    p95_ms > 50 for 10m         the services' 95th-percentile latency (p50_ms likewise)
    run_p95_ms > 20 for 10m     the same of the module's run() alone (no body, parsing, queue)
    requests_per_s < 1 for 2m   the requests per second all devices serve together
    device offline > 15m        a device that has not been heard of for that long
    state == Failed             a service's roll-up state (Failed, Unhealthy, ...)

Every refusal is a :class:`~manifests.errors.ConfigError` with one line saying what to write.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from manifests.errors import ConfigError
from manifests.module import NAME_PATTERN

#: Longest condition text accepted (before parsing).
MAX_CONDITION_CHARS = 200
#: Longest ``for`` duration, and longest offline threshold: a day.
MAX_DURATION_S = 24 * 3600
#: A threshold beyond this is a typo, not a limit anyone alerts on.
MAX_THRESHOLD = 1e9

STATES = ("Failed", "Unschedulable", "Unhealthy", "Transitioning", "Healthy")


class Metric(enum.StrEnum):
    ERROR_RATE = "error_rate"
    P95_MS = "p95_ms"
    P50_MS = "p50_ms"
    RUN_P95_MS = "run_p95_ms"
    REQUESTS_PER_S = "requests_per_s"
    DEVICE_OFFLINE = "device_offline"
    STATE = "state"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


_OPERATORS = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}

_UNITS = {"s": 1, "m": 60, "h": 3600}
_DURATION = r"(\d+(?:\.\d+)?)\s*([smh])"
_NUMBER_RULE = re.compile(
    rf"^(error_rate|run_p95_ms|p95_ms|p50_ms|requests_per_s)\s*(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)?)\s*(%?)"
    rf"(?:\s+for\s+{_DURATION})?$"
)
_OFFLINE_RULE = re.compile(rf"^device[ _]offline\s*>\s*{_DURATION}$")
_STATE_RULE = re.compile(rf"^state\s*(==|!=)\s*([A-Za-z]+)(?:\s+for\s+{_DURATION})?$")
_NAME = re.compile(NAME_PATTERN)

EXAMPLES = "e.g. 'error_rate > 1% for 5m', 'p95_ms > 50 for 10m', 'device offline > 15m', 'state == Failed'"


def _seconds(number: str, unit: str) -> int:
    seconds = float(number) * _UNITS[unit]
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"duration {number}{unit} is longer than {MAX_DURATION_S // 3600}h")
    return int(seconds)


@dataclass(frozen=True)
class Condition:
    """A parsed condition. ``threshold`` is in the metric's unit (percent for error_rate,
    seconds for device_offline); ``state`` is the state word of a ``state`` rule."""

    metric: Metric
    operator: str
    threshold: float
    for_s: int = 0
    state: str | None = None

    def breached(self, value: float | str) -> bool:
        """Whether ``value`` (a number, or a state word for ``state``) meets the condition."""
        if self.metric is Metric.STATE:
            return bool(_OPERATORS[self.operator](value, self.state))
        if isinstance(value, str):
            return False
        return bool(_OPERATORS[self.operator](value, self.threshold))

    def text(self) -> str:
        """The compact form, normalised (what the API shows)."""
        tail = f" for {_duration_text(self.for_s)}" if self.for_s else ""
        if self.metric is Metric.DEVICE_OFFLINE:
            return f"device offline > {_duration_text(int(self.threshold))}"
        if self.metric is Metric.STATE:
            return f"state {self.operator} {self.state}{tail}"
        unit = "%" if self.metric is Metric.ERROR_RATE else ""
        return f"{self.metric.value} {self.operator} {self.threshold:g}{unit}{tail}"


def _duration_text(seconds: int) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_condition(text: str) -> Condition:
    """The compact form of a rule's condition; a one-line :class:`ConfigError` otherwise."""
    if len(text) > MAX_CONDITION_CHARS:
        raise ConfigError(f"alert condition is longer than {MAX_CONDITION_CHARS} characters")
    source = " ".join(text.split())
    if m := _NUMBER_RULE.match(source):
        metric, operator, number, percent, *duration = m.groups()
        if percent and metric != Metric.ERROR_RATE:
            raise ConfigError(f"alert condition {source!r}: only error_rate is in percent")
        threshold = float(number)
        if not math.isfinite(threshold) or threshold > MAX_THRESHOLD:
            raise ConfigError(f"alert condition {source!r}: threshold is above {MAX_THRESHOLD:g}")
        if metric == Metric.ERROR_RATE and threshold > 100:
            raise ConfigError(f"alert condition {source!r}: an error rate is at most 100%")
        for_s = _seconds(duration[0], duration[1]) if duration[0] else 0
        return Condition(Metric(metric), operator, threshold, for_s)
    if m := _OFFLINE_RULE.match(source):
        return Condition(Metric.DEVICE_OFFLINE, ">", float(_seconds(m.group(1), m.group(2))))
    if m := _STATE_RULE.match(source):
        operator, word, *duration = m.groups()
        state = next((s for s in STATES if s.lower() == word.lower()), None)
        if state is None:
            raise ConfigError(f"alert condition {source!r}: the state is one of {', '.join(STATES)}")
        for_s = _seconds(duration[0], duration[1]) if duration[0] else 0
        return Condition(Metric.STATE, operator, 0.0, for_s, state)
    raise ConfigError(f"alert condition {source!r} is not understood; {EXAMPLES}")


def check_rule_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"alert rule name {name[:80]!r}: use 1-63 lower-case letters, digits, '.', '_' or '-'"
        )
    return name


def check_severity(severity: str) -> Severity:
    try:
        return Severity(severity)
    except ValueError:
        choices = ", ".join(s.value for s in Severity)
        raise ConfigError(f"alert severity {severity[:40]!r}: use one of {choices}") from None
