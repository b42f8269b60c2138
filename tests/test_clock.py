"""The wire's timestamp format and millisecond truncation (``samvad.clock``)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from samvad.clock import (
    ManualClock,
    SystemClock,
    epoch_millis,
    millisecond_now,
    parse_iso,
    to_iso,
    truncate_ms,
)


def _reference_iso(value: datetime) -> str:
    """The format as the original backend wrote it (``Date.toISOString``)."""
    value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T"
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}."
        f"{value.microsecond // 1000:03d}Z"
    )


def _random_times(count: int) -> list[datetime]:
    rng = random.Random(14)
    start = datetime(1, 1, 1, tzinfo=UTC)
    span = (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC) - start).total_seconds()
    times = [start + timedelta(seconds=rng.uniform(0, span)) for _ in range(count)]
    # Runs within one second and across the seconds around it, as a server formats them.
    now = datetime(2025, 1, 10, 17, 0, 0, 999_000, tzinfo=UTC)
    times += [
        now + timedelta(microseconds=rng.randrange(-2_000_000, 2_000_000)) for _ in range(count)
    ]
    return times


def test_to_iso_matches_the_wire_format_for_any_time() -> None:
    for value in _random_times(5000):
        assert to_iso(value) == _reference_iso(value), value


def test_to_iso_pads_years_before_1000_and_keeps_the_edges() -> None:
    assert to_iso(datetime(33, 2, 3, 4, 5, 6, 7_999, tzinfo=UTC)) == "0033-02-03T04:05:06.007Z"
    assert to_iso(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000Z"
    last = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert to_iso(last) == "9999-12-31T23:59:59.999Z"


def test_to_iso_does_not_reuse_another_seconds_text() -> None:
    # The same second's fields in another order, another year, another day.
    pairs = [
        (datetime(2025, 1, 10, 17, 0, 1, tzinfo=UTC), "2025-01-10T17:00:01.000Z"),
        (datetime(2025, 1, 10, 17, 1, 0, tzinfo=UTC), "2025-01-10T17:01:00.000Z"),
        (datetime(2026, 1, 10, 17, 0, 1, tzinfo=UTC), "2026-01-10T17:00:01.000Z"),
        (datetime(2025, 1, 10, 17, 0, 1, 5_000, tzinfo=UTC), "2025-01-10T17:00:01.005Z"),
        (datetime(2025, 10, 1, 17, 0, 1, tzinfo=UTC), "2025-10-01T17:00:01.000Z"),
    ]
    for value, text in pairs * 2:
        assert to_iso(value) == text


def test_to_iso_converts_other_zones_to_utc() -> None:
    kolkata = datetime(2025, 1, 10, 22, 30, 0, 123_456, tzinfo=ZoneInfo("Asia/Kolkata"))
    assert to_iso(kolkata) == "2025-01-10T17:00:00.123Z"
    fixed = datetime(2025, 1, 10, 12, 0, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert to_iso(fixed) == "2025-01-10T17:00:00.000Z"
    assert parse_iso(to_iso(kolkata)) == truncate_ms(kolkata)


class _Subclass(datetime):
    pass


def test_truncate_ms_drops_only_what_is_below_a_millisecond() -> None:
    for value in _random_times(2000):
        truncated = truncate_ms(value)
        assert truncated == value.replace(microsecond=value.microsecond // 1000 * 1000)
        assert truncated.tzinfo is value.tzinfo
        assert parse_iso(to_iso(value)) == truncated


def test_truncate_ms_keeps_the_type_zone_and_fold() -> None:
    already = datetime(2025, 1, 10, 17, 0, 0, 123_000, tzinfo=UTC)
    assert truncate_ms(already) == already
    sub = _Subclass(2025, 1, 10, 17, 0, 0, 123_456, tzinfo=UTC)
    assert type(truncate_ms(sub)) is _Subclass
    assert truncate_ms(sub).microsecond == 123_000
    # The second 01:30 of a night the clocks went back: fold=1 kept.
    ambiguous = datetime(
        2025, 11, 2, 1, 30, 0, 500_500, fold=1, tzinfo=ZoneInfo("America/New_York")
    )
    truncated = truncate_ms(ambiguous)
    assert truncated.fold == 1 and truncated.microsecond == 500_000
    assert truncated.utcoffset() == ambiguous.utcoffset()


def test_millisecond_now_reads_the_system_clock_to_the_millisecond() -> None:
    now = millisecond_now(SystemClock())
    for _ in range(2000):  # across several milliseconds
        before = truncate_ms(datetime.now(UTC))
        value = now()
        after = datetime.now(UTC)
        assert type(value) is datetime and value.tzinfo is UTC
        assert value.microsecond % 1000 == 0
        assert before <= value <= after


def test_millisecond_now_gives_one_object_per_millisecond_and_a_new_one_after() -> None:
    now = millisecond_now(SystemClock())
    first = now()
    while (value := now()) == first:
        assert value is first
    assert value - first >= timedelta(milliseconds=1)


def test_millisecond_now_builds_each_millisecond_across_seconds() -> None:
    """The second is kept and the milliseconds added from a table: every
    reading equals the exact conversion, across second boundaries and jumps."""
    from samvad.clock import _SystemMillisecond

    readings = [
        1_764_471_599_998_123_456,
        1_764_471_599_999_000_000,
        1_764_471_600_000_000_001,
        1_764_471_600_001_999_999,
        1_764_471_600_001_000_000,
        1_700_000_000_500_000_000,
        1_764_471_599_999_500_000,
    ]
    now = _SystemMillisecond(iter(readings).__next__)
    for ns in readings:
        millis = ns // 1_000_000
        expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
        assert now() == expected


def test_millisecond_now_follows_any_other_clock_truncated() -> None:
    clock = ManualClock(datetime(2025, 1, 10, 17, 0, 0, 123456, tzinfo=UTC))
    now = millisecond_now(clock)
    assert now() == datetime(2025, 1, 10, 17, 0, 0, 123000, tzinfo=UTC)
    clock.advance(0.0015)
    assert now() == datetime(2025, 1, 10, 17, 0, 0, 124000, tzinfo=UTC)


def test_epoch_millis_is_the_timestamp_in_milliseconds_for_clock_readings_and_others() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    one = timedelta(milliseconds=1)
    now = millisecond_now(SystemClock())
    for _ in range(200):  # the clock's latest reading: from its own integer
        value = now()
        assert epoch_millis(value) == (value - epoch) // one
    rng = random.Random(7)
    for _ in range(2000):  # any other datetime (a ManualClock's, a stored one)
        millis = rng.randrange(0, 4_000_000_000_000)
        value = epoch + timedelta(milliseconds=millis)
        assert epoch_millis(value) == millis
        assert epoch_millis(value.astimezone(ZoneInfo("Asia/Kolkata"))) == millis
    naive = datetime(2025, 1, 10, 17, 0, 0, 123000)  # local time, as timestamp() takes it
    assert epoch_millis(naive) == round(naive.timestamp() * 1000)
