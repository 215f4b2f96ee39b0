"""A deployment change's rollout strategy: waves, bake time, gates (pure, bounded).

The CLI parses an operator's flags with these functions before it sends anything, and the hub
parses the same text again (``PUT /api/v1/deployments/{name}``'s ``rollout`` object), so both
refuse the same inputs with the same one-line message:

- waves: ``1%,10%,50%,100%`` — cumulative shares of the targeted devices, rising, the last 100%;
- bake: ``2m``, ``90s``, ``1h`` — how long a wave's devices run the new version, Healthy,
  before its gates are judged;
- gates: ``error_rate<1%`` (the wave's devices' errors per 100 requests over the bake) and
  ``p95_ms<1.5x`` (their median p95 latency, relative to the devices still on the previous
  version) or ``p95_ms<250`` (milliseconds);
- on failure: ``rollback`` (default) or ``halt``.

Every count and length is bounded by a named constant below (docs/security.md §18).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from manifests.errors import ConfigError

#: Waves one rollout may have (a 1,2,...,100% rollout would bake for hours anyway).
MAX_WAVES = 10
#: Gates one rollout may have.
MAX_GATES = 8
#: The longest bake one wave may ask for (a day); the shortest is 1 s (tests, the bench).
MAX_BAKE_S = 86_400.0
MIN_BAKE_S = 1.0
#: The longest a wave's devices may take to become Healthy before the rollout halts.
MAX_HEALTH_TIMEOUT_S = 86_400.0
#: Characters of one gate or the waves text (before anything is parsed).
MAX_TEXT = 200
#: A tag key to spread waves by follows the tag rules; its distinct values are bounded by the
#: hub (``rollout_max_spread_values``).
SPREAD_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"

STRATEGIES = ("all", "waves")
ON_FAILURE = ("rollback", "halt")
OnFailure = Literal["rollback", "halt"]

_PERCENT = re.compile(r"^\s*(\d{1,3}(?:\.\d{1,3})?)\s*%\s*$")
_DURATION = re.compile(r"^\s*(\d{1,6}(?:\.\d{1,3})?)\s*(ms|s|m|h)?\s*$")
_GATE = re.compile(r"^\s*([a-z0-9_]{1,20})\s*<\s*(\d{1,9}(?:\.\d{1,6})?)\s*(%|x|ms)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _clip(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ConfigError(f"{what}: longer than {MAX_TEXT} characters")
    return value


def parse_waves(text: str) -> tuple[float, ...]:
    """``"1%,10%,50%,100%"`` → ``(1.0, 10.0, 50.0, 100.0)``: cumulative, rising, ending at 100."""
    _text(text, "waves")
    parts = text.split(",")
    if len(parts) > MAX_WAVES:
        raise ConfigError(f"waves {_clip(text)!r}: at most {MAX_WAVES} waves")
    waves: list[float] = []
    for part in parts:
        match = _PERCENT.fullmatch(part)
        if match is None:
            raise ConfigError(
                f"waves {_clip(text)!r}: {_clip(part.strip())!r} is not a share such as 10%; "
                "give rising shares of the devices ending at 100%, e.g. 1%,10%,50%,100%"
            )
        share = float(match.group(1))
        if not 0 < share <= 100:
            raise ConfigError(f"waves {_clip(text)!r}: {share:g}% is not between 0% and 100%")
        if waves and share <= waves[-1]:
            raise ConfigError(f"waves {_clip(text)!r}: each wave must reach more devices than the one before")
        waves.append(share)
    if waves[-1] != 100:
        raise ConfigError(f"waves {_clip(text)!r}: the last wave must be 100% (every targeted device)")
    return tuple(waves)


def parse_duration(text: str, *, what: str, low: float, high: float) -> float:
    """``"2m"`` → 120.0 (units ms, s, m, h; a bare number is seconds), within [low, high]."""
    _text(text, what)
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ConfigError(f"{what} {_clip(text)!r}: expected a duration such as 90s, 2m or 1h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not low <= seconds <= high:
        raise ConfigError(f"{what} {_clip(text)!r}: must be between {low:g}s and {high:g}s")
    return seconds


Metric = Literal["error_rate", "p95_ms"]


@dataclass(frozen=True)
class Gate:
    """``metric < limit``; ``relative``: the limit is a multiple of the previous version's value."""

    metric: Metric
    limit: float
    relative: bool = False

    def text(self) -> str:
        if self.relative:
            return f"{self.metric}<{self.limit:g}x"
        return f"{self.metric}<{self.limit:g}{'%' if self.metric == 'error_rate' else ''}"


def parse_gate(text: str) -> Gate:
    """``"error_rate<1%"``, ``"p95_ms<1.5x"`` or ``"p95_ms<250"`` → a :class:`Gate`."""
    _text(text, "gate")
    match = _GATE.fullmatch(text)
    hint = "use error_rate<N% or p95_ms<Nx (relative to the previous version) or p95_ms<N (ms)"
    if match is None:
        raise ConfigError(f"gate {_clip(text)!r}: {hint}")
    metric, number, unit = match.group(1), float(match.group(2)), match.group(3)
    if metric == "error_rate":
        if unit != "%":
            raise ConfigError(
                f"gate {_clip(text)!r}: an error rate is a share of requests, e.g. error_rate<1%"
            )
        if not 0 < number <= 100:
            raise ConfigError(f"gate {_clip(text)!r}: the error rate must be above 0% and at most 100%")
        return Gate("error_rate", number)
    if metric == "p95_ms":
        if unit == "%":
            raise ConfigError(f"gate {_clip(text)!r}: {hint}")
        if unit == "x":
            if not 1 <= number <= 100:
                raise ConfigError(f"gate {_clip(text)!r}: a relative limit must be between 1x and 100x")
            return Gate("p95_ms", number, relative=True)
        if not 0 < number <= 3_600_000:
            raise ConfigError(f"gate {_clip(text)!r}: the latency must be above 0 and at most 3600000 ms")
        return Gate("p95_ms", number)
    raise ConfigError(f"gate {_clip(text)!r}: unknown metric {metric!r}; {hint}")


