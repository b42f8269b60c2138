"""The use-case layer: one ownership rule, erasure that reaches the live side,
one end-of-session path, one count of messages — on the memory store, with a
fake live side that records what the use cases asked of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.documents import PROFILES, SESSIONS, STATES, Document
from samvad.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, RateLimited
from samvad.interruptions import Interruption, InterruptionStack
from samvad.models import Role, SessionStatus, UserState
from samvad.persistence import Persistence
from samvad.principal import ANONYMOUS, SERVICE, Principal
from samvad.ratelimit import RateLimits
from samvad.service import SessionService, Transport, ensure_owner
from samvad.stores.base import HistoryBounds
from samvad.stores.memory import MemoryStore

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)
ALICE = Principal.user("alice")
BOB = Principal.user("bob")


@dataclass
class FakeLive:
    """The live side as the use cases see it: who holds which channel, and
    what they were asked to do."""

    owners: dict[str, str] = field(default_factory=dict)
    ended: list[str] = field(default_factory=list)
    erased_sessions: list[str] = field(default_factory=list)
    erased_users: list[str] = field(default_factory=list)
    states: list[UserState] = field(default_factory=list)

    def owner(self, session_id: str) -> str | None:
        return self.owners.get(session_id)

    def end(self, session_id: str) -> None:
        self.ended.append(session_id)

    def erase_session(self, session_id: str) -> None:
        self.erased_sessions.append(session_id)
        self.owners.pop(session_id, None)

    def erase_user(self, user_id: str) -> None:
        self.erased_users.append(user_id)
        for session_id in [s for s, u in self.owners.items() if u == user_id]:
            self.erase_session(session_id)

    def state_changed(self, state: UserState) -> None:
        self.states.append(state)


@dataclass
class Counts:
    messages: list[tuple[Role, str]] = field(default_factory=list)
    interruptions: int = 0
    limited: list[str] = field(default_factory=list)

    def message_stored(self, role: Role, transport: str) -> None:
        self.messages.append((role, transport))

    def interruption_pushed(self) -> None:
        self.interruptions += 1

    def rate_limited(self, limit: str) -> None:
        self.limited.append(limit)


@dataclass
class World:
    service: SessionService
    live: FakeLive
    counts: Counts
    persistence: Persistence
    clock: ManualClock


def settings(**changes: object) -> Settings:
    return Settings(store="memory", flush_linger=0.0, flush_interval=1.0).replace(**changes)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    s = settings(max_merged_object_bytes=2_000)
    store = MemoryStore(bounds=HistoryBounds(cap=s.history_cap, max_bytes=s.history_max_bytes))
    async with world_on(store, s) as world:
        yield world


@contextlib.asynccontextmanager
async def world_on(store: MemoryStore, s: Settings) -> AsyncIterator[World]:
    clock = ManualClock(T0)
    async with store, Persistence(store, settings=s, clock=clock) as persistence:
        live, counts = FakeLive(), Counts()
        service = SessionService(
            persistence,
            InterruptionStack(),
            settings=s,
            limits=RateLimits.from_settings(s, clock.monotonic),
            observer=counts,
            live=live,
        )
        yield World(service, live, counts, persistence, clock)


def interruption(session_id: str, user_id: str) -> Interruption:
    return Interruption(
        session_id=session_id, user_id=user_id, at=T0, reason="barge_in", heard="a", cut="b"
    )


# -- the ownership rule -------------------------------------------------------------


def test_the_rule_refuses_only_another_owner() -> None:
    ensure_owner(None, "alice", "s1")
    ensure_owner("alice", "alice", "s1")
    with pytest.raises(Conflict, match="s1 belongs to another user"):
        ensure_owner("bob", "alice", "s1")


async def test_a_live_channel_of_another_user_refuses_start_create_and_append(
    world: World,
) -> None:
    # No stored document at all: the live channel alone decides.
    world.live.owners["s1"] = "bob"
    svc = world.service
    with pytest.raises(Conflict):
        await svc.start(ALICE, user_id="alice", session_id="s1")
    with pytest.raises(Conflict):
        await svc.create_session(ALICE, session_id="s1", user_id="alice")
    with pytest.raises(Conflict):
        await svc.append_message(ALICE, "alice", role=Role.USER, content="hi", session_id="s1")
    # Nothing was written for alice, nor a session document for anyone.
    assert await world.persistence.get_session("s1") is None
    assert await world.persistence.get_profile("alice") is None
    assert world.counts.messages == []


async def test_a_stored_session_of_another_user_refuses_start_and_append(world: World) -> None:
    svc = world.service
    await svc.create_session(BOB, session_id="s1", user_id="bob")
    with pytest.raises(Conflict):
        await svc.start(ALICE, user_id="alice", session_id="s1")
    with pytest.raises(Conflict):
        await svc.start(SERVICE, user_id="alice", session_id="s1")
    with pytest.raises(Conflict):
        await svc.append_message(ANONYMOUS, "alice", role=Role.USER, content="x", session_id="s1")
    session = await world.persistence.get_session("s1")
    assert session is not None and session.user_id == "bob"


async def test_a_user_may_not_act_for_another(world: World) -> None:
    svc = world.service
    with pytest.raises(Forbidden):
        await svc.start(ALICE, user_id="bob", session_id="s1")
    with pytest.raises(Forbidden):
        await svc.save_state(ALICE, "bob", {"x": 1})
    await svc.create_session(BOB, session_id="s1", user_id="bob")
    for call in (svc.get_session, svc.end_session, svc.delete_session):
        with pytest.raises(Forbidden):
            await call(ALICE, "s1")
    with pytest.raises(Forbidden):
        await svc.stats(ALICE)
    assert world.live.ended == [] and world.live.erased_sessions == []


async def test_start_opens_the_session_and_reads_the_snapshot(world: World) -> None:
    svc = world.service
    await svc.save_state(ALICE, "alice", {"language": "en"})
    await svc.append_message(ALICE, "alice", role=Role.USER, content="elsewhere")
    snapshot = await svc.start(ALICE, user_id="alice", session_id="s1", language="en")
    assert snapshot.session.status is SessionStatus.ACTIVE
    assert snapshot.state is not None and snapshot.state.data == {"language": "en"}
    assert [m.content for m in snapshot.history] == ["elsewhere"]
    assert snapshot.session_history == ()


class HeldReads(MemoryStore):
    """Document reads wait for ``release``; ``waiting`` holds their collections."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: set[str] = set()
        self.three_waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, collection: str, doc_id: str) -> Document | None:
        self.waiting.add(collection)
        if len(self.waiting) == 3:
            self.three_waiting.set()
        await self.release.wait()
        return await super().get(collection, doc_id)


