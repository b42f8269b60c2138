from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from samvad.cache import ENTRY_OVERHEAD, ViewCache, _Expiring
from samvad.clock import ManualClock


def make(clock: ManualClock, *, maxsize: int = 100, ttl: float = 1800.0) -> ViewCache[str, str]:
    return ViewCache(maxsize=maxsize, ttl=ttl, timer=clock.monotonic)


async def test_a_miss_loads_and_a_hit_does_not() -> None:
    clock = ManualClock()
    cache = make(clock)
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return "v", True

    assert await cache.get("k", load) == "v"
    assert await cache.get("k", load) == "v"
    assert loads == 1
    assert (cache.hits, cache.misses) == (1, 1)


class GatedLoad:
    """A loader that counts its calls and answers "v" once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> tuple[str | None, bool]:
        self.calls += 1
        await self.release.wait()
        return "v", True


async def test_concurrent_misses_share_one_load() -> None:
    cache = make(ManualClock())
    load = GatedLoad()
    waiters = [asyncio.create_task(cache.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0)
    load.release.set()
    assert await asyncio.gather(*waiters) == ["v"] * 20
    assert load.calls == 1


async def test_a_prefetch_starts_the_load_a_lookup_then_joins() -> None:
    cache = make(ManualClock())
    load = GatedLoad()
    task = cache.prefetch("k", load)
    assert task is not None
    assert cache.prefetch("k", load) is None, "already loading"
    reader = asyncio.create_task(cache.get("k", load))
    await asyncio.sleep(0)
    load.release.set()
    assert await task == ("v", True)
    assert await reader == "v"
    assert load.calls == 1
    assert cache.prefetch("k", load) is None, "cached"
    assert await cache.get("k", load) == "v"
    assert load.calls == 1


async def test_a_prefetch_completes_an_incomplete_entry_only_when_asked() -> None:
    cache = make(ManualClock())

    async def load() -> tuple[str | None, bool]:
        return "whole", True

    cache.put("k", "partial", complete=False)
    assert cache.prefetch("k", load, want_complete=False) is None
    task = cache.prefetch("k", load)
    assert task is not None
    await task
    assert cache.peek("k") is not None and cache.peek("k").value == "whole"  # type: ignore[union-attr]


async def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    cache = make(ManualClock())
    release = asyncio.Event()

    async def load() -> tuple[str | None, bool]:
        await release.wait()
        return "v", True

    first = asyncio.create_task(cache.get("k", load))
    second = asyncio.create_task(cache.get("k", load))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == "v"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_entries_expire_after_the_ttl() -> None:
    clock = ManualClock()
    cache = make(clock, ttl=1800)
    cache.put("k", "old")
    clock.advance(1799)
    assert cache.peek("k") is not None
    clock.advance(2)
    assert cache.peek("k") is None

    async def load() -> tuple[str | None, bool]:
        return "new", True

    assert await cache.get("k", load) == "new"


async def test_the_cache_is_bounded_in_entries() -> None:
    cache = make(ManualClock(), maxsize=3)
    for i in range(10):
        cache.put(f"k{i}", "v")
    assert len(cache) == 3
    assert cache.peek("k9") is not None
    assert cache.peek("k0") is None


async def test_incomplete_entries_reload_only_when_asked() -> None:
    cache = make(ManualClock())
    cache.put("k", "partial", complete=False)

    async def load() -> tuple[str | None, bool]:
        return "full", True

    assert await cache.get("k", load, want_complete=False) == "partial"
    assert await cache.get("k", load, want_complete=True) == "full"
    entry = cache.peek("k")
    assert entry is not None and entry.complete


async def test_a_failing_load_propagates_and_is_retried_next_time() -> None:
    cache = make(ManualClock())

    async def failing() -> tuple[str | None, bool]:
        raise OSError("boom")

    with pytest.raises(OSError):
        await cache.get("k", failing)

    async def load() -> tuple[str | None, bool]:
        return "v", True

    assert await cache.get("k", load) == "v"


async def test_absence_is_cached_until_a_put_or_discard() -> None:
    cache = make(ManualClock())
    loads = 0
    value: str | None = None

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return value, True

    assert await cache.get("k", load) is None
    assert await cache.get("k", load) is None
    assert loads == 1
    assert cache.peek("k") is None
    cache.put("k", "v")
    assert await cache.get("k", load) == "v"
    cache.discard("k")
    value = "stored"
    assert await cache.get("k", load) == "stored"
    assert loads == 2


async def test_absence_is_remembered_for_a_minute_at_most() -> None:
    clock = ManualClock()
    cache = make(clock, ttl=1800.0)
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return None, True

    assert await cache.get("k", load) is None
    clock.advance(59)
    assert await cache.get("k", load) is None
    assert loads == 1
    clock.advance(2)
    assert await cache.get("k", load) is None
    assert loads == 2


async def test_absence_expires_with_a_shorter_ttl() -> None:
    clock = ManualClock()
    cache = make(clock, ttl=10.0)
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return None, True

    assert await cache.get("k", load) is None
    clock.advance(11)
    assert await cache.get("k", load) is None
    assert loads == 2


async def test_absence_assumed_in_memory_mode_is_read_again_when_complete_is_wanted() -> None:
    cache = make(ManualClock())
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return None, False

    assert await cache.get("k", load, want_complete=False) is None
    assert await cache.get("k", load, want_complete=False) is None
    assert loads == 1
    assert await cache.get("k", load, want_complete=True) is None
    assert loads == 2


async def test_clear_forgets_absence_too() -> None:
    cache = make(ManualClock())
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return None, True

    await cache.get("k", load)
    cache.clear()
    await cache.get("k", load)
    assert loads == 2


async def test_a_load_invalidated_while_it_runs_is_returned_but_not_cached() -> None:
    cache = make(ManualClock())
    release = asyncio.Event()

    def loader(answer: str) -> Callable[[], Awaitable[tuple[str | None, bool]]]:
        async def load() -> tuple[str | None, bool]:
            await release.wait()
            return answer, True

        return load

    stale = asyncio.create_task(cache.get("k", loader("before")))
    await asyncio.sleep(0)
    cache.invalidate("k")  # what that load reads is wrong already
    # A caller after the invalidation is not joined to the disowned load.
    fresh = asyncio.create_task(cache.get("k", loader("after")))
    await asyncio.sleep(0)
    release.set()
    assert await stale == "before"
    assert await fresh == "after"
    entry = cache.peek("k")
    assert entry is not None
    assert entry.value == "after"
    assert cache.misses == 2


def sized(clock: ManualClock, *, max_bytes: int, maxsize: int = 1000) -> ViewCache[str, str]:
    """A cache bounded in bytes: a value's size is its length."""
    return ViewCache(
        maxsize=maxsize, ttl=60.0, timer=clock.monotonic, max_bytes=max_bytes, sizeof=len
    )


