"""An async client for Samvad's real-time protocol, on the ``websockets`` library.

::

    async with await SamvadClient.connect("ws://127.0.0.1:8080/ws", user_id="u1") as client:
        exchange = await client.ask("What documents do I need for a home loan?")
        print(exchange.reply.text)

Frames are plain dicts, as in ``docs/protocol.md``. The client tracks the
highest sequence number it has seen (:attr:`SamvadClient.last_seq`), which is
what a reconnect passes as ``resume_from`` to get the missed messages replayed.

Every message gets a ``clientId`` and stays in :attr:`SamvadClient.pending`
until the server no longer needs it: until its ``ack``, or, with a server that
sends ``durable`` frames (a Firestore store), until Firestore has it.
:meth:`SamvadClient.reconnect` resumes the session and sends the pending
messages again; the server stores each ``clientId`` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, WebSocketException

__all__ = [
    "Exchange",
    "Frame",
    "Outgoing",
    "Reply",
    "SamvadClient",
    "ServerError",
    "Started",
]

logger = logging.getLogger(__name__)

Frame = dict[str, Any]


class ServerError(Exception):
    """The server answered with an ``error`` frame where a result was expected."""

    def __init__(self, frame: Mapping[str, Any]) -> None:
        self.code = str(frame.get("code"))
        self.message = str(frame.get("message"))
        self.frame = dict(frame)
        super().__init__(f"{self.code}: {self.message}")


@dataclass(frozen=True, slots=True)
class Started:
    """The server's answer to ``start``."""

    session_id: str
    user_id: str
    mode: str
    state: dict[str, Any]
    history: list[dict[str, Any]]
    last_seq: int
    resumed: bool
    limits: dict[str, Any]
    #: The ``resume`` frame, when the start asked to resume.
    resume: dict[str, Any] | None = None
    #: Firestore could not be read: ``state`` and ``history`` may lack data.
    history_incomplete: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """One assistant reply as the client received it."""

    reply_id: str
    text: str
    chunks: tuple[str, ...]
    seq: int | None
    message_id: str | None
    complete: bool
    interrupted: bool = False


@dataclass(slots=True)
class Outgoing:
    """A message sent and kept until the server no longer needs it."""

    client_id: str
    text: str
    #: From its ``ack``; None until then.
    seq: int | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Exchange:
    """A user message, its ``ack``, the reply, and every frame seen meanwhile."""

    ack: dict[str, Any]
    reply: Reply
    frames: list[dict[str, Any]] = field(default_factory=list)


