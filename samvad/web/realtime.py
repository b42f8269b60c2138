"""The WebSocket endpoint (``/ws``): asyncio glue around two sans-I/O cores.

:mod:`samvad.web.protocol` parses and checks frames and keeps each
connection's state; :mod:`samvad.conversation` runs the conversations
(sequence numbers, replies, barge-in, resume, who hears what); the use cases
(:mod:`samvad.service`) hold the rules and reach the store. This module only
moves frames and runs tasks:

- per connection, a reader task reads frames and turns them into calls
  (the ASGI handler's task waits for it), and one writer task drains a
  bounded send queue to the socket, so a client that reads slowly only fills
  its own queue (and is then closed with 1013) while everyone else goes on;
  ``reply.chunk`` frames still waiting in the queue merge, so a connection
  that is behind gets fewer, larger frames.
  When the server offers a synchronous write (``samvad serve``:
  :mod:`samvad.web.uvicorn_ws`) and no journal must be waited for, a frame
  with nothing queued before it is written at once by whoever made it, and
  the writer only drains a backlog;
- the idle and start deadlines are one timer per connection that checks when
  the last frame came, not a timeout around every read;
- the :class:`Hub` delivers the engine's events as frames (``FanOut``), runs
  each reply's responder as a supervised task (``ReplyRunner``; a
  ``task_free`` one at once, up to its first wait), and schedules the
  engine's orphan deadlines on the event loop.

Nothing here awaits a Firestore write. The protocol is documented in
``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from samvad.clock import to_iso
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
    Reply,
    ReplyChunk,
    ReplyEnded,
    ReplyInterrupted,
    ReplyStarted,
    SessionEnded,
    StateChanged,
)
from samvad.errors import (
    BacklogFull,
    Forbidden,
    IdleTimeout,
    NotFound,
    NothingToInterrupt,
    RateLimited,
    SamvadError,
    StartTimeout,
    Unauthorized,
)
from samvad.logs import bind_log_context
from samvad.models import Message
from samvad.persistence import new_id
from samvad.principal import ANONYMOUS, Principal
from samvad.responder import Responder, load_responder
from samvad.service import SessionService
from samvad.web.auth import TokenVerifier, authenticate_start
from samvad.web.metrics import Metrics
from samvad.web.protocol import (
    MAX_HISTORY_LIMIT,
    Close,
    CloseCode,
    ConnectionState,
    End,
    Frame,
    Interrupt,
    Ping,
    Received,
    Reject,
    ServerProtocol,
    Start,
    StateUpdate,
    UserMessage,
    ack_frame,
    durable_frame,
    encode,
    ended_frame,
    error_frame,
    interrupted_frame,
    merged_chunk_frame,
    message_frame,
    pong_frame,
    reply_chunk_frame,
    reply_end_frame,
    reply_start_frame,
    resume_frame,
    started_frame,
    state_frame,
)
from samvad.web.schemas import encode as encode_json
from samvad.web.uvicorn_ws import FLUSH, ON_TEXT, SEND_TEXT

__all__ = [
    "CLOSE_TIMEOUT",
    "DURABLE_INTERVAL",
    "SHUTDOWN_DEADLINE",
    "Connection",
    "Hub",
    "frame_of",
    "routes",
]

logger = logging.getLogger(__name__)

#: Seconds a close frame may take to go out before the connection is dropped.
CLOSE_TIMEOUT = 5.0
#: Seconds ``close_all`` waits for connection handlers at shutdown.
SHUTDOWN_DEADLINE = 10.0
#: ``Connection._seen`` while a frame is being handled: the idle and start
#: deadlines count only the time spent waiting for a frame.
_HANDLING = float("inf")


def _in_context(context: contextvars.Context, take: Callable[[str], bool]) -> Callable[[str], bool]:
    """``take`` run in ``context``: ``context.run(take, text)`` without a Python frame."""
    return functools.partial(context.run, take)  # type: ignore[call-arg]  # run(f, *args)


#: Seconds between two looks at a connection whose frame is handled past a deadline.
_WATCHDOG_POLL = 0.1
#: Fewest seconds between two rounds of ``durable`` frames (one per session each).
DURABLE_INTERVAL = 0.25

_ids = itertools.count(1)


#: Most characters of reply text merged into one queued ``reply.chunk`` frame.
MERGE_MAX_CHARS = 8192
#: Seconds a ``reply.chunk`` must have waited in a send queue before the next
#: chunks merge into it: the connection is behind. A burst a responder yields
#: at once to a connection that keeps up still goes out chunk by chunk.
MERGE_AFTER = 0.005


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    code: int
    reason: str


class _Chunk:
    """A ``reply.chunk`` waiting in one connection's send queue.

    Once it has waited ``MERGE_AFTER`` seconds, the next chunks of the same
    reply merge into it: a connection that is behind gets one frame carrying
    chunks ``first..index``
    (``firstIndex`` on the wire) instead of one frame each, so its backlog, and
    the CPU spent writing it, stay small, and what follows (the next ``ack``)
    is not queued behind a long tail of words.
    """

    __slots__ = (
        "_first_text",
        "first",
        "index",
        "parts",
        "queued_at",
        "reply_id",
        "size",
        "text",
    )

    def __init__(self, event: ReplyChunk, text: str, queued_at: float) -> None:
        self.queued_at = queued_at
        self.reply_id = event.reply_id
        self.first = self.index = event.index
        self.parts: list[str] | None = None
        self.size = len(event.text)
        #: The frame as sent: the one encoded for every device until a merge.
        self.text: str | None = text
        self._first_text = event.text

    def merge(self, event: ReplyChunk) -> bool:
        """Take ``event`` in when it is the next chunk of this reply and fits."""
        if (
            event.reply_id != self.reply_id
            or event.index != self.index + 1
            or self.size + len(event.text) > MERGE_MAX_CHARS
        ):
            return False
        if self.parts is None:
            self.parts = [self._first_text]
        self.parts.append(event.text)
        self.index = event.index
        self.size += len(event.text)
        self.text = None
        return True

    def encoded(self) -> str:
        text = self.text
        if text is None:
            assert self.parts is not None
            text = self.text = encode(
                merged_chunk_frame(
                    self.reply_id,
                    first_index=self.first,
                    index=self.index,
                    text="".join(self.parts),
                )
            )
        return text


class _Urgent(str):
    """A queued frame (an ``ack``) that the writer hands to the socket, with
    what was queued after it, before it waits for anything: not held for the
    end of the loop's turn."""

    __slots__ = ()


