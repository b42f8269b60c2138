"""The conversation engine, sans I/O: live sessions, replies, barge-in, resume.

Plain synchronous code. For each live session a :class:`Conversation` numbers
its messages, holds the reply being streamed, the interruption context the
next reply gets and the replay buffer a resuming device is served from; the
:class:`Engine` knows which devices are attached to which session and user,
and decides who receives what. Tests drive it without sockets.

What it does not do, the glue (``samvad.web.realtime``) does, through two
narrow interfaces defined here:

- :class:`FanOut` delivers :data:`Event` values to devices (the glue turns
  them into the frames of ``docs/protocol.md``) and disconnects devices;
- :class:`ReplyRunner` runs a reply's responder as a task, feeding its chunks
  back with :meth:`Engine.reply_chunk` and :meth:`Engine.reply_done`, and
  cancels it when the engine cuts the reply.

Time is a deadline, not a timer: when the last device of a session leaves
while a reply streams, :meth:`Engine.leave` returns when the reply is to be
cut; the glue calls :meth:`Engine.orphan_deadline` then.

Who may join a session is :func:`samvad.service.ensure_owner`, applied in
:meth:`Engine.join`; the engine implements
:class:`samvad.service.LiveSessions`, through which the use cases end and
erase live sessions. Devices are opaque hashable values to the engine.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import msgspec

from samvad.errors import BacklogFull
from samvad.interruptions import Interruption
from samvad.models import Message, Role, UserState
from samvad.service import SessionService, StartSnapshot, ensure_owner

__all__ = [
    "MAX_REPLY_CHARS",
    "ORPHAN_REPLY_GRACE",
    "Acked",
    "Conversation",
    "Departure",
    "Device",
    "Disconnect",
    "Durable",
    "Engine",
    "Event",
    "FanOut",
    "InFlight",
    "MessageStored",
    "Opened",
    "Reply",
    "ReplyChunk",
    "ReplyEnded",
    "ReplyInterrupted",
    "ReplyRunner",
    "ReplyStarted",
    "ReplyState",
    "ResumeFailure",
    "ResumePlan",
    "SessionEnded",
    "SessionState",
    "StateChanged",
    "heard_part",
    "last_seq",
    "new_reply_id",
    "plan_resume",
]

logger = logging.getLogger(__name__)

#: Seconds a reply goes on streaming (into the replay buffer, for a resume)
#: after the last device of its session disconnected; then it is cut.
ORPHAN_REPLY_GRACE = 30.0
#: Longest reply kept (characters); a responder going on beyond it is cut.
MAX_REPLY_CHARS = 16_384
#: Sessions whose latest sequence number is remembered after their channel went.
_REMEMBERED_SESSIONS = 100_000

#: Client ids remembered per live session (besides those in the stored history).
_REMEMBERED_CLIENT_IDS = 256

#: A connected device, as the glue identifies it (opaque here).
Device = Hashable


# -- pure rules: sequence numbers, what was heard, resume ---------------------------


def last_seq(messages: Iterable[Message], session_id: str) -> int:
    """The highest sequence number of ``session_id`` among ``messages`` (0 if none)."""
    return max(
        (m.seq for m in messages if m.session_id == session_id and m.seq is not None), default=0
    )


def heard_part(sent: str, *, heard_chars: int | None, heard_text: str | None) -> str:
    """What the user heard of a reply of which ``sent`` was sent.

    The client may say how many characters were played, or which text; by
    default the user heard everything that was sent. The result is always a
    prefix of ``sent``: a client cannot make the server store text it never sent.
    """
    if heard_chars is not None:
        return sent[:heard_chars]
    if heard_text is not None:
        common = 0
        for ours, theirs in zip(sent, heard_text, strict=False):
            if ours != theirs:
                break
            common += 1
        return sent[:common]
    return sent


class ResumeFailure(StrEnum):
    """Why a resume could not recover what the client missed."""

    HISTORY_TRIMMED = "history_trimmed"
    UNKNOWN_SEQ = "unknown_seq"
    TOO_MANY_MISSED = "too_many_missed"


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What to tell a resuming client: the missed messages, or why they are gone."""

    recovered: bool
    messages: tuple[Message, ...] = ()
    reason: ResumeFailure | None = None