async def test_a_start_reads_the_session_state_and_profile_at_once() -> None:
    """A store that answers slowly costs a start one read's time, not three:
    the three reads are all in flight before any of them is answered."""
    store = HeldReads()
    async with world_on(store, settings()) as w:
        start = asyncio.create_task(w.service.start(ALICE, user_id="alice", session_id="s1"))
        await asyncio.wait_for(store.three_waiting.wait(), 5)
        assert store.waiting == {SESSIONS, STATES, PROFILES}
        store.release.set()
        snapshot = await asyncio.wait_for(start, 5)
        assert snapshot.session.user_id == "alice"


# -- ending ---------------------------------------------------------------------------


async def test_ending_ends_the_live_channel_and_the_stored_session(world: World) -> None:
    svc = world.service
    await svc.start(ALICE, user_id="alice", session_id="s1")
    world.service.interruptions.push(interruption("s1", "alice"))
    ended = await svc.end_session(ALICE, "s1")
    assert ended.status is SessionStatus.ENDED
    assert world.live.ended == ["s1"]
    # The context of the next reply goes; the count stays.
    assert svc.interruptions.recent("s1") == ()
    assert svc.interruptions.count("s1") == 1
    with pytest.raises(NotFound):
        await svc.end_session(ALICE, "nope")


# -- erasure --------------------------------------------------------------------------


async def test_deleting_a_session_erases_its_live_side_and_interruptions(world: World) -> None:
    svc = world.service
    await svc.start(ALICE, user_id="alice", session_id="s1")
    world.live.owners["s1"] = "alice"
    svc.interruptions.push(interruption("s1", "alice"))
    deleted = await svc.delete_session(ALICE, "s1")
    assert (deleted.session, deleted.interruptions) == (True, 1)
    assert "s1" in world.live.erased_sessions
    assert await world.persistence.get_session("s1") is None
    with pytest.raises(NotFound):
        await svc.delete_session(ALICE, "s1")


