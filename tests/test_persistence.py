"""The persistence service's logic over a store double: overlay, erasure, memory mode."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from samvad.cache import ENTRY_OVERHEAD
from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.documents import PROFILES, SESSIONS, STATES
from samvad.errors import Conflict
from samvad.history import new_message_id
from samvad.interruptions import Interruption
from samvad.models import Message, Mode, Role, SessionStatus
from samvad.persistence import CacheStats, Persistence
from samvad.stores.base import HistoryBounds, SessionCursor
from samvad.writes import EraseScope, FieldsWrite, ProfileWrite
from tests.support.stores import FlakyStore, settle

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


def settings(**changes: object) -> Settings:
    base = Settings(
        flush_linger=0.0,
        flush_interval=1.0,
        probe_interval=0.001,
        probe_max_interval=0.002,
        history_cap=100,
    )
    return base.replace(**changes)


@pytest.fixture
async def p(store: FlakyStore, clock: ManualClock) -> AsyncIterator[Persistence]:
    async with Persistence(store, settings=settings(), clock=clock) as persistence:
        yield persistence


async def test_saved_state_is_served_from_memory_and_reaches_the_store(
    p: Persistence, store: FlakyStore
) -> None:
    assert await p.get_state("u1") is None
    p.save_state("u1", {"language": "en", "conversationContext": {"topic": "loans"}})
    state = await p.get_state("u1")
    assert state is not None
    assert state.data == {"language": "en", "conversationContext": {"topic": "loans"}}
    assert state.is_active
    await asyncio.wait_for(p.writes.flush(), 5)
    stored = await store.get(STATES, "u1")
    assert stored is not None
    assert stored["language"] == "en"
    assert stored["isActive"] is True
    assert stored["updatedAt"] == T0


async def test_state_save_replaces_top_level_fields_whole(
    p: Persistence, store: FlakyStore
) -> None:
    p.save_state("u1", {"ctx": {"a": 1, "b": 2}, "language": "en"})
    await asyncio.wait_for(p.writes.flush(), 5)
    p.save_state("u1", {"ctx": {"a": 9}})
    state = await p.get_state("u1")
    assert state is not None and state.data == {"ctx": {"a": 9}, "language": "en"}
    await asyncio.wait_for(p.writes.flush(), 5)
    stored = await store.get(STATES, "u1")
    assert stored is not None and stored["ctx"] == {"a": 9} and stored["language"] == "en"


async def test_a_cache_miss_reads_the_store_once_and_overlays_pending_writes(
    p: Persistence, store: FlakyStore, clock: ManualClock
) -> None:
    await store.write_fields(
        FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"old": 1, "keep": True})
    )
    store.gate.clear()  # the pending write stays pending
    p.save_state("u1", {"old": 2})
    await settle()
    await p.settle()
    p.states.clear()
    reads = store.reads
    state = await p.get_state("u1")
    assert state is not None and state.data == {"old": 2, "keep": True}
    assert store.reads == reads + 1
    assert await p.get_state("u1") == state
    assert store.reads == reads + 1
    store.gate.set()


async def test_history_is_capped_and_ordered(p: Persistence, store: FlakyStore) -> None:
    for i in range(130):
        p.append_message("u1", role=Role.USER, content=f"message {i}")
    profile = await p.get_profile("u1")
    assert profile is not None
    assert len(profile.history) == 100
    assert profile.history[0].content == "message 30"
    assert profile.history[-1].content == "message 129"
    await asyncio.wait_for(p.writes.flush(), 5)
    stored = await store.get(PROFILES, "u1")
    assert stored is not None
    assert stored["historyLength"] == 100
    assert [m["content"] for m in stored["conversationHistory"]] == [
        f"message {i}" for i in range(30, 130)
    ]


async def test_history_is_bounded_in_bytes(clock: ManualClock) -> None:
    store = FlakyStore(bounds=HistoryBounds(cap=100, max_bytes=8192))
    async with Persistence(store, settings=settings(history_max_bytes=8192), clock=clock) as p:
        for i in range(20):
            p.append_message("u1", role=Role.ASSISTANT, content=f"{i}:" + "x" * 1000)
        profile = await p.get_profile("u1")
        assert profile is not None
        assert profile.history_bytes <= 8192
        assert len(profile.history) == 7
        assert profile.history[-1].content.startswith("19:")
        await asyncio.wait_for(p.writes.flush(), 5)
        stored = await store.get(PROFILES, "u1")
        assert stored is not None and stored["historyLength"] == 7


async def test_a_message_is_never_older_than_the_one_before(
    p: Persistence, clock: ManualClock
) -> None:
    await p.get_profile("u1")
    p.append_message("u1", role=Role.USER, content="first")
    assert await p.get_profile("u1") is not None
    clock._wall = T0.replace(year=2024)  # the wall clock jumps back
    second = p.append_message("u1", role=Role.USER, content="second")
    assert second.timestamp == T0


async def test_erasing_a_user_clears_memory_and_store_and_nothing_comes_back(
    p: Persistence, store: FlakyStore
) -> None:
    p.save_state("u1", {"language": "en"})
    p.append_message("u1", role=Role.USER, content="hello")
    await p.save_session("s1", user_id="u1", language="en")
    await asyncio.wait_for(p.writes.flush(), 5)
    # More writes still pending when the erase comes in.
    store.gate.clear()
    p.append_message("u1", role=Role.USER, content="pending")
    await p.save_session("s2", user_id="u1")
    erasure = await p.erase_user("u1")
    assert erasure.user_state and erasure.user_profile
    assert erasure.sessions == 2
    assert await p.get_state("u1") is None
    assert await p.get_profile("u1") is None
    assert await p.get_session("s1") is None
    store.gate.set()
    await asyncio.wait_for(p.writes.flush(), 5)
    for collection, doc_id in [
        (STATES, "u1"),
        (PROFILES, "u1"),
        (SESSIONS, "s1"),
        (SESSIONS, "s2"),
    ]:
        assert await store.get(collection, doc_id) is None, (collection, doc_id)
    assert (await p.list_sessions("u1")).sessions == ()


async def test_a_read_while_an_erase_is_pending_does_not_see_the_old_data(
    p: Persistence, store: FlakyStore
) -> None:
    p.append_message("u1", role=Role.USER, content="old")
    await asyncio.wait_for(p.writes.flush(), 5)
    store.gate.clear()
    await p.erase_user("u1")
    p.profiles.clear()
    assert await p.get_profile("u1") is None
    p.append_message("u1", role=Role.USER, content="new")
    profile = await p.get_profile("u1")
    assert profile is not None and [m.content for m in profile.history] == ["new"]
    store.gate.set()
    await asyncio.wait_for(p.writes.flush(), 5)
    stored = await store.get(PROFILES, "u1")
    assert stored is not None
    assert [m["content"] for m in stored["conversationHistory"]] == ["new"]


async def test_memory_mode_serves_reads_without_the_store_and_completes_later(
    p: Persistence, store: FlakyStore
) -> None:
    p.save_state("known", {"a": 1})
    await asyncio.wait_for(p.writes.flush(), 5)
    p.states.clear()
    store.down = True
    p.writes.report_unavailable(RuntimeError("test"))
    reads = store.reads
    p.save_state("known", {"b": 2})
    partial = await p.get_state("known")
    assert partial is not None and partial.data == {"b": 2}
    assert store.reads == reads, "memory mode must not wait on the store"
    store.down = False
    await asyncio.wait_for(p.writes.flush(), 5)
    assert p.mode is Mode.FIRESTORE
    full = await p.get_state("known")
    assert full is not None and full.data == {"a": 1, "b": 2}


async def test_a_failing_read_switches_to_memory_mode_without_raising(
    p: Persistence, store: FlakyStore
) -> None:
    store.down = True
    assert await p.get_profile("nobody") is None
    assert p.mode is Mode.MEMORY
    store.down = False


async def test_sessions_lifecycle(p: Persistence, store: FlakyStore, clock: ManualClock) -> None:
    created = await p.save_session("s1", user_id="u1", language="en", metadata={"platform": "web"})
    assert created.status is SessionStatus.ACTIVE and created.created_at == T0
    clock.advance(5)
    updated = await p.save_session("s1", user_id="u1", metadata={"deviceId": "d1"})
    assert updated.created_at == T0
    assert updated.language == "en"
    assert updated.metadata == {"platform": "web", "deviceId": "d1"}
    with pytest.raises(Conflict):
        await p.save_session("s1", user_id="someone-else")
    ended = await p.end_session("s1")
    assert ended is not None and ended.status is SessionStatus.ENDED and ended.ended_at is not None
    assert await p.end_session("nope") is None
    await asyncio.wait_for(p.writes.flush(), 5)
    stored = await store.get(SESSIONS, "s1")
    assert stored is not None
    assert stored["createdAt"] == T0
    assert stored["isActive"] is False and stored["status"] == "ended"


async def test_list_sessions_pages_by_cursor_and_filters_by_status(
    p: Persistence, clock: ManualClock
) -> None:
    for i in range(5):
        await p.save_session(f"s{i}", user_id="u1")
        clock.advance(1)
    await p.end_session("s1")
    await p.save_session("other", user_id="u2")
    await asyncio.wait_for(p.writes.flush(), 5)
    first = await p.list_sessions("u1", limit=2)
    assert [s.id for s in first.sessions] == ["s1", "s4"]
    assert first.next_cursor is not None
    second = await p.list_sessions("u1", limit=2, cursor=SessionCursor.decode(first.next_cursor))
    assert [s.id for s in second.sessions] == ["s3", "s2"]
    active = await p.active_sessions("u1")
    assert [s.id for s in active] == ["s4", "s3", "s2", "s0"]
    ended = await p.list_sessions("u1", status=SessionStatus.ENDED)
    assert [s.id for s in ended.sessions] == ["s1"]


async def test_list_sessions_includes_sessions_not_yet_flushed(
    p: Persistence, store: FlakyStore
) -> None:
    await p.save_session("flushed", user_id="u1")
    await asyncio.wait_for(p.writes.flush(), 5)
    store.gate.clear()
    await p.save_session("pending", user_id="u1")
    page = await p.list_sessions("u1")
    assert {s.id for s in page.sessions} == {"flushed", "pending"}
    store.gate.set()


async def test_idle_sessions_are_marked_abandoned(store: FlakyStore, clock: ManualClock) -> None:
    async with Persistence(store, settings=settings(session_idle_timeout=60), clock=clock) as p:
        await p.save_session("idle", user_id="u1")
        await p.save_session("busy", user_id="u1")
        await asyncio.wait_for(p.writes.flush(), 5)
        clock.advance(61)
        await p.touch_session("busy")
        p.sessions.clear()
        assert await p.sweep_idle_sessions() == 1
        idle = await p.get_session("idle")
        assert idle is not None and idle.status is SessionStatus.ABANDONED
        busy = await p.get_session("busy")
        assert busy is not None and busy.status is SessionStatus.ACTIVE


async def test_erase_session_drops_only_that_session(p: Persistence, store: FlakyStore) -> None:
    await p.save_session("s1", user_id="u1")
    await p.save_session("s2", user_id="u1")
    await asyncio.wait_for(p.writes.flush(), 5)
    assert (await p.erase_session("s1")).session
    assert not (await p.erase_session("missing")).session
    await asyncio.wait_for(p.writes.flush(), 5)
    assert await store.get(SESSIONS, "s1") is None
    assert await store.get(SESSIONS, "s2") is not None


async def test_interruptions_are_persisted_only_when_enabled(
    store: FlakyStore, clock: ManualClock
) -> None:
    record = Interruption(
        session_id="s1", user_id="u1", at=T0, reason="barge-in", heard="Hel", cut="lo"
    )
    async with Persistence(store, settings=settings(), clock=clock) as off:
        off.record_interruption(record)
        assert off.writes.pending_count == 0
    async with Persistence(store, settings=settings(persist_interruptions=True), clock=clock) as on:
        on.record_interruption(record)
        await asyncio.wait_for(on.writes.flush(), 5)
    assert (await store.counts()).total_interruptions == 1


async def test_counts_come_from_the_store_and_fall_back_to_memory(
    p: Persistence, store: FlakyStore
) -> None:
    p.save_state("u1", {"a": 1})
    await p.save_session("s1", user_id="u1")
    p.append_message("u1", role=Role.USER, content="x")
    await asyncio.wait_for(p.writes.flush(), 5)
    counts, from_store = await p.counts()
    assert from_store
    assert (counts.active_users, counts.active_sessions, counts.total_profiles) == (1, 1, 1)
    store.down = True
    counts, from_store = await p.counts()
    assert not from_store
    assert counts.active_sessions == 1
    store.down = False


async def test_close_flushes_everything(store: FlakyStore, clock: ManualClock) -> None:
    p = Persistence(store, settings=settings(flush_linger=30.0), clock=clock)
    await p.start()
    p.save_state("u1", {"a": 1})
    p.append_message("u1", role=Role.USER, content="bye")
    assert await p.close() == 0
    assert await store.get(STATES, "u1") is not None
    assert await store.get(PROFILES, "u1") is not None


async def test_a_write_in_flight_when_its_user_is_erased_is_not_served(
    p: Persistence, store: FlakyStore
) -> None:
    store.gate.clear()
    await p.save_session("s1", user_id="u1")
    p.append_message("u1", role=Role.USER, content="in flight")
    await settle()
    assert p.writes.status().pending_in_flight == 2
    await p.erase_user("u1")
    p.sessions.clear()
    p.profiles.clear()
    assert await p.get_session("s1") is None
    assert await p.get_profile("u1") is None
    assert (await p.list_sessions("u1")).sessions == ()
    store.gate.set()
    await asyncio.wait_for(p.writes.flush(), 5)
    assert await p.get_session("s1") is None, "nothing cached may outlive the erase"
    assert await store.get(SESSIONS, "s1") is None


async def test_list_sessions_sees_a_write_confirmed_while_the_query_runs(
    p: Persistence, store: FlakyStore
) -> None:
    store.gate.clear()
    await p.save_session("s1", user_id="u1")
    await settle()
    assert p.writes.status().pending_in_flight == 1
    store.query_gate.clear()
    listing = asyncio.create_task(p.list_sessions("u1"))
    await settle()
    store.gate.set()  # the write commits after the query took its snapshot
    await asyncio.wait_for(p.writes.flush(), 5)
    store.query_gate.set()
    page = await listing
    assert [s.id for s in page.sessions] == ["s1"]


async def test_a_write_to_an_uncached_user_leaves_a_complete_view(
    p: Persistence, store: FlakyStore, clock: ManualClock
) -> None:
    await store.write_fields(
        FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"stored": 1})
    )
    before = clock.now() - timedelta(seconds=1)
    earlier = Message(id="m0", role=Role.USER, content="before", timestamp=before)
    await store.write_profile(ProfileWrite(user_id="u1", append=[earlier]), now=before)
    reads = store.reads
    p.save_state("u1", {"new": 2})
    p.append_message("u1", role=Role.USER, content="hi")
    await p.settle()  # the state's view: loaded in the background
    await asyncio.wait_for(p.writes.flush(), 5)  # the profile's: what its flush committed
    assert store.reads == reads + 1  # the state's load; the profile is read only by its write
    store.down = True  # what is in memory is complete, store or no store
    state = await p.get_state("u1")
    assert state is not None and state.data == {"stored": 1, "new": 2}
    profile = await p.get_profile("u1")
    assert profile is not None and [m.content for m in profile.history] == ["before", "hi"]
    assert store.reads == reads + 1
    store.down = False


async def test_a_commit_landing_during_another_instances_erase_is_not_served(
    p: Persistence, store: FlakyStore
) -> None:
    store.gate.clear()  # the write waits in flight
    p.append_message("u1", role=Role.USER, content="hi")
    flushing = asyncio.create_task(p.writes.flush())
    await settle()
    p.remote_erase(EraseScope.USER, "u1")  # heard while the write is in flight
    store.gate.set()  # it lands (it races the other instance's erase)
    await asyncio.wait_for(flushing, 5)
    assert p.profiles.peek("u1") is None  # the commit did not become the view
    assert await p.get_profile("u1") is None  # the erase is under way: gone


async def test_a_write_to_a_user_known_to_have_no_profile_is_its_view_at_once(
    p: Persistence, store: FlakyStore
) -> None:
    assert await p.get_profile("u1") is None
    reads = store.reads
    p.append_message("u1", role=Role.USER, content="hi")
    store.down = True  # before any flush: the absence was complete, so is the view
    profile = await p.get_profile("u1")
    assert profile is not None and [m.content for m in profile.history] == ["hi"]
    assert store.reads == reads
    store.down = False


async def test_a_user_without_state_is_read_from_the_store_once(
    p: Persistence, store: FlakyStore
) -> None:
    reads = store.reads
    for _ in range(5):
        assert await p.get_state("stateless") is None
        assert await p.get_profile("stateless") is None
        assert await p.get_session("no-such-session") is None
    assert store.reads == reads + 3


async def test_a_write_after_a_cached_absence_is_served(p: Persistence) -> None:
    assert await p.get_state("u1") is None
    assert await p.get_profile("u1") is None
    assert await p.get_session("s1") is None
    p.save_state("u1", {"language": "en"})
    p.append_message("u1", role=Role.USER, content="hello")
    await p.save_session("s1", user_id="u1")
    state = await p.get_state("u1")
    assert state is not None and state.data == {"language": "en"}
    profile = await p.get_profile("u1")
    assert profile is not None and [m.content for m in profile.history] == ["hello"]
    assert await p.get_session("s1") is not None


async def test_preferences_after_a_cached_absence_are_served(p: Persistence) -> None:
    assert await p.get_profile("u1") is None
    p.set_preferences("u1", {"voiceSpeed": 1.0})
    profile = await p.get_profile("u1")
    assert profile is not None and profile.preferences == {"voiceSpeed": 1.0}


async def test_an_erased_user_reads_as_absent_and_a_new_write_is_served(
    p: Persistence, store: FlakyStore
) -> None:
    p.save_state("u1", {"a": 1})
    await asyncio.wait_for(p.writes.flush(), 5)
    await p.erase_user("u1")
    await asyncio.wait_for(p.writes.flush(), 5)
    assert await p.get_state("u1") is None
    p.save_state("u1", {"b": 2})
    state = await p.get_state("u1")
    assert state is not None and state.data == {"b": 2}


async def another_instance_appends(store: FlakyStore, clock: ManualClock, content: str) -> None:
    """Another server instance's profile write, straight to the shared store."""
    at = clock.now()
    message = Message(id=new_message_id(at), role=Role.USER, content=content, timestamp=at)
    await store.write_profile(ProfileWrite(user_id="u1", append=[message]), now=at)


