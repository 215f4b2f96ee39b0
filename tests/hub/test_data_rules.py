"""The pure rules of collected data on the hub and in the SDK: the byte budget, a batch's
check, and the times a user gives. No hub needed."""

from __future__ import annotations

import io
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest

from cloud_hub.data.budget import MIN_CHARGE, DataBudget
from cloud_hub.data.check import check_batch
from cloud_hub.errors import InvalidBatch, TooLarge
from packager.sdk.data import parse_when
from packager.sdk.errors import BadArgument
from tests.hub.data_support import gz, key_of, lines, record

pytestmark = pytest.mark.sql_independent  # pure logic: no database

MIB = 1 << 20


def test_the_budget_charges_small_batches_their_minimum_and_says_when_to_come_back() -> None:
    budget = DataBudget(bytes_per_hour=3600 * MIN_CHARGE, burst=4 * MIN_CHARGE)  # a minimum a second
    assert [budget.take("edge-1", 10, now=0.0) for _ in range(4)] == [None] * 4
    assert budget.take("edge-1", 10, now=0.0) == pytest.approx(1.0)
    assert budget.take("edge-2", 10, now=0.0) is None  # each device has its own bucket
    assert budget.take("edge-1", 10, now=1.0) is None
    assert budget.take("edge-1", 3 * MIN_CHARGE, now=1.5) == pytest.approx(2.5)


def test_a_batch_larger_than_the_burst_costs_the_whole_burst_so_it_can_pass() -> None:
    budget = DataBudget(bytes_per_hour=MIB, burst=8 * MIB)
    assert budget.take("edge-1", 9 * MIB, now=0.0) is None


def test_a_compression_bomb_costs_one_line_of_memory() -> None:
    key = key_of("digits")
    bomb = gz(lines([record(key, n, data="a" * 1_000_000) for n in range(100)]))  # 100 MB unpacked
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge):
            check_batch(io.BytesIO(bomb), key, 100, max_raw=64 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB


def test_a_batch_of_records_is_summarised_and_a_count_short_of_its_header_refused() -> None:
    key = key_of("digits")
    body = gz(lines([record(key, n) for n in range(3)]))
    summary = check_batch(io.BytesIO(body), key, 3)
    assert (summary.records, summary.first_at.second, summary.last_at.second) == (3, 0, 2)
    with pytest.raises(InvalidBatch, match="declares 4"):
        check_batch(io.BytesIO(body), key, 4)
    with pytest.raises(InvalidBatch, match="not a collected record"):
        check_batch(io.BytesIO(gz(b"\n")), key, 1)


NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("1h", NOW - timedelta(hours=1)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2d", NOW - timedelta(days=2)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T08:30:00Z", datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
        ("2026-12-01T08:30:00+01:00", datetime(2026, 12, 1, 7, 30, tzinfo=UTC)),
        ("2026-12-01T08:30", datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
    ],
)
def test_times_are_read_as_a_user_writes_them(given: str, expected: datetime) -> None:
    assert parse_when(given, now=NOW) == expected


@pytest.mark.parametrize("given", ["yesterday", "1y", "-1h", "", "2026-13-01"])
def test_unreadable_times_are_refused_with_what_to_write(given: str) -> None:
    with pytest.raises(BadArgument, match="duration ago"):
        parse_when(given, now=NOW)