def plan_resume(
    candidates: Iterable[Message],
    *,
    session_id: str,
    last_seen: int,
    current: int,
    window: int,
) -> ResumePlan:
    """Decide what a client that saw up to ``last_seen`` gets replayed.

    ``candidates`` are the messages the server still holds (history and the
    replay buffer, duplicates allowed); ``current`` is the session's latest
    sequence number. Every message from ``last_seen + 1`` to ``current`` must
    be there, or the answer is an explicit "not recovered".
    """
    if last_seen > current:
        return ResumePlan(recovered=False, reason=ResumeFailure.UNKNOWN_SEQ)
    missed = current - last_seen
    if missed == 0:
        return ResumePlan(recovered=True)
    if missed > window:
        return ResumePlan(recovered=False, reason=ResumeFailure.TOO_MANY_MISSED)
    by_seq: dict[int, Message] = {}
    for message in candidates:
        seq = message.seq
        if message.session_id == session_id and seq is not None and last_seen < seq <= current:
            by_seq.setdefault(seq, message)
    if len(by_seq) != missed:
        return ResumePlan(recovered=False, reason=ResumeFailure.HISTORY_TRIMMED)
    return ResumePlan(recovered=True, messages=tuple(by_seq[s] for s in sorted(by_seq)))


# -- events: what devices are told ----------------------------------------------------
#
# Frozen msgspec structs, not frozen dataclasses: four are made per message
# (ack, reply start, chunk and end), and a frozen dataclass's ``__init__``
# costs several times as much. Out of the collector's lists (``gc=False``):
# they hold messages, text and numbers, never anything that refers back.


class Acked(msgspec.Struct, frozen=True, gc=False):
    """The sender's message was stored (``ack``); ``duplicate`` when it had
    been already (the same ``clientId`` again): nothing was stored this time."""

    message: Message
    client_id: str | None
    duplicate: bool = False


class MessageStored(msgspec.Struct, frozen=True, gc=False):
    """A message another device of the user should know about (``message``)."""

    message: Message


class ReplyStarted(msgspec.Struct, frozen=True, gc=False):
    """``reply.start``."""

    reply_id: str
    in_reply_to: int | None


class ReplyChunk(msgspec.Struct, frozen=True, gc=False):
    """``reply.chunk``."""

    reply_id: str
    index: int
    text: str


class ReplyEnded(msgspec.Struct, frozen=True, gc=False):
    """``reply.end``: ``message`` is None when nothing was stored."""

    reply_id: str
    message: Message | None
    text: str
    complete: bool


class ReplyInterrupted(msgspec.Struct, frozen=True, gc=False):
    """``interrupted``: what was heard, and what was stored of it."""

    reply_id: str
    heard: str
    message: Message | None
    reason: str
    late: bool


class StateChanged(msgspec.Struct, frozen=True, gc=False):
    """``state``."""

    state: UserState


class Durable(msgspec.Struct, frozen=True, gc=False):
    """``durable``: every message of the session up to ``seq`` is in the store."""

    session_id: str
    seq: int


class SessionEnded(msgspec.Struct, frozen=True, gc=False):
    """``ended``."""

    session_id: str


Event = (
    Acked
    | MessageStored
    | ReplyStarted
    | ReplyChunk
    | ReplyEnded
    | ReplyInterrupted
    | StateChanged
    | SessionEnded
    | Durable
)


class Disconnect(StrEnum):
    """Why devices are disconnected (the glue picks the close code)."""

    #: The session was ended (``end``, REST ``end``): a normal close.
    ENDED = "ended"
    #: The session or its user was erased: close 4410, do not resume.
    ERASED = "erased"
    #: A bug ended the reply task: close 1011.
    FAILED = "failed"


class FanOut(Protocol):
    """Delivery to devices, implemented by the glue."""

    def send(self, devices: Sequence[Device], event: Event) -> None:
        """Deliver ``event`` to each of ``devices`` (in the order of calls)."""
        ...

    def disconnect(self, devices: Sequence[Device], why: Disconnect) -> None:
        """Close ``devices`` after what was already sent to them."""
        ...


class ReplyRunner(Protocol):
    """Runs replies' responders, implemented by the glue."""

    def start(self, reply: Reply) -> None:
        """Run the responder for ``reply``; feed :meth:`Engine.reply_chunk` and
        :meth:`Engine.reply_done`, or :meth:`Engine.reply_failed` on a bug.

        It may do so before it returns (a task-free responder whose chunks
        are ready): the engine calls it last, with the reply's state complete."""
        ...

    def cancel(self, reply: Reply) -> None:
        """Stop the responder of ``reply`` (the engine has cut it)."""
        ...


# -- states ---------------------------------------------------------------------------


class SessionState(StrEnum):
    """Where a live session is."""

    #: At least one device is attached.
    ACTIVE = "active"
    #: No device left, a reply still streams (for a resume) until a deadline.
    ORPHANED = "orphaned"
    #: Ended (``end``): its devices are being closed.
    ENDED = "ended"
    #: Its data was erased: devices closed, reply cancelled, buffers dropped.
    ERASED = "erased"
    #: Nobody uses it any more; a later start makes a new one.
    RELEASED = "released"


