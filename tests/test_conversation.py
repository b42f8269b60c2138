"""The conversation engine without sockets: a fake fan-out records who is told
what, a fake runner stands for the responder tasks, and an injected clock
drives the orphan deadline. The persistence underneath is the real one, on the
memory store."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.conversation import (
    Acked,
    Conversation,
    Device,
    Disconnect,
    Durable,
    Engine,
    Event,
    MessageStored,
    Opened,
    Reply,
    ReplyChunk,
    ReplyEnded,
    ReplyInterrupted,
    ReplyStarted,
    ReplyState,
    SessionEnded,
    SessionState,
    StateChanged,
    new_reply_id,
)
from samvad.errors import Conflict
from samvad.interruptions import InterruptionStack
from samvad.models import Message, Role
from samvad.persistence import Persistence
from samvad.principal import ANONYMOUS
from samvad.service import SessionService
from samvad.stores.base import HistoryBounds
from samvad.stores.memory import MemoryStore

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Phone:
    """A device: whose it is, for checking that nothing crosses users."""

    name: str
    user_id: str


@dataclass
class Wire:
    """FanOut and ReplyRunner fakes: everything the engine asked for, in order."""

    sent: list[tuple[Device, Event]] = field(default_factory=list)
    closed: list[tuple[Device, Disconnect]] = field(default_factory=list)
    started: list[Reply] = field(default_factory=list)
    cancelled: list[Reply] = field(default_factory=list)

    def send(self, devices: Sequence[Device], event: Event) -> None:
        self.sent.extend((device, event) for device in devices)

    def disconnect(self, devices: Sequence[Device], why: Disconnect) -> None:
        self.closed.extend((device, why) for device in devices)

    def start(self, reply: Reply) -> None:
        self.started.append(reply)

    def cancel(self, reply: Reply) -> None:
        self.cancelled.append(reply)

    def to(self, device: Device) -> list[Event]:
        return [event for d, event in self.sent if d == device]

    def take(self) -> list[tuple[Device, Event]]:
        sent, self.sent = self.sent, []
        return sent


@dataclass
class World:
    engine: Engine
    wire: Wire
    service: SessionService
    persistence: Persistence
    clock: ManualClock

    async def history(self, user_id: str) -> tuple[Message, ...]:
        profile = await self.persistence.get_profile(user_id)
        return profile.history if profile is not None else ()

    async def open(
        self, device: Phone, session_id: str, *, resume_from: int | None = None
    ) -> Opened:
        """What the glue does for a ``start``: the use case, then start-or-join."""
        snapshot = await self.service.start(
            ANONYMOUS, user_id=device.user_id, session_id=session_id
        )
        return self.engine.open(device, snapshot, resume_from=resume_from)

    async def join(self, device: Phone, session_id: str) -> Conversation:
        return (await self.open(device, session_id)).conversation


@pytest.fixture
async def world() -> AsyncIterator[World]:
    settings = Settings(store="memory")
    clock = ManualClock(T0)
    bounds = HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
    async with (
        MemoryStore(bounds=bounds) as store,
        Persistence(store, settings=settings, clock=clock) as persistence,
    ):
        wire = Wire()
        service = SessionService(persistence, InterruptionStack(), settings=settings)
        engine = Engine(service, wire, wire, resume_window=50, orphan_grace=30.0)
        service.bind_live(engine)
        yield World(engine, wire, service, persistence, clock)


ALICE_PHONE = Phone("phone", "alice")
ALICE_LAPTOP = Phone("laptop", "alice")
ALICE_WATCH = Phone("watch", "alice")
BOB = Phone("bob", "bob")


def stream(world: World, *chunks: str, complete: bool = True) -> Reply:
    """The responder of the latest reply produces ``chunks`` and ends."""
    reply = world.wire.started[-1]
    for chunk in chunks:
        assert world.engine.reply_chunk(reply, chunk)
    world.engine.reply_done(reply, complete=complete)
    return reply


async def test_one_turn_acks_streams_and_stores_with_sequence_numbers(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    message = world.engine.user_message(ALICE_PHONE, "hello", client_id="c1")
    reply = world.wire.started[-1]
    assert reply.prompt == message and reply.in_reply_to == 1
    world.engine.reply_chunk(reply, "Hi ")
    world.engine.reply_chunk(reply, "there")
    world.engine.reply_done(reply, complete=True)
    events = world.wire.to(ALICE_PHONE)
    assert events[0] == Acked(message, "c1")
    assert events[1] == ReplyStarted(reply.id, 1)
    assert events[2:4] == [ReplyChunk(reply.id, 0, "Hi "), ReplyChunk(reply.id, 1, "there")]
    ended = events[4]
    assert isinstance(ended, ReplyEnded) and ended.complete and ended.text == "Hi there"
    assert ended.message is not None and ended.message.seq == 2
    assert reply.state is ReplyState.FINISHED
    assert [(m.role, m.seq, m.content) for m in await world.history("alice")] == [
        (Role.USER, 1, "hello"),
        (Role.ASSISTANT, 2, "Hi there"),
    ]
    # A responder still producing after the end is told to stop.
    assert not world.engine.reply_chunk(reply, "more")


async def test_a_client_id_sent_again_gets_the_original_ack_and_no_second_reply(
    world: World,
) -> None:
    await world.join(ALICE_PHONE, "s1")
    first = world.engine.user_message(ALICE_PHONE, "hello", client_id="c1")
    stream(world, "Hi")
    world.wire.take()
    # Still pending (nothing is flushed here) and on another device of the session.
    await world.join(ALICE_LAPTOP, "s1")
    again = world.engine.user_message(ALICE_LAPTOP, "hello", client_id="c1")
    assert again == first
    assert world.wire.take() == [(ALICE_LAPTOP, Acked(first, "c1", duplicate=True))]
    assert len(world.wire.started) == 1
    # Another id is another message; the same id in another session is too.
    world.engine.user_message(ALICE_PHONE, "hello", client_id="c2")
    await world.join(ALICE_WATCH, "s2")
    other = world.engine.user_message(ALICE_WATCH, "hello", client_id="c1")
    assert other.session_id == "s2" and other.seq == 1
    history = await world.history("alice")
    stored = [(m.session_id, m.client_id) for m in history if m.role is Role.USER]
    assert stored == [("s1", "c1"), ("s1", "c2"), ("s2", "c1")]


async def test_a_client_id_is_found_in_the_stored_history_by_a_new_live_session(
    world: World,
) -> None:
    await world.join(ALICE_PHONE, "s1")
    first = world.engine.user_message(ALICE_PHONE, "hello", client_id="c1")
    stream(world, "Hi")
    world.engine.leave(ALICE_PHONE)
    assert world.engine.conversation("s1") is None  # released: only the history knows
    await world.join(ALICE_PHONE, "s1")
    world.wire.take()
    again = world.engine.user_message(ALICE_PHONE, "hello", client_id="c1")
    assert again.id == first.id and again.seq == 1
    assert world.wire.take() == [(ALICE_PHONE, Acked(again, "c1", duplicate=True))]


async def test_durable_tells_the_session_s_devices_once_per_new_seq(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    await world.join(ALICE_LAPTOP, "s1")
    world.engine.user_message(ALICE_PHONE, "hello", client_id="c1")
    stream(world, "Hi")
    world.wire.take()
    world.engine.durable("s1", 1)
    world.engine.durable("s1", 1)  # known already
    world.engine.durable("s1", 9)  # never past the session's own numbering
    world.engine.durable("nobody", 3)
    assert world.wire.take() == [
        (ALICE_PHONE, Durable("s1", 1)),
        (ALICE_LAPTOP, Durable("s1", 1)),
        (ALICE_PHONE, Durable("s1", 2)),
        (ALICE_LAPTOP, Durable("s1", 2)),
    ]


async def test_barge_in_stores_what_was_heard_and_hands_the_context_on_once(
    world: World,
) -> None:
    await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "tell me")
    reply = world.wire.started[-1]
    world.engine.reply_chunk(reply, "Hello there")
    assert world.engine.interrupt(ALICE_PHONE, reason="barge_in", heard_chars=5)
    assert world.wire.cancelled == [reply]
    assert reply.state is ReplyState.INTERRUPTED
    cut = world.wire.to(ALICE_PHONE)[-1]
    assert isinstance(cut, ReplyInterrupted) and (cut.heard, cut.late) == ("Hello", False)
    stored = (await world.history("alice"))[-1]
    assert (stored.content, stored.interrupted, stored.seq) == ("Hello", True, 2)
    world.engine.user_message(ALICE_PHONE, "sorry, go on")
    second = world.wire.started[-1]
    assert second.interruption is not None
    assert (second.interruption.heard, second.interruption.cut) == ("Hello", " there")
    stream(world, "ok")
    world.engine.user_message(ALICE_PHONE, "thanks")
    assert world.wire.started[-1].interruption is None
    # A late chunk of the cut reply changes nothing.
    assert not world.engine.reply_chunk(reply, "late")
    assert not world.engine.interrupt(ALICE_PHONE, reason="barge_in", reply_id="nope")


async def test_a_late_interrupt_keeps_the_stored_reply_whole(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    reply = stream(world, "All of it")
    assert world.engine.interrupt(ALICE_PHONE, reason="barge_in", heard_chars=3, reply_id=reply.id)
    late = world.wire.to(ALICE_PHONE)[-1]
    assert isinstance(late, ReplyInterrupted) and (late.heard, late.late) == ("All", True)
    assert (await world.history("alice"))[-1].content == "All of it"
    assert world.service.interruptions.count("s1") == 1
    assert not world.engine.interrupt(ALICE_PHONE, reason="barge_in")


async def test_devices_hear_their_session_and_their_user_only(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    await world.join(ALICE_LAPTOP, "s1")
    await world.join(ALICE_WATCH, "s2")
    await world.join(BOB, "s3")
    world.engine.user_message(ALICE_PHONE, "hello")
    stream(world, "reply")
    await world.service.save_state(ANONYMOUS, "alice", {"topic": "loans"})
    phone, laptop, watch = (world.wire.to(d) for d in (ALICE_PHONE, ALICE_LAPTOP, ALICE_WATCH))
    assert [type(e) for e in phone] == [
        Acked,
        ReplyStarted,
        ReplyChunk,
        ReplyEnded,
        StateChanged,
    ]
    assert [type(e) for e in laptop] == [
        MessageStored,
        ReplyStarted,
        ReplyChunk,
        ReplyEnded,
        StateChanged,
    ]
    # The other session of the user hears of each stored message, not the stream.
    assert [type(e) for e in watch] == [MessageStored, MessageStored, StateChanged]
    assert world.wire.to(BOB) == []


async def test_a_live_session_of_another_user_cannot_be_joined(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "private")
    with pytest.raises(Conflict):
        world.engine.join(BOB, session_id="s1", user_id="bob")
    with pytest.raises(Conflict):
        await world.join(BOB, "s1")
    assert world.engine.devices_of("bob") == ()
    stream(world, "still private")
    assert all(device == ALICE_PHONE for device, _ in world.wire.sent)
    with pytest.raises(RuntimeError, match="joined none"):
        world.engine.user_message(BOB, "let me in")


async def test_an_orphaned_reply_runs_until_its_deadline_then_is_cut(world: World) -> None:
    conversation = await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    reply = world.wire.started[-1]
    world.engine.reply_chunk(reply, "Part one")
    first = world.engine.leave(ALICE_PHONE)
    assert first.end_session and first.orphan_deadline == world.clock.monotonic() + 30
    assert conversation.state is SessionState.ORPHANED
    world.clock.advance(10)
    # Back in time: the reply goes on, and the device sees what it missed.
    opened = await world.open(ALICE_PHONE, "s1", resume_from=0)
    assert opened.conversation is conversation
    assert opened.resume is not None and opened.resume.recovered
    assert [m.content for m in opened.resume.messages] == ["q"]
    assert opened.in_flight is not None and opened.in_flight.text == "Part one"
    second = world.engine.leave(ALICE_PHONE)
    assert second.orphan_deadline == world.clock.monotonic() + 30
    world.clock.advance(25)
    world.engine.orphan_deadline(conversation)  # the first timer: too early now
    assert reply.streaming
    world.clock.advance(5)
    world.engine.orphan_deadline(conversation)
    assert reply.state is ReplyState.INTERRUPTED
    assert conversation.state is SessionState.RELEASED
    assert world.engine.conversation("s1") is None
    stored = (await world.history("alice"))[-1]
    assert (stored.content, stored.interrupted) == ("Part one", True)
    assert world.service.interruptions.count("s1") == 0  # not a barge-in


async def test_a_reply_that_ends_while_orphaned_is_stored_whole(world: World) -> None:
    conversation = await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    world.engine.leave(ALICE_PHONE)
    stream(world, "done")
    assert conversation.state is SessionState.RELEASED
    stored = (await world.history("alice"))[-1]
    assert (stored.content, stored.interrupted) == ("done", False)
    # The sequence goes on for a resume.
    again = await world.join(ALICE_PHONE, "s1")
    assert again.last_seq == 2
    plan, in_flight = world.engine.resume(again, (await world.history("alice")), 0)
    assert plan.recovered and [m.seq for m in plan.messages] == [1, 2] and in_flight is None


async def test_a_reply_that_ends_while_orphaned_reaches_the_users_other_session(
    world: World,
) -> None:
    """The only device left is on another session: it still hears of the reply
    stored after its own session's device went away."""
    await world.join(ALICE_PHONE, "s1")
    await world.join(ALICE_WATCH, "s2")
    world.engine.user_message(ALICE_PHONE, "q")
    world.engine.leave(ALICE_PHONE)
    world.wire.take()
    stream(world, "done")
    heard = world.wire.to(ALICE_WATCH)
    assert [type(e) for e in heard] == [MessageStored]
    assert isinstance(heard[0], MessageStored) and heard[0].message.content == "done"