def keys(cache: ViewCache[str, str]) -> list[str]:
    return sorted(key for key, _ in cache.items())


def test_a_byte_bound_evicts_the_least_recently_used() -> None:
    clock = ManualClock()
    entry = ENTRY_OVERHEAD + 100
    cache = sized(clock, max_bytes=3 * entry)
    for key in ("a", "b", "c"):
        cache.put(key, "x" * 100)
    assert cache.bytes == 3 * entry
    cache.put("d", "x" * 100)
    assert keys(cache) == ["b", "c", "d"]
    assert cache.bytes == 3 * entry
    assert cache.peek("b") is not None  # a write's peek is a use too
    cache.put("e", "x" * 100)
    assert keys(cache) == ["b", "d", "e"]


async def test_a_read_keeps_an_entry_under_the_byte_bound() -> None:
    clock = ManualClock()
    cache = sized(clock, max_bytes=3 * (ENTRY_OVERHEAD + 100))
    for key in ("a", "b", "c"):
        cache.put(key, "x" * 100)

    async def load() -> tuple[str | None, bool]:
        raise AssertionError("a hit does not load")

    assert await cache.get("a", load) == "x" * 100
    cache.put("d", "x" * 100)
    assert keys(cache) == ["a", "c", "d"]


def test_a_large_value_evicts_as_many_as_it_needs() -> None:
    clock = ManualClock()
    cache = sized(clock, max_bytes=4 * (ENTRY_OVERHEAD + 100))
    for key in ("a", "b", "c", "d"):
        cache.put(key, "x" * 100)
    cache.put("big", "x" * (2 * ENTRY_OVERHEAD + 300))
    assert keys(cache) == ["big", "d"]
    assert cache.bytes <= 4 * (ENTRY_OVERHEAD + 100)


