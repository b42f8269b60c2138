"""The WebSocket protocol ``samvad serve`` runs (samvad/web/uvicorn_ws.py):
the same bytes on the wire as uvicorn's, in one socket write per loop turn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import CodeType
from typing import Any, ClassVar

import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import OP_TEXT, Frame

from samvad.config import Settings
from samvad.responder import EchoResponder, ReplyContext
from samvad.server import uvicorn_config
from samvad.web.app import create_app
from samvad.web.uvicorn_ws import (
    SEND_TEXT,
    TurnBuffer,
    TurnWebSocketProtocol,
    _TurnFlush,
    text_frame_header,
)
from tests.support.serve import start_serve
from tests.support.server import live_server
from tests.support.stores import FlakyStore
from tests.web.test_realtime import RawSocket


class Wire(asyncio.Transport):
    """A transport that records what reaches it, write by write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


async def next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_websockets_state_is_the_attribute_the_protocol_reads() -> None:
    """``TurnWebSocketProtocol`` reads websockets' ``Protocol._state`` for its
    ``state`` property; through every state a connection goes."""
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    conn = ServerProtocol()
    for state in State:
        conn.state = state
        assert conn._state is conn.state is state


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70000])
def test_a_text_frame_is_framed_as_websockets_frames_it(length: int) -> None:
    payload = b"x" * length
    expected = Frame(OP_TEXT, payload).serialize(mask=False)
    assert text_frame_header(length) + payload == expected


async def test_what_one_turn_writes_reaches_the_socket_in_one_write_in_order() -> None:
    wire = Wire()
    buffer = TurnBuffer(wire, asyncio.get_running_loop())
    buffer.write(b"ack")
    buffer.write_parts(b"<", b"chunk>")
    buffer.write(b"end")
    assert wire.writes == []  # nothing before the turn ends
    await next_turn()
    assert wire.writes == [b"ack<chunk>end"]
    buffer.write(b"next")
    await next_turn()
    assert wire.writes == [b"ack<chunk>end", b"next"]


async def test_the_buffers_of_one_turn_are_flushed_by_one_loop_callback() -> None:
    loop = asyncio.get_running_loop()
    wires = [Wire() for _ in range(3)]
    buffers = [TurnBuffer(wire, loop) for wire in wires]
    scheduled: list[Any] = []
    call_soon = loop.call_soon

    def counting_call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
        scheduled.append(callback)
        return call_soon(callback, *args, **kwargs)

    loop.call_soon = counting_call_soon  # type: ignore[method-assign, assignment]
    try:
        for index, buffer in enumerate(buffers):
            buffer.write(b"frame %d" % index)
            buffer.write(b"more")
        assert len(scheduled) == 1
    finally:
        del loop.call_soon
    await next_turn()
    assert [wire.writes for wire in wires] == [[b"frame %dmore" % i] for i in range(3)]


async def test_a_buffer_whose_flush_fails_does_not_stop_the_others() -> None:
    class Broken(Wire):
        def write(self, data: Any) -> None:
            raise RuntimeError("the socket is gone")

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        broken, wire = Broken(), Wire()
        TurnBuffer(broken, loop).write(b"lost")
        after = TurnBuffer(wire, loop)
        after.write(b"kept")
        await next_turn()
        assert wire.writes == [b"kept"]
        assert [type(c["exception"]) for c in reported] == [RuntimeError]
        after.write(b"next turn too")  # still scheduled as before
        await next_turn()
        assert wire.writes == [b"kept", b"next turn too"]
    finally:
        loop.set_exception_handler(None)


async def test_closing_writes_what_is_buffered_first() -> None:
    wire = Wire()
    buffer = TurnBuffer(wire, asyncio.get_running_loop())
    buffer.write(b"close frame")
    buffer.close()
    assert wire.writes == [b"close frame"]
    assert wire.closed
    await next_turn()
    assert wire.writes == [b"close frame"]


async def test_an_abort_drops_what_is_buffered() -> None:
    wire = Wire()
    buffer = TurnBuffer(wire, asyncio.get_running_loop())
    buffer.write(b"never")
    buffer.abort()
    await next_turn()
    assert wire.writes == []
    assert wire.aborted


class _CountedBuffer(TurnBuffer):
    """A turn buffer that records each write it makes to the socket, and
    whether the end of a loop turn made it (rather than the app's FLUSH)."""

    writes: ClassVar[list[bytes]] = []
    at_turn_end: ClassVar[list[bool]] = []

    def _write(self, data: bytes) -> None:
        type(self).writes.append(data)
        type(self).at_turn_end.append(_called_from(_TurnFlush._run.__code__))
        super()._write(data)