async def test_without_grace_the_last_device_leaving_cuts_the_reply_at_once(
    world: World,
) -> None:
    world.engine.orphan_grace = 0
    conversation = await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    world.engine.reply_chunk(world.wire.started[-1], "cut")
    departure = world.engine.leave(ALICE_PHONE)
    assert departure.end_session and departure.orphan_deadline is None
    assert conversation.state is SessionState.RELEASED


async def test_ending_cuts_the_reply_tells_every_device_and_frees_the_channel(
    world: World,
) -> None:
    conversation = await world.join(ALICE_PHONE, "s1")
    await world.join(ALICE_LAPTOP, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    world.engine.reply_chunk(world.wire.started[-1], "so far")
    await world.service.end_session(ANONYMOUS, "s1")
    assert conversation.state is SessionState.ENDED
    assert world.wire.to(ALICE_LAPTOP)[-1] == SessionEnded("s1")
    assert sorted(d.name for d, why in world.wire.closed if why is Disconnect.ENDED) == [
        "laptop",
        "phone",
    ]
    assert (await world.history("alice"))[-1].content == "so far"
    assert world.engine.conversation("s1") is None
    # The devices leaving afterwards change nothing; a new start numbers on.
    assert not world.engine.leave(ALICE_PHONE).end_session
    assert (await world.join(ALICE_PHONE, "s1")).last_seq == 2


async def test_erasing_a_session_cancels_the_reply_and_forgets_it(world: World) -> None:
    conversation = await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "secret")
    reply = world.wire.started[-1]
    world.engine.reply_chunk(reply, "secret answer")
    world.wire.take()
    await world.service.delete_session(ANONYMOUS, "s1")
    assert reply.state is ReplyState.CANCELLED and world.wire.cancelled == [reply]
    assert conversation.state is SessionState.ERASED and not conversation.recent
    assert world.wire.closed == [(ALICE_PHONE, Disconnect.ERASED)]
    assert world.wire.take() == []  # nothing more was sent, not even the cut
    assert [m.content for m in await world.history("alice")] == ["secret"]
    # Late chunks and the device leaving change nothing.
    assert not world.engine.reply_chunk(reply, "more")
    assert not world.engine.leave(ALICE_PHONE).end_session
    fresh = await world.join(BOB, "s1")
    assert fresh is not conversation and fresh.last_seq == 0
    plan, _ = world.engine.resume(fresh, (), 0)
    assert plan.recovered and plan.messages == ()