_Outgoing = str | _Chunk | _CloseRequest


def _stored(event: MessageStored) -> Frame:
    return message_frame(event.message)


def _interrupted(event: ReplyInterrupted) -> Frame:
    return interrupted_frame(
        event.reply_id,
        heard=event.heard,
        message=event.message,
        reason=event.reason,
        late=event.late,
    )


def _state(event: StateChanged) -> Frame:
    return state_frame(event.state)


def _durable(event: Durable) -> Frame:
    return durable_frame(event.session_id, event.seq)


def _session_ended(event: SessionEnded) -> Frame:
    return ended_frame(event.session_id)


#: The frame of each kind of event: one dict lookup per event, not a chain of
#: ``isinstance`` (an event type is final: the engine makes exactly these).
_FRAMES: dict[type, Callable[[Any], Frame]] = {
    ReplyChunk: reply_chunk_frame,
    Acked: ack_frame,
    MessageStored: _stored,
    ReplyStarted: reply_start_frame,
    ReplyEnded: reply_end_frame,
    ReplyInterrupted: _interrupted,
    StateChanged: _state,
    Durable: _durable,
    SessionEnded: _session_ended,
}


def frame_of(event: Event) -> Frame:
    """The server frame (``docs/protocol.md``) that tells a device of ``event``."""
    return _FRAMES[type(event)](event)