async def test_a_flush_brings_what_other_instances_appended_into_the_cached_view(
    p: Persistence, store: FlakyStore, clock: ManualClock
) -> None:
    p.append_message("u1", role=Role.USER, content="mine 1")
    await asyncio.wait_for(p.writes.flush(), 5)
    await p.settle()
    clock.advance(1)
    await another_instance_appends(store, clock, "theirs")
    clock.advance(1)
    p.append_message("u1", role=Role.USER, content="mine 2")
    await asyncio.wait_for(p.writes.flush(), 5)
    clock.advance(1)
    p.append_message("u1", role=Role.USER, content="mine 3")  # queued after the commit
    reads = store.reads
    profile = await p.get_profile("u1")
    assert profile is not None
    assert [m.content for m in profile.history] == ["mine 1", "theirs", "mine 2", "mine 3"]
    assert store.reads == reads, "adopted from the commit, not read again"


async def test_a_commit_older_than_a_later_load_is_not_adopted(
    p: Persistence, store: FlakyStore, clock: ManualClock
) -> None:
    p.append_message("u1", role=Role.USER, content="mine")
    await asyncio.wait_for(p.writes.flush(), 5)  # committed while cached
    p.profiles.clear()  # evicted before anyone looked
    clock.advance(1)
    await another_instance_appends(store, clock, "theirs")
    profile = await p.get_profile("u1")
    assert profile is not None
    assert [m.content for m in profile.history] == ["mine", "theirs"]
    clock.advance(1)
    store.gate.clear()  # the next write stays pending
    p.append_message("u1", role=Role.USER, content="later")
    profile = await p.get_profile("u1")
    assert profile is not None
    assert [m.content for m in profile.history] == ["mine", "theirs", "later"]
    store.gate.set()


