"""The WebSocket endpoint (``/ws``): thin asyncio glue around :mod:`samvad.web.protocol`.

Per connection, one reader task turns frames into calls and one writer task
drains a bounded send queue to the socket, so a client that reads slowly only
fills its own queue (and is then closed with 1013) while everyone else goes on.
Per session, a :class:`SessionChannel` numbers messages, runs the streamed
reply as a supervised task and fans frames out to every device attached to
the session. Nothing here awaits a Firestore write: messages, sessions and
state go through :class:`samvad.persistence.Persistence`, whose writes return
at once. The protocol is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from samvad.clock import to_iso
from samvad.errors import BacklogFull, Forbidden, NotFound, SamvadError, Unauthorized
from samvad.interruptions import Interruption
from samvad.logs import bind_log_context
from samvad.models import Message, Role, UserState
from samvad.persistence import new_id
from samvad.principal import ANONYMOUS, Principal
from samvad.responder import Responder, load_responder
from samvad.service import ensure_owner
from samvad.web.auth import authenticate_start
from samvad.web.protocol import (
    MAX_HISTORY_LIMIT,
    Close,
    CloseCode,
    ConnectionState,
    End,
    ErrorCode,
    Interrupt,
    Ping,
    Received,
    Reject,
    ServerProtocol,
    Start,
    StateUpdate,
    UserMessage,
    ack_frame,
    encode,
    ended_frame,
    error_frame,
    heard_part,
    interrupted_frame,
    last_seq,
    message_frame,
    plan_resume,
    pong_frame,
    reply_chunk_frame,
    reply_end_frame,
    reply_start_frame,
    resume_frame,
    started_frame,
    state_frame,
)
from samvad.web.services import Services, services

logger = logging.getLogger(__name__)

#: Seconds a close frame may take to go out before the connection is dropped.
CLOSE_TIMEOUT = 5.0
#: Seconds ``close_all`` waits for connection handlers at shutdown.
SHUTDOWN_DEADLINE = 10.0
#: Seconds a reply goes on streaming (into the replay buffer, for a resume)
#: after the last device of its session disconnected; then it is cut.
ORPHAN_REPLY_GRACE = 30.0
#: Longest reply kept (characters); a responder going on beyond it is cut.
MAX_REPLY_CHARS = 16_384
#: History messages handed to the responder with each user message.
REPLY_HISTORY = 20
#: Sessions whose latest sequence number is remembered after their last connection left.
_REMEMBERED_SESSIONS = 100_000

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    code: int
    reason: str


@dataclass(slots=True, eq=False)
class _Reply:
    """One streamed assistant reply (mutable: it grows chunk by chunk)."""

    id: str
    in_reply_to: int | None
    chunks: list[str] = field(default_factory=list)
    size: int = 0
    task: asyncio.Task[None] | None = None
    finished: bool = False
    message: Message | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class SessionChannel:
    """One session's live side: its connections, sequence numbers and reply.

    Every method that changes what clients see runs without awaiting, so a
    frame broadcast here reaches every device of the session in one order.
    """

    def __init__(self, hub: Hub, *, session_id: str, user_id: str, seq: int) -> None:
        self.hub = hub
        self.session_id = session_id
        self.user_id = user_id
        self.last_seq = seq
        self.connections: dict[Connection, None] = {}
        self.recent: deque[Message] = deque(maxlen=max(1, hub.settings.ws_resume_window))
        self.reply: _Reply | None = None
        self.last_reply: _Reply | None = None
        self.pending_interruption: Interruption | None = None
        self.ended = False
        self.orphan_timer: asyncio.TimerHandle | None = None

    # -- fan-out ---------------------------------------------------------------

    def broadcast(self, frame: Mapping[str, Any]) -> None:
        text = encode(frame)
        for connection in list(self.connections):
            connection.send_text(text)

    # -- messages --------------------------------------------------------------

    def append(self, role: Role, content: str, *, interrupted: bool = False) -> Message:
        """Store a message with the session's next sequence number (may raise BacklogFull)."""
        seq = self.last_seq + 1
        message = self.hub.service.record_message(
            self.user_id,
            self.session_id,
            role=role,
            content=content,
            interrupted=interrupted,
            seq=seq,
        )
        self.last_seq = seq
        self.hub.remember_seq(self.session_id, self.user_id, seq)
        self.recent.append(message)
        return message

    def _append_reply(self, reply: _Reply, content: str, *, interrupted: bool) -> Message | None:
        try:
            return self.append(Role.ASSISTANT, content, interrupted=interrupted)
        except BacklogFull:
            logger.warning(
                "write backlog full: reply %s of session %s not stored", reply.id, self.session_id
            )
            return None

    def forget_messages(self) -> None:
        """Drop the resume buffer (after an erasure); sequence numbers go on."""
        self.recent.clear()
        self.last_reply = None

    # -- replies -----------------------------------------------------------------

    def in_flight(self) -> dict[str, Any] | None:
        """The reply being streamed, as a resuming client needs it."""
        reply = self.reply
        if reply is None:
            return None
        return {
            "replyId": reply.id,
            "inReplyTo": reply.in_reply_to,
            "text": reply.text,
            "chunks": len(reply.chunks),
        }

    def start_reply(self, user_message: Message) -> None:
        """Stream the responder's answer to ``user_message`` as a supervised task."""
        reply = _Reply(id=new_id(), in_reply_to=user_message.seq)
        self.reply = reply
        interruption, self.pending_interruption = self.pending_interruption, None
        self.broadcast(reply_start_frame(reply.id, in_reply_to=reply.in_reply_to))
        reply.task = self.hub.spawn(
            self._run_reply(reply, user_message, interruption),
            name=f"samvad-reply-{reply.id}",
            on_failure=self._reply_crashed,
        )

    async def _run_reply(
        self, reply: _Reply, user_message: Message, interruption: Interruption | None
    ) -> None:
        hub = self.hub
        context = await hub.service.reply_context(
            self.user_id, self.session_id, message=user_message.content, interruption=interruption
        )
        complete = True
        stream = hub.responder.reply(context)
        try:
            async for chunk in stream:
                if reply.finished:
                    return
                room = hub.max_reply_chars - reply.size
                if len(chunk) > room:
                    # A reply is one history entry: keep it far below the document limit.
                    logger.warning("reply %s cut at %d characters", reply.id, hub.max_reply_chars)
                    self._add_chunk(reply, chunk[:room])
                    complete = False
                    break
                self._add_chunk(reply, chunk)
        except Exception:
            logger.exception(
                "responder failed on reply %s of session %s", reply.id, self.session_id
            )
            complete = False
        finally:
            aclose: Callable[[], Awaitable[None]] | None = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if not reply.finished:
            self._finish_reply(reply, complete=complete)

    def _add_chunk(self, reply: _Reply, chunk: str) -> None:
        if chunk:
            reply.chunks.append(chunk)
            reply.size += len(chunk)
            self.broadcast(reply_chunk_frame(reply.id, index=len(reply.chunks) - 1, text=chunk))

    def _finish_reply(self, reply: _Reply, *, complete: bool) -> None:
        reply.finished = True
        text = reply.text
        message = self._append_reply(reply, text, interrupted=not complete) if text else None
        reply.message = message
        self.reply = None
        self.last_reply = reply
        self.broadcast(reply_end_frame(reply.id, message=message, text=text, complete=complete))
        if message is not None:
            self.hub.notify_user(self.user_id, message_frame(message), skip_session=self.session_id)
        self.hub.release_if_idle(self)

    def cut_orphan(self) -> None:
        """Nobody came back for the reply in time: store what was sent, cut."""
        self.orphan_timer = None
        if not self.connections:
            self.interrupt(reason="disconnected", push_context=False)
            self.hub.release_if_idle(self)

    def _reply_crashed(self) -> None:
        # A bug, not a responder failure (those end the reply as incomplete).
        if self.reply is not None:
            self.reply.finished = True
            self.reply = None
        for connection in list(self.connections):
            connection.send(error_frame(ErrorCode.INTERNAL_ERROR, "The reply failed."))
            connection.close(CloseCode.INTERNAL_ERROR, "internal error")
        self.hub.release_if_idle(self)

    # -- barge-in ----------------------------------------------------------------

    def interrupt(
        self,
        *,
        reason: str,
        heard_chars: int | None = None,
        heard_text: str | None = None,
        reply_id: str | None = None,
        push_context: bool = True,
    ) -> bool:
        """Cut the reply being streamed (or amend what was heard of the last one).

        The stored assistant message holds exactly what the user heard, marked
        ``interrupted``; the interruption is pushed for the next reply. Returns
        False when there was nothing to interrupt.
        """
        reply = self.reply
        if reply is not None and reply_id in (None, reply.id):
            reply.finished = True
            self.reply = None
            if reply.task is not None:
                reply.task.cancel()
            sent = reply.text
            heard = heard_part(sent, heard_chars=heard_chars, heard_text=heard_text)
            message: Message | None = None
            if sent:
                message = self._append_reply(reply, heard, interrupted=True)
                if push_context:
                    self._push(reason, heard=heard, cut=sent[len(heard) :], message=message)
            reply.message = message
            self.last_reply = reply
            self.broadcast(
                interrupted_frame(reply.id, heard=heard, message=message, reason=reason, late=False)
            )
            if message is not None:
                self.hub.notify_user(
                    self.user_id, message_frame(message), skip_session=self.session_id
                )
            return True
        last = self.last_reply
        if reply_id is not None and last is not None and last.id == reply_id and last.message:
            # The text was all sent but the client was still playing it: the
            # stored message stays whole; the next reply learns what was missed.
            full = last.text
            heard = heard_part(full, heard_chars=heard_chars, heard_text=heard_text)
            if push_context:
                self._push(reason, heard=heard, cut=full[len(heard) :], message=last.message)
            self.broadcast(
                interrupted_frame(
                    last.id, heard=heard, message=last.message, reason=reason, late=True
                )
            )
            return True
        return False

    def _push(self, reason: str, *, heard: str, cut: str, message: Message | None) -> None:
        interruption = Interruption(
            session_id=self.session_id,
            user_id=self.user_id,
            at=self.hub.clock.now(),
            reason=reason,
            heard=heard,
            cut=cut,
            message_id=message.id if message is not None else None,
        )
        self.pending_interruption = interruption
        self.hub.service.push_interruption(interruption)

    # -- end -----------------------------------------------------------------------

    def end(self) -> None:
        """End the session for every device attached to it (``end`` frame, REST ``end``)."""
        self.ended = True
        self.interrupt(reason="session_end", push_context=False)
        for connection in list(self.connections):
            if connection.proto.state is ConnectionState.ACTIVE:
                connection.proto.ended()
            connection.send(ended_frame(self.session_id))
            connection.close(CloseCode.NORMAL, "session ended")

    def erase(self) -> None:
        """The session's data was erased: cut the reply without storing or
        sending it, forget what a resume would replay, close every device."""
        self.ended = True  # nothing left to mark ended when the devices detach
        if self.orphan_timer is not None:
            self.orphan_timer.cancel()
            self.orphan_timer = None
        reply = self.reply
        if reply is not None:
            reply.finished = True
            self.reply = None
            if reply.task is not None:
                reply.task.cancel()
        self.pending_interruption = None
        self.forget_messages()
        for connection in list(self.connections):
            connection.close(CloseCode.SESSION_ERASED, "session erased")