def _called_from(code: CodeType) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _Counted(TurnWebSocketProtocol):
    buffer_class = _CountedBuffer


class OneChunk:
    """The built-in responder's reply in one chunk."""

    task_free = True

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        yield EchoResponder().text_for(context)


def _app() -> Starlette:
    app = create_app(Settings(store="memory", ws_reply_chunk_delay=0.0))
    return app


async def _frames(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10):
        return [json.loads(await ws.recv()) for _ in range(count)]


async def _conversation(url: str, *, compression: str | None) -> list[tuple[int, Any]]:
    """Each frame's size and content but its ids and times: a session with
    two long messages, ended, then started again (its history in a frame too
    long for a two-byte length)."""
    raw: list[str] = []
    async with connect(url, compression=compression, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "userId": "wire-user", "sessionId": "s1"}))
        raw.append(str(await ws.recv()))
        for text in ("hello there", "y" * 40_000, "z" * 40_000):
            await ws.send(json.dumps({"type": "message", "text": text, "clientId": text[:5]}))
            async with asyncio.timeout(10):
                raw += [str(await ws.recv()) for _ in range(4)]
        await ws.send(json.dumps({"type": "end"}))
        async with asyncio.timeout(10):
            try:
                while True:
                    raw.append(str(await ws.recv()))
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                raw.append(f"close {exc.rcvd.code} {exc.rcvd.reason}")
    async with connect(url, compression=compression, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "userId": "wire-user", "historyLimit": 50}))
        raw.append(str(await ws.recv()))
    return [(len(text), _without_ids(text)) for text in raw]


def _without_ids(text: str) -> Any:
    if text.startswith("close"):
        return text
    frame = json.loads(text)
    for key in ("sessionId", "replyId", "messageId", "timestamp", "history", "message"):
        frame.pop(key, None)
    return frame


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_a_session_looks_the_same_on_the_wire_as_under_uvicorns_own_protocol(
    compression: str | None,
) -> None:
    seen = []
    for ws in ("auto", TurnWebSocketProtocol):
        async with live_server(
            _app(), ws=ws, ws_per_message_deflate=compression is not None
        ) as server:
            server.services.hub.responder = OneChunk()
            seen.append(await _conversation(f"{server.ws_url}/ws", compression=compression))
    uvicorns, ours = seen
    kinds = [frame.get("type") if isinstance(frame, dict) else frame for _, frame in ours]
    assert kinds[:5] == ["started", "ack", "reply.start", "reply.chunk", "reply.end"]
    assert kinds[-2:] == ["close 1000 session ended", "started"]
    sizes = sorted(size for size, _ in ours)
    assert sizes[0] < 126 and 126 <= sizes[-2] < 65536 and sizes[-1] >= 65536
    # The same frames, sizes included, apart from ids and times.
    assert [frame for _, frame in ours] == [frame for _, frame in uvicorns]
    assert sorted(sizes) == sorted(size for size, _ in uvicorns)


@contextlib.asynccontextmanager
async def _started(
    protocol: type[TurnWebSocketProtocol], user_id: str, *, compression: str | None = None
) -> AsyncIterator[ClientConnection]:
    """A live server running ``protocol`` that answers in one chunk, and a
    connection to it with ``user_id``'s session started."""
    async with live_server(
        _app(), ws=protocol, ws_per_message_deflate=compression is not None
    ) as server:
        server.services.hub.responder = OneChunk()
        async with connect(f"{server.ws_url}/ws", compression=compression) as ws:
            await ws.send(json.dumps({"type": "start", "userId": user_id}))
            await _frames(ws, 1)
            yield ws


async def test_the_frames_of_one_message_leave_in_one_write_once_it_is_handled() -> None:
    writes: list[bytes] = []
    at_turn_end: list[bool] = []
    _CountedBuffer.writes, _CountedBuffer.at_turn_end = writes, at_turn_end
    async with _started(_Counted, "one-write") as ws:
        # The first reply reads the user's views into the caches (its
        # reply.chunk waits for that); from then on a whole exchange is
        # produced while the message is handled.
        for text in ("hello", "again", "and again"):
            before = len(writes)
            await ws.send(json.dumps({"type": "message", "text": text}))
            frames = await _frames(ws, 4)
            kinds = [f["type"] for f in frames]
            assert kinds == ["ack", "reply.start", "reply.chunk", "reply.end"]
        assert len(writes) == before + 1
        assert writes[-1].count(b'{"type":') == 4
        # Handed to the socket by the connection (FLUSH, for the ack) once
        # the message was handled, not held for the end of the loop's turn.
        assert at_turn_end[-1] is False


