"""Issue 16, finding 8: the sign-in throttle's table, on a clock the test moves."""

from __future__ import annotations

import pytest

from cloud_hub.login_throttle import LoginThrottle, ThrottlePolicy, client_key

pytestmark = pytest.mark.sql_independent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **policy: float) -> LoginThrottle:
    values = {"free_failures": 3, "base_delay_s": 1.0, "max_delay_s": 8.0, "forget_after_s": 60.0}
    return LoginThrottle(ThrottlePolicy(**{**values, **policy}), clock=clock)  # type: ignore[arg-type]


def wrong(t: LoginThrottle, key: str, times: int = 1) -> list[float]:
    """``times`` attempts with a wrong token: the block each started (-1 when refused)."""
    out = []
    for _ in range(times):
        a = t.admit(key)
        out.append(-1 if a.retry_after_s > 0 else a.block_s)
    return out


def test_the_delay_doubles_after_each_block_up_to_the_cap_and_a_success_resets_it() -> None:
    clock = Clock()
    t = throttle(clock)
    assert wrong(t, "a", 3) == [0, 0, 1]
    assert wrong(t, "a", 5) == [-1] * 5  # refused while blocked, and not counted
    assert t.retry_after("a") == 1 and t.retry_after("b") == 0  # per address
    blocks = []
    for _ in range(6):
        clock.now += t.retry_after("a")
        blocks += wrong(t, "a")
    assert blocks == [2, 4, 8, 8, 8, 8]
    clock.now += 8
    assert t.admit("a").retry_after_s == 0  # the right token, after the block:
    t.succeeded("a")
    assert t.retry_after("a") == 0 and wrong(t, "a", 3) == [0, 0, 1]


def test_a_right_token_within_the_free_tries_resets_the_count() -> None:
    t = throttle(Clock())
    wrong(t, "a", 2)
    assert t.admit("a").block_s == 1  # the third attempt would start a block if wrong …
    t.succeeded("a")  # … but it was right
    assert t.retry_after("a") == 0 and wrong(t, "a", 3) == [0, 0, 1]


def test_one_episode_is_reported_once_until_a_success_or_forgetting_ends_it() -> None:
    clock = Clock()
    t = throttle(clock)
    started = []
    for _ in range(10):
        clock.now += t.retry_after("a")
        started.append(t.admit("a").episode_started)
    assert started.count(True) == 1 and started.index(True) == 2
    t.succeeded("a")
    assert [t.admit("a").episode_started for _ in range(3)] == [False, False, True]
    clock.now += 61  # silent for longer than forget_after_s: a fresh start
    assert t.retry_after("a") == 0
    assert [t.admit("a").episode_started for _ in range(3)] == [False, False, True]


def test_the_table_is_bounded_and_forgets_the_least_recently_seen_first() -> None:
    clock = Clock()
    t = throttle(clock, max_clients=100)
    for i in range(10_000):
        t.admit(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    wrong(t, "keep", 2)
    for i in range(99):
        clock.now += 0.001
        wrong(t, f"new-{i}", 3)  # blocked, for a second
    wrong(t, "keep")  # its third wrong token; and it is the most recently seen again
    t.admit("one-more")
    assert len(t) == 100
    assert t.retry_after("new-0") == 0 and t.retry_after("new-1") > 0  # the oldest went
    assert t.retry_after("keep") == 1  # its count was kept: the third started a block


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
