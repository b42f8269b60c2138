"""The in-memory view cache: a bounded ``cachetools.TTLCache`` with single-flight loads.

Bounded twice: in entries, and in bytes when given a ``sizeof`` (each entry
counted as its value's :meth:`memory_bytes`-style estimate plus
:data:`ENTRY_OVERHEAD` for the cache's own bookkeeping). Whichever bound is
reached first evicts expired entries, then the least recently used. A value
larger than the whole byte budget is served but not kept.

A hit costs a dictionary lookup. A miss runs the loader once per key however
many callers ask at the same time: the load runs in its own task, so a
caller that goes away (a dropped connection) does not cancel it for the others.
Absence is cached too, for a shorter time (:data:`ABSENT_TTL`): a user
without a saved state is not read again from the store on every reply, and a
document another instance creates still shows up here within a minute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import TTLCache

__all__ = [
    "ABSENT_TTL",
    "ENTRY_OVERHEAD",
    "Cached",
    "Loader",
    "ViewCache",
]

#: Seconds a key found absent in the store is remembered as absent (at most the TTL).
ABSENT_TTL = 60.0
#: Bytes one cache entry costs besides its value: the key, the ``Cached``
#: wrapper, cachetools' link object and its slots in three dicts (measured
#: with tracemalloc at about 350, rounded up).
ENTRY_OVERHEAD = 512

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Cached(Generic[V]):
    """A cached value; ``complete`` is False when it was built without reading the
    store (memory-only mode) and should be re-read once the store is back."""

    value: V
    complete: bool = True


Loader = Callable[[], Awaitable[tuple[V | None, bool]]]
"""Returns (value or None when absent, complete)."""


class _Bounded(TTLCache[K, "Cached[V]"]):
    """A ``TTLCache`` bounded in bytes (its ``maxsize``) and in entries."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        ttl: float,
        timer: Callable[[], float],
        sizeof: Callable[[V], int],
    ) -> None:
        super().__init__(maxsize=max_bytes, ttl=ttl, timer=timer, getsizeof=self._entry_size)
        self.max_entries = max_entries
        self._sizeof = sizeof

    def _entry_size(self, entry: Cached[V]) -> int:
        return self._sizeof(entry.value) + ENTRY_OVERHEAD

    def __setitem__(self, key: K, value: Cached[V]) -> None:
        if len(self) >= self.max_entries and key not in self:
            while len(self) >= self.max_entries:
                self.popitem()
        super().__setitem__(key, value)


class ViewCache(Generic[K, V]):
    """TTL-, entry- and byte-bounded cache of views, keyed by document id."""

    def __init__(
        self,
        *,
        maxsize: int,
        ttl: float,
        timer: Callable[[], float],
        absent_ttl: float = ABSENT_TTL,
        max_bytes: int | None = None,
        sizeof: Callable[[V], int] | None = None,
    ) -> None:
        self._data: TTLCache[K, Cached[V]]
        if max_bytes is not None and sizeof is not None:
            self._data = _Bounded(
                max_entries=maxsize, max_bytes=max_bytes, ttl=ttl, timer=timer, sizeof=sizeof
            )
            # An absent key costs an entry and the key.
            maxsize = max(1, min(maxsize, max_bytes // ENTRY_OVERHEAD))
        else:
            self._data = TTLCache(maxsize=maxsize, ttl=ttl, timer=timer)
        # Keys the store had no document for, with whether that was read from
        # the store (True) or assumed in memory-only mode (False).
        self._absent: TTLCache[K, bool] = TTLCache(
            maxsize=maxsize, ttl=min(ttl, absent_ttl), timer=timer
        )
        self._loading: dict[K, asyncio.Task[tuple[V | None, bool]]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        """Estimated bytes held (entries, when the cache is not bounded in bytes)."""
        return int(self._data.currsize)

    def _keep(self, key: K, entry: Cached[V]) -> None:
        try:
            self._data[key] = entry
        except ValueError:
            # Larger than the whole byte budget: served, not kept.
            self._data.pop(key, None)

    def peek(self, key: K) -> Cached[V] | None:
        """The cached entry, without loading (and without counting a hit or miss).

        None both when nothing is cached and when the key is known to be absent.
        """
        return self._data.get(key)

    def put(self, key: K, value: V, *, complete: bool = True) -> None:
        self._keep(key, Cached(value, complete))
        self._absent.pop(key, None)

    def discard(self, key: K) -> None:
        """Forget ``key`` (its value, or that it is absent): the next get loads it."""
        self._data.pop(key, None)
        self._absent.pop(key, None)

    def invalidate(self, key: K) -> None:
        """Forget ``key`` and disown a load of it in flight: its answer, read
        before whatever made the entry wrong, is still returned to whoever waits
        for it but not cached; the next get loads afresh."""
        self.discard(key)
        self._loading.pop(key, None)

    def invalidate_all(self) -> None:
        """:meth:`invalidate` every key."""
        self.clear()
        self._loading.clear()

    def items(self) -> Iterator[tuple[K, V]]:
        """A snapshot of the live entries."""
        for key, entry in list(self._data.items()):
            yield key, entry.value

    def clear(self) -> None:
        self._data.clear()
        self._absent.clear()

    async def get(self, key: K, load: Loader[V], *, want_complete: bool = True) -> V | None:
        """The value for ``key``, loading it on a miss (or when an incomplete entry
        should be completed, ``want_complete``)."""
        value, _complete = await self.lookup(key, load, want_complete=want_complete)
        return value

    async def lookup(
        self, key: K, load: Loader[V], *, want_complete: bool = True
    ) -> tuple[V | None, bool]:
        """:meth:`get`, and whether its answer is complete: False when it was built
        without the store (memory-only mode), an absence included."""
        entry = self._data.get(key)
        if entry is not None and (entry.complete or not want_complete):
            self.hits += 1
            return entry.value, entry.complete
        absent = self._absent.get(key)
        if absent is not None and (absent or not want_complete):
            self.hits += 1
            return None, absent
        task = self._loading.get(key)
        if task is None:
            self.misses += 1
            task = asyncio.create_task(self._load(key, load), name="samvad-cache-load")
            self._loading[key] = task
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Loader[V]) -> tuple[V | None, bool]:
        task = asyncio.current_task()
        try:
            value, complete = await load()
            if self._loading.get(key) is not task:
                return value, complete  # invalidated while it ran: not cached
            if value is not None:
                self._keep(key, Cached(value, complete))
                self._absent.pop(key, None)
            else:
                self._data.pop(key, None)
                self._absent[key] = complete
            return value, complete
        finally:
            if self._loading.get(key) is task:
                del self._loading[key]