async def test_with_a_journal_the_writer_hands_the_ack_to_the_socket_at_once(
    tmp_path: Path,
) -> None:
    # With a journal the connection's writer task sends every frame, once the
    # journal has the writes before it; it hands the ack to the socket at once.
    writes: list[bytes] = []
    at_turn_end: list[bool] = []
    _CountedBuffer.writes, _CountedBuffer.at_turn_end = writes, at_turn_end
    settings = Settings(
        store="memory", journal=True, data_dir=tmp_path / "data", ws_reply_chunk_delay=0.0
    )
    # A store that says it is durable, as Firestore is: the journal opens.
    app = create_app(settings, store_factory=lambda _: FlakyStore())
    async with live_server(app, ws=_Counted) as server:
        assert server.services.persistence.journal is not None
        server.services.hub.responder = OneChunk()
        async with connect(f"{server.ws_url}/ws", compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "userId": "journalled"}))
            await _frames(ws, 1)
            for text in ("hello", "again"):
                await ws.send(json.dumps({"type": "message", "text": text}))
                kinds: list[str] = []
                async with asyncio.timeout(10):
                    while not kinds or kinds[-1] != "reply.end":
                        kind = json.loads(await ws.recv())["type"]
                        if kind != "durable":  # the store's commits, whenever they come
                            kinds.append(kind)
                assert kinds == ["ack", "reply.start", "reply.chunk", "reply.end"]
    acks = [i for i, write in enumerate(writes) if b'{"type":"ack"' in write]
    assert len(acks) == 2
    assert not any(at_turn_end[i] for i in acks)  # the writer handed them on at once


async def test_flush_hands_what_this_turn_wrote_to_the_socket_at_once() -> None:
    wire = Wire()
    buffer = TurnBuffer(wire, asyncio.get_running_loop())
    buffer.write(b"ack")
    buffer.flush()
    assert wire.writes == [b"ack"]  # before the turn ends
    buffer.write(b"chunk")
    buffer.write(b"end")
    await next_turn()
    assert wire.writes == [b"ack", b"chunkend"]
    await next_turn()
    assert wire.writes == [b"ack", b"chunkend"]  # nothing written twice


def test_samvad_serve_runs_the_turn_protocol() -> None:
    config = uvicorn_config(_app(), Settings(store="memory"))
    config.load()
    assert config.ws_protocol_class is TurnWebSocketProtocol


@pytest.mark.parametrize("configured", [None, "true"])
async def test_samvad_serve_negotiates_compression_only_when_configured(
    tmp_path: Path, configured: str | None
) -> None:
    """A client that asks for permessage-deflate (as browsers do) gets it only
    with SAMVAD_WS_COMPRESSION; without it the connection takes the protocol's
    fast paths, its messages among them."""
    env = {"SAMVAD_STORE": "memory"}
    if configured is not None:
        env["SAMVAD_WS_COMPRESSION"] = configured
    served = await asyncio.to_thread(start_serve, tmp_path, **env)
    try:
        async with connect(served.ws_url, compression="deflate") as ws:
            assert ws.response is not None
            offered = ws.response.headers.get("Sec-WebSocket-Extensions")
            assert (offered is not None and "permessage-deflate" in offered) is (
                configured is not None
            )
            await ws.send(json.dumps({"type": "start", "userId": "u-deflate"}))
            assert json.loads(await ws.recv())["type"] == "started"
            await ws.send(json.dumps({"type": "message", "text": "hello", "clientId": "m1"}))
            assert json.loads(await ws.recv())["type"] == "ack"
    finally:
        served.stop()


class _AsgiSends(TurnWebSocketProtocol):
    """The protocol, counting the frames that came through the ASGI ``send``."""

    asgi_texts: ClassVar[list[str]] = []

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send":
            type(self).asgi_texts.append(message["text"])
        await super().send(message)


async def test_the_connection_writes_its_frames_without_the_asgi_send() -> None:
    frames: list[str] = []
    _AsgiSends.asgi_texts = frames
    async with _started(_AsgiSends, "no-asgi-send") as ws:
        await ws.send(json.dumps({"type": "message", "text": "hello"}))
        assert len(await _frames(ws, 4)) == 4
    assert frames == []  # every frame went through the SEND_TEXT extension


async def test_with_an_extension_negotiated_frames_go_through_the_asgi_send() -> None:
    frames: list[str] = []
    _AsgiSends.asgi_texts = frames
    async with _started(_AsgiSends, "deflated", compression="deflate") as ws:
        await ws.send(json.dumps({"type": "message", "text": "hello"}))
        assert len(await _frames(ws, 4)) == 4
    assert [json.loads(f)["type"] for f in frames] == [
        "started",
        "ack",
        "reply.start",
        "reply.chunk",
        "reply.end",
    ]