def test_a_value_larger_than_the_budget_is_not_kept() -> None:
    clock = ManualClock()
    cache = sized(clock, max_bytes=2 * (ENTRY_OVERHEAD + 100))
    cache.put("a", "x" * 100)
    cache.put("huge", "x" * 10_000)
    assert cache.peek("huge") is None
    assert cache.peek("a") is not None
    cache.put("a", "y" * 10_000)  # a replacement too large drops the old value
    assert cache.peek("a") is None
    assert cache.bytes == 0


async def test_a_loaded_value_larger_than_the_budget_is_served_not_kept() -> None:
    clock = ManualClock()
    cache = sized(clock, max_bytes=ENTRY_OVERHEAD + 100)
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        return "x" * 10_000, True

    assert await cache.get("k", load) == "x" * 10_000
    assert await cache.get("k", load) == "x" * 10_000
    assert loads == 2


def test_the_entry_bound_holds_beside_the_byte_bound() -> None:
    clock = ManualClock()
    cache = sized(clock, max_bytes=1_000_000, maxsize=2)
    for key in ("a", "b", "c"):
        cache.put(key, "x")
    assert keys(cache) == ["b", "c"]
    cache.put("c", "y")  # replacing an entry evicts nothing
    assert keys(cache) == ["b", "c"]


def test_expired_entries_go_first_and_free_their_bytes() -> None:
    clock = ManualClock()
    cache = sized(clock, max_bytes=3 * (ENTRY_OVERHEAD + 100))
    cache.put("old", "x" * 100)
    clock.advance(30)
    cache.put("a", "x" * 100)
    cache.put("b", "x" * 100)
    clock.advance(31)  # "old" expires, "a" and "b" do not
    cache.put("c", "x" * 100)
    assert keys(cache) == ["a", "b", "c"]
    cache.discard("a")
    assert cache.bytes == 2 * (ENTRY_OVERHEAD + 100)


def test_an_entry_is_measured_once_when_it_is_put() -> None:
    clock = ManualClock()
    measured: list[str] = []

    def sizeof(value: str) -> int:
        measured.append(value)
        return len(value)

    cache: ViewCache[str, str] = ViewCache(
        maxsize=1000,
        ttl=60.0,
        timer=clock.monotonic,
        max_bytes=2 * (ENTRY_OVERHEAD + 100),
        sizeof=sizeof,
    )
    cache.put("a", "x" * 100)
    cache.put("b", "y" * 100)
    assert cache.peek("a") is not None
    cache.put("c", "z" * 100)  # evicts "b" by the size it was put with
    cache.discard("a")
    assert measured == ["x" * 100, "y" * 100, "z" * 100]
    assert keys(cache) == ["c"]
    assert cache.bytes == ENTRY_OVERHEAD + 100


def test_a_size_the_caller_knows_is_not_measured_again() -> None:
    clock = ManualClock()

    def sizeof(value: str) -> int:
        raise AssertionError("measured although the size was given")

    cache: ViewCache[str, str] = ViewCache(
        maxsize=1000, ttl=60.0, timer=clock.monotonic, max_bytes=10_000, sizeof=sizeof
    )
    cache.put("a", "x" * 100, size=100)
    assert cache.size_of("a") == 100
    assert cache.bytes == ENTRY_OVERHEAD + 100
    cache.put("a", "y" * 100, size=cache.size_of("a"))
    assert cache.bytes == ENTRY_OVERHEAD + 100
    assert cache.size_of("b") is None


