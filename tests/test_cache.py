from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from samvad.cache import ViewCache
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


async def test_concurrent_misses_share_one_load() -> None:
    cache = make(ManualClock())
    release = asyncio.Event()
    loads = 0

    async def load() -> tuple[str | None, bool]:
        nonlocal loads
        loads += 1
        await release.wait()
        return "v", True

    waiters = [asyncio.create_task(cache.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == ["v"] * 20
    assert loads == 1


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