class SamvadClient:
    """One connection to ``/ws``. Build with :meth:`connect`; use as ``async with``."""

    def __init__(self, connection: ClientConnection, *, heartbeat: float | None = None) -> None:
        self.connection = connection
        self.started: Started | None = None
        self.last_seq = 0
        #: Every message of the session up to this ``seq`` is in Firestore.
        self.durable_seq = 0
        #: The server sends ``durable`` frames: messages are kept until durable.
        self.keeps_until_durable = False
        self._outbox: dict[str, Outgoing] = {}
        self._heartbeat_interval = heartbeat
        self._heartbeat: asyncio.Task[None] | None = None
        self._url: str | None = None
        self._start_options: dict[str, Any] = {}
        self._connect_options: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        user_id: str,
        session_id: str | None = None,
        language: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        token: str | None = None,
        resume_from: int | None = None,
        history_limit: int | None = None,
        heartbeat: float | None = 30.0,
        **options: Any,
    ) -> Self:
        """Open a connection and start (or resume) a session.

        ``heartbeat`` is the interval of ``ping`` frames that keep the
        connection from idling out (None: no heartbeat); ``options`` go to
        :func:`websockets.asyncio.client.connect`.
        """
        connection = await connect(url, **options)
        client = cls(connection, heartbeat=heartbeat)
        client._url, client._connect_options = url, dict(options)
        client._start_options = {
            "user_id": user_id,
            "language": language,
            "metadata": metadata,
            "token": token,
            "history_limit": history_limit,
        }
        try:
            await client.start(
                user_id=user_id,
                session_id=session_id,
                language=language,
                metadata=metadata,
                token=token,
                resume_from=resume_from,
                history_limit=history_limit,
            )
        except BaseException:
            await connection.close()
            raise
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def session_id(self) -> str:
        if self.started is None:
            raise RuntimeError("Cannot use the session before it has started.")
        return self.started.session_id

    # -- frames ------------------------------------------------------------------

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one frame as JSON text."""
        await self.connection.send(json.dumps(frame))

    async def recv(self, within: float | None = None) -> Frame:
        """The next frame from the server (waiting at most ``within`` seconds)."""
        async with asyncio.timeout(within):
            data = await self.connection.recv()
        frame: Frame = json.loads(data)
        self._track(frame)
        return frame

    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame until the connection closes."""
        async for data in self.connection:
            frame: Frame = json.loads(data)
            self._track(frame)
            yield frame

    async def wait_for(
        self,
        kind: str,
        *,
        where: Callable[[Frame], bool] | None = None,
        within: float | None = 10.0,
        seen: list[Frame] | None = None,
    ) -> Frame:
        """Read frames until one of type ``kind`` (matching ``where``) arrives.

        Frames read on the way are appended to ``seen`` when given; raises
        ``TimeoutError`` after ``within`` seconds.
        """
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv()
                if seen is not None:
                    seen.append(frame)
                if frame.get("type") == kind and (where is None or where(frame)):
                    return frame

    def _track(self, frame: Frame) -> None:
        kind = frame.get("type")
        seq: Any = None
        if kind == "ack":
            self._acked(frame)
        elif kind == "durable":
            self._durable(frame)
        if kind in ("ack", "reply.end") or (kind == "interrupted" and not frame.get("late")):
            seq = frame.get("seq")
        elif kind == "message":
            message = frame.get("message") or {}
            if self.started is not None and message.get("sessionId") == self.started.session_id:
                seq = message.get("seq")
        elif kind == "resume":
            seq = frame.get("lastSeq")
        if isinstance(seq, int) and seq > self.last_seq:
            self.last_seq = seq

    # -- keeping messages until they are safe ---------------------------------------

    @property
    def pending(self) -> list[Outgoing]:
        """The messages kept for a re-send, oldest first: not yet acknowledged,
        or (with a server that sends ``durable`` frames) not yet durable."""
        return list(self._outbox.values())

    def _acked(self, frame: Frame) -> None:
        entry = self._outbox.get(str(frame.get("clientId")))
        if entry is None:
            return
        seq = frame.get("seq")
        entry.seq = seq if isinstance(seq, int) else None
        entry.message_id = frame.get("messageId")
        if not self.keeps_until_durable or (
            entry.seq is not None and entry.seq <= self.durable_seq
        ):
            del self._outbox[entry.client_id]

    def _durable(self, frame: Frame) -> None:
        if self.started is not None and frame.get("sessionId") != self.started.session_id:
            return
        self.keeps_until_durable = True
        seq = frame.get("seq")
        if isinstance(seq, int) and seq > self.durable_seq:
            self.durable_seq = seq
        for entry in list(self._outbox.values()):
            if entry.seq is not None and entry.seq <= self.durable_seq:
                del self._outbox[entry.client_id]

    async def wait_durable(self, within: float | None = 30.0) -> None:
        """Read frames until no message is pending (each one durable, or
        acknowledged with a server that sends no ``durable`` frames)."""
        async with asyncio.timeout(within):
            while self._outbox:
                await self.recv()

    async def reconnect(
        self, url: str | None = None, *, within: float = 30.0, resend: bool = True
    ) -> Started:
        """Connect again (to ``url``, or the same URL), resume the session from
        :attr:`last_seq` and send every pending message again with its
        ``clientId``: the server stores what it does not have and answers the
        rest with their original ``ack`` (``duplicate: true``).

        Tries again with a growing pause until ``within`` seconds have passed.
        """
        if self.started is None or self._url is None:
            raise RuntimeError("Cannot reconnect a client that never started a session.")
        self._url = url or self._url
        with contextlib.suppress(Exception):
            await self.close()
        pause = 0.1
        async with asyncio.timeout(within):
            while True:
                try:
                    self.connection = await connect(self._url, **self._connect_options)
                    break
                except (OSError, InvalidHandshake, WebSocketException) as exc:
                    logger.debug("reconnect failed (%s); trying again", type(exc).__name__)
                    await asyncio.sleep(pause)
                    pause = min(2.0, pause * 2)
        started = await self.start(
            session_id=self.started.session_id, resume_from=self.last_seq, **self._start_options
        )
        if resend:
            for entry in list(self._outbox.values()):
                # Its seq is known again from the new ack: a server that lost
                # the message numbers it anew, and a durable frame in the new
                # numbering says nothing of the old one.
                entry.seq = entry.message_id = None
                await self._send_message(entry.text, entry.client_id, final=True)
        return started

    # -- the protocol ------------------------------------------------------------

    async def start(
        self,
        *,
        user_id: str,
        session_id: str | None = None,
        language: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        token: str | None = None,
        resume_from: int | None = None,
        history_limit: int | None = None,
    ) -> Started:
        """Send ``start`` and wait for ``started`` (and ``resume`` when resuming)."""
        frame: Frame = {"type": "start", "userId": user_id}
        optional = {
            "sessionId": session_id,
            "language": language,
            "metadata": dict(metadata) if metadata is not None else None,
            "token": token,
            "historyLimit": history_limit,
        }
        frame.update({k: v for k, v in optional.items() if v is not None})
        if resume_from is not None:
            frame["resume"] = {"lastSeq": resume_from}
        await self.send(frame)
        answer = await self._expect("started")
        resume = await self._expect("resume") if resume_from is not None else None
        self.started = Started(
            session_id=answer["sessionId"],
            user_id=answer["userId"],
            mode=answer["mode"],
            state=answer["state"],
            history=answer["history"],
            last_seq=answer["lastSeq"],
            resumed=answer["resumed"],
            limits=answer["limits"],
            resume=resume,
            history_incomplete=answer.get("historyIncomplete", False),
        )
        if resume_from is None or (resume is not None and resume.get("reason") == "unknown_seq"):
            # unknown_seq: the server lost what it had (a restart before Firestore
            # had it); go on from its numbering, and re-send what is pending.
            self.last_seq = answer["lastSeq"]
        if self._heartbeat_interval is not None and self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(self._heartbeat_interval))
        return self.started

    async def _expect(self, kind: str, within: float = 30.0) -> Frame:
        frame = await self.recv(within)
        if frame.get("type") == "error":
            raise ServerError(frame)
        if frame.get("type") != kind:
            raise ServerError({"code": "unexpected_frame", "message": f"{kind} expected: {frame}"})
        return frame

    async def message(
        self, text: str, *, client_id: str | None = None, final: bool = True
    ) -> str | None:
        """Send a user message (or an interim transcript with ``final=False``).

        Returns its ``clientId`` (made up when not given); the message is kept
        in :attr:`pending` until the server no longer needs it. Interim
        transcripts are neither stored nor kept (None).
        """
        if final:
            client_id = client_id or f"c-{uuid.uuid4().hex}"
            self._outbox.setdefault(client_id, Outgoing(client_id, text))
        await self._send_message(text, client_id, final=final)
        return client_id if final else None

    async def _send_message(self, text: str, client_id: str | None, *, final: bool) -> None:
        frame: Frame = {"type": "message", "text": text, "final": final}
        if client_id is not None:
            frame["clientId"] = client_id
        await self.send(frame)

    async def ask(
        self, text: str, *, client_id: str | None = None, within: float | None = 30.0
    ) -> Exchange:
        """Send a message and wait for its ``ack`` and the whole reply."""
        client_id = await self.message(text, client_id=client_id)
        seen: list[Frame] = []
        async with asyncio.timeout(within):
            ack = await self.wait_for("ack", seen=seen, within=None)
            if ack.get("clientId") != client_id:
                raise ServerError({"code": "unexpected_frame", "message": f"ack: {ack}"})
            return Exchange(ack=ack, reply=await self.read_reply(seen=seen), frames=seen)

    async def read_reply(self, *, seen: list[Frame] | None = None) -> Reply:
        """Read one streamed reply, from ``reply.start`` to ``reply.end`` or ``interrupted``."""
        seen = [] if seen is None else seen
        start = await self.wait_for("reply.start", seen=seen, within=None)
        reply_id = start["replyId"]
        chunks: list[str] = []
        while True:
            frame = await self.recv()
            seen.append(frame)
            if frame.get("replyId") != reply_id:
                continue
            kind = frame["type"]
            if kind == "reply.chunk":
                chunks.append(frame["text"])
            elif kind == "reply.end":
                return Reply(
                    reply_id=reply_id,
                    text=frame["text"],
                    chunks=tuple(chunks),
                    seq=frame["seq"],
                    message_id=frame["messageId"],
                    complete=frame["complete"],
                )
            elif kind == "interrupted":
                return Reply(
                    reply_id=reply_id,
                    text=frame["heard"],
                    chunks=tuple(chunks),
                    seq=frame["seq"],
                    message_id=frame["messageId"],
                    complete=False,
                    interrupted=True,
                )

    async def interrupt(
        self,
        *,
        heard_chars: int | None = None,
        heard_text: str | None = None,
        reason: str | None = None,
        reply_id: str | None = None,
    ) -> None:
        """Barge in: cut the reply being streamed; say how much of it was played."""
        frame: Frame = {"type": "interrupt"}
        optional = {
            "heardChars": heard_chars,
            "heardText": heard_text,
            "reason": reason,
            "replyId": reply_id,
        }
        frame.update({k: v for k, v in optional.items() if v is not None})
        await self.send(frame)

    async def set_state(self, state: Mapping[str, Any]) -> None:
        """Merge fields into the user's state; every device gets a ``state`` frame."""
        await self.send({"type": "state", "state": dict(state)})

    async def ping(self, ts: str | int | float | None = None) -> None:
        await self.send({"type": "ping", "ts": ts})

    async def end(self, within: float = 10.0) -> Frame:
        """End the session; returns the ``ended`` frame (the server then closes)."""
        await self.send({"type": "end"})
        return await self.wait_for("ended", within=within)

    async def _beat(self, interval: float) -> None:
        try:
            while True:
                await asyncio.sleep(interval)
                await self.ping()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The connection is gone: reads report it; the heartbeat just stops.
            logger.debug("heartbeat stopped: %s", type(exc).__name__)

    async def close(self) -> None:
        """Close the connection (the server ends the session unless another device holds it)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        await self.connection.close()