async def test_pending_interruptions_counts_records_not_yet_in_the_store(
    store: FlakyStore, clock: ManualClock
) -> None:
    record = Interruption(
        session_id="s1", user_id="u1", at=T0, reason="barge-in", heard="Hel", cut="lo"
    )
    async with Persistence(store, settings=settings(persist_interruptions=True), clock=clock) as p:
        store.gate.clear()
        p.record_interruption(record)
        p.record_interruption(record)
        p.save_state("u1", {"a": 1})
        assert p.pending_interruptions() == 2
        store.gate.set()
        await asyncio.wait_for(p.writes.flush(), 5)
        assert p.pending_interruptions() == 0


async def test_cache_stats_count_hits_misses_and_entries(p: Persistence) -> None:
    assert await p.get_state("u1") is None
    assert await p.get_state("u1") is None
    p.save_state("u2", {"a": 1})
    await p.settle()
    stats = p.cache_stats()
    assert dataclasses.replace(stats["states"], bytes=0) == CacheStats(hits=1, misses=2, entries=1)
    assert stats["states"].bytes >= ENTRY_OVERHEAD
    assert stats["profiles"] == CacheStats(hits=0, misses=0, entries=0, bytes=0)
    assert set(stats) == {"states", "profiles", "sessions"}


class ReadGatedStore(FlakyStore):
    """Document reads wait for ``read_gate`` before taking their snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.read_gate = asyncio.Event()
        self.read_gate.set()

    async def get(self, collection: str, doc_id: str) -> dict[str, object] | None:
        await self.read_gate.wait()
        return await super().get(collection, doc_id)


async def test_a_commit_landing_during_a_load_does_not_undo_what_the_load_read(
    clock: ManualClock,
) -> None:
    store = ReadGatedStore()
    async with Persistence(store, settings=settings(), clock=clock) as p:
        p.append_message("u1", role=Role.USER, content="mine 1")
        await asyncio.wait_for(p.writes.flush(), 5)
        await p.settle()
        clock.advance(1)
        store.gate.clear()
        p.append_message("u1", role=Role.USER, content="mine 2")
        await settle()  # in flight
        p.profiles.clear()
        store.read_gate.clear()
        loading = asyncio.create_task(p.get_profile("u1"))
        await settle()
        store.gate.set()  # "mine 2" commits while the load waits...
        await settle()
        clock.advance(1)
        await another_instance_appends(store, clock, "theirs")
        store.read_gate.set()  # ...and the load reads after both
        await loading
        clock.advance(1)
        p.append_message("u1", role=Role.USER, content="later")
        profile = await p.get_profile("u1")
        assert profile is not None
        assert [m.content for m in profile.history] == ["mine 1", "mine 2", "theirs", "later"]


async def test_the_dead_letter_keeps_a_refused_message_whole(
    store: FlakyStore, clock: ManualClock, tmp_path: Path
) -> None:
    store.rejecting.add((PROFILES, "u1"))
    async with Persistence(store, settings=settings(data_dir=tmp_path), clock=clock) as p:
        message = p.append_message("u1", role=Role.USER, content="héllo", session_id="s1", seq=1)
        await asyncio.wait_for(p.writes.flush(), 10)
        assert p.status().writes_set_aside == 1
    [line] = p.dead_letter_path.read_text().splitlines()
    record = json.loads(line)
    assert record["document"] == "user_profiles/u1"
    assert record["change"]["append"] == [
        {
            "id": message.id,
            "role": "user",
            "content": "héllo",
            "timestamp": "2025-01-10T17:00:00.000Z",
            "session_id": "s1",
            "interrupted": False,
            "seq": 1,
            "client_id": None,
        }
    ]


async def test_held_views_answer_as_the_lookups_do_once_cached(p: Persistence) -> None:
    assert p.held_state("u1") is None and p.held_history("u1", 20) is None
    assert await p.get_state("u1") is None and await p.recent_history("u1", 20) == ()
    assert p.held_state("u1") == (None,)  # known absent: an answer, not a load
    assert p.held_history("u1", 20) == ()
    p.save_state("u1", {"mood": "calm"})
    for n in range(3):
        p.append_message("u1", role=Role.USER, content=f"m{n}")
    state = await p.get_state("u1")
    assert state is not None and p.held_state("u1") == (state,)
    held = p.held_history("u1", 2)
    assert held is not None and [m.content for m in held] == ["m1", "m2"]
    assert held == await p.recent_history("u1", 2)
    assert p.held_history("u1", 0) == ()
    p.profiles.invalidate("u1")
    assert p.held_history("u1", 2) is None  # the next read loads it