class Connection:
    """One WebSocket: a reader task, a writer task and a bounded send queue."""

    def __init__(self, hub: Hub, websocket: WebSocket) -> None:
        s = hub.settings
        self.hub = hub
        self.ws = websocket
        self.id = f"c{next(_ids)}"
        self.proto = ServerProtocol(
            max_frame_bytes=s.ws_max_frame_bytes,
            rate=s.ws_rate_per_second,
            burst=s.ws_rate_burst,
            strikes=s.ws_rate_strikes,
            clock=hub.clock.monotonic,
        )
        self.queue: asyncio.Queue[str | _CloseRequest] = asyncio.Queue(maxsize=s.ws_send_queue)
        self.user_id: str | None = None
        #: Who started the session on this connection (set by ``start``).
        self.principal: Principal = ANONYMOUS
        self.channel: SessionChannel | None = None
        self.closing: _CloseRequest | None = None
        self.finished = asyncio.Event()
        self._peer_gone = False
        self._aborted = False
        self._writer: asyncio.Task[None] | None = None
        self._supervised: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id}>"

    # -- sending -------------------------------------------------------------------

    def send(self, frame: Mapping[str, Any]) -> None:
        self.send_text(encode(frame))

    def send_text(self, text: str) -> None:
        """Queue a frame; a full queue means the client reads too slowly: close it."""
        if self.closing is not None:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            logger.warning("connection %s reads too slowly (send queue full): closing", self.id)
            self.closing = _CloseRequest(CloseCode.TRY_AGAIN_LATER, "send queue full")
            self._abort()

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued (idempotent)."""
        if self.closing is not None:
            return
        self.closing = _CloseRequest(code, reason)
        try:
            self.queue.put_nowait(self.closing)
        except asyncio.QueueFull:
            self._abort()

    def _abort(self) -> None:
        # The writer waits on a socket the client does not read; stop it, and
        # let serve() try the close frame within a deadline.
        self._aborted = True
        if self._writer is not None:
            self._writer.cancel()

    async def _write_loop(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if isinstance(item, _CloseRequest):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self.ws.close(int(item.code), item.reason)
                    return
                await self.ws.send_text(item)
            except (WebSocketDisconnect, WebSocketDisconnected, OSError, TimeoutError):
                self._peer_gone = True
                return

    # -- receiving -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        settings = self.hub.settings
        idle = settings.ws_idle_timeout
        clock = self.hub.clock
        # ``start`` must come within ``ws_start_timeout`` of the connection,
        # however many other frames (pings) come before it: a connection that
        # never identifies itself does not hold a socket for long.
        start_deadline = clock.monotonic() + settings.ws_start_timeout
        while self.closing is None:
            waiting_for_start = self.channel is None
            timeout = idle
            if waiting_for_start:
                timeout = max(0.0, min(idle, start_deadline - clock.monotonic()))
            try:
                async with asyncio.timeout(timeout):
                    message = await self.ws.receive()
            except TimeoutError:
                if waiting_for_start and timeout < idle:
                    logger.info("connection %s sent no start frame in time: closing", self.id)
                    self.send(error_frame(ErrorCode.START_TIMEOUT, "No start frame in time."))
                else:
                    logger.info("connection %s idle for %.0f s: closing", self.id, idle)
                    self.send(error_frame(ErrorCode.IDLE_TIMEOUT, "No frame received in time."))
                self.close(CloseCode.IDLE_TIMEOUT, "idle timeout")
                return
            if message["type"] == "websocket.disconnect":
                self._peer_gone = True
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                await self._dispatch(self.proto.receive(data))
            except (Unauthorized, Forbidden) as exc:
                self.send(error_frame(exc.code, exc.message))
                self.close(exc.close_code, exc.code)
            except SamvadError as exc:
                self.send(error_frame(exc.code, exc.message))

    async def _dispatch(self, received: Received) -> None:
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
        elif isinstance(received, UserMessage):
            await self._on_message(received)
        elif isinstance(received, Interrupt):
            self._on_interrupt(received)
        elif isinstance(received, StateUpdate):
            await self._on_state(received)
        elif isinstance(received, End):
            channel = self._session()
            with contextlib.suppress(BacklogFull, NotFound):
                await self.hub.service.end_session(self.principal, channel.session_id)
            logger.info("session %s ended by its user %s", channel.session_id, channel.user_id)

    def _session(self) -> SessionChannel:
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
        # follow it reach this connection in order.
        channel = hub.attach(
            self,
            session_id=session_id,
            user_id=frame.user_id,
            session_history=snapshot.session_history,
        )
        self.principal = principal
        self.proto.started()
        limit = min(frame.history_limit, MAX_HISTORY_LIMIT)
        history = snapshot.history
        self.send(
            started_frame(
                session_id=session_id,
                user_id=frame.user_id,
                mode=hub.persistence.mode.value,
                state=snapshot.state,
                history=history[-limit:] if limit else (),
                last_seq=channel.last_seq,
                resumed=frame.resume_from is not None,
                limits=hub.limits,
            )
        )
        if frame.resume_from is not None:
            plan = plan_resume(
                itertools.chain(snapshot.session_history, channel.recent),
                session_id=session_id,
                last_seen=frame.resume_from,
                current=channel.last_seq,
                window=hub.settings.ws_resume_window,
            )
            self.send(resume_frame(plan, last_seq=channel.last_seq, in_flight=channel.in_flight()))
        logger.info(
            "connection %s started session %s for user %s%s",
            self.id,
            session_id,
            frame.user_id,
            " (resume)" if frame.resume_from is not None else "",
        )

    async def _on_message(self, frame: UserMessage) -> None:
        if not frame.final:
            return  # interim transcript: only the final one is a message
        channel = self._session()
        channel.interrupt(reason="new_message")
        message = channel.append(Role.USER, frame.text)
        self.send(ack_frame(message, frame.client_id))
        self.hub.notify_user(channel.user_id, message_frame(message), skip=self)
        channel.start_reply(message)
        await self.hub.service.touch_session(channel.session_id)

    def _on_interrupt(self, frame: Interrupt) -> None:
        done = self._session().interrupt(
            reason=frame.reason,
            heard_chars=frame.heard_chars,
            heard_text=frame.heard_text,
            reply_id=frame.reply_id,
        )
        if not done:
            self.send(error_frame(ErrorCode.NOTHING_TO_INTERRUPT, "No reply is being streamed."))

    async def _on_state(self, frame: StateUpdate) -> None:
        channel = self._session()
        # Every device of the user hears of it (LiveSessions.state_changed).
        await self.hub.service.save_state(self.principal, channel.user_id, frame.state)

    # -- life cycle ----------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection until it closes, then detach it from the hub."""
        try:
            await self.ws.accept()
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            self.proto.closed()
            self.finished.set()
            return
        writer = self._writer = asyncio.create_task(self._write_loop(), name=f"ws-{self.id}-w")
        reader = asyncio.create_task(self._read_loop(), name=f"ws-{self.id}-r")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and not self._peer_gone and not writer.done():
                self._supervise(reader)
                if self.closing is None:
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
                # Let the writer flush what is queued and send the close frame.
                await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT + 1)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            for task in (reader, writer):
                self._supervise(task)
            self.proto.closed()
            await self.hub.detach(self)
            if self._aborted and not self._peer_gone:
                await self._close_frame_within_deadline()
            self.finished.set()

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if task in self._supervised:
            return
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            self._supervised.add(task)
            logger.error("connection %s: task %s failed", self.id, task.get_name(), exc_info=exc)
            if task is self._writer:
                self._aborted = True  # nothing drains the queue: send the close frame directly
            if self.closing is None:
                self.send(error_frame(ErrorCode.INTERNAL_ERROR, "Internal error."))
                self.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _close_frame_within_deadline(self) -> None:
        request = self.closing or _CloseRequest(CloseCode.INTERNAL_ERROR, "internal error")
        with contextlib.suppress(
            WebSocketDisconnect, WebSocketDisconnected, OSError, TimeoutError, RuntimeError
        ):
            async with asyncio.timeout(1.0):
                await self.ws.close(int(request.code), request.reason)


