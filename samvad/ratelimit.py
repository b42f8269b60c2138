"""Per-key rate limits (REST erasures) on an injected clock, in bounded memory.

A :class:`RateLimiter` is a token bucket per key: ``per_minute`` requests may
come at once, and the allowance refills evenly over a minute. A refused
request learns how long to wait (``Retry-After``). Memory is bounded: at most
``max_keys`` buckets are kept, least recently used first out. A bucket idle for
a minute is full again, so evicting it loses nothing; only when more than
``max_keys`` keys are busy within one minute does an evicted key start afresh.

The WebSocket message rate is limited per connection by the sans-I/O protocol
(:class:`samvad.web.protocol.TokenBucket`, ``SAMVAD_WS_RATE_*``), not here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from samvad.config import Settings
from samvad.errors import RateLimited

__all__ = [
    "DEFAULT_MAX_KEYS",
    "RateLimiter",
    "RateLimits",
]

#: Buckets kept per limiter (see the module docstring).
DEFAULT_MAX_KEYS = 100_000


class RateLimiter:
    """A token bucket per key; ``hit`` takes a token or raises :class:`RateLimited`."""

    __slots__ = ("_buckets", "_burst", "_clock", "_max_keys", "_rate", "name")

    def __init__(
        self,
        name: str,
        *,
        per_minute: int,
        clock: Callable[[], float],
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if per_minute < 1:
            raise ValueError("A rate limit must allow at least one request a minute.")
        if max_keys < 1:
            raise ValueError("A rate limiter must keep at least one key.")
        self.name = name
        self._burst = float(per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, time of the last update)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def hit(self, key: str) -> None:
        """Count one request of ``key``; raises :class:`RateLimited` when it is over its limit."""
        wait = self.take(key)
        if wait is not None:
            raise RateLimited(
                f"Too many {self.name} requests; try again in {max(1, math.ceil(wait))} s.",
                retry_after=wait,
            )

    def take(self, key: str) -> float | None:
        """Take a token for ``key``: None when allowed, else the seconds until one is free."""
        now = self._clock()
        found = self._buckets.get(key)
        if found is None:
            tokens = self._burst
        else:
            tokens, last = found
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            self._buckets.move_to_end(key)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return None

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The REST rate limits of one server, built in the lifespan from the settings."""

    refresh: RateLimiter
    delete: RateLimiter

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float]) -> RateLimits:
        """``SAMVAD_REFRESH_RATE_PER_MINUTE`` and ``SAMVAD_DELETE_RATE_PER_MINUTE``, per user."""
        return cls(
            refresh=RateLimiter(
                "refresh", per_minute=settings.refresh_rate_per_minute, clock=clock
            ),
            delete=RateLimiter("delete", per_minute=settings.delete_rate_per_minute, clock=clock),
        )