async def test_a_session_id_used_again_after_a_delete_starts_empty(world: World) -> None:
    svc = world.service
    await svc.start(ALICE, user_id="alice", session_id="s1")
    svc.record_message("alice", "s1", role=Role.USER, content="secret", seq=1)
    again = await svc.start(ALICE, user_id="alice", session_id="s1")
    assert [m.seq for m in again.session_history] == [1]
    await svc.delete_session(ALICE, "s1")
    fresh = await svc.start(ALICE, user_id="alice", session_id="s1")
    # The message stays in alice's history but is not the new session's.
    assert [m.content for m in fresh.history] == ["secret"]
    assert fresh.session_history == ()
    # And another user may take the id now, with nothing of alice's.
    await svc.delete_session(ALICE, "s1")
    taken = await svc.start(BOB, user_id="bob", session_id="s1")
    assert taken.history == () and taken.session_history == ()


async def test_refreshing_a_user_erases_their_live_sessions(world: World) -> None:
    svc = world.service
    await svc.start(ALICE, user_id="alice", session_id="s1")
    world.live.owners.update({"s1": "alice", "s2": "bob"})
    svc.record_message("alice", "s1", role=Role.USER, content="secret", seq=1)
    svc.interruptions.push(interruption("s1", "alice"))
    cleared = await svc.refresh_user(ALICE, "alice")
    assert (cleared.user_profile, cleared.sessions, cleared.interruptions) == (True, 1, 1)
    assert world.live.erased_users == ["alice", "alice"]
    assert world.live.erased_sessions == ["s1"]
    assert world.live.owners == {"s2": "bob"}
    snapshot = await svc.start(BOB, user_id="bob", session_id="s1")
    assert snapshot.session_history == () and snapshot.history == ()


async def test_deleting_a_session_known_only_by_its_interruptions(world: World) -> None:
    svc = world.service
    svc.interruptions.push(interruption("s9", "bob"))
    with pytest.raises(Forbidden):
        await svc.delete_session(ALICE, "s9")
    assert (await svc.delete_session(BOB, "s9")).interruptions == 1


async def test_erasures_are_rate_limited_per_user(world: World) -> None:
    svc = world.service
    refreshes = 0
    with pytest.raises(RateLimited):
        for refreshes in range(1, 1000):  # noqa: B007 (counted for the assertion)
            await svc.refresh_user(ALICE, "alice")
    assert refreshes == svc.settings.refresh_rate_per_minute + 1
    assert world.counts.limited == ["refresh"]
    await svc.refresh_user(BOB, "bob")  # a per-user limit: bob is not slowed down


# -- state, counting, stats ----------------------------------------------------------


async def test_state_changes_reach_the_live_side_without_server_fields(world: World) -> None:
    svc = world.service
    state = await svc.save_state(ALICE, "alice", {"topic": "loans", "updatedAt": "forged"})
    assert state.data == {"topic": "loans"}
    assert world.live.states == [state]
    with pytest.raises(PayloadTooLarge):
        await svc.save_state(ALICE, "alice", {"big": "x" * 3_000})
    assert (await svc.get_state(ALICE, "alice")).data == {"topic": "loans"}


async def test_messages_are_counted_once_by_the_door_they_came_through(world: World) -> None:
    svc = world.service
    await svc.append_message(ALICE, "alice", role=Role.USER, content="rest")
    svc.record_message("alice", "s1", role=Role.ASSISTANT, content="live", seq=1)
    svc.push_interruption(interruption("s1", "alice"))
    assert world.counts.messages == [
        (Role.USER, Transport.REST),
        (Role.ASSISTANT, Transport.WEBSOCKET),
    ]
    assert world.counts.interruptions == 1
    stats = await svc.stats(SERVICE)
    assert stats.live_interruptions == 1
    assert stats.total_interruptions == 1


async def test_ending_as_a_user_needs_the_session_still_theirs(world: World) -> None:
    # A live connection's end, arriving after its session id changed hands.
    svc = world.service
    await svc.start(BOB, user_id="bob", session_id="s1")
    world.live.owners["s1"] = "bob"
    with pytest.raises(Conflict):
        await svc.end_session(ANONYMOUS, "s1", user_id="alice")
    assert world.live.ended == []
    await svc.end_session(ANONYMOUS, "s1", user_id="bob")
    assert world.live.ended == ["s1"]