# Members read for every message, under module names: on Python 3.11 reading
# an attribute of an Enum class (``Role.USER``) goes through the slow hook
# ``EnumType.__getattr__`` installs, about 0.13 µs against 0.02 µs for a
# global (3.12 dropped the hook).
_USER, _ASSISTANT = Role.USER, Role.ASSISTANT
_ORPHANED = SessionState.ORPHANED

_SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.ACTIVE: frozenset(
        {SessionState.ORPHANED, SessionState.ENDED, SessionState.ERASED, SessionState.RELEASED}
    ),
    SessionState.ORPHANED: frozenset(
        {SessionState.ACTIVE, SessionState.ENDED, SessionState.ERASED, SessionState.RELEASED}
    ),
    SessionState.ENDED: frozenset(),
    SessionState.ERASED: frozenset(),
    SessionState.RELEASED: frozenset(),
}


class ReplyState(StrEnum):
    """Where a reply is."""

    STREAMING = "streaming"
    #: The responder finished (or failed, or went past the size limit).
    FINISHED = "finished"
    #: Cut by a barge-in, a new message, ``end``, shutdown or an orphan deadline.
    INTERRUPTED = "interrupted"
    #: Dropped without storing anything (erasure, a bug).
    CANCELLED = "cancelled"


_STREAMING, _FINISHED = ReplyState.STREAMING, ReplyState.FINISHED  # (see _USER)

_REPLY_TRANSITIONS: dict[ReplyState, frozenset[ReplyState]] = {
    ReplyState.STREAMING: frozenset(
        {ReplyState.FINISHED, ReplyState.INTERRUPTED, ReplyState.CANCELLED}
    ),
    ReplyState.FINISHED: frozenset(),
    ReplyState.INTERRUPTED: frozenset(),
    ReplyState.CANCELLED: frozenset(),
}


class _ReplyIds:
    """Reply ids: version-4 UUIDs in hex, as ``uuid.uuid4().hex`` writes them,
    made of 64 random bits drawn once per process (again in a forked child)
    and a counter, rather than 122 fresh random bits each: a call into the
    system's random source cost more than the rest of starting a reply. They
    only have to be unique: a reply id grants nothing (an ``interrupt`` naming
    one is honoured only for the connection's own session and its current
    reply).
    """

    __slots__ = ("_high", "_next")

    #: Where version 4 and the RFC 4122 variant go (``uuid.UUID``'s layout).
    _VERSION = (0xF << 76, 0x4 << 76)
    _VARIANT = (0xC << 60, 0x8 << 60)

    def __init__(self) -> None:
        self._high = 0
        self._next = itertools.count().__next__
        self.reseed()

    def reseed(self) -> None:
        """New random bits (a forked child must not repeat its parent's ids)."""
        high = int.from_bytes(os.urandom(8), "big") << 64
        self._high = high & ~self._VERSION[0] | self._VERSION[1]

    def __call__(self) -> str:
        low = self._next() & 0xFFFF_FFFF_FFFF_FFFF
        # Zero-padded hex without a format string, as samvad.history's ids.
        return hex(_UUID_MARK | self._high | (low & ~self._VARIANT[0] | self._VARIANT[1]))[3:]


_UUID_MARK = 1 << 128


_reply_ids = _ReplyIds()
os.register_at_fork(after_in_child=_reply_ids.reseed)


def new_reply_id() -> str:
    """A unique version-4 UUID in hex (:class:`_ReplyIds`)."""
    return _reply_ids()


class Reply(msgspec.Struct, eq=False):
    """One streamed assistant reply (mutable: it grows chunk by chunk).

    Compared and hashed by identity (``eq=False``). A msgspec struct rather
    than a dataclass: one is made per message (0.18 against 0.85 µs,
    ``timeit``)."""

    id: str
    session_id: str
    user_id: str
    #: The user message it answers.
    prompt: Message
    #: The interruption context this reply is the first to receive.
    interruption: Interruption | None
    chunks: list[str] = msgspec.field(default_factory=list)
    size: int = 0
    state: ReplyState = ReplyState.STREAMING
    #: What was stored of it, once it is over.
    message: Message | None = None

    @property
    def in_reply_to(self) -> int | None:
        return self.prompt.seq

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def streaming(self) -> bool:
        return self.state is _STREAMING

    def move(self, to: ReplyState) -> None:
        if to not in _REPLY_TRANSITIONS[self.state]:
            raise RuntimeError(f'Cannot move a reply from "{self.state.value}" to "{to.value}".')
        self.state = to