class Hub:
    """The live WebSocket connections of this process, by user and by session."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self.service = services.service
        self.settings = services.settings
        self.persistence = services.persistence
        self.interruptions = services.interruptions
        self.clock = services.persistence.clock
        self.metrics = services.metrics
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
        if services.responder is None:
            services.responder = load_responder(self.settings)
        self.closing = False
        #: Seconds a reply streams on with nobody connected (see ORPHAN_REPLY_GRACE).
        self.orphan_grace = ORPHAN_REPLY_GRACE
        #: Longest reply in characters (see MAX_REPLY_CHARS).
        self.max_reply_chars = MAX_REPLY_CHARS
        self._connections: dict[Connection, None] = {}
        self._by_user: dict[str, dict[Connection, None]] = {}
        self._channels: dict[str, SessionChannel] = {}
        # The latest sequence number of recent sessions, and whose they were.
        self._seqs: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        s = self.settings
        self.limits = {
            "maxFrameBytes": s.ws_max_frame_bytes,
            "ratePerSecond": s.ws_rate_per_second,
            "rateBurst": s.ws_rate_burst,
            "idleTimeoutSeconds": s.ws_idle_timeout,
            "resumeWindow": s.ws_resume_window,
        }

    @property
    def responder(self) -> Responder:
        responder = self._services.responder
        if responder is None:
            responder = self._services.responder = load_responder(self.settings)
        return responder

    # -- connections ---------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        """Handle one WebSocket from handshake to close."""
        if self.closing:
            await websocket.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        connection = Connection(self, websocket)
        self._connections[connection] = None
        try:
            await connection.serve()
        finally:
            self._connections.pop(connection, None)

    def attach(
        self,
        connection: Connection,
        *,
        session_id: str,
        user_id: str,
        session_history: Iterable[Message],
    ) -> SessionChannel:
        """Join ``connection`` to its session's channel (created on first use).

        A live channel of another user is refused with :class:`Conflict`
        (:func:`samvad.service.ensure_owner`), whatever the stored document says.
        """
        channel = self._channels.get(session_id)
        if channel is not None:
            ensure_owner(channel.user_id, user_id, session_id)
        else:
            remembered = self._seqs.get(session_id)
            seq = remembered[1] if remembered is not None and remembered[0] == user_id else 0
            seq = max(seq, last_seq(session_history, session_id))
            channel = SessionChannel(self, session_id=session_id, user_id=user_id, seq=seq)
            self._channels[session_id] = channel
        if channel.orphan_timer is not None:
            channel.orphan_timer.cancel()
            channel.orphan_timer = None
        channel.connections[connection] = None
        connection.channel = channel
        connection.user_id = user_id
        self._by_user.setdefault(user_id, {})[connection] = None
        return channel

    async def detach(self, connection: Connection) -> None:
        """Forget a closed connection; the last one to leave a session ends it."""
        self._connections.pop(connection, None)
        if connection.user_id is not None:
            devices = self._by_user.get(connection.user_id)
            if devices is not None:
                devices.pop(connection, None)
                if not devices:
                    del self._by_user[connection.user_id]
        channel = connection.channel
        if channel is None:
            return
        channel.connections.pop(connection, None)
        if channel.connections:
            return
        if not channel.ended:
            # Closed without ``end``: the session ends, and a resume re-activates it.
            await self.service.session_left(channel.session_id)
        if channel.reply is not None and not channel.connections and channel.orphan_timer is None:
            if self.orphan_grace > 0:
                loop = asyncio.get_running_loop()
                channel.orphan_timer = loop.call_later(self.orphan_grace, channel.cut_orphan)
            else:
                channel.cut_orphan()
        self.release_if_idle(channel)

    def release_if_idle(self, channel: SessionChannel) -> None:
        """Drop a channel nobody uses (a reply still streaming keeps it, for resume)."""
        if channel.connections or channel.reply is not None:
            return
        if channel.orphan_timer is not None:
            channel.orphan_timer.cancel()
            channel.orphan_timer = None
        if self._channels.get(channel.session_id) is channel:
            del self._channels[channel.session_id]

    # -- the live side of the use cases (samvad.service.LiveSessions) ------------------

    def owner(self, session_id: str) -> str | None:
        """The user of the live channel of ``session_id``, if there is one."""
        channel = self._channels.get(session_id)
        return channel.user_id if channel is not None else None

    def end(self, session_id: str) -> None:
        """End the live channel of ``session_id`` (REST ``end`` and the ``end`` frame)."""
        channel = self._channels.get(session_id)
        if channel is not None:
            channel.end()

    def erase_session(self, session_id: str) -> None:
        """Close and forget the live side of an erased session."""
        self._seqs.pop(session_id, None)
        channel = self._channels.pop(session_id, None)
        if channel is not None:
            channel.erase()
            logger.info("live session %s erased", session_id)

    def erase_user(self, user_id: str) -> None:
        """Close and forget the live sessions of an erased user."""
        for session_id in [s for s, c in self._channels.items() if c.user_id == user_id]:
            self.erase_session(session_id)
        for session_id in [s for s, (owner, _) in self._seqs.items() if owner == user_id]:
            del self._seqs[session_id]

    def state_changed(self, state: UserState) -> None:
        """Send the user's new state to every connection of theirs."""
        self.notify_user(state.user_id, state_frame(state))

    def remember_seq(self, session_id: str, user_id: str, seq: int) -> None:
        self._seqs[session_id] = (user_id, seq)
        self._seqs.move_to_end(session_id)
        if len(self._seqs) > _REMEMBERED_SESSIONS:
            self._seqs.popitem(last=False)

    def notify_user(
        self,
        user_id: str,
        frame: Mapping[str, Any],
        *,
        skip: Connection | None = None,
        skip_session: str | None = None,
    ) -> None:
        """Send ``frame`` to the user's connections (other devices, other sessions)."""
        devices = self._by_user.get(user_id)
        if not devices:
            return
        text = encode(frame)
        for connection in list(devices):
            if connection is skip:
                continue
            channel = connection.channel
            if (
                skip_session is not None
                and channel is not None
                and channel.session_id == skip_session
            ):
                continue
            connection.send_text(text)

    async def authenticate(self, frame: Start, headers: Mapping[str, str]) -> Principal:
        """Who sent ``frame``: its token, or the upgrade's API key (anyone with auth off).

        Raises :class:`Unauthorized` for missing or invalid credentials; whether
        they may act for ``userId`` is the use case's rule (``Forbidden``).
        """
        return await authenticate_start(
            self.settings, self._services.verify_token, token=frame.token, headers=headers
        )

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
        if code == ErrorCode.RATE_LIMITED and self.metrics is not None:
            self.metrics.rate_limited.labels("websocket").inc()

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
        return {
            "connections": len(self._connections),
            "users": len(self._by_user),
            "sessions": len(self._channels),
        }

    def connections_of(self, user_id: str) -> tuple[Connection, ...]:
        """The live connections of a user, oldest first."""
        return tuple(self._by_user.get(user_id, ()))

    async def close_all(self, *, code: int = 1001, reason: str = "server shutting down") -> None:
        """Close every connection (at shutdown) and wait for their handlers."""
        self.closing = True
        for channel in list(self._channels.values()):
            if channel.orphan_timer is not None:
                channel.orphan_timer.cancel()
                channel.orphan_timer = None
            # What was sent is stored, marked interrupted; not a barge-in.
            channel.interrupt(reason="shutdown", push_context=False)
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


async def _endpoint(websocket: WebSocket) -> None:
    await services(websocket).hub.serve(websocket)


def routes() -> list[BaseRoute]:
    """The WebSocket routes."""
    return [WebSocketRoute("/ws", _endpoint, name="ws")]