async def test_a_slow_reader_is_closed_with_1013_without_delaying_others() -> None:
    # test_realtime's scenario under this protocol: once the socket is full,
    # frames stop being written at once and queue until the queue is full.
    class Flood:
        async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            for _ in range(100_000):
                await asyncio.sleep(0)
                yield "x" * 32_768

    app = create_app(Settings(store="memory", ws_reply_chunk_delay=0.0, ws_send_queue=8))
    async with live_server(app, ws=TurnWebSocketProtocol) as server:
        hub = server.services.hub
        hub.orphan_grace = 0
        hub.max_reply_chars = 10**12
        async with connect(f"{server.ws_url}/ws", compression=None) as fast:
            await fast.send(json.dumps({"type": "start", "userId": "u-fast"}))
            await _frames(fast, 1)
            slow = await RawSocket.open(server.port)
            await slow.send({"type": "start", "userId": "u-slow"})
            async with asyncio.timeout(10):
                while not hub.connections_of("u-slow"):
                    await fast.send(json.dumps({"type": "ping"}))
                    await _frames(fast, 1)
            (slow_conn,) = hub.connections_of("u-slow")
            hub.responder = Flood()
            await slow.send({"type": "message", "text": "flood me"})
            async with asyncio.timeout(20):
                await slow_conn.finished.wait()
            assert slow_conn.closing is not None and slow_conn.closing.code == 1013
            hub.responder = OneChunk()
            await fast.send(json.dumps({"type": "message", "text": "am I slowed down?"}))
            kinds = [f["type"] for f in await _frames(fast, 4)]
            assert kinds == ["ack", "reply.start", "reply.chunk", "reply.end"]
            slow.close()


async def test_a_client_writing_faster_than_the_app_reads_is_paused_then_resumed() -> None:
    """Reading stops once a read finds the app behind (what an earlier read
    brought still waits) and resumes when the app has taken everything: of a
    client that floods, the server holds about two reads' worth, and loses
    nothing."""
    count = 40
    release = asyncio.Event()
    received: list[str] = []
    protocols: list[TurnWebSocketProtocol] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        protocols.append(scope["extensions"][SEND_TEXT].__self__)
        received.append((await receive())["text"])
        await release.wait()
        while len(received) < count:
            received.append((await receive())["text"])
        await send({"type": "websocket.send", "text": "done"})
        await receive()  # websocket.disconnect

    async with (
        live_server(app, ws=TurnWebSocketProtocol) as server,
        connect(server.ws_url, compression=None) as ws,
    ):
        for i in range(count):
            await ws.send(f"m{i}")
            await asyncio.sleep(0.005)  # one read each, as far as the server goes
        (protocol,) = protocols
        async with asyncio.timeout(10):
            while not protocol.read_paused:  # noqa: ASYNC110 (a protocol flag, no event)
                await asyncio.sleep(0.01)
        assert protocol.queue.qsize() <= 4  # the rest waits in the socket
        release.set()
        async with asyncio.timeout(10):
            assert await ws.recv() == "done"
        assert received == [f"m{i}" for i in range(count)]
        assert not protocol.read_paused


async def test_the_inbox_hands_messages_in_order_to_getters_in_order() -> None:
    from samvad.web.uvicorn_ws import _Inbox

    drained: list[int] = []
    inbox = _Inbox(asyncio.get_running_loop(), lambda: drained.append(inbox.qsize()))
    inbox.put_nowait("early")
    inbox.put_nowait("second")
    assert not inbox.empty() and inbox.qsize() == 2
    assert await inbox.get() == "early"
    assert drained == []  # not while a message waits: reading stays paused
    assert await inbox.get() == "second"
    assert inbox.empty() and drained == [0]
    first = asyncio.ensure_future(inbox.get())
    second = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("one")
    inbox.put_nowait("two")
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 5)) == ["one", "two"]


async def test_a_getter_cancelled_after_its_wake_up_passes_it_on() -> None:
    from samvad.web.uvicorn_ws import _Inbox

    inbox = _Inbox(asyncio.get_running_loop())
    leaving = asyncio.ensure_future(inbox.get())
    staying = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("message")  # wakes ``leaving``...
    leaving.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(staying, 5) == "message"
    assert leaving.cancelled()
    # A getter cancelled while it waits leaves nothing behind.
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    inbox.put_nowait("later")
    assert await inbox.get() == "later"
