"""Time: an injectable clock and the wire format for timestamps.

Everything that reads the time takes a :class:`Clock`, so expiry, flush
intervals and idle time-outs are tested by moving a :class:`ManualClock`
instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol

__all__ = [
    "Clock",
    "ManualClock",
    "SystemClock",
    "epoch_millis",
    "millisecond_now",
    "parse_iso",
    "to_iso",
    "truncate_ms",
]


class Clock(Protocol):
    """Wall-clock time for stored timestamps, monotonic time for intervals."""

    def now(self) -> datetime:
        """The current UTC time (timezone-aware)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class SystemClock:
    """The real clocks of the machine.

    Both are the C functions themselves (no Python frame of their own): the
    message path reads the monotonic clock about a dozen times per message.
    """

    __slots__ = ()

    now: Callable[[], datetime] = staticmethod(partial(datetime.now, UTC))
    monotonic: Callable[[], float] = staticmethod(time.monotonic)


class ManualClock:
    """A clock that moves only when told to; for tests."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, start: datetime | None = None) -> None:
        self._wall = start or datetime(2025, 1, 10, 17, 0, 0, tzinfo=UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("A clock cannot be moved backwards.")
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)


class _SecondPrefix:
    """The text up to the milliseconds of the last second :func:`to_iso` formatted.

    Timestamps come in bursts within one second (every message, every
    response); formatting the date and time once per second and the
    milliseconds per call costs about a third of ``isoformat``. One entry,
    replaced whole, so a thread reading it never sees half of one.
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple[tuple[int, int, int, int, int, int], str] = ((0, 0, 0, 0, 0, 0), "")

    def __call__(self, value: datetime) -> str:
        key = (value.second, value.minute, value.hour, value.day, value.month, value.year)
        entry = self.entry
        if entry[0] == key:
            return entry[1]
        # "2025-01-10T17:00:00+00:00" -> "2025-01-10T17:00:00": isoformat pads
        # the year to four digits (strftime's %Y does not: "33-02-03T...").
        prefix = value.isoformat(timespec="seconds")[:19]
        self.entry = (key, prefix)
        return prefix


_second_prefix = _SecondPrefix()
#: ".000Z" to ".999Z": a lookup, where formatting the milliseconds cost as much
#: as the rest of a timestamp.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def to_iso(value: datetime) -> str:
    """Format as the wire's ISO-8601 UTC with milliseconds: ``2025-01-10T17:00:00.000Z``."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return _second_prefix(value) + _MILLIS[value.microsecond // 1000]


def parse_iso(text: str) -> datetime:
    """Parse an ISO-8601 timestamp; a value without a zone is taken as UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _SystemMillisecond:
    """``truncate_ms(SystemClock().now())``, one ``datetime`` per millisecond.

    Stored timestamps are millisecond-precise and a busy server stamps several
    messages within one millisecond: the integer time of day and one compare
    cost a sixth of building a datetime and truncating it (0.3 against 1.8 µs
    here). Every reading of one millisecond is the same (immutable) object.
    One entry, replaced whole, so a thread reading it never sees half of one.
    """

    __slots__ = ("_time_ns", "entry", "second")

    def __init__(self, time_ns: Callable[[], int] = time.time_ns) -> None:
        self._time_ns = time_ns
        self.entry: tuple[int, datetime] = (-1, _EPOCH)
        self.second: tuple[int, datetime] = (-1, _EPOCH)

    def __call__(self) -> datetime:
        millis = self._time_ns() // 1_000_000
        entry = self.entry
        if entry[0] == millis:
            return entry[1]
        # A new millisecond: its second plus a timedelta from a table, since
        # building a timedelta costs three times the addition (0.65 against
        # 0.18 µs here).
        seconds, rest = divmod(millis, 1000)
        second = self.second
        if second[0] != seconds:
            second = self.second = (seconds, _EPOCH + timedelta(0, seconds))
        value = second[1] + _MILLISECONDS[rest]
        self.entry = (millis, value)
        return value


_MILLISECONDS = tuple(timedelta(0, 0, ms * 1000) for ms in range(1000))
_ONE_MILLISECOND = _MILLISECONDS[1]


_system_millisecond = _SystemMillisecond()


def millisecond_now(clock: Clock) -> Callable[[], datetime]:
    """A function returning ``truncate_ms(clock.now())``: the current time to the
    millisecond, as stored. For the system clock, a cheaper one that gives the
    same readings (both read the system's real-time clock)."""
    if type(clock) is SystemClock:
        return _system_millisecond
    return lambda: truncate_ms(clock.now())


def epoch_millis(value: datetime) -> int:
    """Whole milliseconds from the Unix epoch to ``value`` (a naive one taken
    as local time, as ``timestamp()`` takes it), exactly: the float of
    ``timestamp() * 1000`` is one short for some. The millisecond clock's
    latest reading (the timestamp of the message being stored) is answered
    with the integer it was made from, where the subtraction costs a
    timedelta and a division, and a message id wants the milliseconds of
    every new message."""
    entry = _system_millisecond.entry
    if entry[1] is value:
        return entry[0]
    if value.tzinfo is None:
        value = value.astimezone(UTC)
    return (value - _EPOCH) // _ONE_MILLISECOND


def truncate_ms(value: datetime) -> datetime:
    """Drop sub-millisecond precision, so a stored value round-trips through the wire format."""
    extra = value.microsecond % 1000
    if not extra:
        return value
    if type(value) is datetime and value.tzinfo is UTC:
        # The same value as replace() (a UTC time has no fold), at half its cost.
        return value - timedelta(0, 0, extra)
    return value.replace(microsecond=value.microsecond - extra)
