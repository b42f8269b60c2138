"""Frames taken as the server reads them (``ON_TEXT``: samvad/web/uvicorn_ws.py,
samvad/web/realtime.py). What the app takes at once and what it leaves to
``receive`` keep the order of the frames; a message the connection takes so is
answered, logged and failed exactly as its read loop would have."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from samvad.logs import request_id_var, user_id_var
from samvad.web.uvicorn_ws import ON_TEXT, SEND_TEXT
from tests.support.server import live_server
from tests.web.test_realtime import closed_code, make_app, open_client
from tests.web.test_uvicorn_ws_reads import CLOSE, TEXT, _read_frame, text, upgraded


class RawClient:
    """A WebSocket client that writes frames exactly as given (several in one write)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self) -> str:
        """The next text frame (a close frame or the end fails the test)."""
        async with asyncio.timeout(10):
            received = await _read_frame(self.reader)
        assert received is not None and received[0] != CLOSE, received
        assert received[0] == TEXT
        return received[1].decode()


@asynccontextmanager
async def raw_client(port: int, path: str = "/") -> AsyncIterator[RawClient]:
    reader, writer = await upgraded(port, path)
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()


def taking_app(offered: list[str]) -> Any:
    """Takes the frames that start with ``take`` at once (answering ``took``
    through ``SEND_TEXT``), leaves the others to ``receive`` (answered ``got``)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        extensions = scope["extensions"]
        send_now = extensions[SEND_TEXT]

        def take(text: str) -> bool:
            offered.append(text)
            if not text.startswith("take"):
                return False
            assert send_now("took " + text)
            return True

        extensions[ON_TEXT](take)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "got " + message["text"]})

    return app


async def test_frames_behind_a_queued_one_are_queued_too_so_the_order_holds() -> None:
    offered: list[str] = []
    async with (
        live_server(taking_app(offered), lifespan="off") as server,
        raw_client(server.port) as client,
    ):
        # One read: take-1 is taken; keep-1 is refused and queued; take-2
        # comes behind a queued frame, so it is queued without being offered.
        await client.write(text("take-1") + text("keep-1") + text("take-2"))
        assert [await client.read() for _ in range(3)] == [
            "took take-1",
            "got keep-1",
            "got take-2",
        ]
        # Once the app has taken everything queued, frames are offered again.
        await client.write(text("take-3"))
        assert await client.read() == "took take-3"
    assert offered == ["take-1", "keep-1", "take-3"]


async def started(client: RawClient, user_id: str) -> None:
    """Start a session, then exchange a first message: a connection's first
    message goes through its read loop (the session's activity is written
    with it), the next ones are taken as they are read."""
    await client.write(text(json.dumps({"type": "start", "userId": user_id})))
    while json.loads(await client.read())["type"] != "started":
        pass
    await client.write(text(json.dumps({"type": "message", "text": "first"})))
    while json.loads(await client.read())["type"] != "reply.end":
        pass


async def test_a_message_a_ping_and_a_message_in_one_read_are_answered_in_order() -> None:
    """The first message is handled as it is read; the ping goes to the read
    loop; the second message, behind it, too: its ack after the pong."""
    async with live_server(make_app()) as server, raw_client(server.port, "/ws") as client:
        await started(client, "u-order")
        await client.write(
            text(json.dumps({"type": "message", "text": "one", "clientId": "m1"}))
            + text(json.dumps({"type": "ping", "ts": 7}))
            + text(json.dumps({"type": "message", "text": "two", "clientId": "m2"}))
        )
        seen: list[str] = []
        while len(seen) < 3:
            frame = json.loads(await client.read())
            if frame["type"] == "ack":
                seen.append("ack " + frame["clientId"])
            elif frame["type"] == "pong":
                assert frame["ts"] == 7
                seen.append("pong")
        assert seen == ["ack m1", "pong", "ack m2"]


async def test_a_message_taken_at_once_runs_in_its_connections_log_context() -> None:
    async with live_server(make_app()) as server:
        persistence = server.services.persistence
        append = persistence.append_message
        seen: list[tuple[str | None, str | None]] = []

        def observed(user_id: str, **fields: Any) -> Any:
            seen.append((user_id_var.get(), request_id_var.get()))
            return append(user_id, **fields)

        persistence.append_message = observed  # type: ignore[method-assign]
        client = await open_client(server, "u-log", compression=None)
        assert (await client.ask("hello")).reply.complete  # through the read loop
        assert (await client.ask("again")).reply.complete  # taken as it is read
        await client.close()
    # The user's messages and the replies, all with the ids its start bound.
    assert [user for user, _ in seen] == ["u-log"] * 4
    assert all(request_id for _, request_id in seen)


async def test_a_bug_handling_a_message_closes_that_connection_with_1011_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with live_server(make_app()) as server:
        persistence = server.services.persistence
        victim = await open_client(server, "u-bug", compression=None)
        bystander = await open_client(server, "u-ok")
        append = persistence.append_message

        def broken(user_id: str, **fields: Any) -> Any:
            if user_id == "u-bug":
                raise RuntimeError("a bug")
            return append(user_id, **fields)

        assert (await victim.ask("first")).reply.complete  # through the read loop
        persistence.append_message = broken  # type: ignore[method-assign]
        await victim.message("hello")  # taken as it is read
        assert (await victim.wait_for("error"))["code"] == "internal_error"
        assert await closed_code(victim) == 1011
        assert any(r.exc_info for r in caplog.records if r.name == "samvad.web.realtime")
        assert (await bystander.ask("and me?")).reply.complete
        await bystander.close()


async def test_a_frame_left_to_the_read_loop_is_parsed_once() -> None:
    """Its rate-limit token is spent once: four pings in one read fit a
    burst of four (the first was parsed by ``_take_text``, the rest by the loop)."""
    app = make_app(ws_rate_burst=6, ws_rate_per_second=0.01)  # start and first: two
    async with live_server(app) as server, raw_client(server.port, "/ws") as client:
        await started(client, "u-burst")
        await client.write(b"".join(text(json.dumps({"type": "ping", "ts": i})) for i in range(4)))
        answers = [json.loads(await client.read()) for _ in range(4)]
        assert [(a["type"], a.get("ts")) for a in answers] == [("pong", i) for i in range(4)]
        # The burst is spent now: the next frame is refused.
        await client.write(text(json.dumps({"type": "ping", "ts": 4})))
        assert json.loads(await client.read())["code"] == "rate_limited"


async def test_a_connections_first_message_writes_the_sessions_activity() -> None:
    """The touch is an ``await``: a message whose touch is due goes through
    the read loop, which writes it, and the ones after it are taken at once."""
    async with live_server(make_app()) as server:
        service = server.services.hub.service
        touch = service.touch_session
        touched: list[str] = []

        async def observed(session_id: str) -> None:
            touched.append(session_id)
            await touch(session_id)

        service.touch_session = observed  # type: ignore[method-assign]
        client = await open_client(server, "u-touch", compression=None)
        assert (await client.ask("one")).reply.complete
        assert (await client.ask("two")).reply.complete
        await client.close()
        assert client.started is not None
        assert touched == [client.started.session_id]


async def test_messages_taken_at_once_keep_the_connection_from_idling_out() -> None:
    """The idle deadline counts from the last frame, taken at once or not."""
    async with live_server(make_app(ws_idle_timeout=1.0)) as server:
        client = await open_client(server, "u-busy", compression=None)
        assert (await client.ask("first")).reply.complete  # through the read loop
        for i in range(8):  # 2.4 s of messages taken at once, each 0.3 s apart
            await asyncio.sleep(0.3)
            assert (await client.ask(f"still here {i}")).reply.complete
        await client.close()


#: Frames a client may send after its start, and what each must get back:
#: ``ack`` (a message, acked once, in order), ``error`` (one error frame),
#: or nothing (an interim transcript).
_GENERATED: list[tuple[str, Any]] = [
    ("ack", lambda rng, i: {"type": "message", "text": f"hi {i}", "clientId": f"g{i}"}),
    (
        "ack",
        lambda rng, i: {
            "type": "message",
            "text": "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 60))),
            "clientId": f"g{i}",
        },
    ),
    ("none", lambda rng, i: {"type": "message", "text": "um", "final": False}),
    ("error", lambda rng, i: {"type": "message", "text": 5, "clientId": f"g{i}"}),
    ("error", lambda rng, i: {"type": "message", "clientId": f"g{i}"}),
    ("error", lambda rng, i: {"type": "no-such-frame"}),
    ("error", lambda rng, i: {"type": "start", "userId": "u-someone-else"}),
    ("error", lambda rng, i: "{not json" + "x" * rng.randint(0, 40)),
    ("error", lambda rng, i: ["a", "list"]),
]


async def test_generated_frames_taken_at_once_are_each_answered_once_in_order() -> None:
    """Random runs of good and bad frames, in one to three reads, on a
    connection whose messages are taken as they are read: every message is
    acked once and in order, every bad frame gets one error, nothing closes
    the connection, and another user is served throughout."""
    rng = random.Random(20261130)
    app = make_app(ws_rate_burst=1000, ws_rate_per_second=1000.0)
    async with live_server(app) as server:
        bystander = await open_client(server, "u-bystander", compression=None)
        for case in range(25):
            expected_acks: list[str] = []
            errors = 0
            texts: list[str] = []
            for i in range(rng.randint(1, 12)):
                outcome, make = rng.choice(_GENERATED)
                value = make(rng, i)
                texts.append(value if isinstance(value, str) else json.dumps(value))
                if outcome == "ack":
                    expected_acks.append(value["clientId"])
                elif outcome == "error":
                    errors += 1
            data = b"".join(text(t) for t in texts)
            cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(0, 2), len(data) - 1)))
            writes = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            async with raw_client(server.port, "/ws") as client:
                await started(client, f"u-gen-{case}")
                for chunk in writes:
                    await client.write(chunk)
                await client.write(text(json.dumps({"type": "ping", "ts": "end"})))
                acks: list[str] = []
                seen_errors: list[str] = []
                while True:
                    frame = json.loads(await client.read())
                    if frame["type"] == "ack":
                        acks.append(frame["clientId"])
                    elif frame["type"] == "error":
                        seen_errors.append(frame["code"])
                    elif frame["type"] == "pong" and frame["ts"] == "end":
                        break
                assert acks == expected_acks, (case, texts)
                assert len(seen_errors) == errors, (case, texts, seen_errors)
                assert "internal_error" not in seen_errors
            assert (await bystander.ask(f"still here {case}")).reply.complete
        await bystander.close()


async def test_a_reply_cut_by_a_message_read_with_its_own_is_closed_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The second message cuts the first one's reply before the reply's task
    has run a step: the cancellation still reaches the reply (its stream is
    closed as a cancelled task closes it, not left to the collector)."""
    async with live_server(make_app()) as server, raw_client(server.port, "/ws") as client:
        await started(client, "u-cut")
        await client.write(
            text(json.dumps({"type": "message", "text": "one two three", "clientId": "m1"}))
            + text(json.dumps({"type": "message", "text": "four", "clientId": "m2"}))
        )
        acked = False
        while True:
            frame = json.loads(await client.read())
            acked = acked or (frame["type"] == "ack" and frame["clientId"] == "m2")
            if acked and frame["type"] == "reply.end":
                break
        await asyncio.sleep(0.05)
        assert not server.services.hub._replies  # no reply left running
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