async def test_refreshing_a_user_erases_every_live_session_of_theirs(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    await world.join(ALICE_WATCH, "s2")
    await world.join(BOB, "s3")
    world.engine.user_message(ALICE_PHONE, "one")
    await world.service.refresh_user(ANONYMOUS, "alice")
    assert sorted(d.name for d, _ in world.wire.closed) == ["phone", "watch"]
    assert world.engine.owner("s1") is None and world.engine.owner("s2") is None
    assert world.engine.owner("s3") == "bob"
    # Sequence numbers are not remembered across the erasure either.
    assert (await world.join(ALICE_LAPTOP, "s1")).last_seq == 0


async def test_a_reply_is_cut_at_the_size_limit(world: World) -> None:
    world.engine.max_reply_chars = 5
    await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    reply = world.wire.started[-1]
    assert not world.engine.reply_chunk(reply, "Hello world")
    ended = world.wire.to(ALICE_PHONE)[-1]
    assert isinstance(ended, ReplyEnded) and (ended.text, ended.complete) == ("Hello", False)


async def test_a_failed_reply_task_disconnects_its_session_only(world: World) -> None:
    await world.join(ALICE_PHONE, "s1")
    await world.join(ALICE_WATCH, "s2")
    world.engine.user_message(ALICE_PHONE, "q")
    world.engine.reply_failed(world.wire.started[-1])
    assert world.wire.closed == [(ALICE_PHONE, Disconnect.FAILED)]


async def test_an_idle_session_holds_no_replay_buffer_until_its_first_message(
    world: World,
) -> None:
    conversation = await world.join(ALICE_PHONE, "s1")
    assert conversation.recent is None
    assert not hasattr(conversation, "__dict__")
    for n in range(60):
        world.engine.user_message(ALICE_PHONE, f"m{n}")
        stream(world, "ok")
    assert conversation.recent is not None
    assert [m.seq for m in conversation.recent] == list(range(71, 121))  # the last 50
    world.wire.take()
    resumed = await world.open(ALICE_LAPTOP, "s1", resume_from=118)
    assert resumed.resume is not None and resumed.resume.recovered
    assert [m.seq for m in resumed.resume.messages] == [119, 120]


async def test_illegal_transitions_say_what_was_wrong(world: World) -> None:
    conversation = await world.join(ALICE_PHONE, "s1")
    world.engine.user_message(ALICE_PHONE, "q")
    reply = stream(world, "done")
    with pytest.raises(RuntimeError, match='Cannot move a reply from "finished" to "interrupted"'):
        reply.move(ReplyState.INTERRUPTED)
    world.engine.leave(ALICE_PHONE)
    with pytest.raises(RuntimeError, match='Cannot move session s1 from "released" to "active"'):
        conversation.move(SessionState.ACTIVE)
    await world.join(ALICE_PHONE, "s1")
    with pytest.raises(RuntimeError, match="second session"):
        await world.join(ALICE_PHONE, "s2")


def test_reply_ids_are_unique_version_4_uuids_in_hex() -> None:
    ids = {new_reply_id() for _ in range(1000)}
    assert len(ids) == 1000
    for reply_id in ids:
        parsed = uuid.UUID(hex=reply_id)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert parsed.hex == reply_id


def test_a_forked_child_makes_reply_ids_of_its_own() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, as its parent's next would be
        os.write(write, new_reply_id().encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    ours = new_reply_id()
    assert status == 0
    # The same count (the child's went on from the parent's, as did ours):
    # only the random half tells them apart.
    assert child[16:] == ours[16:]
    assert child[:16] != ours[:16]
    assert uuid.UUID(hex=child).version == 4
