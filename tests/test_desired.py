"""``manifests.desired.verify_desired`` on a device whose clock is wrong: an expiry the hub's
clock does not see is blamed on the device clock, with the amount it is off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from manifests.desired import DesiredRefusal, DesiredStateRefused, format_span, verify_desired
from tests.factory import Forge

HUB_NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)  # the hub's default desired_ttl_s


@pytest.fixture(scope="module")
def forge() -> Forge:
    return Forge()


def refusal(
    forge: Forge, *, issued: datetime, now: datetime, hub_now: datetime | None
) -> DesiredStateRefused:
    state = forge.desired_state("dev-a", 5, issued=issued, expires_in=WEEK)
    with pytest.raises(DesiredStateRefused) as refused:
        verify_desired(
            forge.desired_bytes(state), hub_trust=forge.hub_trust, device_id="dev-a",
            applied_generation=4, now=now, hub_now=hub_now,
        )  # fmt: skip
    return refused.value


def test_a_device_clock_ahead_of_the_hub_is_told_by_how_much_not_to_wait_for_the_hub(forge: Forge) -> None:
    # Issued an hour ago by the hub; the device's clock runs 8 days 2 h 03 min ahead.
    skew = timedelta(days=8, hours=2, minutes=3)
    refused = refusal(forge, issued=HUB_NOW - timedelta(hours=1), now=HUB_NOW + skew, hub_now=HUB_NOW)
    assert refused.reason is DesiredRefusal.CLOCK_SKEW
    message = str(refused)
    assert "the device clock is 8 d 2 h ahead of the hub's" in message
    assert "fix the device's time (NTP)" in message and "re-issue" not in message
    assert not refused.temporary


def test_a_state_expired_by_the_hubs_clock_too_is_the_hubs_to_reissue(forge: Forge) -> None:
    refused = refusal(forge, issued=HUB_NOW - 2 * WEEK, now=HUB_NOW, hub_now=HUB_NOW)
    assert refused.reason is DesiredRefusal.EXPIRED
    assert "by the hub's clock too; the hub must re-issue it" in str(refused)
    assert "NTP" not in str(refused)


def test_without_the_hubs_clock_the_refusal_names_the_skew_a_renewing_hub_implies(forge: Forge) -> None:
    # A week-long state is renewed within 3.5 days, so 8 days after issue the device clock is
    # 4 d 12 h to 8 d ahead, or the hub has been silent for that long.
    refused = refusal(forge, issued=HUB_NOW, now=HUB_NOW + timedelta(days=8), hub_now=None)
    assert refused.reason is DesiredRefusal.EXPIRED
    message = str(refused)
    assert "the device clock is 4 d 12 h to 8 d 0 h ahead of the hub's" in message
    assert "fix the device's time, NTP" in message and "the hub must re-issue it" in message


def test_a_device_clock_behind_the_hub_is_no_reason_to_refuse(forge: Forge) -> None:
    state = forge.desired_state("dev-a", 5, issued=HUB_NOW, expires_in=WEEK)
    got = verify_desired(
        forge.desired_bytes(state), hub_trust=forge.hub_trust, device_id="dev-a",
        applied_generation=4, now=HUB_NOW - timedelta(hours=2, minutes=3), hub_now=HUB_NOW,
    )  # fmt: skip
    assert got.generation == 5


@pytest.mark.parametrize(
    ("span", "text"),
    [
        (timedelta(days=3, hours=4, minutes=5), "3 d 4 h"),
        (timedelta(hours=2, minutes=3, seconds=9), "2 h 03 min"),
        (timedelta(minutes=5, seconds=7), "5 min 07 s"),
        (timedelta(seconds=42.9), "42 s"),
        (-timedelta(hours=1), "1 h 00 min"),
    ],
)
def test_spans_read_as_people_write_them(span: timedelta, text: str) -> None:
    assert format_span(span) == text
