"""Rollout rules without a hub: parsing the operator's flags, picking waves, judging gates,
deciding a wave's next step (cloud_hub.rollouts, manifests.rollout)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from cloud_hub.rollouts.engine import Halt, Progress, Promote, StartBake, Wait, WaveHealth, decide
from cloud_hub.rollouts.gates import Cohort, breach, cohort_of
from cloud_hub.rollouts.waves import pick_thresholds, wave_of, wave_sizes
from manifests.errors import ConfigError
from manifests.reported import ModuleMetrics, Telemetry
from manifests.rollout import (
    MAX_GATES,
    MAX_WAVES,
    Gate,
    parse_duration,
    parse_gate,
    parse_rollout,
    parse_waves,
)

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


# --- parsing ---------------------------------------------------------------------------------


def test_waves_gates_and_bake_parse_from_the_operators_words() -> None:
    assert parse_waves("1%,10%,50%,100%") == (1.0, 10.0, 50.0, 100.0)
    assert parse_waves(" 0.5% , 100% ") == (0.5, 100.0)
    assert parse_gate("error_rate<1%") == Gate("error_rate", 1.0)
    assert parse_gate("p95_ms<1.5x") == Gate("p95_ms", 1.5, relative=True)
    assert parse_gate("p95_ms < 250") == Gate("p95_ms", 250.0)
    assert parse_duration("2m", what="bake", low=1, high=3600) == 120.0
    spec = parse_rollout(
        {
            "waves": "1%,100%",
            "bake": "90s",
            "gates": ["error_rate<2%"],
            "on_failure": "halt",
            "spread_by": "site",
        }
    )
    assert (spec.waves, spec.bake_s, spec.on_failure, spec.spread_by) == ((1.0, 100.0), 90.0, "halt", "site")
    assert parse_rollout(spec.to_json()) == spec
    assert not parse_rollout(None).staged and not parse_rollout({"strategy": "all"}).staged


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"waves": "10%,5%,100%"}, "more devices than the one before"),
        ({"waves": "1%,50%"}, "last wave must be 100%"),
        ({"waves": "0%,100%"}, "between 0% and 100%"),
        ({"waves": "ten,100%"}, "is not a share"),
        ({"waves": ",".join(f"{i}%" for i in range(1, MAX_WAVES + 1)) + ",100%"}, f"at most {MAX_WAVES}"),
        ({"waves": "1%,100%", "bake": "forever"}, "expected a duration"),
        ({"waves": "1%,100%", "bake": "0s"}, "between 1s and"),
        ({"waves": "1%,100%", "bake": "2d"}, "expected a duration"),
        ({"waves": "1%,100%", "gates": ["error_rate<1"]}, "share of requests"),
        ({"waves": "1%,100%", "gates": ["cpu<50%"]}, "unknown metric"),
        ({"waves": "1%,100%", "gates": ["p95_ms>2x"]}, "use error_rate<N%"),
        ({"waves": "1%,100%", "gates": ["p95_ms<0.5x"]}, "between 1x and 100x"),
        ({"waves": "1%,100%", "gates": ["error_rate<1%"] * (MAX_GATES + 1)}, f"at most {MAX_GATES} gates"),
        ({"waves": "1%,100%", "gates": "error_rate<1%"}, "expected a list"),
        ({"waves": "1%,100%", "on_failure": "explode"}, "use 'rollback' or 'halt'"),
        ({"waves": "1%,100%", "spread_by": "a b"}, "give a tag key"),
        ({"waves": "1%," * 100 + "100%"}, "longer than 200 characters"),
        ({"strategy": "all", "bake": "2m"}, "needs waves"),
        ({"strategy": "canary"}, "use 'all' or 'waves'"),
        ({"strategy": "waves"}, "needs waves"),
        ({"waves": "1%,100%", "surprise": 1}, "unknown field"),
        ("1%,100%", "must be an object"),
    ],
)
def test_bad_rollouts_are_refused_in_one_line(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_rollout(raw)
    assert "\n" not in str(caught.value)


# --- waves -----------------------------------------------------------------------------------


def _fleet(n: int, sites: int = 1) -> dict[str, dict[str, str]]:
    return {f"dev-{i:05d}": {"site": f"site-{i % sites}"} for i in range(n)}


def _waves_of(
    devices: dict[str, dict[str, str]], waves: tuple[float, ...], spread: str | None, rid: str = "r1"
) -> dict[str, int]:
    th = pick_thresholds(rid, devices, waves, spread)
    return {
        d: wave_of(rid, d, tags, waves=waves, thresholds=th, spread_by=spread) for d, tags in devices.items()
    }


def test_each_wave_holds_exactly_its_share_of_the_fleet() -> None:
    devices = _fleet(5000)
    waves = (1.0, 10.0, 50.0, 100.0)
    placed = Counter(_waves_of(devices, waves, None).values())
    assert [sum(placed[w] for w in range(k + 1)) for k in range(4)] == [50, 500, 2500, 5000]
    assert wave_sizes(3, waves) == [1, 1, 1, 3]  # a wave is never empty


def test_wave_picking_is_deterministic_and_differs_between_rollouts() -> None:
    devices = _fleet(400)
    waves = (10.0, 100.0)
    first = _waves_of(devices, waves, None, "r1")
    assert first == _waves_of(devices, waves, None, "r1")
    other = _waves_of(devices, waves, None, "r2")
    assert {d for d, w in first.items() if w == 0} != {d for d, w in other.items() if w == 0}


def test_spread_by_takes_every_site_at_the_same_pace() -> None:
    devices = _fleet(1000, sites=10)
    placed = _waves_of(devices, (10.0, 100.0), "site")
    first = Counter(devices[d]["site"] for d, w in placed.items() if w == 0)
    assert first == {f"site-{i}": 10 for i in range(10)}


def test_a_late_joiner_gets_its_wave_without_moving_anybody() -> None:
    devices = _fleet(2000)
    waves = (5.0, 50.0, 100.0)
    th = pick_thresholds("r1", devices, waves, None)
    before = {d: wave_of("r1", d, t, waves=waves, thresholds=th, spread_by=None) for d, t in devices.items()}
    late = {f"late-{i}": {} for i in range(2000)}
    joined = Counter(wave_of("r1", d, t, waves=waves, thresholds=th, spread_by=None) for d, t in late.items())
    # The same rule places the late ones (about 5 % in the first wave), the others stay put.
    assert 50 <= joined[0] <= 150
    assert before == {
        d: wave_of("r1", d, t, waves=waves, thresholds=th, spread_by=None) for d, t in devices.items()
    }


# --- gates -----------------------------------------------------------------------------------


def _sample(device: str, at: int, requests: int, errors: int, p95: float) -> Telemetry:
    return Telemetry(
        device_id=device,
        ts=T0 + timedelta(seconds=at),
        modules=[
            ModuleMetrics(
                service="svc", requests_total=requests, errors_total=errors, requests_per_s=1.0, p95_ms=p95
            )
        ],
    )


def test_a_cohort_counts_requests_between_samples_and_skips_restarts() -> None:
    samples = [
        _sample("a", 0, 100, 0, 10.0),
        _sample("a", 10, 200, 5, 12.0),
        _sample("a", 20, 50, 0, 14.0),  # restarted: the interval is unknown
        _sample("a", 30, 150, 5, 16.0),
        _sample("b", 0, 0, 0, 30.0),
        _sample("b", 10, 100, 0, 30.0),
        _sample("z", 10, 9999, 9999, 999.0),  # not in the cohort
    ]
    cohort = cohort_of(samples, "svc", frozenset({"a", "b"}))
    assert (cohort.devices, cohort.requests, cohort.errors, cohort.intervals) == (2, 300, 10, 3)
    assert cohort.p95_ms == pytest.approx((13.0 + 30.0) / 2)


def test_gates_name_what_broke_beside_the_previous_versions_figure() -> None:
    gates = (Gate("error_rate", 1.0), Gate("p95_ms", 1.5, relative=True))
    old = Cohort(devices=10, requests=1000, errors=0, p95_ms=20.0)
    bad = Cohort(devices=1, requests=1000, errors=52, p95_ms=21.0)
    assert breach(gates, bad, old, "1") == "error rate 5.2% vs 0.0% on 1 (gate error_rate<1%)"
    slow = Cohort(devices=1, requests=1000, errors=0, p95_ms=40.0)
    assert breach(gates, slow, old, "1") == "p95 40 ms vs 20 ms on 1 (gate p95_ms<1.5x)"
    assert breach(gates, Cohort(1, 1000, 5, 25.0), old, "1") is None
    # Nothing to judge passes: no requests, no previous devices to compare with.
    assert breach(gates, Cohort(), old, "1") is None
    assert breach(gates, slow, Cohort(), "1") is None


# --- deciding --------------------------------------------------------------------------------


def _progress(**changes: object) -> Progress:
    base: dict[str, object] = dict(
        wave=0, waves=4, wave_started_at=T0, bake_started_at=None, bake_s=60.0,
        health_timeout_s=120.0, gates=(Gate("error_rate", 1.0),), previous="1",
    )  # fmt: skip
    base.update(changes)
    return Progress(**base)  # type: ignore[arg-type]


def _no_cohorts(since: datetime) -> tuple[Cohort, Cohort]:
    raise AssertionError("telemetry read before the bake was over")


def test_a_wave_bakes_once_healthy_and_is_promoted_when_its_gates_hold() -> None:
    healthy = WaveHealth(devices=50, healthy=50, offline=0)
    assert decide(_progress(), WaveHealth(50, 10, 0, waiting=["d"]), _no_cohorts, T0) == Wait()
    assert decide(_progress(), healthy, _no_cohorts, T0 + timedelta(seconds=5)) == StartBake(
        T0 + timedelta(seconds=5)
    )
    baking = _progress(bake_started_at=T0)
    assert decide(baking, healthy, _no_cohorts, T0 + timedelta(seconds=59)) == Wait()
    good = (Cohort(50, 5000, 0, 10.0, intervals=50), Cohort(4950, 50000, 0, 10.0, intervals=4950))
    assert decide(baking, healthy, lambda since: good, T0 + timedelta(seconds=60)) == Promote()
    last = _progress(wave=3, bake_started_at=T0)
    assert decide(last, healthy, lambda since: good, T0 + timedelta(seconds=60)) == Promote(complete=True)


def test_a_wave_halts_on_a_broken_gate_a_failed_device_or_the_health_timeout() -> None:
    healthy = WaveHealth(devices=50, healthy=50, offline=0)
    bad = (Cohort(50, 1000, 52, 10.0, intervals=50), Cohort(4950, 50000, 0, 10.0, intervals=4950))
    verdict = decide(_progress(bake_started_at=T0), healthy, lambda since: bad, T0 + timedelta(seconds=60))
    assert verdict == Halt("wave 1 (50 devices): error rate 5.2% vs 0.0% on 1 (gate error_rate<1%)")
    failed = WaveHealth(50, 48, 0, failed=[("d-7", "score.py:3 RuntimeError: boom"), ("d-9", "x")])
    assert decide(_progress(), failed, _no_cohorts, T0) == Halt(
        "wave 1 (50 devices): device d-7 Failed (and 1 more): score.py:3 RuntimeError: boom"
    )
    slow = WaveHealth(50, 49, 0, waiting=["d-3"])
    assert decide(_progress(), slow, _no_cohorts, T0 + timedelta(seconds=121)) == Halt(
        "wave 1 (50 devices): 1 device(s) not Healthy within 120s, e.g. d-3"
    )


def test_a_bake_without_telemetry_waits_for_some_and_then_halts() -> None:
    healthy = WaveHealth(devices=50, healthy=50, offline=0)
    silent = (Cohort(50, 0, 0, None, intervals=0), Cohort(4950, 50000, 0, 10.0, intervals=4950))
    baking = _progress(bake_started_at=T0)
    assert decide(baking, healthy, lambda since: silent, T0 + timedelta(seconds=60)) == Wait()
    assert decide(baking, healthy, lambda since: silent, T0 + timedelta(seconds=181)) == Halt(
        "wave 1 (50 devices): no telemetry from its devices within 180s of the bake's start, "
        "so its gates cannot be judged"
    )
    # Without gates there is nothing to measure: the bake's end promotes.
    assert (
        decide(
            _progress(bake_started_at=T0, gates=()), healthy, lambda since: silent, T0 + timedelta(seconds=60)
        )
        == Promote()
    )