@dataclass(frozen=True, slots=True)
class InFlight:
    """The reply being streamed, as a resuming device needs it."""

    reply_id: str
    in_reply_to: int | None
    text: str
    chunks: int


@dataclass(frozen=True, slots=True)
class Opened:
    """A device joined its session: what its ``started`` and ``resume`` frames say."""

    conversation: Conversation
    #: What a resuming device gets replayed (None: it did not ask to resume).
    resume: ResumePlan | None = None
    #: The reply being streamed, for a resuming device.
    in_flight: InFlight | None = None


@dataclass(frozen=True, slots=True)
class Departure:
    """What the glue must do after a device left."""

    session_id: str | None
    #: The last device left without ``end``: mark the stored session ended.
    end_session: bool = False
    #: A reply goes on for a resume: call :meth:`Engine.orphan_deadline` at
    #: this monotonic time (seconds).
    orphan_deadline: float | None = None


class Conversation:
    """One live session: its devices, sequence numbers, reply and replay buffer."""

    # One per live session, most of them idle: no per-instance dict, and the
    # replay buffer made with the session's first message.
    __slots__ = (
        "_window",
        "client_ids",
        "devices",
        "durable_seq",
        "last_reply",
        "last_seq",
        "orphan_deadline",
        "pending_interruption",
        "recent",
        "reply",
        "session_id",
        "state",
        "user_id",
    )

    def __init__(self, *, session_id: str, user_id: str, seq: int, window: int) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.last_seq = seq
        self.state = SessionState.ACTIVE
        self.devices: dict[Device, None] = {}
        #: The session's latest messages, for a device that resumes (None: none yet).
        self.recent: deque[Message] | None = None
        self._window = max(1, window)
        self.reply: Reply | None = None
        self.last_reply: Reply | None = None
        self.pending_interruption: Interruption | None = None
        self.orphan_deadline: float | None = None
        #: Every message up to this sequence number is in the store.
        self.durable_seq = 0
        #: The user messages sent with a ``clientId``, by it (made on first use).
        self.client_ids: OrderedDict[str, Message] | None = None

    def remember_client_ids(self, messages: Iterable[Message]) -> None:
        """Know ``messages``' client ids: a message sent again with one is a duplicate."""
        for message in messages:
            if message.client_id is None or message.role is not _USER:
                continue
            if self.client_ids is None:
                self.client_ids = OrderedDict()
            self.client_ids[message.client_id] = message
            self.client_ids.move_to_end(message.client_id)
            if len(self.client_ids) > _REMEMBERED_CLIENT_IDS:
                self.client_ids.popitem(last=False)

    def remember(self, message: Message) -> None:
        """Keep ``message`` in the replay buffer (the latest ``window`` messages)."""
        recent = self.recent
        if recent is None:
            recent = self.recent = deque(maxlen=self._window)
        recent.append(message)

    def __repr__(self) -> str:
        return f"<Conversation {self.session_id} {self.state.value}>"

    def move(self, to: SessionState) -> None:
        if to not in _SESSION_TRANSITIONS[self.state]:
            raise RuntimeError(
                f'Cannot move session {self.session_id} from "{self.state.value}" to "{to.value}".'
            )
        self.state = to

    def in_flight(self) -> InFlight | None:
        """The reply being streamed, if any."""
        reply = self.reply
        if reply is None:
            return None
        return InFlight(reply.id, reply.in_reply_to, reply.text, len(reply.chunks))


