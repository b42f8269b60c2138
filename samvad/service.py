"""The use cases: every operation on users and sessions, written once.

REST handlers (``samvad.web.rest``) and the WebSocket glue
(``samvad.web.realtime``) translate requests and frames into calls of
:class:`SessionService` and its results back into responses and frames; the
rules live here, not in the doors:

- **Who may act.** Every operation takes the caller's :class:`Principal`; a user
  may only act for themselves (:class:`Forbidden` otherwise), the service key and
  an anonymous caller (authentication off) for anyone.
- **Whose session it is.** A session belongs to the user who created it. Its
  owner is whoever holds its live channel, or else the ``userId`` of its stored
  document (:meth:`SessionService.session_owner`); :func:`ensure_owner` refuses
  with :class:`Conflict` to create, start, resume, join or append to a session of
  another user, on both doors alike.
- **Erasure ends what it erases.** Deleting a session or refreshing a user
  closes the live connections attached to it, cancels the reply in flight and
  drops the replay buffers and interruption stacks, before and after the stored
  data goes; a session id used again afterwards starts a fresh, empty session
  (the erased messages still in the owner's history are never replayed or
  counted as the new session's).
- **Ending a session** is one operation: REST ``PUT /end`` and the WebSocket
  ``end`` frame both cut the reply in flight, tell every device and close them
  (:meth:`LiveSessions.end`), drop the interruption context and mark the stored
  session ended.
- **Counting.** Every stored message and interruption, and every refusal by
  the per-user erasure limits, is reported to one :class:`ServiceObserver`,
  whichever door it came through.

The live side (connections, replies, replay buffers) is reached through the
:class:`LiveSessions` protocol defined here and implemented by the conversation
engine; this module imports nothing from the web layer. Nothing here awaits a
Firestore write: :class:`~samvad.persistence.Persistence` returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from samvad.clock import Clock
from samvad.config import Settings
from samvad.documents import PROFILES, STATE_SERVER_FIELDS
from samvad.errors import BacklogFull, Conflict, DataUnavailable, NotFound, RateLimited
from samvad.interruptions import Interruption, InterruptionStack
from samvad.lifecycle import effective_status, idle_cutoff, list_user_sessions
from samvad.logs import bind_log_context
from samvad.models import (
    Message,
    Mode,
    PersistenceStatus,
    Profile,
    Role,
    Session,
    SessionStatus,
    UserState,
)
from samvad.persistence import Persistence
from samvad.principal import Principal
from samvad.ratelimit import RateLimiter, RateLimits
from samvad.responder import ReplyContext
from samvad.stores.base import SessionCursor
from samvad.validation import check_merged
from samvad.writes import ProfileWrite, Write

__all__ = [
    "LiveSessions",
    "NoLiveSessions",
    "ServiceObserver",
    "SessionDeletion",
    "SessionService",
    "StartSnapshot",
    "Stats",
    "Transport",
    "UserEraser",
    "UserRefresh",
    "ensure_owner",
]

logger = logging.getLogger(__name__)

#: History messages handed to the responder with each user message.
REPLY_HISTORY = 20
#: Erased sessions whose earlier messages are remembered as not theirs any more.
_REMEMBERED_ERASURES = 100_000
#: Active sessions listed at most (``GET /user/{userId}/active``).
_ACTIVE_LISTED = 100


class Transport(StrEnum):
    """The door a use case was called through (a metrics label)."""

    REST = "rest"
    WEBSOCKET = "websocket"


# Read for every WebSocket message, under a module name: on Python 3.11 reading
# an attribute of an Enum class goes through the slow hook
# ``EnumType.__getattr__`` installs (see samvad.conversation._USER).
_WEBSOCKET = Transport.WEBSOCKET


def ensure_owner(owner: str | None, user_id: str, session_id: str) -> None:
    """The ownership rule: ``user_id`` may use ``session_id`` unless another user owns it.

    Raises :class:`Conflict`. Applied before a session is created, started,
    joined, resumed or appended to, and again where a live channel is joined
    (after any ``await``, so a race cannot slip past it).
    """
    if owner is not None and owner != user_id:
        raise Conflict(f"session {session_id} belongs to another user")


class LiveSessions(Protocol):
    """What the use cases need of the live side (the conversation engine)."""

    def owner(self, session_id: str) -> str | None:
        """The user whose live channel ``session_id`` is, or None without one."""
        ...

    def end(self, session_id: str) -> None:
        """End the live channel: cut the reply in flight (stored as heard), send
        ``ended`` to every device attached and close them normally."""
        ...

    def erase_session(self, session_id: str) -> None:
        """The session was erased: close its devices (4410), cancel its reply
        without storing it, and forget its replay buffer and sequence numbers."""
        ...

    def erase_user(self, user_id: str) -> None:
        """The user was erased: :meth:`erase_session` for each of their live channels."""
        ...

    def state_changed(self, state: UserState) -> None:
        """Tell every device of ``state.user_id`` the user's new state."""
        ...