def parse_gates(texts: Iterable[str]) -> tuple[Gate, ...]:
    gates: list[Gate] = []
    for text in texts:
        if len(gates) >= MAX_GATES:
            raise ConfigError(f"at most {MAX_GATES} gates per rollout")
        gates.append(parse_gate(text))
    return tuple(gates)


@dataclass(frozen=True)
class RolloutSpec:
    """How one deployment change reaches its devices. ``waves`` empty: all at once."""

    waves: tuple[float, ...] = ()
    bake_s: float = 120.0
    gates: tuple[Gate, ...] = ()
    on_failure: OnFailure = "rollback"
    spread_by: str | None = None
    health_timeout_s: float | None = None  # None: the hub's rollout_health_timeout_s

    @property
    def staged(self) -> bool:
        return bool(self.waves)

    def to_json(self) -> dict[str, Any]:
        """The API's ``rollout`` object for this spec (what the CLI and SDK send)."""
        out: dict[str, Any] = {"strategy": "waves" if self.waves else "all"}
        if self.waves:
            out.update(
                waves=",".join(f"{w:g}%" for w in self.waves),
                bake=f"{self.bake_s:g}s",
                gates=[g.text() for g in self.gates],
                on_failure=self.on_failure,
            )
            if self.spread_by is not None:
                out["spread_by"] = self.spread_by
            if self.health_timeout_s is not None:
                out["health_timeout"] = f"{self.health_timeout_s:g}s"
        return out


_KEYS = {"strategy", "waves", "bake", "gates", "on_failure", "spread_by", "health_timeout"}


def parse_spread_key(text: str) -> str:
    _text(text, "spread-by")
    if not re.fullmatch(SPREAD_KEY_PATTERN, text):
        raise ConfigError(f"spread-by {_clip(text)!r}: give a tag key such as site")
    return text


def parse_rollout(raw: object) -> RolloutSpec:
    """The ``rollout`` object of a deploy request (or the CLI's flags gathered into one).

    ``{"strategy": "all"}`` (or nothing) deploys at once; ``{"strategy": "waves", "waves":
    "1%,10%,100%", "bake": "2m", "gates": ["error_rate<1%"], "on_failure": "rollback",
    "spread_by": "site", "health_timeout": "5m"}`` stages it (``strategy`` may be left out when
    ``waves`` is given).
    """
    if raw is None:
        return RolloutSpec()
    if not isinstance(raw, Mapping):
        raise ConfigError('rollout must be an object, e.g. {"waves": "1%,10%,100%", "bake": "2m"}')
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(
            f"rollout: unknown field {_clip(str(unknown[0]))!r}; use one of {', '.join(sorted(_KEYS))}"
        )
    strategy = raw.get("strategy", "waves" if raw.get("waves") is not None else "all")
    if strategy not in STRATEGIES:
        raise ConfigError(f"rollout strategy {_clip(str(strategy))!r}: use 'all' or 'waves'")
    if strategy == "all":
        staged_only = sorted(k for k in raw if k != "strategy")
        if staged_only:
            raise ConfigError(
                f"rollout: {staged_only[0]!r} needs waves (strategy 'waves'), e.g. waves 1%,10%,100%"
            )
        return RolloutSpec()
    if raw.get("waves") is None:
        raise ConfigError("rollout strategy 'waves' needs waves, e.g. 1%,10%,50%,100%")
    waves = parse_waves(_text(raw["waves"], "waves"))
    bake = raw.get("bake")
    bake_s = (
        120.0
        if bake is None
        else parse_duration(_text(bake, "bake"), what="bake", low=MIN_BAKE_S, high=MAX_BAKE_S)
    )
    gates_raw = raw.get("gates", [])
    if not isinstance(gates_raw, list):
        raise ConfigError('rollout gates: expected a list such as ["error_rate<1%", "p95_ms<1.5x"]')
    if len(gates_raw) > MAX_GATES:
        raise ConfigError(f"at most {MAX_GATES} gates per rollout")
    gates = parse_gates(_text(g, "gate") for g in gates_raw)
    on_failure = raw.get("on_failure", "rollback")
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on-failure {_clip(str(on_failure))!r}: use 'rollback' or 'halt'")
    spread = raw.get("spread_by")
    spread_by = None if spread is None else parse_spread_key(_text(spread, "spread-by"))
    timeout = raw.get("health_timeout")
    health_timeout_s = (
        None
        if timeout is None
        else parse_duration(
            _text(timeout, "health-timeout"), what="health-timeout", low=1.0, high=MAX_HEALTH_TIMEOUT_S
        )
    )
    return RolloutSpec(
        waves=waves,
        bake_s=bake_s,
        gates=gates,
        on_failure="halt" if on_failure == "halt" else "rollback",
        spread_by=spread_by,
        health_timeout_s=health_timeout_s,
    )