class Connection:
    """One WebSocket: a reader (the connection's own task), a writer task and a
    bounded send queue.

    The reader and the writer speak the ASGI messages directly (Starlette's
    ``WebSocket`` only accepts, reads the headers and closes): each frame
    saves a layer of state checks both ways.
    """

    __slots__ = (
        "_aborted",
        "_deadline",
        "_direct",
        "_done",
        "_finished",
        "_flush_now",
        "_handoff",
        "_limit",
        "_loop_time",
        "_on_text",
        "_out",
        "_peer_gone",
        "_reading",
        "_receive",
        "_seen",
        "_send",
        "_send_now",
        "_stop_reading",
        "_supervised",
        "_touched",
        "_urgent",
        "_wakeup",
        "_watchdog",
        "_writer",
        "channel",
        "closing",
        "hub",
        "id",
        "principal",
        "proto",
        "user_id",
        "ws",
    )

    def __init__(
        self,
        hub: Hub,
        websocket: WebSocket,
        receive: Receive | None = None,
        send: Send | None = None,
    ) -> None:
        s = hub.settings
        self.hub = hub
        self.ws = websocket
        self._receive: Receive = receive or websocket.receive
        self._send: Send = send or websocket.send
        # The server's way to write a text frame without a coroutine, when it
        # offers one (``samvad serve`` does: samvad.web.uvicorn_ws).
        extensions = websocket.scope.get("extensions") or {}
        self._send_now: Callable[[str], bool] | None = extensions.get(SEND_TEXT)
        # And to hand what it wrote in this turn to the socket at once (after an ack).
        self._flush_now: Callable[[], None] | None = extensions.get(FLUSH)
        # And to hand it each text frame as it is read, while the read loop
        # waits (``_take_text``).
        self._on_text: Callable[[Callable[[str], bool] | None], None] | None = extensions.get(
            ON_TEXT
        )
        #: What ``_take_text`` left to the read loop with the frame it queued:
        #: the frame parsed (not a message), or what handling it raised.
        self._handoff: Received | Exception | None = None
        #: An urgent frame was written directly while a frame was handled.
        self._urgent = False
        # With it, and no journal to wait for, a frame with nothing queued
        # before it is written by whoever makes it (``send_text``,
        # ``send_chunk``): the writer task is woken only for a backlog, a
        # close, or a socket that is full.
        self._direct = self._send_now is not None and hub.service.persistence.journal is None
        self.id = f"c{next(_ids)}"
        self.proto = ServerProtocol(
            max_frame_bytes=s.ws_max_frame_bytes,
            rate=s.ws_rate_per_second,
            burst=s.ws_rate_burst,
            strikes=s.ws_rate_strikes,
            clock=hub.clock.monotonic,
        )
        # The send queue: frames encoded once for every device, chunks that
        # merge while they wait, and the close request last.
        self._out: list[_Outgoing] = []
        self._limit = s.ws_send_queue
        self._wakeup: asyncio.Future[None] | None = None
        self.user_id: str | None = None
        #: Who started the session on this connection (set by ``start``).
        self.principal: Principal = ANONYMOUS
        #: The live session this connection joined (``start``).
        self.channel: Conversation | None = None
        self.closing: _CloseRequest | None = None
        self._finished: asyncio.Event | None = None  # made when someone waits
        self._done = False
        self._peer_gone = False
        self._aborted = False
        self._writer: asyncio.Task[None] | None = None
        #: The task running the read loop, while it reads; cancelled when the writer ends.
        self._reading: asyncio.Task[Any] | None = None
        self._stop_reading = False
        self._supervised: set[asyncio.Task[None]] | None = None
        # The idle and start deadlines: one timer per connection that checks
        # when the last frame came (``_seen``, loop time), not a timeout per frame.
        self._seen = 0.0
        self._loop_time: Callable[[], float] = time.monotonic
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._touched = float("-inf")

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id}>"

    @property
    def finished(self) -> asyncio.Event:
        """Set once the connection is closed and detached from the hub."""
        event = self._finished
        if event is None:
            event = self._finished = asyncio.Event()
            if self._done:
                event.set()
        return event

    def _finish(self) -> None:
        self._done = True
        if self._finished is not None:
            self._finished.set()

    # -- sending -------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        self.send_text(encode(frame))

    def send_text(self, text: str, *, urgent: bool = False) -> None:
        """Send a frame, after those queued; a full queue means the client
        reads too slowly: close it. An ``urgent`` frame (an ``ack``) goes to
        the socket once the frame that caused it is handled (with what that
        made too: the start of the reply), not at the end of the loop's turn."""
        # Written at once if the writer has nothing queued, is waiting for
        # more, and no journal must be waited for (the server's turn buffer
        # still sends it with what follows, in one write). Inline, here and in
        # send_chunk: four frames a message.
        send_now = self._send_now
        if (
            self._direct
            and not self._out
            and self._wakeup is not None
            and self.closing is None
            and send_now is not None
            and send_now(text)
        ):
            if urgent:
                self._urgent = True
        else:
            self._push(_Urgent(text) if urgent else text)

    def send_chunk(self, event: ReplyChunk, text: str) -> None:
        """Queue a ``reply.chunk`` (``text`` is its frame), merged into the
        previous one of the same reply when that one has waited long enough."""
        out = self._out
        send_now = self._send_now  # as send_text writes at once
        if (
            not out
            and self._direct
            and self._wakeup is not None
            and self.closing is None
            and send_now is not None
            and send_now(text)
        ):
            return  # nothing waits, so nothing merges: the connection keeps up
        now = self.hub.clock.monotonic()
        if out and self.closing is None:
            tail = out[-1]
            if (
                isinstance(tail, _Chunk)
                and now - tail.queued_at >= MERGE_AFTER
                and tail.merge(event)
            ):
                return
        self._push(_Chunk(event, text, now))

    def _push(self, item: _Outgoing) -> None:
        if self.closing is not None:
            return
        if len(self._out) >= self._limit:
            logger.warning("connection %s reads too slowly (send queue full): closing", self.id)
            self.closing = _CloseRequest(CloseCode.TRY_AGAIN_LATER, "send queue full")
            self._abort()
            return
        self._out.append(item)
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued (idempotent)."""
        if self.closing is not None:
            return
        self.closing = _CloseRequest(code, reason)
        if len(self._out) >= self._limit:
            self._abort()
            return
        self._out.append(self.closing)
        self._wake()

    def _abort(self) -> None:
        # The writer waits on a socket the client does not read; stop it, and
        # let serve() try the close frame within a deadline.
        self._aborted = True
        if self._writer is not None:
            self._writer.cancel()

    async def _write_loop(self) -> None:
        out = self._out
        send = self._send
        send_now = self._send_now
        flush_now = self._flush_now
        persistence = self.hub.service.persistence
        loop = asyncio.get_running_loop()
        # Acknowledged means durable: no frame leaves before the journal has
        # every write submitted before it was queued. One wait covers every
        # frame queued when it began (``covered``, at the head of the queue).
        covered = 0
        # An urgent frame was written: hand it to the socket, with what was
        # queued after it, before waiting for anything.
        urgent = False
        while True:
            if not out:
                if urgent and flush_now is not None:
                    urgent = False
                    flush_now()
                wakeup = self._wakeup = loop.create_future()
                await wakeup
                continue
            if not covered and persistence.journal is not None:
                if urgent and flush_now is not None:
                    urgent = False
                    flush_now()
                covered = len(out)
                await persistence.durable()  # JournalUnavailable: close, send nothing more
            item = out.pop(0)
            if covered:
                covered -= 1
            try:
                if isinstance(item, _CloseRequest):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self.ws.close(int(item.code), item.reason)
                    return
                text = item if isinstance(item, str) else item.encoded()
                if send_now is None or not send_now(text):
                    await send({"type": "websocket.send", "text": text})
                if item.__class__ is _Urgent:
                    urgent = True
            except (WebSocketDisconnect, WebSocketDisconnected, OSError, TimeoutError):
                self._peer_gone = True
                return

    # -- receiving -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        settings = self.hub.settings
        loop = asyncio.get_running_loop()
        # ``start`` must come within ``ws_start_timeout`` of the connection,
        # however many other frames (pings) come before it: a connection that
        # never identifies itself does not hold a socket for long.
        self._seen = loop.time()
        self._deadline = self._seen + settings.ws_start_timeout
        self._arm_watchdog(loop)
        receive = self._receive
        on_text = self._on_text
        self._loop_time = loop.time
        try:
            while self.closing is None:
                if on_text is not None:
                    # Frames taken between two turns of this loop are handled
                    # in its context as it is now (the ids a start binds for
                    # the log lines), copied after each frame it handled.
                    on_text(_in_context(contextvars.copy_context(), self._take_text))
                self._seen = loop.time()
                message = await receive()
                self._seen = _HANDLING
                kind = message["type"]
                if kind == "websocket.disconnect":
                    self._peer_gone = True
                    return
                if kind != "websocket.receive":
                    continue
                try:
                    handoff = self._handoff
                    if handoff is None:
                        data = message.get("text")
                        if data is None:
                            data = message.get("bytes") or b""
                        received = self.proto.receive(data)
                    else:  # this frame, as _take_text left it
                        self._handoff = None
                        if isinstance(handoff, Exception):
                            raise handoff
                        received = handoff
                    if received.__class__ is UserMessage:
                        # Nearly every frame, handled here: without the two
                        # coroutines _dispatch and an async handler would make.
                        self.hub.count_frame(received)
                        touch = self._on_message(received, self.hub.clock.monotonic())
                        if touch is not None:
                            await self.hub.service.touch_session(touch)
                    else:
                        await self._dispatch(received)
                except (Unauthorized, Forbidden) as exc:
                    self.send(error_frame(exc.code, exc.message))
                    self.close(exc.close_code, exc.code)
                except SamvadError as exc:
                    self.send(error_frame(exc.code, exc.message))
                if self._urgent:
                    self._urgent = False
                    if self._flush_now is not None:
                        self._flush_now()
        finally:
            if on_text is not None:
                on_text(None)
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    def _take_text(self, text: str) -> bool:
        """A text frame the server read while the read loop waits for one
        (``ON_TEXT``, :mod:`samvad.web.uvicorn_ws`): a message is handled here
        and now, as the read loop would, without waking its task; True when
        it was. Anything else goes to the read loop (False, and the server
        queues the frame): a frame the loop is still handling the one before
        of, once closing, or when the session's touch is due (an ``await``);
        a frame that is not a message, parsed (its rate-limit token spent),
        or what handling it raised, is left in ``_handoff`` for the loop to
        take with it, so that it is parsed and answered once, in order."""
        if (
            self._seen == _HANDLING
            or self.closing is not None
            or self._handoff is not None
            or self._stop_reading
        ):
            return False
        hub = self.hub
        now = hub.clock.monotonic()
        if now - self._touched >= hub.settings.touch_interval:
            return False
        seen = self._seen
        self._seen = _HANDLING
        try:
            received = self.proto.receive(text)
            if received.__class__ is not UserMessage:
                self._handoff = received
                self._seen = seen
                return False
            hub.count_frame(received)
            self._on_message(received, now)  # no touch: not due at ``now``
        except Exception as exc:
            self._handoff = exc  # raised by the read loop, as if it had failed there
            self._seen = seen
            return False
        if self._urgent:
            self._urgent = False
            if self._flush_now is not None:
                self._flush_now()
        self._seen = self._loop_time()
        return True

    def _arm_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        idle = self.hub.settings.ws_idle_timeout
        due = self._seen + idle
        if self.channel is None:
            due = min(due, self._deadline)
        now = loop.time()
        if due <= now:  # a frame is being handled past a deadline: look again soon
            due = now + _WATCHDOG_POLL
        self._watchdog = loop.call_at(due, self._check_deadlines, loop)

    def _check_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog fired: close if the start or idle deadline passed, else re-arm."""
        self._watchdog = None
        if self.closing is not None:
            return
        now = loop.time()
        idle = self.hub.settings.ws_idle_timeout
        if self._seen == _HANDLING:
            self._arm_watchdog(loop)
            return
        if self.channel is None and now >= self._deadline:
            logger.info("connection %s sent no start frame in time: closing", self.id)
            self.send(error_frame(StartTimeout.code, "No start frame in time."))
        elif now >= self._seen + idle:
            logger.info("connection %s idle for %.0f s: closing", self.id, idle)
            self.send(error_frame(IdleTimeout.code, "No frame received in time."))
        else:
            self._arm_watchdog(loop)
            return
        self.close(CloseCode.IDLE_TIMEOUT, "idle timeout")

    async def _dispatch(self, received: Received) -> None:
        """Handle any frame but a message (:meth:`_read_loop` handles those)."""
        self.hub.count_frame(received)
        if isinstance(received, Reject):
            logger.debug("connection %s: frame rejected (%s)", self.id, received.error.code)
            self.send(error_frame(received.error.code, received.error.message))
        elif isinstance(received, Close):
            logger.info(
                "connection %s: closing with %d (%s)", self.id, received.code, received.error
            )
            self.send(error_frame(received.error, received.reason))
            self.close(received.code, received.reason)
        elif isinstance(received, Ping):
            self.send(pong_frame(received.ts, to_iso(self.hub.clock.now())))
        elif isinstance(received, Start):
            await self._on_start(received)
        elif isinstance(received, Interrupt):
            self._on_interrupt(received)
        elif isinstance(received, StateUpdate):
            await self._on_state(received)
        elif isinstance(received, End):
            channel = self._session()
            with contextlib.suppress(BacklogFull, NotFound):
                await self.hub.service.end_session(
                    self.principal, channel.session_id, user_id=channel.user_id
                )
            logger.info("session %s ended by its user %s", channel.session_id, channel.user_id)

    def _session(self) -> Conversation:
        channel = self.channel
        if channel is None:
            raise RuntimeError("Cannot handle a session frame before the session has started.")
        return channel

    async def _on_start(self, frame: Start) -> None:
        hub = self.hub
        principal = await hub.authenticate(frame, self.ws.headers)
        session_id = frame.session_id or new_id()
        bind_log_context(user_id=frame.user_id, session_id=session_id)
        snapshot = await hub.service.start(
            principal,
            user_id=frame.user_id,
            session_id=session_id,
            language=frame.language,
            metadata=frame.metadata,
        )
        if self.closing is not None or hub.closing:
            return
        # From here on nothing awaits: the snapshot below and the frames that
        # follow it reach this connection in order. Joining applies the
        # ownership rule again (another user's start may have won the race).
        opened = hub.engine.open(self, snapshot, resume_from=frame.resume_from)
        channel = self.channel = opened.conversation
        self.user_id = frame.user_id
        self.principal = principal
        self.proto.started()
        limit = min(frame.history_limit, MAX_HISTORY_LIMIT)
        history = snapshot.history
        self.send(
            started_frame(
                session_id=session_id,
                user_id=frame.user_id,
                mode=hub.service.mode.value,
                state=snapshot.state,
                history=history[-limit:] if limit else (),
                last_seq=channel.last_seq,
                resumed=frame.resume_from is not None,
                limits=hub.limits,
                history_incomplete=not snapshot.history_complete,
            )
        )
        if opened.resume is not None:
            in_flight = opened.in_flight
            self.send(
                resume_frame(
                    opened.resume,
                    last_seq=channel.last_seq,
                    in_flight=None
                    if in_flight is None
                    else {
                        "replyId": in_flight.reply_id,
                        "inReplyTo": in_flight.in_reply_to,
                        "text": in_flight.text,
                        "chunks": in_flight.chunks,
                    },
                )
            )
        if hub.durable_frames:
            # Before any ack: a client learns at once that it should keep its
            # messages until they are durable, and how far they are.
            self.send(durable_frame(session_id, channel.durable_seq))
        logger.info(
            "connection %s started session %s for user %s%s",
            self.id,
            session_id,
            frame.user_id,
            " (resume)" if frame.resume_from is not None else "",
        )

    def _on_message(self, frame: UserMessage, now: float) -> str | None:
        """Handle a message frame (``now``: the hub's monotonic clock); the
        session whose activity is now due to be written (``touch_session``),
        if it is."""
        if not frame.final:
            return None  # interim transcript: only the final one is a message
        channel = self._session()
        hub = self.hub
        hub.engine.user_message(self, frame.text, client_id=frame.client_id)
        # The session's activity is written lazily (``touch_interval``); one
        # touch per interval per connection says as much as one per message.
        if now - self._touched >= hub.settings.touch_interval:
            self._touched = now
            return channel.session_id
        return None

    def _on_interrupt(self, frame: Interrupt) -> None:
        done = self.hub.engine.interrupt(
            self,
            reason=frame.reason,
            heard_chars=frame.heard_chars,
            heard_text=frame.heard_text,
            reply_id=frame.reply_id,
        )
        if not done:
            self.send(error_frame(NothingToInterrupt.code, "No reply is being streamed."))

    async def _on_state(self, frame: StateUpdate) -> None:
        channel = self._session()
        # Every device of the user hears of it (the engine's state_changed).
        await self.hub.service.save_state(self.principal, channel.user_id, frame.state)

    # -- life cycle ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection until it closes, then detach it from the hub.

        The read loop runs in a task of its own, not in the caller's (the ASGI
        handler's): the caller's coroutine sits under twenty-odd frames of
        server, middleware and routing, and every frame that arrived would
        resume and suspend each of them (1.2 % of a message's instructions,
        ``bench/bench_ws_instructions.py``); the reader's task holds one. When
        the writer ends first (the close frame is out, or the peer is gone) it
        cancels the read; a cancellation of the caller reaches the reader
        through the ``await``.
        """
        try:
            await self.ws.accept()
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            self.proto.closed()
            self._finish()
            return
        if self.hub.metrics is not None:
            self.hub.metrics.ws_opened.inc()
        writer = self._writer = asyncio.create_task(self._write_loop(), name=f"ws-{self.id}-w")
        writer.add_done_callback(self._writer_done)
        reader = self._reading = asyncio.create_task(self._read_loop(), name=f"ws-{self.id}-r")
        try:
            try:
                await reader
            except asyncio.CancelledError:
                caller = asyncio.current_task()
                if not self._stop_reading or caller is None or caller.cancelling():
                    raise  # cancelled from outside (shutdown): not only by the writer
            except Exception as exc:
                # A bug handling a frame: this connection alone closes, with 1011.
                logger.error("connection %s: reader failed", self.id, exc_info=exc)
                if self.closing is None:
                    self.send(error_frame(SamvadError.code, "Internal error."))
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
            self._reading = None
            if not self._peer_gone and not writer.done():
                if self.closing is None:
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
                # Let the writer flush what is queued and send the close frame.
                await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT + 1)
        finally:
            self._reading = None
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._supervise(writer)
            self.proto.closed()
            await self.hub.detach(self)
            if self._aborted and not self._peer_gone:
                await self._close_frame_within_deadline()
            self._finish()

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        reading = self._reading
        if reading is not None and not self._stop_reading:
            self._stop_reading = True
            reading.cancel()

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if self._supervised is not None and task in self._supervised:
            return
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            if self._supervised is None:
                self._supervised = set()
            self._supervised.add(task)
            logger.error("connection %s: task %s failed", self.id, task.get_name(), exc_info=exc)
            if task is self._writer:
                self._aborted = True  # nothing drains the queue: send the close frame directly
            if self.closing is None:
                self.send(error_frame(SamvadError.code, "Internal error."))
                self.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _close_frame_within_deadline(self) -> None:
        request = self.closing or _CloseRequest(CloseCode.INTERNAL_ERROR, "internal error")
        with contextlib.suppress(
            WebSocketDisconnect, WebSocketDisconnected, OSError, TimeoutError, RuntimeError
        ):
            async with asyncio.timeout(1.0):
                await self.ws.close(int(request.code), request.reason)


class Hub:
    """The live WebSocket connections of this process, and the conversation
    engine's glue: it delivers the engine's events (``FanOut``), runs replies
    (``ReplyRunner``) and schedules its orphan deadlines."""

    def __init__(
        self,
        service: SessionService,
        *,
        settings: Settings,
        metrics: Metrics | None = None,
        verify_token: TokenVerifier | None = None,
        responder: Responder | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self._verify_token = verify_token
        self.clock = self.service.clock
        self.metrics = metrics
        self._frame_counters: dict[type, Any] = {}
        if self.metrics is not None:
            frames = self.metrics.ws_frames
            self._frame_counters = {
                kind: frames.labels(label)
                for kind, label in (
                    (Start, "start"),
                    (UserMessage, "message"),
                    (Interrupt, "interrupt"),
                    (StateUpdate, "state"),
                    (Ping, "ping"),
                    (End, "end"),
                    (Reject, "rejected"),
                    (Close, "refused"),
                )
            }
        #: Writes the assistant's replies; replaceable while running (tests do).
        self.responder: Responder = responder or load_responder(settings)
        self.closing = False
        self.engine = Engine(self.service, self, self, resume_window=self.settings.ws_resume_window)
        self._connections: dict[Connection, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._replies: dict[Reply, asyncio.Task[None]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed: asyncio.Future[None] | None = None
        #: ``durable`` frames are sent (the store is durable: not the memory store).
        self.durable_frames = self.service.persistence.store.durable
        self._durable_due: dict[str, int] = {}
        self._durable_timer: asyncio.TimerHandle | None = None
        self._durable_sent_at = float("-inf")
        s = self.settings
        self.limits = {
            "maxFrameBytes": s.ws_max_frame_bytes,
            "ratePerSecond": s.ws_rate_per_second,
            "rateBurst": s.ws_rate_burst,
            "idleTimeoutSeconds": s.ws_idle_timeout,
            "resumeWindow": s.ws_resume_window,
        }

    @property
    def orphan_grace(self) -> float:
        """Seconds a reply streams on with nobody connected (the engine's)."""
        return self.engine.orphan_grace

    @orphan_grace.setter
    def orphan_grace(self, seconds: float) -> None:
        self.engine.orphan_grace = seconds

    @property
    def max_reply_chars(self) -> int:
        """Longest reply in characters (the engine's)."""
        return self.engine.max_reply_chars

    @max_reply_chars.setter
    def max_reply_chars(self, chars: int) -> None:
        self.engine.max_reply_chars = chars

    # -- connections ---------------------------------------------------------------

    async def serve(
        self, websocket: WebSocket, receive: Receive | None = None, send: Send | None = None
    ) -> None:
        """Handle one WebSocket from handshake to close (``receive``/``send``:
        the ASGI callables under ``websocket``, for the frames)."""
        if self.closing:
            await websocket.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        connection = Connection(self, websocket, receive, send)
        self._connections[connection] = None
        try:
            await connection.serve()
        finally:
            self._connections.pop(connection, None)

    async def detach(self, connection: Connection) -> None:
        """Forget a closed connection; the last one to leave a session ends it."""
        self._connections.pop(connection, None)
        departure = self.engine.leave(connection)
        if departure.orphan_deadline is not None and connection.channel is not None:
            self._at(departure.orphan_deadline, self.engine.orphan_deadline, connection.channel)
        if departure.end_session and departure.session_id is not None:
            try:
                await self.service.session_left(departure.session_id)
            except SamvadError as exc:  # a full backlog, a journal that cannot write
                logger.warning(
                    "session %s: its end could not be recorded (%s)",
                    departure.session_id,
                    exc.code,
                )

    def _at(self, deadline: float, call: Callable[[Conversation], None], arg: Conversation) -> None:
        """Call ``call(arg)`` at the monotonic time ``deadline`` (the engine's clock)."""

        def fire() -> None:
            self._timers.discard(handle)
            call(arg)

        delay = max(0.0, deadline - self.clock.monotonic())
        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    async def authenticate(self, frame: Start, headers: Mapping[str, str]) -> Principal:
        """Who sent ``frame``: its token, or the upgrade's API key (anyone with auth off).

        Raises :class:`Unauthorized` for missing or invalid credentials; whether
        they may act for ``userId`` is the use case's rule (``Forbidden``).
        """
        return await authenticate_start(
            self.settings, self._verify_token, token=frame.token, headers=headers
        )

    # -- FanOut ----------------------------------------------------------------------

    def send(self, devices: Sequence[Device], event: Event) -> None:
        """Deliver ``event`` to ``devices`` as one frame, encoded once."""
        # frame_of and encode, inlined: 4 times a message.
        text = encode_json(_FRAMES[event.__class__](event)).decode()
        if event.__class__ is ReplyChunk:
            for device in devices:
                assert isinstance(device, Connection)
                device.send_chunk(event, text)
            return
        urgent = event.__class__ is Acked
        for device in devices:
            assert isinstance(device, Connection)
            device.send_text(text, urgent=urgent)

    def disconnect(self, devices: Sequence[Device], why: Disconnect) -> None:
        """Close ``devices`` after what is queued for them."""
        for device in devices:
            assert isinstance(device, Connection)
            if why is Disconnect.ENDED:
                if device.proto.state is ConnectionState.ACTIVE:
                    device.proto.ended()
                device.close(CloseCode.NORMAL, "session ended")
            elif why is Disconnect.ERASED:
                if device.proto.state is ConnectionState.ACTIVE:
                    device.proto.ended()
                device.close(CloseCode.SESSION_ERASED, "session erased")
            else:
                device.send(error_frame(SamvadError.code, "The reply failed."))
                device.close(CloseCode.INTERNAL_ERROR, "internal error")

    # -- ReplyRunner -------------------------------------------------------------------

    def start(self, reply: Reply) -> None:
        """Stream the responder's answer to ``reply`` as a supervised task.

        A responder that says it is ``task_free`` (:mod:`samvad.responder`)
        runs at once instead, in the caller, up to its first wait: with its
        chunks ready (and the reply context found in the caches) the reply ends
        without a task; one that has to wait goes on from there in a supervised
        task, as if it had been one from the start.
        """
        run = self._run_reply(reply)
        if not getattr(self.responder, "task_free", False):
            # It may bind what it does to its task (a timeout, a task group, a
            # cancel scope entered before a wait and left after it): a task
            # of its own from the start.
            self._replies[reply] = self.spawn(
                run,
                name=f"samvad-reply-{reply.id}",
                on_failure=lambda: self.engine.reply_failed(reply),
            )
            return
        try:
            waiting = run.send(None)
        except StopIteration:
            return
        except Exception as exc:
            run.close()
            logger.error("reply %s failed", reply.id, exc_info=exc)
            self.engine.reply_failed(reply)
            return
        task = self._replies[reply] = self.spawn(
            _go_on(run, waiting),
            name=f"samvad-reply-{reply.id}",
            on_failure=lambda: self.engine.reply_failed(reply),
        )
        task.add_done_callback(functools.partial(_cancel_unstarted, run))

    def cancel(self, reply: Reply) -> None:
        """Stop the responder of a reply the engine cut."""
        task = self._replies.pop(reply, None)
        if task is not None:
            task.cancel()

    async def _run_reply(self, reply: Reply) -> None:
        engine = self.engine
        try:
            context = await self.service.reply_context(
                reply.user_id,
                reply.session_id,
                message=reply.prompt.content,
                interruption=reply.interruption,
            )
            complete = True
            stream = self.responder.reply(context)
            try:
                async for chunk in stream:
                    if not engine.reply_chunk(reply, chunk):
                        return
            except Exception:
                logger.exception(
                    "responder failed on reply %s of session %s", reply.id, reply.session_id
                )
                complete = False
            finally:
                # An async generator run to its end has nothing to close (its
                # frame is gone): one awaitable fewer per reply.
                aclose: Callable[[], Awaitable[None]] | None = getattr(stream, "aclose", None)
                if aclose is not None and getattr(stream, "ag_frame", stream) is not None:
                    await aclose()
            engine.reply_done(reply, complete=complete)
        finally:
            self._replies.pop(reply, None)

    # -- metrics ---------------------------------------------------------------------

    def count_frame(self, received: Received) -> None:
        """One client frame handled (by kind); refused ones count as rate limited."""
        counter = self._frame_counters.get(type(received))
        if counter is None:
            return
        counter.inc()
        if isinstance(received, Reject):
            code: str = received.error.code
        elif isinstance(received, Close):
            code = received.error
        else:
            return
        if code == RateLimited.code and self.metrics is not None:
            self.metrics.rate_limited.labels("websocket").inc()

    # -- durable frames ------------------------------------------------------------------

    def messages_durable(self, messages: Sequence[Message]) -> None:
        """The write-behind's ``DurableObserver``: a profile write committed
        ``messages``. Their sessions' devices hear of it in the next round of
        ``durable`` frames (at most one round per ``DURABLE_INTERVAL``)."""
        if self.closing:
            return
        due = self._durable_due
        for message in messages:
            session_id, seq = message.session_id, message.seq
            if session_id is not None and seq is not None and seq > due.get(session_id, 0):
                due[session_id] = seq
        if due and self._durable_timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._durable_sent_at + DURABLE_INTERVAL - loop.time())
            self._durable_timer = loop.call_later(delay, self._send_durable)

    def _send_durable(self) -> None:
        self._durable_timer = None
        self._durable_sent_at = asyncio.get_running_loop().time()
        due, self._durable_due = self._durable_due, {}
        for session_id, seq in due.items():
            self.engine.durable(session_id, seq)

    # -- tasks -----------------------------------------------------------------------

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        *,
        name: str,
        on_failure: Callable[[], None],
    ) -> asyncio.Task[None]:
        """Run ``coro`` as a supervised task: a failure is logged and ``on_failure`` runs."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                logger.error("task %s failed", task.get_name(), exc_info=exc)
                on_failure()

        task.add_done_callback(done)
        return task

    # -- figures and shutdown ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Live connections, users and sessions (for stats)."""
        users, sessions = self.engine.counts()
        return {"connections": len(self._connections), "users": users, "sessions": sessions}

    def connections_of(self, user_id: str) -> tuple[Connection, ...]:
        """The live connections of a user, oldest first."""
        return tuple(c for c in self.engine.devices_of(user_id) if isinstance(c, Connection))

    async def close_all(self, *, code: int = 1001, reason: str = "server shutting down") -> None:
        """Close every connection (at shutdown) and wait for their handlers.

        Runs once: ``samvad serve`` calls it as soon as a signal arrives (uvicorn
        waits for open connections before the lifespan ends), the lifespan calls
        it again for other servers; a later call awaits the first.
        """
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close_all(code, reason))
        await asyncio.shield(self._closed)

    async def _close_all(self, code: int, reason: str) -> None:
        self.closing = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._durable_timer is not None:
            self._durable_timer.cancel()
            self._durable_timer = None
        # What was sent is stored, marked interrupted; not a barge-in.
        self.engine.shutdown()
        connections = list(self._connections)
        for connection in connections:
            connection.close(code, reason)
        waiters = [asyncio.ensure_future(c.finished.wait()) for c in connections]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=SHUTDOWN_DEADLINE)
            for waiter in pending:
                waiter.cancel()
            if pending:
                logger.warning("%d WebSocket handlers did not finish in time", len(pending))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _go_on(run: Coroutine[Any, Any, None], waiting: Any) -> None:
    """The rest of ``run``, a coroutine started by hand (``run.send(None)``)
    that suspended on ``waiting`` (what a coroutine yields to its task: a
    future, or None to let the loop go round once).

    Run as a task, it hands the task ``waiting`` as ``run`` itself would have,
    then delegates to ``run``: the task waits on the same future, a
    cancellation reaches ``run`` the same way (the future is cancelled, or the
    ``CancelledError`` is thrown in), and ``run`` goes on as in a task of its own.
    """
    await _resumed(run, waiting)


