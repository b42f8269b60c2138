"""The in-memory view cache: bounded, expiring, with single-flight loads.

Bounded twice: in entries, and in bytes when given a ``sizeof`` (each entry
counted as its value's :meth:`memory_bytes`-style estimate plus
:data:`ENTRY_OVERHEAD` for the cache's own bookkeeping). Whichever bound is
reached first evicts expired entries, then the least recently used. A value
larger than the whole byte budget is served but not kept.

An entry's size is measured once, when it is put, and kept beside it: what
an eviction or a replacement subtracts is what was added. An entry expires
``ttl`` seconds after it was put (a read makes it recently used, not younger).

A hit costs a dictionary lookup and a clock read. A miss runs the loader once
per key however many callers ask at the same time: the load runs in its own
task, so a caller that goes away (a dropped connection) does not cancel it for
the others. Absence is cached too, for a shorter time (:data:`ABSENT_TTL`): a
user without a saved state is not read again from the store on every reply,
and a document another instance creates still shows up here within a minute.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

import msgspec

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
#: wrapper, the entry's tuple and its slots in the two ordered dicts
#: (measured with tracemalloc at about 350, rounded up).
ENTRY_OVERHEAD = 512

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class Cached(msgspec.Struct, Generic[V], frozen=True, gc=False):
    """A cached value; ``complete`` is False when it was built without reading the
    store (memory-only mode) and should be re-read once the store is back.

    A frozen msgspec struct: one is made for every change of a cached view
    (twice per WebSocket message), where a frozen dataclass costs several
    times as much to make. Out of the garbage collector's lists
    (``gc=False``), and with it the cache's tuple that holds it: nothing a
    cache keeps refers back to its entry, so it can never be part of a
    reference cycle, and every entry would otherwise be walked by each full
    collection (the value is, when it is a type the collector tracks)."""

    value: V
    complete: bool = True


Loader = Callable[[], Awaitable[tuple[V | None, bool]]]
"""Returns (value or None when absent, complete)."""


class _Expiring(Generic[K, T]):
    """Values kept ``ttl`` seconds after they were put, bounded in entries and in
    size (each value's size given when it is put), least recently used evicted.

    Two ordered dicts: one in order of use (a hit moves its key to the end),
    one in order of expiry (with one ``ttl`` for all, the order of the puts).
    """

    __slots__ = ("_by_expiry", "_entries", "_timer", "_ttl", "max_entries", "max_size", "size")

    def __init__(
        self, *, max_entries: int, max_size: int, ttl: float, timer: Callable[[], float]
    ) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self.size = 0
        self._ttl = ttl
        self._timer = timer
        # key -> (value, size, expires at), least recently used first.
        self._entries: OrderedDict[K, tuple[T, int, float]] = OrderedDict()
        # key -> expires at, soonest first.
        self._by_expiry: OrderedDict[K, float] = OrderedDict()

    def __len__(self) -> int:
        self._expire(self._timer())
        return len(self._entries)

    def held(self) -> int:
        """The size of the live entries."""
        self._expire(self._timer())
        return self.size

    def get(self, key: K) -> T | None:
        """The live value of ``key`` (now its most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= self._timer():
            self.pop(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: T, size: int) -> bool:
        """Keep ``value`` for ``key``; False (and nothing kept for ``key``) when
        ``size`` alone exceeds the bound.

        A key already held is updated where it is and moved to the end of both
        orders. Popped and inserted again, as it once was, it left a deleted
        slot in each dict on every update, and once a dict's free slots ran
        out (about every ``table size - entries`` updates) both dicts were
        rebuilt whole, on the event loop: 0.2 to 0.4 ms at 1,000 entries, 11 to 13 ms
        at 50,000 (``bench/bench_cache.py``, docs/benchmarks.md section 29).
        Only evictions and expiries delete now.
        """
        if size > self.max_size:
            self.pop(key)
            return False
        now = self._timer()
        expires = now + self._ttl
        entries, by_expiry = self._entries, self._by_expiry
        old = entries.get(key)
        if old is not None:
            entries[key] = (value, size, expires)
            entries.move_to_end(key)
            by_expiry[key] = expires  # the latest expiry: the end is its place
            by_expiry.move_to_end(key)
            self.size += size - old[1]
            if self.size > self.max_size:
                self._expire(now)
                # Never reaches ``key`` itself: it is last, and within the bound alone.
                while self.size > self.max_size:
                    self.pop(next(iter(entries)))
            return True
        if len(entries) >= self.max_entries or self.size + size > self.max_size:
            self._expire(now)
            while entries and (
                len(entries) >= self.max_entries or self.size + size > self.max_size
            ):
                self.pop(next(iter(entries)))
        entries[key] = (value, size, expires)
        by_expiry[key] = expires
        self.size += size
        return True

    def size_of(self, key: K) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> T | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        del self._by_expiry[key]
        self.size -= entry[1]
        return entry[0]

    def _expire(self, now: float) -> None:
        by_expiry = self._by_expiry
        while by_expiry:
            key, expires = next(iter(by_expiry.items()))
            if expires > now:
                return
            self.pop(key)

    def items(self) -> list[tuple[K, T]]:
        """A snapshot of the live entries."""
        now = self._timer()
        return [(key, entry[0]) for key, entry in self._entries.items() if entry[2] > now]

    def clear(self) -> None:
        self._entries.clear()
        self._by_expiry.clear()
        self.size = 0


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
        if max_bytes is not None and sizeof is not None:
            self._sizeof: Callable[[V], int] | None = sizeof
            self._data: _Expiring[K, Cached[V]] = _Expiring(
                max_entries=maxsize, max_size=max_bytes, ttl=ttl, timer=timer
            )
            # An absent key costs an entry and the key.
            maxsize = max(1, min(maxsize, max_bytes // ENTRY_OVERHEAD))
        else:
            # Bounded in entries only: each counts 1.
            self._sizeof = None
            self._data = _Expiring(max_entries=maxsize, max_size=maxsize, ttl=ttl, timer=timer)
        # Keys the store had no document for, with whether that was read from
        # the store (True) or assumed in memory-only mode (False).
        self._absent: _Expiring[K, bool] = _Expiring(
            max_entries=maxsize, max_size=maxsize, ttl=min(ttl, absent_ttl), timer=timer
        )
        self._loading: dict[K, asyncio.Task[tuple[V | None, bool]]] = {}
        self.hits = 0
        self.misses = 0
        #: ``peek(key)``: the cached entry, without loading (and without
        #: counting a hit or miss); None both when nothing is cached and when
        #: the key is known to be absent. The entries' own ``get``, bound here
        #: rather than called from a method: three peeks a WebSocket message.
        self.peek: Callable[[K], Cached[V] | None] = self._data.get

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        """Estimated bytes held (entries, when the cache is not bounded in bytes)."""
        return self._data.held()

    def size_of(self, key: K) -> int | None:
        """What ``key``'s value was counted as when it was put (its ``sizeof``);
        None when nothing is cached for it or the cache counts entries only."""
        if self._sizeof is None:
            return None
        size = self._data.size_of(key)
        return None if size is None else size - ENTRY_OVERHEAD

    def put(self, key: K, value: V, *, complete: bool = True, size: int | None = None) -> None:
        """Cache ``value``; ``size`` is its ``sizeof`` when the caller knows it
        already (saves measuring it again)."""
        # Larger than the whole byte budget: served, not kept (_data.put drops it).
        sizeof = self._sizeof
        if sizeof is None:
            self._data.put(key, Cached(value, complete), 1)
        else:
            self._data.put(
                key,
                Cached(value, complete),
                (sizeof(value) if size is None else size) + ENTRY_OVERHEAD,
            )
        if self._absent.size:  # each absent key counts 1: none, nothing to pop
            self._absent.pop(key)

    def discard(self, key: K) -> None:
        """Forget ``key`` (its value, or that it is absent): the next get loads it."""
        self._data.pop(key)
        self._absent.pop(key)

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
        for key, entry in self._data.items():
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
        """:meth:`get`, and whether its answer is complete: False when it was
        built without the store (memory-only mode), an absence included."""
        held = self._held(key, want_complete)
        if held is not None:
            self.hits += 1
            return held
        return await asyncio.shield(self._loading.get(key) or self._start(key, load))

    def absence(self, key: K) -> bool | None:
        """Whether ``key`` is known to be absent: None when it is not (a value is
        cached, or nothing is known), else whether that absence is complete."""
        return self._absent.get(key)

    def loading(self, key: K) -> bool:
        """Whether a load of ``key`` is in flight."""
        return key in self._loading

    def held(self, key: K, *, want_complete: bool = True) -> tuple[V | None, bool] | None:
        """What :meth:`lookup` would answer without loading (counted as a hit),
        or None when it would have to load: for a caller that can skip a
        coroutine when the cache answers."""
        # _held's common case inline (two calls a message): a complete entry.
        entry = self._data.get(key)
        if entry is not None and entry.complete:
            self.hits += 1
            return entry.value, True
        held = self._held(key, want_complete)
        if held is not None:
            self.hits += 1
        return held

    def prefetch(
        self, key: K, load: Loader[V], *, want_complete: bool = True
    ) -> asyncio.Task[tuple[V | None, bool]] | None:
        """Start loading ``key`` as :meth:`lookup` would, without waiting: the
        load's task, or None when the entry is there (or already loading).

        For warming a view in the background: one task, where a lookup in a
        task of its own would take two and a shield.
        """
        if key in self._loading or self._held(key, want_complete) is not None:
            return None
        return self._start(key, load)

    def _held(self, key: K, want_complete: bool) -> tuple[V | None, bool] | None:
        """What the cache can answer for ``key`` without a load (value or
        absence, and whether complete), or None."""
        entry = self._data.get(key)
        if entry is not None and (entry.complete or not want_complete):
            return entry.value, entry.complete
        absent = self._absent.get(key)
        if absent is not None and (absent or not want_complete):
            return None, absent
        return None

    def _start(self, key: K, load: Loader[V]) -> asyncio.Task[tuple[V | None, bool]]:
        self.misses += 1
        task = asyncio.create_task(self._load(key, load), name="samvad-cache-load")
        self._loading[key] = task
        return task

    async def _load(self, key: K, load: Loader[V]) -> tuple[V | None, bool]:
        task = asyncio.current_task()
        try:
            value, complete = await load()
            if self._loading.get(key) is not task:
                return value, complete  # invalidated while it ran: not cached
            if value is not None:
                self.put(key, value, complete=complete)
            else:
                self._data.pop(key)
                self._absent.put(key, complete, 1)
            return value, complete
        finally:
            if self._loading.get(key) is task:
                del self._loading[key]
