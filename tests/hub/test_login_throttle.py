"""Issue 16, finding 8: the sign-in throttle's table, on a clock the test moves."""

from __future__ import annotations

import pytest

from cloud_hub.login_throttle import LoginThrottle, ThrottlePolicy, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **policy: float) -> LoginThrottle:
    values = {"free_failures": 3, "base_delay_s": 1.0, "max_delay_s": 8.0, "forget_after_s": 60.0}
    return LoginThrottle(ThrottlePolicy(**{**values, **policy}), clock=clock)  # type: ignore[arg-type]


def test_the_delay_doubles_after_each_block_up_to_the_cap_and_a_success_resets_it() -> None:
    clock = Clock()
    t = throttle(clock)
    assert [t.failed("a").delay_s for _ in range(3)] == [0, 0, 1]
    assert t.retry_after("a") == 1 and t.retry_after("b") == 0  # per address
    delays = []
    for _ in range(6):
        clock.now += t.retry_after("a")
        delays.append(t.failed("a").delay_s)
    assert delays == [2, 4, 8, 8, 8, 8]
    clock.now += 8
    t.succeeded("a")
    assert t.retry_after("a") == 0 and [t.failed("a").delay_s for _ in range(3)] == [0, 0, 1]


def test_one_episode_is_reported_once_until_a_success_or_forgetting_ends_it() -> None:
    clock = Clock()
    t = throttle(clock)
    started = []
    for _ in range(10):
        clock.now += t.retry_after("a")
        started.append(t.failed("a").episode_started)
    assert started.count(True) == 1 and started.index(True) == 2
    t.succeeded("a")
    assert [t.failed("a").episode_started for _ in range(3)] == [False, False, True]
    clock.now += 61  # silent for longer than forget_after_s: a fresh start
    assert t.retry_after("a") == 0
    assert [t.failed("a").episode_started for _ in range(3)] == [False, False, True]


def test_the_table_is_bounded_and_forgets_the_least_recently_seen_first() -> None:
    clock = Clock()
    t = throttle(clock, max_clients=100)
    for i in range(10_000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    t.failed("keep")
    t.failed("keep")
    for i in range(99):
        clock.now += 0.001
        for _ in range(3):
            t.failed(f"new-{i}")  # blocked, for a second
    t.retry_after("keep")  # seen again: now the newest
    t.failed("one-more")
    assert len(t) == 100
    assert t.retry_after("new-0") == 0 and t.retry_after("new-1") > 0  # the oldest went
    assert t.failed("keep").delay_s == 1  # its two failures were kept


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
        ("testclient", "testclient"),
    ],
)
def test_ipv6_clients_count_per_64_as_one_host_holds_a_whole_prefix(address: str | None, key: str) -> None:
    assert client_key(address) == key