def _cancel_unstarted(run: Coroutine[Any, Any, None], task: asyncio.Task[None]) -> None:
    """Deliver a cancellation to ``run`` that its ``_go_on`` task never did.

    A task cancelled before its first step never starts its coroutine, so
    ``_go_on`` cannot pass the cancellation on: ``run`` would stay suspended
    where it waited (inside the responder's stream) until the collector
    closed it, and its ``finally`` would then find the stream still running
    (``aclose(): asynchronous generator is already running``). That happens
    when a reply is cut by a message read with the one that started it. Here
    ``run`` gets the ``CancelledError`` the task would have thrown in; what it
    still awaits on its way out runs in a task of its own, like this one.
    """
    if not task.cancelled() or inspect.getcoroutinestate(run) != inspect.CORO_SUSPENDED:
        return  # it ran (to its end or to the cancellation): nothing is left
    try:
        waiting = run.throw(asyncio.CancelledError())
    except (StopIteration, asyncio.CancelledError):
        return
    except Exception:
        logger.exception("a cancelled reply failed on its way out")
        return
    follow = asyncio.get_running_loop().create_task(_go_on(run, waiting))
    follow.add_done_callback(functools.partial(_cancel_unstarted, run))


@types.coroutine
def _resumed(run: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, None, None]:
    try:
        yield waiting
    except BaseException as exc:
        # Thrown into the task while it waited (a cancellation the future
        # could not take): ``run`` gets it where it waits.
        try:
            waiting = run.throw(exc)
        except StopIteration:
            return
        yield from _resumed(run, waiting)
        return
    yield from run


async def _endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    # An ASGI app, not a Starlette endpoint: the connection reads and writes
    # its frames with ``receive``/``send`` directly.
    websocket = WebSocket(scope, receive, send)
    hub: Hub = websocket.state.services.hub
    await hub.serve(websocket, receive, send)


class _Endpoint:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _endpoint(scope, receive, send)


def routes() -> list[BaseRoute]:
    """The WebSocket routes."""
    return [WebSocketRoute("/ws", _Endpoint(), name="ws")]