class Engine:
    """Every live session of this process (implements ``LiveSessions``)."""

    def __init__(
        self,
        service: SessionService,
        fanout: FanOut,
        runner: ReplyRunner,
        *,
        resume_window: int,
        orphan_grace: float = ORPHAN_REPLY_GRACE,
        max_reply_chars: int = MAX_REPLY_CHARS,
    ) -> None:
        self.service = service
        self.fanout = fanout
        self.runner = runner
        self.clock = service.clock
        self.resume_window = resume_window
        #: Seconds a reply streams on with nobody connected (see ORPHAN_REPLY_GRACE).
        self.orphan_grace = orphan_grace
        #: Longest reply in characters (see MAX_REPLY_CHARS).
        self.max_reply_chars = max_reply_chars
        self._sessions: dict[str, Conversation] = {}
        self._of_device: dict[Device, Conversation] = {}
        self._by_user: dict[str, dict[Device, None]] = {}
        # The latest sequence number of recent sessions, and whose they were.
        self._seqs: OrderedDict[str, tuple[str, int]] = OrderedDict()

    # -- who is where ------------------------------------------------------------------

    def conversation(self, session_id: str) -> Conversation | None:
        """The live session ``session_id``, if there is one."""
        return self._sessions.get(session_id)

    def conversation_of(self, device: Device) -> Conversation:
        """The session ``device`` joined (RuntimeError if it joined none)."""
        conversation = self._of_device.get(device)
        if conversation is None:
            raise RuntimeError("Cannot handle a session frame from a device that joined none.")
        return conversation

    def devices_of(self, user_id: str) -> tuple[Device, ...]:
        """The devices of a user in live sessions, oldest first."""
        return tuple(self._by_user.get(user_id, ()))

    def counts(self) -> tuple[int, int]:
        """Users with a device attached, and live sessions."""
        return len(self._by_user), len(self._sessions)

    def _user_devices(
        self, user_id: str, *, skip: Device | None = None, skip_session: str | None = None
    ) -> list[Device]:
        out = []
        for device in self._by_user.get(user_id, ()):
            if device is skip:
                continue
            if skip_session is not None:
                conversation = self._of_device.get(device)
                if conversation is not None and conversation.session_id == skip_session:
                    continue
            out.append(device)
        return out

    def _broadcast(self, conversation: Conversation, event: Event) -> None:
        if conversation.devices:
            self.fanout.send(list(conversation.devices), event)

    # -- joining and leaving -----------------------------------------------------------

    def join(
        self,
        device: Device,
        *,
        session_id: str,
        user_id: str,
        session_history: Iterable[Message] = (),
    ) -> Conversation:
        """Attach ``device`` to the live session (made on first use).

        ``session_history`` is the session's messages in the user's history
        (``StartSnapshot.session_history``): numbering goes on after them. A
        live session of another user is refused with ``Conflict``.
        """
        if device in self._of_device:
            raise RuntimeError("Cannot join a device to a second session.")
        conversation = self._sessions.get(session_id)
        if conversation is not None:
            ensure_owner(conversation.user_id, user_id, session_id)
        else:
            remembered = self._seqs.get(session_id)
            seq = remembered[1] if remembered is not None and remembered[0] == user_id else 0
            conversation = Conversation(
                session_id=session_id,
                user_id=user_id,
                seq=max(seq, last_seq(session_history, session_id)),
                window=self.resume_window,
            )
            self._sessions[session_id] = conversation
        if conversation.state is _ORPHANED:
            conversation.move(SessionState.ACTIVE)
            conversation.orphan_deadline = None
        # The stored history may hold what another instance (or this one before
        # a restart) stored: a message sent again is found there too.
        conversation.remember_client_ids(session_history)
        conversation.devices[device] = None
        self._of_device[device] = conversation
        self._by_user.setdefault(user_id, {})[device] = None
        return conversation

    def open(
        self, device: Device, snapshot: StartSnapshot, *, resume_from: int | None = None
    ) -> Opened:
        """Start or join: attach ``device`` to the session ``snapshot`` opened
        (:meth:`SessionService.start`) and, when it asks to resume from
        ``resume_from``, plan what it missed. ``Conflict`` for another user's."""
        session = snapshot.session
        conversation = self.join(
            device,
            session_id=session.id,
            user_id=session.user_id,
            session_history=snapshot.session_history,
        )
        conversation.durable_seq = max(conversation.durable_seq, snapshot.durable_seq)
        if resume_from is None:
            return Opened(conversation)
        plan, in_flight = self.resume(conversation, snapshot.session_history, resume_from)
        return Opened(conversation, plan, in_flight)

    def resume(
        self, conversation: Conversation, session_history: Iterable[Message], last_seen: int
    ) -> tuple[ResumePlan, InFlight | None]:
        """What a device that saw up to ``last_seen`` gets replayed, and the reply in flight."""
        plan = plan_resume(
            [*session_history, *(conversation.recent or ())],
            session_id=conversation.session_id,
            last_seen=last_seen,
            current=conversation.last_seq,
            window=self.resume_window,
        )
        return plan, conversation.in_flight()

    def leave(self, device: Device) -> Departure:
        """``device`` is gone; the last one to leave a session ends it."""
        conversation = self._of_device.pop(device, None)
        if conversation is None:
            return Departure(session_id=None)
        devices = self._by_user.get(conversation.user_id)
        if devices is not None:
            devices.pop(device, None)
            if not devices:
                del self._by_user[conversation.user_id]
        conversation.devices.pop(device, None)
        session_id = conversation.session_id
        if conversation.devices or conversation.state is not SessionState.ACTIVE:
            return Departure(session_id=session_id)
        # Closed without ``end``: the session ends, and a resume re-activates it.
        reply = conversation.reply
        if reply is None or not reply.streaming:
            self._release(conversation)
            return Departure(session_id=session_id, end_session=True)
        conversation.move(SessionState.ORPHANED)
        deadline = self.clock.monotonic() + max(0.0, self.orphan_grace)
        conversation.orphan_deadline = deadline
        if self.orphan_grace <= 0:
            self.orphan_deadline(conversation)
            return Departure(session_id=session_id, end_session=True)
        return Departure(session_id=session_id, end_session=True, orphan_deadline=deadline)

    def orphan_deadline(self, conversation: Conversation) -> None:
        """The glue's timer for :attr:`Departure.orphan_deadline` fired: if nobody
        came back for the reply, store what was sent and cut it."""
        deadline = conversation.orphan_deadline
        if conversation.state is not SessionState.ORPHANED or deadline is None:
            return
        if self.clock.monotonic() < deadline:
            return  # an earlier timer of a session that was resumed and left again
        conversation.orphan_deadline = None
        self._cut(conversation, reason="disconnected", push_context=False)
        self._release(conversation)

    def _release(self, conversation: Conversation) -> None:
        conversation.move(SessionState.RELEASED)
        self._forget(conversation)

    def _forget(self, conversation: Conversation) -> None:
        if self._sessions.get(conversation.session_id) is conversation:
            del self._sessions[conversation.session_id]

    # -- messages ----------------------------------------------------------------------

    def _append(
        self,
        conversation: Conversation,
        role: Role,
        content: str,
        *,
        interrupted: bool = False,
        client_id: str | None = None,
    ) -> Message:
        """Store a message with the session's next sequence number (may raise BacklogFull)."""
        seq = conversation.last_seq + 1
        message = self.service.record_message(
            conversation.user_id,
            conversation.session_id,
            role=role,
            content=content,
            seq=seq,
            interrupted=interrupted,
            client_id=client_id,
        )
        if client_id is not None:
            conversation.remember_client_ids((message,))
        conversation.last_seq = seq
        # The session's last seq, for a device that joins it once it is released.
        seqs = self._seqs
        seqs[conversation.session_id] = (conversation.user_id, seq)
        seqs.move_to_end(conversation.session_id)
        if len(seqs) > _REMEMBERED_SESSIONS:
            seqs.popitem(last=False)
        recent = conversation.recent  # Conversation.remember, inlined: two a message
        if recent is None:
            conversation.remember(message)
        else:
            recent.append(message)
        return message

    def _append_reply(
        self, conversation: Conversation, reply: Reply, content: str, *, interrupted: bool
    ) -> Message | None:
        try:
            return self._append(conversation, _ASSISTANT, content, interrupted=interrupted)
        except BacklogFull:
            logger.warning(
                "write backlog full: reply %s of session %s not stored",
                reply.id,
                conversation.session_id,
            )
            return None

    def user_message(self, device: Device, text: str, *, client_id: str | None = None) -> Message:
        """One turn: a user message from ``device`` cuts the reply in flight, is
        stored and acknowledged, reaches the user's other devices, and the
        reply to it starts. :class:`BacklogFull` when it could not be stored.

        A ``client_id`` this session already stored a message with (a client
        re-sending after a reconnect) changes nothing: the sender gets the
        original ``ack`` again, marked duplicate, and no second reply.
        """
        conversation = self.conversation_of(device)
        if client_id is not None and conversation.client_ids is not None:
            original = conversation.client_ids.get(client_id)
            if original is not None:
                # Written again (merged by id, so at most once in the store):
                # what a client re-sends is what it was not told is durable.
                self.service.record_again(conversation.user_id, original)
                self.fanout.send([device], Acked(original, client_id, duplicate=True))
                return original
        if conversation.reply is not None:  # without a reply_id, _cut has nothing else to do
            self._cut(conversation, reason="new_message")
        message = self._append(conversation, _USER, text, client_id=client_id)
        self.fanout.send([device], Acked(message, client_id))
        if len(self._by_user.get(conversation.user_id, ())) > 1:  # another device
            others = self._user_devices(conversation.user_id, skip=device)
            if others:
                self.fanout.send(others, MessageStored(message))
        self._start_reply(conversation, message)
        return message

    # -- replies -----------------------------------------------------------------------

    def _start_reply(self, conversation: Conversation, prompt: Message) -> None:
        interruption, conversation.pending_interruption = conversation.pending_interruption, None
        reply = Reply(
            id=new_reply_id(),
            session_id=conversation.session_id,
            user_id=conversation.user_id,
            prompt=prompt,
            interruption=interruption,
        )
        conversation.reply = reply
        if conversation.devices:  # _broadcast, inlined here and for chunks and the end
            self.fanout.send(list(conversation.devices), ReplyStarted(reply.id, prompt.seq))
        # Last: the runner may stream (and end) the whole reply before it returns.
        self.runner.start(reply)

    def _reply_conversation(self, reply: Reply) -> Conversation | None:
        conversation = self._sessions.get(reply.session_id)
        if conversation is None or conversation.reply is not reply:
            return None
        return conversation

    def reply_chunk(self, reply: Reply, chunk: str) -> bool:
        """The responder produced ``chunk``; False when the reply is over (cut,
        or now past the size limit) and the responder should stop."""
        if reply.state is not _STREAMING:
            return False
        # _reply_conversation, inlined: once per chunk.
        conversation = self._sessions.get(reply.session_id)
        if conversation is None or conversation.reply is not reply:
            return False
        room = self.max_reply_chars - reply.size
        if len(chunk) > room:
            # A reply is one history entry: keep it far below the document limit.
            logger.warning("reply %s cut at %d characters", reply.id, self.max_reply_chars)
            self._add_chunk(conversation, reply, chunk[:room])
            self._finish(conversation, reply, complete=False)
            return False
        self._add_chunk(conversation, reply, chunk)
        return True

    def _add_chunk(self, conversation: Conversation, reply: Reply, chunk: str) -> None:
        if chunk:
            reply.chunks.append(chunk)
            reply.size += len(chunk)
            if conversation.devices:
                self.fanout.send(
                    list(conversation.devices), ReplyChunk(reply.id, len(reply.chunks) - 1, chunk)
                )

    def reply_done(self, reply: Reply, *, complete: bool) -> None:
        """The responder ended (``complete=False``: it failed); no-op once cut."""
        if reply.state is not _STREAMING:
            return
        conversation = self._sessions.get(reply.session_id)  # _reply_conversation
        if conversation is not None and conversation.reply is reply:
            self._finish(conversation, reply, complete=complete)

    def _finish(self, conversation: Conversation, reply: Reply, *, complete: bool) -> None:
        reply.move(_FINISHED)
        text = "".join(reply.chunks)
        message = (
            self._append_reply(conversation, reply, text, interrupted=not complete)
            if text
            else None
        )
        reply.message = message
        conversation.reply = None
        conversation.last_reply = reply
        if conversation.devices:
            self.fanout.send(
                list(conversation.devices), ReplyEnded(reply.id, message, text, complete)
            )
        if message is not None:
            self._tell_other_sessions(conversation, message)
        if conversation.state is _ORPHANED:
            conversation.orphan_deadline = None
            self._release(conversation)

    def _tell_other_sessions(self, conversation: Conversation, message: Message) -> None:
        if len(self._by_user.get(conversation.user_id, ())) <= len(conversation.devices):
            return  # every device of the user is on this session
        others = self._user_devices(conversation.user_id, skip_session=conversation.session_id)
        if others:
            self.fanout.send(others, MessageStored(message))

    def reply_failed(self, reply: Reply) -> None:
        """A bug ended the reply's task (not a responder failure: those end the
        reply incomplete): the session's devices are disconnected."""
        if not reply.streaming:
            return
        reply.move(ReplyState.CANCELLED)
        conversation = self._reply_conversation(reply)
        if conversation is None:
            return
        conversation.reply = None
        if conversation.devices:
            self.fanout.disconnect(list(conversation.devices), Disconnect.FAILED)
        if conversation.state is _ORPHANED:
            self._release(conversation)

    # -- barge-in ----------------------------------------------------------------------

    def interrupt(
        self,
        device: Device,
        *,
        reason: str,
        heard_chars: int | None = None,
        heard_text: str | None = None,
        reply_id: str | None = None,
    ) -> bool:
        """Barge-in from ``device``: cut the reply being streamed (or amend what
        was heard of the last one). False when there was nothing to interrupt."""
        return self._cut(
            self.conversation_of(device),
            reason=reason,
            heard_chars=heard_chars,
            heard_text=heard_text,
            reply_id=reply_id,
        )

    def _cut(
        self,
        conversation: Conversation,
        *,
        reason: str,
        heard_chars: int | None = None,
        heard_text: str | None = None,
        reply_id: str | None = None,
        push_context: bool = True,
    ) -> bool:
        """The stored assistant message holds exactly what the user heard, marked
        ``interrupted``; the interruption is pushed for the next reply."""
        reply = conversation.reply
        if reply is not None and reply_id in (None, reply.id):
            reply.move(ReplyState.INTERRUPTED)
            conversation.reply = None
            self.runner.cancel(reply)
            sent = reply.text
            heard = heard_part(sent, heard_chars=heard_chars, heard_text=heard_text)
            message: Message | None = None
            if sent:
                message = self._append_reply(conversation, reply, heard, interrupted=True)
                if push_context:
                    self._push(conversation, reason, heard, sent[len(heard) :], message)
            reply.message = message
            conversation.last_reply = reply
            self._broadcast(
                conversation, ReplyInterrupted(reply.id, heard, message, reason, late=False)
            )
            if message is not None:
                self._tell_other_sessions(conversation, message)
            return True
        last = conversation.last_reply
        if reply_id is not None and last is not None and last.id == reply_id and last.message:
            # The text was all sent but the client was still playing it: the
            # stored message stays whole; the next reply learns what was missed.
            full = last.text
            heard = heard_part(full, heard_chars=heard_chars, heard_text=heard_text)
            if push_context:
                self._push(conversation, reason, heard, full[len(heard) :], last.message)
            self._broadcast(
                conversation, ReplyInterrupted(last.id, heard, last.message, reason, late=True)
            )
            return True
        return False

    def _push(
        self,
        conversation: Conversation,
        reason: str,
        heard: str,
        cut: str,
        message: Message | None,
    ) -> None:
        interruption = Interruption(
            session_id=conversation.session_id,
            user_id=conversation.user_id,
            at=self.clock.now(),
            reason=reason,
            heard=heard,
            cut=cut,
            message_id=message.id if message is not None else None,
        )
        conversation.pending_interruption = interruption
        self.service.push_interruption(interruption)

    # -- the live side of the use cases (samvad.service.LiveSessions) ------------------

    def owner(self, session_id: str) -> str | None:
        """The user of the live session ``session_id``, if there is one."""
        conversation = self._sessions.get(session_id)
        return conversation.user_id if conversation is not None else None

    def end(self, session_id: str) -> None:
        """End the live session for every device attached: the reply is cut
        (stored as heard), each device is told and disconnected."""
        conversation = self._sessions.get(session_id)
        if conversation is None:
            return
        self._cut(conversation, reason="session_end", push_context=False)
        conversation.move(SessionState.ENDED)
        conversation.orphan_deadline = None
        self._forget(conversation)
        devices = list(conversation.devices)
        if devices:
            self.fanout.send(devices, SessionEnded(session_id))
            self.fanout.disconnect(devices, Disconnect.ENDED)

    def erase_session(self, session_id: str) -> None:
        """The session was erased: cancel its reply without storing or sending
        it, forget what a resume would replay, disconnect its devices."""
        self._seqs.pop(session_id, None)
        conversation = self._sessions.get(session_id)
        if conversation is None:
            return
        conversation.move(SessionState.ERASED)
        conversation.orphan_deadline = None
        self._forget(conversation)
        reply = conversation.reply
        if reply is not None:
            reply.move(ReplyState.CANCELLED)
            conversation.reply = None
            self.runner.cancel(reply)
        conversation.pending_interruption = None
        conversation.recent = None
        conversation.last_reply = None
        if conversation.devices:
            self.fanout.disconnect(list(conversation.devices), Disconnect.ERASED)
        logger.info("live session %s erased", session_id)

    def erase_user(self, user_id: str) -> None:
        """The user was erased: :meth:`erase_session` for each of their live sessions."""
        for session_id in [s for s, c in self._sessions.items() if c.user_id == user_id]:
            self.erase_session(session_id)
        for session_id in [s for s, (owner, _) in self._seqs.items() if owner == user_id]:
            del self._seqs[session_id]

    def durable(self, session_id: str, seq: int) -> None:
        """Every message of ``session_id`` up to ``seq`` is in the store: tell its
        devices, unless they know already (or the session is not live here)."""
        conversation = self._sessions.get(session_id)
        if conversation is None:
            return
        # Never past what this session numbered (a late write of an erased
        # session's messages under the same id must not speak for the new one).
        seq = min(seq, conversation.last_seq)
        if seq <= conversation.durable_seq:
            return
        conversation.durable_seq = seq
        self._broadcast(conversation, Durable(session_id, seq))

    def state_changed(self, state: UserState) -> None:
        """Every device of the user is told the new state."""
        devices = self._user_devices(state.user_id)
        if devices:
            self.fanout.send(devices, StateChanged(state))

    # -- shutdown ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Store every reply in flight as sent, marked interrupted (not a barge-in)."""
        for conversation in list(self._sessions.values()):
            conversation.orphan_deadline = None
            self._cut(conversation, reason="shutdown", push_context=False)
