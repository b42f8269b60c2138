"""A small expiring map with single-flight loads, for the ADK session service.

:class:`samvad.cache.ViewCache` keeps byte budgets, completeness marks and
cached absence, which an ADK turn (a session and two scoped states looked up
several times) does not need: this one keeps entries in a plain dict, checks
expiry on read and evicts the oldest entry beyond ``maxsize``. Absence is not
cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = [
    "ExpiringMap",
    "Loader",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Loader = Callable[[], Awaitable[tuple[V | None, bool]]]
"""Returns (value or None when absent, complete: whether the store was read)."""


class ExpiringMap(Generic[K, V]):
    """Values kept ``ttl`` seconds after they were loaded or put, at most ``maxsize``."""

    def __init__(self, *, maxsize: int, ttl: float, timer: Callable[[], float]) -> None:
        if maxsize < 1 or ttl <= 0:
            raise ValueError("An expiring map needs a positive size and time to live.")
        self._maxsize = maxsize
        self._ttl = ttl
        self._forever = ttl == float("inf")
        self._timer = timer
        # key -> (value, expires at, complete)
        self._data: dict[K, tuple[V, float, bool]] = {}
        self._loading: dict[K, asyncio.Task[V | None]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def peek(self, key: K) -> V | None:
        """The live value, without loading."""
        entry = self._data.get(key)
        if entry is None or entry[1] <= self._timer():
            return None
        return entry[0]

    def fresh(self, key: K, *, want_complete: bool = True) -> V | None:
        """The value :meth:`get` would return without loading, else None."""
        entry = self._data.get(key)
        if entry is None or not (entry[2] or not want_complete):
            return None
        if self._forever or entry[1] > self._timer():
            return entry[0]
        return None

    def put(self, key: K, value: V, *, complete: bool = True) -> None:
        self._data.pop(key, None)
        self._data[key] = (value, self._timer() + self._ttl, complete)
        if len(self._data) > self._maxsize:
            del self._data[next(iter(self._data))]

    def discard(self, key: K) -> None:
        self._data.pop(key, None)

    def items(self) -> Iterator[tuple[K, V]]:
        """A snapshot of the live entries."""
        now = self._timer()
        for key, (value, expires, _complete) in list(self._data.items()):
            if expires > now:
                yield key, value

    async def get(self, key: K, load: Loader[V], *, want_complete: bool = True) -> V | None:
        """The value for ``key``, loading it when absent, expired, or incomplete
        while a complete one is wanted; concurrent callers share one load."""
        entry = self._data.get(key)
        if entry is not None and entry[1] > self._timer() and (entry[2] or not want_complete):
            return entry[0]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, load), name="samvad-adk-load")
            self._loading[key] = task
        # A caller that gives up does not cancel the load for the others.
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Loader[V]) -> V | None:
        try:
            value, complete = await load()
            if value is not None:
                self.put(key, value, complete=complete)
            else:
                self._data.pop(key, None)
            return value
        finally:
            self._loading.pop(key, None)
