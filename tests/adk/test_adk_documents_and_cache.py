"""The ADK layout's ids and fields, and the expiring map behind the service's views."""

from __future__ import annotations

import asyncio

import pytest

from samvad.adk import documents as docs
from samvad.adk.cache import ExpiringMap
from samvad.clock import ManualClock


def test_ids_keep_every_part_apart_and_are_valid_firestore_ids() -> None:
    keys = {
        docs.session_key("a|b", "c", "d"),
        docs.session_key("a", "b|c", "d"),
        docs.session_key("a/b", "c", "d"),
        docs.session_key("__a", "b", "c__"),
        docs.session_key(".", ".", "."),
    }
    assert len(keys) == 5
    for key in keys:
        assert "/" not in key
        assert key.count("|") == 2
        assert not (key.startswith("__") and key.endswith("__"))
        assert key not in {".", ".."}
    assert docs.app_state_id("..") == "%2E%2E"
    assert docs.user_state_id("app", "u_1").endswith(docs.user_state_suffix("u_1"))
    assert docs.chunk_id("k", 3) == "k|000003"


def test_event_and_state_fields_round_trip() -> None:
    name = docs.event_field(12, "ev:1")
    assert docs.parse_event_field(name) == (12, "ev:1")
    assert docs.parse_event_field("appName") is None
    assert docs.parse_event_field("e:x:1") is None
    state = {"nested": [[1, 2], {"k": None}], "big": 2**70, "text": "naïve"}
    assert docs.decode_state({"appName": "a", **docs.state_fields(state)}) == state
    assert docs.decode_state(None) == {}


def test_collections_are_named_under_a_prefix() -> None:
    c = docs.Collections.under("bot_")
    assert (c.sessions, c.events, c.app_states, c.user_states) == (
        "bot_sessions",
        "bot_events",
        "bot_app_states",
        "bot_user_states",
    )
    with pytest.raises(ValueError, match="prefix"):
        docs.Collections.under("a/b")


async def test_the_map_expires_entries_and_bounds_its_size() -> None:
    clock = ManualClock()
    views: ExpiringMap[str, int] = ExpiringMap(maxsize=2, ttl=10.0, timer=clock.monotonic)
    views.put("a", 1)
    views.put("b", 2)
    views.put("c", 3)  # "a", the oldest, goes
    assert (views.peek("a"), views.peek("b"), views.peek("c")) == (None, 2, 3)
    clock.advance(10.0)
    assert views.peek("b") is None
    assert list(views.items()) == []


async def test_concurrent_misses_share_one_load_and_absence_is_not_kept() -> None:
    clock = ManualClock()
    views: ExpiringMap[str, int] = ExpiringMap(maxsize=10, ttl=10.0, timer=clock.monotonic)
    loads = 0
    release = asyncio.Event()

    async def load() -> tuple[int | None, bool]:
        nonlocal loads
        loads += 1
        await release.wait()
        return 7, True

    waiters = [asyncio.create_task(views.get("k", load)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == [7, 7, 7]
    assert loads == 1

    async def absent() -> tuple[int | None, bool]:
        nonlocal loads
        loads += 1
        return None, True

    assert await views.get("x", absent) is None
    assert await views.get("x", absent) is None
    assert loads == 3


async def test_an_incomplete_entry_is_loaded_again_when_a_complete_one_is_wanted() -> None:
    clock = ManualClock()
    views: ExpiringMap[str, int] = ExpiringMap(maxsize=10, ttl=10.0, timer=clock.monotonic)
    views.put("k", 1, complete=False)
    assert views.fresh("k", want_complete=False) == 1
    assert views.fresh("k") is None

    async def load() -> tuple[int | None, bool]:
        return 2, True

    assert await views.get("k", load) == 2
    assert views.fresh("k") == 2