class NoLiveSessions:
    """No live side (a process without WebSockets, a benchmark)."""

    def owner(self, session_id: str) -> str | None:
        return None

    def end(self, session_id: str) -> None:
        return None

    def erase_session(self, session_id: str) -> None:
        return None

    def erase_user(self, user_id: str) -> None:
        return None

    def state_changed(self, state: UserState) -> None:
        return None


class ServiceObserver(Protocol):
    """Where the use cases report what they counted (metrics)."""

    def message_stored(self, role: Role, transport: str) -> None:
        """One conversation message stored."""
        ...

    def interruption_pushed(self) -> None:
        """One interruption context pushed (a barge-in)."""
        ...

    def rate_limited(self, limit: str) -> None:
        """One request refused by the per-user limit ``limit``."""
        ...


class _Unobserved:
    def message_stored(self, role: Role, transport: str) -> None:
        return None

    def interruption_pushed(self) -> None:
        return None

    def rate_limited(self, limit: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class StartSnapshot:
    """What a ``start`` needs once the session is open: the session, the user's
    state and history, and the history messages that count as this session's."""

    session: Session
    state: UserState | None
    history: tuple[Message, ...]
    #: This session's messages in the history (erased ones left out): the
    #: sequence numbers go on after them, and a resume may replay them.
    session_history: tuple[Message, ...]
    #: Every message of the session up to this sequence number is in the
    #: store (0 when nothing is known to be: a memory store, an outage).
    durable_seq: int = 0
    #: False when the state or history was read without Firestore (memory-only
    #: mode): they hold only what this instance knows, and may lack the rest.
    history_complete: bool = True


@dataclass(frozen=True, slots=True)
class UserRefresh:
    """What refreshing (erasing) a user cleared."""

    user_state: bool
    user_profile: bool
    sessions: int
    interruptions: int


@dataclass(frozen=True, slots=True)
class SessionDeletion:
    """What deleting a session cleared."""

    session: bool
    interruptions: int


@dataclass(frozen=True, slots=True)
class Stats:
    """The global figures of ``GET /api/session/stats``."""

    active_users: int
    active_sessions: int
    total_profiles: int
    total_interruptions: int
    persisted_interruptions: int
    live_interruptions: int
    #: The store the counts come from, or ``memory`` (this process's caches).
    source: str
    persistence: PersistenceStatus


#: Erases what a layer above keeps of a user (see :meth:`SessionService.add_user_eraser`).
UserEraser = Callable[[str], Awaitable[object]]


class SessionService:
    """The use cases over :class:`Persistence` and the interruption stack.

    Construction does no I/O. The live side is attached with :meth:`bind_live`
    once the conversation engine exists (it needs this service too).
    """

    def __init__(
        self,
        persistence: Persistence,
        interruptions: InterruptionStack,
        *,
        settings: Settings | None = None,
        limits: RateLimits | None = None,
        observer: ServiceObserver | None = None,
        live: LiveSessions | None = None,
    ) -> None:
        self.persistence = persistence
        self.interruptions = interruptions
        self.settings = settings or persistence.settings
        # Built once: every state save checks the merged state against them.
        self._merge_bounds = self.settings.merge_bounds
        self.limits = limits
        self.observer: ServiceObserver = observer or _Unobserved()
        self.live: LiveSessions = live or NoLiveSessions()
        # Per erased session id, the ids of its messages still in the owner's
        # history: a session started again under that id does not inherit them.
        self._erased_messages: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._user_erasers: list[UserEraser] = []

    def bind_live(self, live: LiveSessions) -> None:
        """Reach the live side through ``live`` from now on."""
        self.live = live

    def add_user_eraser(self, eraser: UserEraser) -> None:
        """Also run ``eraser`` whenever a user is erased (``refresh``): data kept
        by a layer above, such as an agent framework's sessions
        (``samvad.adk``), goes with the user's conversation."""
        self._user_erasers.append(eraser)

    @property
    def clock(self) -> Clock:
        """The clock of the persistence layer (one clock for the whole core)."""
        return self.persistence.clock

    # -- rules -------------------------------------------------------------------

    @staticmethod
    def authorize(principal: Principal, user_id: str) -> str:
        """``user_id``, once ``principal`` is known to act for it (else :class:`Forbidden`)."""
        principal.require_user(user_id)
        bind_log_context(user_id=user_id)
        return user_id

    async def session_owner(
        self, session_id: str, *, known: bool = False
    ) -> tuple[str | None, Session | None]:
        """Who owns ``session_id`` — its live channel's user, else its stored
        document's — and the stored session.

        With ``known``, "nobody" must be an answer Firestore gave: a session
        neither live nor in memory while Firestore cannot be read is
        :class:`DataUnavailable` (for a use case whose answer depends on
        whether it exists). Without, such a session counts as new: creating
        it goes on in memory, and the store refuses the write later should
        the id turn out to be another user's (``FieldsWrite.takes_over``).
        """
        stored, complete = await self.persistence.read_session(session_id)
        # Read after the await: a live channel opened meanwhile counts.
        live_owner = self.live.owner(session_id)
        if live_owner is not None:
            return live_owner, stored
        if stored is None:
            if known:
                self._known(complete)
            return None, None
        return stored.user_id or None, stored

    def _known(self, complete: bool) -> None:
        """Refuse to answer from a view built without Firestore (:class:`DataUnavailable`):
        an answer from it could deny data that exists, or leave part of it out."""
        if not complete:
            raise DataUnavailable(
                "Firestore cannot be reached right now, so this cannot be read; try again shortly.",
                retry_after=self.persistence.retry_after(),
            )

    def _limit(self, limiter: RateLimiter | None, key: str) -> None:
        if limiter is None:
            return
        try:
            limiter.hit(key)
        except RateLimited:
            self.observer.rate_limited(limiter.name)
            raise

    def _check_merged_size(self, field: str, merged: Mapping[str, Any]) -> None:
        """Refuse a merge that would grow a stored object past the configured bounds
        (top-level keys, fields in all, bytes): the same rule for both doors."""
        check_merged(merged, field, self._merge_bounds)

    def _check_metadata(self, stored: Session | None, metadata: Mapping[str, Any] | None) -> None:
        """Refuse ``metadata`` that would grow the session's past the bounds once
        merged into it (a REST save and a WebSocket start alike)."""
        held = stored.metadata if stored is not None else {}
        self._check_merged_size("metadata", {**held, **(metadata or {})})

    # -- user state, profile and history ------------------------------------------

    async def save_state(
        self, principal: Principal, user_id: str, data: Mapping[str, Any]
    ) -> UserState:
        """Merge ``data`` into the user's state (server fields ignored); every
        live device of the user is told the new state."""
        self.authorize(principal, user_id)
        data = {k: v for k, v in data.items() if k not in STATE_SERVER_FIELDS}
        # From the cache without a lookup's coroutines when it holds the state:
        # a WebSocket state update saves it.
        held = self.persistence.held_state(user_id)
        current = held[0] if held is not None else await self.persistence.get_state(user_id)
        self._check_merged_size("state", {**(current.data if current else {}), **data})
        state = self.persistence.save_state(user_id, data)
        self.live.state_changed(state)
        return state

    async def get_state(self, principal: Principal, user_id: str) -> UserState:
        """The user's state; :class:`NotFound` when they have none."""
        self.authorize(principal, user_id)
        state, complete = await self.persistence.read_state(user_id)
        self._known(complete)
        if state is None:
            raise NotFound("User state not found")
        return state

    async def get_profile(self, principal: Principal, user_id: str) -> Profile:
        """The user's profile with its bounded history; :class:`NotFound` without one."""
        self.authorize(principal, user_id)
        profile, complete = await self.persistence.read_profile(user_id)
        self._known(complete)
        if profile is None:
            raise NotFound("User profile not found")
        return profile

    async def recent_history(
        self, principal: Principal, user_id: str, limit: int
    ) -> tuple[tuple[Message, ...], int]:
        """The last ``limit`` messages, oldest first, and the length of the whole history."""
        self.authorize(principal, user_id)
        profile, complete = await self.persistence.read_profile(user_id)
        self._known(complete)
        history = profile.history if profile is not None else ()
        return history[-limit:], len(history)

    async def set_preferences(
        self, principal: Principal, user_id: str, preferences: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge ``preferences`` key by key; returns the merged preferences
        (:class:`DataUnavailable` when the stored ones cannot be read)."""
        self.authorize(principal, user_id)
        profile, complete = await self.persistence.read_profile(user_id)
        self._known(complete)
        merged = {**(profile.preferences if profile else {}), **preferences}
        self._check_merged_size("preferences", merged)
        self.persistence.set_preferences(user_id, preferences)
        return merged

    async def append_message(
        self,
        principal: Principal,
        user_id: str,
        *,
        role: Role,
        content: str,
        session_id: str | None = None,
    ) -> Message:
        """Append one message to the user's history (``POST /history``).

        With a ``session_id`` of another user: :class:`Conflict`.
        """
        self.authorize(principal, user_id)
        session: Session | None = None
        if session_id is not None:
            owner, session = await self.session_owner(session_id)
            ensure_owner(owner, user_id, session_id)
        message = self.persistence.append_message(
            user_id, role=role, content=content, session_id=session_id
        )
        self.observer.message_stored(role, Transport.REST)
        if session is not None and session_id is not None:
            # Activity only; the message is in, so a full backlog must not fail the call.
            await self.touch_session(session_id)
        return message

    # -- sessions -----------------------------------------------------------------

    async def create_session(
        self,
        principal: Principal,
        *,
        session_id: str,
        user_id: str,
        language: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create a session, or update and re-activate one of the same user."""
        self.authorize(principal, user_id)
        bind_log_context(session_id=session_id)
        owner, existing = await self.session_owner(session_id)
        ensure_owner(owner, user_id, session_id)
        self._check_metadata(existing, metadata)
        return await self.persistence.save_session(
            session_id, user_id=user_id, language=language, metadata=metadata
        )

    async def get_session(
        self, principal: Principal, session_id: str
    ) -> tuple[Session, SessionStatus]:
        """A session and its effective status (``abandoned`` once idle too long)."""
        session, complete = await self.persistence.read_session(session_id)
        self._known(complete)
        if session is None:
            raise NotFound("Session not found")
        self.authorize(principal, session.user_id)
        return session, effective_status(session, idle_cutoff(self.persistence))

    async def end_session(
        self, principal: Principal, session_id: str, *, user_id: str | None = None
    ) -> Session:
        """End a session, stored and live alike (REST ``PUT /end``, WebSocket ``end``).

        ``user_id``: the user the caller acts as (a live connection's), who must
        still own the session (:func:`ensure_owner`) when the end takes effect.
        """
        owner, _ = await self.session_owner(session_id, known=True)
        if owner is None:
            raise NotFound("Session not found")
        self.authorize(principal, owner)
        if user_id is not None:
            ensure_owner(owner, user_id, session_id)
        self.live.end(session_id)
        # The interruption context only serves the next reply of a live session.
        self.interruptions.forget_context(session_id)
        session = await self.persistence.end_session(session_id)
        if session is None:
            raise NotFound("Session not found")
        logger.info("session %s ended", session_id)
        return session

    async def session_left(self, session_id: str) -> None:
        """The last device left a live session without ``end``: the session ends
        (a resume re-activates it)."""
        with contextlib.suppress(BacklogFull):
            await self.persistence.end_session(session_id)

    async def touch_session(self, session_id: str) -> None:
        """Record activity on a session (lazily flushed; a full backlog is no error)."""
        # Not contextlib.suppress (0.27 µs against 0.01, ``timeit``): a
        # message touches its session.
        try:  # noqa: SIM105
            await self.persistence.touch_session(session_id)
        except BacklogFull:
            pass

    async def active_sessions(self, principal: Principal, user_id: str) -> list[Session]:
        """The user's sessions that are active (not idle past the time-out), newest first."""
        self.authorize(principal, user_id)
        cutoff = idle_cutoff(self.persistence)
        page = await self.persistence.list_sessions(
            user_id, status=SessionStatus.ACTIVE, limit=_ACTIVE_LISTED
        )
        self._known(page.complete)
        return [s for s in page.sessions if effective_status(s, cutoff) is SessionStatus.ACTIVE]

    async def list_sessions(
        self,
        principal: Principal,
        user_id: str,
        *,
        status: SessionStatus | None,
        limit: int,
        cursor: SessionCursor | None,
    ) -> tuple[list[tuple[Session, SessionStatus]], str | None]:
        """One page of the user's sessions with their effective status, and the next cursor."""
        self.authorize(principal, user_id)
        sessions, next_cursor, complete = await list_user_sessions(
            self.persistence, user_id, status=status, limit=limit, cursor=cursor
        )
        self._known(complete)
        cutoff = idle_cutoff(self.persistence)
        return [(s, effective_status(s, cutoff)) for s in sessions], next_cursor

    # -- erasure --------------------------------------------------------------------

    async def refresh_user(self, principal: Principal, user_id: str) -> UserRefresh:
        """Erase everything of a user: stored data, pending writes, live sessions."""
        self.authorize(principal, user_id)
        self._limit(self.limits.refresh if self.limits else None, user_id)
        # Live first, so nothing is appended while the erase reads; and again
        # after, for a session started while it did.
        self.live.erase_user(user_id)
        erased = await self.persistence.erase_user(user_id)
        for eraser in self._user_erasers:
            await eraser(user_id)
        interruptions = self.interruptions.clear_user(user_id)
        self.live.erase_user(user_id)
        return UserRefresh(
            user_state=erased.user_state,
            user_profile=erased.user_profile,
            sessions=erased.sessions,
            interruptions=interruptions,
        )

    async def delete_session(self, principal: Principal, session_id: str) -> SessionDeletion:
        """Erase one session: its document, interruptions and live channel."""
        owner, _ = await self.session_owner(session_id, known=True)
        if owner is None:
            # Only interruptions may be left of the session: they name its user.
            if self.interruptions.count(session_id) == 0:
                raise NotFound("Session not found")
            recent = self.interruptions.recent(session_id)
            owner = recent[-1].user_id if recent else None
        if owner is not None:
            self.authorize(principal, owner)
        elif principal.is_user:
            raise NotFound("Session not found")
        self._limit(self.limits.delete if self.limits else None, owner or session_id)
        if owner is not None:
            await self._forget_session_messages(owner, session_id)
        self.live.erase_session(session_id)
        erased = await self.persistence.erase_session(session_id)
        interruptions = self.interruptions.clear_session(session_id)
        self.live.erase_session(session_id)
        return SessionDeletion(session=erased.session, interruptions=interruptions)

    async def _forget_session_messages(self, owner: str, session_id: str) -> None:
        # The messages stay in the owner's history (as the original keeps
        # them); they just never count as a later session's of the same id.
        profile = await self.persistence.get_profile(owner)
        ids = frozenset(
            m.id for m in (profile.history if profile else ()) if m.session_id == session_id
        )
        earlier = self._erased_messages.pop(session_id, frozenset())
        self._erased_messages[session_id] = earlier | ids
        if len(self._erased_messages) > _REMEMBERED_ERASURES:
            self._erased_messages.popitem(last=False)

    # -- the live conversation ----------------------------------------------------

    async def start(
        self,
        principal: Principal,
        *,
        user_id: str,
        session_id: str,
        language: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> StartSnapshot:
        """Open (or re-open) ``session_id`` for a live connection of ``user_id``.

        The session is created or re-activated, and the snapshot a ``started``
        frame needs is read. The caller joins the live channel right after,
        applying :func:`ensure_owner` again at that point.
        """
        self.authorize(principal, user_id)
        bind_log_context(session_id=session_id)
        persistence = self.persistence
        # The three reads at once: a Firestore that answers slowly costs a
        # start one read's time, not three (each may take up to the deadline
        # before the queue switches to memory-only mode). The user's own
        # state and profile are read before the session's owner is known;
        # nothing of them leaves unless the session is theirs.
        owned, (state, state_complete), (profile, profile_complete) = await asyncio.gather(
            self.session_owner(session_id),
            persistence.read_state(user_id),
            persistence.read_profile(user_id),
        )
        owner, stored = owned
        ensure_owner(owner, user_id, session_id)
        if metadata:
            self._check_metadata(stored, metadata)
        session = await persistence.save_session(
            session_id, user_id=user_id, language=language, metadata=metadata
        )
        # Memory-only mode does not stop a start: it goes on with what this
        # instance holds, and says so (``historyIncomplete``).
        history = profile.history if profile is not None else ()
        erased = self._erased_messages.get(session_id, frozenset())
        ours = session_messages(history, session_id, erased)
        return StartSnapshot(
            session=session,
            state=state,
            history=history,
            session_history=ours,
            durable_seq=await self._durable_seq(
                user_id, session_id, ours, read_whole=profile_complete
            ),
            history_complete=state_complete and profile_complete,
        )

    async def _durable_seq(
        self, user_id: str, session_id: str, ours: tuple[Message, ...], *, read_whole: bool
    ) -> int:
        """The highest ``seq`` up to which every message of the session is in the store.

        Known only for a durable store whose profile view was read from it
        (``read_whole``: not during an outage; the read's own answer, not the
        cache's, which the change feed may have emptied since): the stored
        history's highest, below the oldest
        message of the session still waiting for the store. Messages heard from
        other instances (the change feed) that the store does not hold yet are
        adopted: written by this instance too (merged by id), since their
        instance may have died before writing them.
        """
        persistence = self.persistence
        key = (PROFILES, user_id)
        if not persistence.store.durable or not read_whole:
            return 0

        def of_session(writes: Iterable[Write]) -> list[Message]:
            return [
                message
                for write in writes
                if isinstance(write, ProfileWrite)
                for message in write.append
                if message.session_id == session_id and message.seq is not None
            ]

        heard = of_session(persistence.remote.writes(key))
        if heard:
            stored = await persistence.stored_message_ids(user_id)
            for message in heard:
                if stored is not None and message.id not in stored:
                    persistence.store_again(user_id, message)
            if stored is None:
                return 0  # the store cannot tell now: nothing is counted
        waiting = [m.seq for m in of_session(persistence.writes.pending_writes(key))]
        if waiting:
            return max(0, min(s for s in waiting if s is not None) - 1)
        return max((m.seq for m in ours if m.seq is not None), default=0)

    def record_message(
        self,
        user_id: str,
        session_id: str,
        *,
        role: Role,
        content: str,
        seq: int,
        interrupted: bool = False,
        client_id: str | None = None,
    ) -> Message:
        """Store one message of a live session with its sequence number (may raise
        :class:`BacklogFull`); ownership was settled when the session started."""
        message = self.persistence.append_message(
            user_id,
            role=role,
            content=content,
            session_id=session_id,
            interrupted=interrupted,
            seq=seq,
            client_id=client_id,
        )
        self.observer.message_stored(role, _WEBSOCKET)
        return message

    def record_again(self, user_id: str, message: Message) -> None:
        """A client sent ``message`` again (its ``clientId``): make sure the
        store gets it — this instance may have it only from another instance
        that died before writing it — without counting it twice (may raise
        :class:`BacklogFull`)."""
        self.persistence.store_again(user_id, message)

    def push_interruption(self, interruption: Interruption) -> None:
        """Keep a barge-in's context for the session's next reply (and log it,
        when interruptions are persisted)."""
        self.interruptions.push(interruption)
        self.observer.interruption_pushed()
        try:
            self.persistence.record_interruption(interruption)
        except BacklogFull:
            logger.warning(
                "write backlog full: interruption of %s not persisted", interruption.session_id
            )

    async def reply_context(
        self,
        user_id: str,
        session_id: str,
        *,
        message: str,
        interruption: Interruption | None,
    ) -> ReplyContext:
        """What the responder gets to answer ``message``."""
        persistence = self.persistence
        held = persistence.held_state(user_id)
        state = held[0] if held is not None else await persistence.get_state(user_id)
        history = persistence.held_history(user_id, REPLY_HISTORY)
        if history is None:
            history = await persistence.recent_history(user_id, REPLY_HISTORY)
        session = persistence.sessions.peek(session_id)
        return ReplyContext(
            user_id=user_id,
            session_id=session_id,
            message=message,
            history=history,
            state=dict(state.data) if state is not None else {},
            language=session.value.language if session is not None else None,
            interruption=interruption,
            interruptions=self.interruptions.recent(session_id),
        )

    # -- figures --------------------------------------------------------------------

    def status(self) -> PersistenceStatus:
        """The persistence mode and backlog."""
        return self.persistence.status()

    @property
    def mode(self) -> Mode:
        """Whether writes reach the store (``firestore``) or wait in memory."""
        return self.persistence.mode

    async def stats(self, principal: Principal) -> Stats:
        """Global counts (for the service key only, with authentication on)."""
        principal.require_service()
        persistence = self.persistence
        counts, from_store = await persistence.counts()
        live = self.interruptions.total
        if not from_store:
            # Memory figures: this process's caches and interruption stack.
            persisted, total = 0, live
        elif self.settings.persist_interruptions:
            # Every interruption is also logged to the store: the log (plus what
            # waits to be written) is the whole truth, the stack would count twice.
            persisted = counts.total_interruptions
            total = persisted + persistence.pending_interruptions()
        else:
            # The log is off: what it holds (from earlier runs) and the live stack
            # are disjoint, so the sum counts each interruption once.
            persisted, total = counts.total_interruptions, counts.total_interruptions + live
        return Stats(
            active_users=counts.active_users,
            active_sessions=counts.active_sessions,
            total_profiles=counts.total_profiles,
            total_interruptions=total,
            persisted_interruptions=persisted,
            live_interruptions=live,
            source=persistence.store.name if from_store else "memory",
            persistence=persistence.status(),
        )


def session_messages(
    messages: Iterable[Message], session_id: str, erased: frozenset[str] = frozenset()
) -> tuple[Message, ...]:
    """The messages of ``session_id`` among ``messages``, erased ones left out."""
    return tuple(m for m in messages if m.session_id == session_id and m.id not in erased)