async def test_held_answers_what_a_lookup_would_without_loading() -> None:
    clock = ManualClock()
    cache = make(clock)

    async def absent() -> tuple[str | None, bool]:
        return None, True

    assert cache.held("k") is None and cache.held("gone") is None
    cache.put("k", "v")
    assert cache.held("k") == ("v", True) == await cache.lookup("k", absent)
    assert await cache.lookup("gone", absent) == (None, True)
    assert cache.held("gone") == (None, True)  # absence is an answer too
    cache.put("partial", "p", complete=False)
    assert cache.held("partial", want_complete=False) == ("p", False)
    assert cache.held("partial") is None  # a lookup would load it
    assert (cache.hits, cache.misses) == (4, 1)
    clock.advance(1801)
    assert cache.held("k") is None


# -- the entries' store, against a model ---------------------------------------------


class _ModelLru:
    """What ``_Expiring`` does, said plainly: a list in order of use, a list in
    order of expiry, an update of a key is a removal and an insert at the end."""

    def __init__(self, *, max_entries: int, max_size: int, ttl: float) -> None:
        self.max_entries, self.max_size, self.ttl = max_entries, max_size, ttl
        self.entries: dict[str, tuple[int, int, float]] = {}  # insertion order = use order
        self.expiry: list[str] = []

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.entries.values())

    def pop(self, key: str) -> int | None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        self.expiry.remove(key)
        return entry[0]

    def expire(self, now: float) -> None:
        while self.expiry and self.entries[self.expiry[0]][2] <= now:
            self.pop(self.expiry[0])

    def put(self, key: str, value: int, size: int, now: float) -> bool:
        self.pop(key)
        if size > self.max_size:
            return False
        if len(self.entries) >= self.max_entries or self.size + size > self.max_size:
            self.expire(now)
            while self.entries and (
                len(self.entries) >= self.max_entries or self.size + size > self.max_size
            ):
                self.pop(next(iter(self.entries)))
        self.entries[key] = (value, size, now + self.ttl)
        self.expiry.append(key)
        return True

    def get(self, key: str, now: float) -> int | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[2] <= now:
            self.pop(key)
            return None
        self.entries[key] = self.entries.pop(key)
        return entry[0]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "get", "pop", "held"]),
        st.sampled_from("abcdefg"),
        st.integers(min_value=0, max_value=60),  # a size (the bound is 100)
        st.sampled_from([0.0, 0.0, 0.5, 3.0]),  # time passing before the step (ttl 5)
    ),
    max_size=80,
)


@given(ops=_OPS)
def test_the_entries_store_does_what_the_model_does(ops: list[tuple[str, str, int, float]]) -> None:
    """Updates in place (no pop and re-insert) change nothing that can be seen:
    answers, order of use, order of expiry, the size held."""
    clock = ManualClock()
    store: _Expiring[str, int] = _Expiring(
        max_entries=5, max_size=100, ttl=5.0, timer=clock.monotonic
    )
    model = _ModelLru(max_entries=5, max_size=100, ttl=5.0)
    for step, (op, key, size, later) in enumerate(ops):
        clock.advance(later)
        now = clock.monotonic()
        if op == "put":
            assert store.put(key, step, size) == model.put(key, step, size, now)
        elif op == "get":
            assert store.get(key) == model.get(key, now)
        elif op == "pop":
            assert store.pop(key) == model.pop(key)
        else:
            model.expire(now)
            assert store.held() == model.size
        assert list(store._entries) == list(model.entries)
        assert list(store._by_expiry) == model.expiry
        assert store.size == model.size
        assert store.size <= store.max_size
        assert len(store._entries) <= store.max_entries
