"""The WebSocket endpoint end to end: a live uvicorn server, real ``websockets`` clients.

These run on the memory store; tests/web/test_realtime_firestore.py runs the
same paths against the Firestore emulator. Each runs twice: with clients that
negotiate no compression, whose frames ``samvad serve`` reads and writes
itself (and whose messages, after a connection's first, the connection takes
as they are read: samvad/web/uvicorn_ws.py), and with permessage-deflate, as
browsers negotiate it, whose frames go through websockets and the read loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import tests.support.server
from samvad.client import SamvadClient, ServerError
from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.errors import Unauthorized
from samvad.models import Role, SessionStatus
from samvad.responder import EchoResponder, ReplyContext
from samvad.web.app import create_app
from samvad.web.auth import TokenVerifier
from tests.support.server import LiveServer, live_server
from tests.web.test_uvicorn_ws_reads import upgrade_request


class Gate:
    """A responder sleep that waits until the test opens the gate: the first
    chunk of a reply comes at once, the rest only after ``open``."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.opened.wait()

    def open(self) -> None:
        self.opened.set()


def make_app(verify_token: TokenVerifier | None = None, **overrides: Any) -> Starlette:
    options: dict[str, Any] = {"store": "memory", "ws_reply_chunk_delay": 0.0}
    options.update(overrides)
    return create_app(Settings(**options), verify_token=verify_token)


#: What the clients of a test negotiate (``client_compression``).
_compression: str | None = None


@pytest.fixture(autouse=True, params=["plain", "deflate"])
def client_compression(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    global _compression
    deflate = request.param == "deflate"
    _compression = "deflate" if deflate else None
    # The servers offer it only under "deflate" (samvad serve does only when configured).
    monkeypatch.setattr(tests.support.server, "OFFER_DEFLATE", deflate)
    try:
        yield
    finally:
        _compression = None


async def open_client(server: LiveServer, user_id: str, **options: Any) -> SamvadClient:
    options.setdefault("heartbeat", None)
    options.setdefault("compression", _compression)
    client = await SamvadClient.connect(f"{server.ws_url}/ws", user_id=user_id, **options)
    # Negotiated as asked: otherwise the two parameters would run alike.
    assert bool(client.connection.protocol.extensions) is (options["compression"] is not None)
    return client


async def closed_code(client: SamvadClient) -> int | None:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(10):
        try:
            while True:
                await client.connection.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


async def close_and_wait(server: LiveServer, client: SamvadClient) -> None:
    """Close ``client`` and wait until the server has let go of its connection."""
    assert client.started is not None
    session_id = client.session_id
    ours = [
        c.finished.wait()
        for c in server.services.hub.connections_of(client.started.user_id)
        if c.channel is not None and c.channel.session_id == session_id
    ]
    await client.close()
    waiters = [asyncio.ensure_future(w) for w in ours]
    try:
        await asyncio.wait(waiters, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def first_chunk(client: SamvadClient) -> dict[str, Any]:
    return await client.wait_for("reply.chunk")


async def test_a_full_conversation() -> None:
    async with live_server(make_app()) as server:
        client = await open_client(server, "u-full", language="en", metadata={"device": "web"})
        started = client.started
        assert started is not None
        assert started.mode == "firestore"
        assert started.history == []
        assert started.last_seq == 0
        first = await client.ask("What documents do I need?", client_id="c1")
        assert first.ack["seq"] == 1
        assert first.ack["clientId"] == "c1"
        assert first.reply.complete
        assert first.reply.seq == 2
        assert '"What documents do I need?"' in first.reply.text
        assert "".join(first.reply.chunks) == first.reply.text
        second = await client.ask("And the fees?")
        assert (second.ack["seq"], second.reply.seq) == (3, 4)
        await client.set_state({"language": "hi", "conversationContext": {"topic": "loans"}})
        state = await client.wait_for("state")
        assert state["state"]["conversationContext"] == {"topic": "loans"}
        await client.ping(7)
        pong = await client.wait_for("pong")
        assert pong["ts"] == 7
        ended = await client.end()
        assert ended["sessionId"] == started.session_id
        assert await closed_code(client) == 1000

        persistence = server.services.persistence
        profile = await persistence.get_profile("u-full")
        assert profile is not None
        assert [(m.role, m.seq) for m in profile.history] == [
            (Role.USER, 1),
            (Role.ASSISTANT, 2),
            (Role.USER, 3),
            (Role.ASSISTANT, 4),
        ]
        assert profile.history[1].content == first.reply.text
        assert all(m.session_id == started.session_id for m in profile.history)
        session = await persistence.get_session(started.session_id)
        assert session is not None
        assert session.status is SessionStatus.ENDED
        assert session.metadata == {"device": "web"}
        user_state = await persistence.get_state("u-full")
        assert user_state is not None
        assert user_state.data["language"] == "hi"
        assert server.services.hub.counts() == {"connections": 0, "users": 0, "sessions": 0}


async def test_start_answers_with_state_and_recent_history() -> None:
    async with live_server(make_app()) as server:
        first = await open_client(server, "u-hist", session_id="s-hist")
        await first.ask("one")
        await first.set_state({"language": "ta"})
        await first.wait_for("state")
        await close_and_wait(server, first)
        again = await open_client(server, "u-hist", session_id="s-hist", history_limit=1)
        assert again.started is not None
        assert again.started.state["language"] == "ta"
        assert [m["seq"] for m in again.started.history] == [2]
        assert again.started.last_seq == 2
        # Numbering goes on from the highest sequence number of the session.
        exchange = await again.ask("two")
        assert exchange.ack["seq"] == 3
        await again.close()


async def test_barge_in_stores_only_what_was_heard() -> None:
    gate = Gate()
    async with live_server(make_app()) as server:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await open_client(server, "u-barge")
        await client.message("Tell me about home loans")
        ack = await client.wait_for("ack")
        chunk = await first_chunk(client)
        assert chunk["index"] == 0
        await client.interrupt(heard_chars=3, reason="user_spoke")
        interrupted = await client.wait_for("interrupted")
        assert interrupted["replyId"] == chunk["replyId"]
        assert interrupted["heard"] == chunk["text"][:3]
        assert interrupted["seq"] == ack["seq"] + 1
        assert interrupted["late"] is False

        svc = server.services
        profile = await svc.persistence.get_profile("u-barge")
        assert profile is not None
        stored = profile.history[-1]
        assert stored.role is Role.ASSISTANT
        assert stored.content == chunk["text"][:3]
        assert stored.interrupted
        assert stored.id == interrupted["messageId"]
        session_id = client.session_id
        assert svc.interruptions.count(session_id) == 1
        latest = svc.interruptions.latest(session_id)
        assert latest is not None
        assert (latest.heard, latest.cut, latest.reason) == (
            chunk["text"][:3],
            chunk["text"][3:],
            "user_spoke",
        )
        assert latest.message_id == stored.id
        await client.close()


async def test_the_interruption_context_reaches_the_next_reply() -> None:
    gate = Gate()
    seen: list[ReplyContext] = []

    class Recording(EchoResponder):
        def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            seen.append(context)
            return super().reply(context)

    async with live_server(make_app()) as server:
        server.services.hub.responder = Recording(sleep=gate.sleep)
        client = await open_client(server, "u-context")
        await client.message("Explain compound interest")
        chunk = await first_chunk(client)
        await client.interrupt()  # default: the user heard what was sent
        interrupted = await client.wait_for("interrupted")
        assert interrupted["heard"] == chunk["text"]
        gate.open()
        exchange = await client.ask("Sorry, go on")
        assert exchange.reply.complete
        assert exchange.reply.text.startswith(f'(You stopped me after "{chunk["text"].strip()}".)')
        context = seen[-1]
        assert context.interruption is not None
        assert context.interruption.heard == chunk["text"]
        assert [i.heard for i in context.interruptions] == [chunk["text"]]
        # Handed to one reply only.
        third = await client.ask("Thanks")
        assert not third.reply.text.startswith("(You stopped me")
        assert seen[-1].interruption is None
        await client.close()


async def test_heard_text_and_a_new_message_also_cut_the_reply() -> None:
    gate = Gate()
    async with live_server(make_app()) as server:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await open_client(server, "u-heard")
        await client.message("First question")
        chunk = await first_chunk(client)
        await client.interrupt(heard_text=chunk["text"][:2] + "zzz")
        interrupted = await client.wait_for("interrupted")
        assert interrupted["heard"] == chunk["text"][:2]
        # A new message while a reply streams cuts it (reason: new_message).
        await client.message("Second question")
        second_chunk = await first_chunk(client)
        await client.message("Third question")
        cut = await client.wait_for("interrupted")
        assert cut["replyId"] == second_chunk["replyId"]
        assert cut["reason"] == "new_message"
        assert cut["heard"] == second_chunk["text"]
        ack = await client.wait_for("ack")
        assert ack["seq"] == cut["seq"] + 1
        gate.open()
        reply = await client.read_reply()
        assert reply.complete
        assert '"Third question"' in reply.text
        await client.close()


async def test_interrupting_with_nothing_streaming_is_an_error_and_harmless() -> None:
    async with live_server(make_app()) as server:
        client = await open_client(server, "u-nothing")
        await client.interrupt()
        error = await client.wait_for("error")
        assert error["code"] == "nothing_to_interrupt"
        exchange = await client.ask("still fine?")
        assert exchange.reply.complete
        await client.close()


async def test_a_late_interrupt_tells_the_next_reply_what_was_not_played() -> None:
    async with live_server(make_app()) as server:
        client = await open_client(server, "u-late")
        exchange = await client.ask("Read me a long answer")
        await client.interrupt(reply_id=exchange.reply.reply_id, heard_chars=8)
        late = await client.wait_for("interrupted")
        assert late["late"] is True
        assert late["heard"] == exchange.reply.text[:8]
        assert late["seq"] == exchange.reply.seq
        latest = server.services.interruptions.latest(client.session_id)
        assert latest is not None
        assert latest.cut == exchange.reply.text[8:]
        # The stored message stays whole: it was all sent.
        profile = await server.services.persistence.get_profile("u-late")
        assert profile is not None
        assert profile.history[-1].content == exchange.reply.text
        await client.close()


async def test_resume_replays_what_was_missed() -> None:
    async with live_server(make_app()) as server:
        phone = await open_client(server, "u-resume", session_id="s-resume")
        await phone.ask("first")
        assert phone.last_seq == 2
        await phone.close()
        desktop = await open_client(server, "u-resume", session_id="s-resume")
        await desktop.ask("second")
        await desktop.ask("third")
        await desktop.close()
        back = await open_client(server, "u-resume", session_id="s-resume", resume_from=2)
        started = back.started
        assert started is not None
        assert started.resumed
        resume = started.resume
        assert resume is not None
        assert resume["recovered"] is True
        assert [(m["seq"], m["role"]) for m in resume["messages"]] == [
            (3, "user"),
            (4, "assistant"),
            (5, "user"),
            (6, "assistant"),
        ]
        assert resume["messages"][0]["content"] == "second"
        assert resume["inFlight"] is None
        assert back.last_seq == 6
        session = await server.services.persistence.get_session("s-resume")
        assert session is not None
        assert session.is_active  # resuming re-activated it
        await back.close()


async def test_resume_picks_up_a_reply_that_was_streaming() -> None:
    gate = Gate()
    async with live_server(make_app()) as server:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await open_client(server, "u-inflight", session_id="s-inflight")
        await client.message("Tell me a story")
        await client.wait_for("ack")
        chunk = await first_chunk(client)
        await client.close()  # the connection drops mid-reply
        back = await open_client(server, "u-inflight", session_id="s-inflight", resume_from=1)
        assert back.started is not None and back.started.resume is not None
        resume = back.started.resume
        assert resume["recovered"] is True
        assert resume["messages"] == []
        assert resume["inFlight"]["replyId"] == chunk["replyId"]
        assert resume["inFlight"]["text"] == chunk["text"]
        gate.open()
        end = await back.wait_for("reply.end")
        assert end["replyId"] == chunk["replyId"]
        assert end["seq"] == 2
        assert end["text"].startswith(chunk["text"])
        assert back.last_seq == 2
        await back.close()


async def test_resume_says_explicitly_when_it_cannot_recover() -> None:
    async with live_server(make_app(history_cap=4)) as server:
        client = await open_client(server, "u-trim", session_id="s-trim")
        for text in ("one", "two", "three"):
            await client.ask(text)
        await close_and_wait(server, client)
        back = await open_client(server, "u-trim", session_id="s-trim", resume_from=1)
        assert back.started is not None and back.started.resume is not None
        resume = back.started.resume
        assert resume == {
            "type": "resume",
            "recovered": False,
            "reason": "history_trimmed",
            "lastSeq": 6,
            "inFlight": None,
        }
        await back.close()
        ahead = await open_client(server, "u-trim", session_id="s-trim", resume_from=99)
        assert ahead.started is not None and ahead.started.resume is not None
        assert ahead.started.resume["reason"] == "unknown_seq"
        await ahead.close()


async def test_two_devices_on_one_session_see_the_same_conversation() -> None:
    async with live_server(make_app()) as server:
        phone = await open_client(server, "u-two", session_id="s-two")
        desktop = await open_client(server, "u-two", session_id="s-two")
        assert len(server.services.hub.connections_of("u-two")) == 2
        exchange = await phone.ask("hello from the phone")
        echoed = await desktop.wait_for("message")
        assert echoed["message"]["content"] == "hello from the phone"
        assert echoed["message"]["seq"] == exchange.ack["seq"]
        mirrored = await desktop.read_reply()
        assert mirrored.reply_id == exchange.reply.reply_id
        assert mirrored.text == exchange.reply.text
        assert desktop.last_seq == phone.last_seq == 2
        # State set on one device reaches both.
        await desktop.set_state({"language": "mr"})
        assert (await phone.wait_for("state"))["state"]["language"] == "mr"
        assert (await desktop.wait_for("state"))["state"]["language"] == "mr"
        # One device leaving does not end the session for the other.
        await phone.close()
        again = await desktop.ask("still here")
        assert again.ack["seq"] == 3
        session = await server.services.persistence.get_session("s-two")
        assert session is not None and session.is_active
        await close_and_wait(server, desktop)
        session = await server.services.persistence.get_session("s-two")
        assert session is not None and session.status is SessionStatus.ENDED


async def test_devices_on_other_sessions_get_message_notifications() -> None:
    async with live_server(make_app()) as server:
        phone = await open_client(server, "u-multi", session_id="s-phone")
        desktop = await open_client(server, "u-multi", session_id="s-desktop")
        exchange = await phone.ask("from the phone")
        user_note = await desktop.wait_for("message")
        assistant_note = await desktop.wait_for("message")
        assert user_note["message"]["sessionId"] == "s-phone"
        assert user_note["message"]["content"] == "from the phone"
        assert assistant_note["message"]["role"] == "assistant"
        assert assistant_note["message"]["content"] == exchange.reply.text
        # Other sessions' numbers do not move this device's resume point.
        assert desktop.last_seq == 0
        await phone.close()
        await desktop.close()


async def test_ending_a_session_ends_it_for_every_device() -> None:
    async with live_server(make_app()) as server:
        phone = await open_client(server, "u-end", session_id="s-end")
        desktop = await open_client(server, "u-end", session_id="s-end")
        await phone.end()
        assert (await desktop.wait_for("ended"))["sessionId"] == "s-end"
        assert await closed_code(desktop) == 1000
        assert await closed_code(phone) == 1000


async def test_malformed_frames_get_error_frames_and_the_connection_stays_usable() -> None:
    async with live_server(make_app()) as server, connect(f"{server.ws_url}/ws") as ws:

        async def answer(data: str | bytes) -> dict[str, Any]:
            await ws.send(data)
            frame: dict[str, Any] = json.loads(await ws.recv())
            return frame

        assert (await answer('{"type": "message", "text": "early"}'))["code"] == "not_started"
        assert (await answer("{nope"))["code"] == "bad_json"
        assert (await answer("[]"))["code"] == "bad_frame"
        assert (await answer('{"type": "teleport"}'))["code"] == "unknown_type"
        assert (await answer(b"\x01\x02"))["code"] == "bad_frame"
        assert (await answer('{"type": "start", "userId": "a/b"}'))["code"] == "invalid_field"
        started = await answer('{"type": "start", "userId": "u-bad"}')
        assert started["type"] == "started"
        assert (await answer('{"type": "message", "text": ""}'))["code"] == "invalid_field"
        assert (await answer('{"type": "start", "userId": "u-bad"}'))["code"] == ("already_started")
        assert (await answer('{"type": "message", "text": "now"}'))["type"] == "ack"


async def test_starting_a_session_of_another_user_is_refused() -> None:
    async with live_server(make_app()) as server:
        owner = await open_client(server, "u-owner", session_id="s-owned")
        with pytest.raises(ServerError) as caught:
            await open_client(server, "u-intruder", session_id="s-owned")
        assert caught.value.code == "conflict"
        await owner.close()


async def test_interim_transcripts_are_not_messages() -> None:
    async with live_server(make_app()) as server:
        client = await open_client(server, "u-interim")
        await client.message("what do", final=False)
        await client.message("what documents", final=False)
        exchange = await client.ask("what documents do I need")
        assert exchange.ack["seq"] == 1
        profile = await server.services.persistence.get_profile("u-interim")
        assert profile is not None
        assert profile.history[0].content == "what documents do I need"
        await client.close()


async def test_oversized_frames_close_with_1009_without_touching_others() -> None:
    async with live_server(make_app(ws_max_frame_bytes=1024)) as server:
        bystander = await open_client(server, "u-bystander")
        client = await open_client(server, "u-big")
        await client.message("x" * 2000)
        error = await client.wait_for("error")
        assert error["code"] == "frame_too_large"
        assert await closed_code(client) == 1009
        assert (await bystander.ask("unaffected")).reply.complete
        await bystander.close()


async def test_exceeding_the_rate_limit_gets_an_error_then_1008() -> None:
    app = make_app(ws_rate_per_second=0.001, ws_rate_burst=3, ws_rate_strikes=2)
    async with live_server(app) as server:
        client = await open_client(server, "u-flood")  # start used one token
        for _ in range(6):
            await client.ping()
        answers = [await client.recv() for _ in range(5)]
        assert [a["type"] for a in answers] == ["pong", "pong", "error", "error", "error"]
        assert {a.get("code") for a in answers[2:]} == {"rate_limited"}
        assert await closed_code(client) == 1008


async def test_idle_connections_time_out_with_4408() -> None:
    async with live_server(make_app(ws_idle_timeout=0.2)) as server:
        client = await open_client(server, "u-idle")
        error = await client.wait_for("error")
        assert error["code"] == "idle_timeout"
        assert await closed_code(client) == 4408
        session = await server.services.persistence.get_session(client.session_id)
        assert session is not None and session.status is SessionStatus.ENDED


async def test_a_connection_that_never_starts_is_closed_even_if_it_pings() -> None:
    async with (
        live_server(make_app(ws_start_timeout=0.3, ws_idle_timeout=30)) as server,
        connect(f"{server.ws_url}/ws") as ws,
    ):
        frames: list[dict[str, Any]] = []

        async def read() -> None:
            async for raw in ws:
                frames.append(json.loads(raw))

        reader = asyncio.create_task(read())
        async with asyncio.timeout(10):
            while not reader.done():
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps({"type": "ping"}))
                await asyncio.wait({reader}, timeout=0.1)  # pacing, under the rate limit
        with pytest.raises(ConnectionClosed):
            reader.result()
        assert ws.close_code == 4408
        assert any(f["type"] == "pong" for f in frames), "pings were answered"
        assert frames[-1] == {**frames[-1], "type": "error", "code": "start_timeout"}


async def test_heartbeats_keep_a_connection_alive() -> None:
    async with live_server(make_app(ws_idle_timeout=0.5)) as server:
        client = await open_client(server, "u-beat", heartbeat=0.05)
        # Ten pongs span twice the idle timeout: the pings kept it open.
        for _ in range(10):
            await client.wait_for("pong")
        assert (await client.ask("alive")).reply.complete
        await client.close()


class RawSocket:
    """A WebSocket client that never reads: a tiny receive buffer and a hand-made
    handshake, so the server's writes back up after a few frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, port: int) -> RawSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, upgrade_request(port, "/ws"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
        assert head.startswith(b"HTTP/1.1 101")
        return cls(sock)

    async def send(self, frame: dict[str, Any]) -> None:
        payload = json.dumps(frame).encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        data = bytes([0x81, 0x80 | len(payload)]) + mask + masked
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


async def test_a_slow_reader_is_closed_with_1013_without_delaying_others() -> None:
    class Flood:
        async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            for _ in range(100_000):
                await asyncio.sleep(0)
                yield "x" * 32_768

    async with live_server(make_app(ws_send_queue=8)) as server:
        svc = server.services
        svc.hub.orphan_grace = 0  # cut the flood as soon as its reader is gone
        svc.hub.max_reply_chars = 10**12
        fast = await open_client(server, "u-fast")
        slow = await RawSocket.open(server.port)
        await slow.send({"type": "start", "userId": "u-slow"})
        async with asyncio.timeout(10):
            while not svc.hub.connections_of("u-slow"):
                # Round trips on the fast connection until the server handled the start.
                await fast.ping()
                await fast.wait_for("pong")
        (slow_conn,) = svc.hub.connections_of("u-slow")
        svc.hub.responder = Flood()
        await slow.send({"type": "message", "text": "flood me"})
        # The slow client never reads: its queue fills and it is dropped.
        async with asyncio.timeout(20):
            await slow_conn.finished.wait()
        assert slow_conn.closing is not None and slow_conn.closing.code == 1013
        assert svc.hub.connections_of("u-slow") == ()
        svc.hub.responder = EchoResponder()
        exchange = await fast.ask("am I slowed down?", within=5)
        assert exchange.reply.complete
        # What the slow client was sent is stored, cut where it was dropped.
        profile = await svc.persistence.get_profile("u-slow")
        assert profile is not None
        assert profile.history[-1].interrupted
        slow.close()
        await fast.close()


async def test_a_failing_responder_ends_the_reply_incomplete() -> None:
    class Broken:
        async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            yield "Half "
            raise RuntimeError("the model went away")

    async with live_server(make_app()) as server:
        server.services.hub.responder = Broken()
        client = await open_client(server, "u-broken")
        exchange = await client.ask("hello")
        assert not exchange.reply.complete
        assert exchange.reply.text == "Half "
        profile = await server.services.persistence.get_profile("u-broken")
        assert profile is not None
        assert profile.history[-1].interrupted
        server.services.hub.responder = EchoResponder()
        assert (await client.ask("again")).reply.complete
        await client.close()


async def test_replies_are_cut_at_the_size_limit() -> None:
    async with live_server(make_app()) as server:
        server.services.hub.max_reply_chars = 40
        client = await open_client(server, "u-long")
        exchange = await client.ask("a question whose echo is longer than forty characters")
        assert not exchange.reply.complete
        assert len(exchange.reply.text) == 40
        assert "".join(exchange.reply.chunks) == exchange.reply.text
        await client.close()


async def test_a_responder_stream_is_closed_when_the_reply_stops_early() -> None:
    """Cut at the size limit, a generator is closed (its ``finally`` runs) and an
    async iterator of another kind gets its ``aclose``; one run to its end is
    left as it is."""
    events: list[str] = []

    class Generator:
        task_free = True

        async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            try:
                for word in context.message.split():
                    yield word + " "
            finally:
                events.append(f"finally {context.message[:5]}")

    class Iterator:
        task_free = True

        def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            parts = iter(["x" * 30, "y" * 30])

            class Stream:
                def __aiter__(self) -> Stream:
                    return self

                async def __anext__(self) -> str:
                    try:
                        return next(parts)
                    except StopIteration:
                        raise StopAsyncIteration from None

                async def aclose(self) -> None:
                    events.append("aclose")

            return Stream()

    async with live_server(make_app()) as server:
        hub = server.services.hub
        hub.max_reply_chars = 40
        hub.responder = Generator()
        client = await open_client(server, "u-close")
        whole = await client.ask("short one")
        assert whole.reply.complete and events == ["finally short"]
        cut = await client.ask("a question whose echo is longer than forty characters")
        assert not cut.reply.complete and events[-1] == "finally a que"
        hub.responder = Iterator()
        cut = await client.ask("anything")
        assert not cut.reply.complete and events[-1] == "aclose"
        await client.close()


class TaskNames:
    """The names of the tasks the event loop creates while installed (a task factory)."""

    def __init__(self) -> None:
        self.created: list[asyncio.Task[Any]] = []
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_task_factory()

    def __enter__(self) -> TaskNames:
        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            task = asyncio.Task(coro, loop=loop, **kwargs)
            self.created.append(task)
            return task

        self._loop.set_task_factory(factory)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.set_task_factory(self._previous)

    def replies(self) -> list[str]:
        return [t.get_name() for t in self.created if t.get_name().startswith("samvad-reply-")]


async def test_a_task_free_reply_whose_chunks_are_ready_runs_without_a_task() -> None:
    class Ready:
        task_free = True

        async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            yield "All of it at once."

    async with live_server(make_app()) as server:
        server.services.hub.responder = Ready()
        client = await open_client(server, "u-ready")
        await client.ask("warm the caches")
        with TaskNames() as tasks:
            exchange = await client.ask("hello")
        assert exchange.reply.complete
        assert exchange.reply.text == "All of it at once."
        assert (exchange.ack["seq"], exchange.reply.seq) == (3, 4)
        assert tasks.replies() == []
        await client.close()


async def test_a_reply_is_a_task_of_its_own_unless_its_responder_is_task_free() -> None:
    class Bound:
        """Say, a timeout around a wait: what it binds to a task must find the same
        task after the wait (an anyio cancel scope refuses to be left elsewhere)."""

        def __init__(self) -> None:
            self.same_task: list[bool] = []

        async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
            entered = asyncio.current_task()
            await asyncio.sleep(0)
            self.same_task.append(asyncio.current_task() is entered)
            yield "Bound to its task."

    async with live_server(make_app()) as server:
        bound = server.services.hub.responder = Bound()
        client = await open_client(server, "u-bound")
        with TaskNames() as tasks:
            exchange = await client.ask("hello")
            again = await client.ask("again")
        assert exchange.reply.complete and again.reply.complete
        assert exchange.reply.text == "Bound to its task."
        assert bound.same_task == [True, True]
        assert len(tasks.replies()) == 2
        await client.close()


async def test_a_task_free_reply_that_waits_goes_on_in_a_task_and_barge_in_still_cuts_it() -> None:
    gate = Gate()
    async with live_server(make_app()) as server:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await open_client(server, "u-waits")
        with TaskNames() as tasks:
            await client.message("a long answer please")
            chunk = await first_chunk(client)
            assert len(tasks.replies()) == 1  # the first chunk came before the first wait
            await client.interrupt()
            interrupted = await client.wait_for("interrupted")
        assert interrupted["heard"] == chunk["text"]
        assert server.services.hub._replies == {}
        gate.open()
        exchange = await client.ask("and now all of it")
        assert exchange.reply.complete
        await client.close()


async def test_shutdown_closes_with_1001_and_stores_the_reply_in_flight() -> None:
    gate = Gate()
    async with live_server(make_app()) as server:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await open_client(server, "u-shutdown")
        await client.message("a long answer please")
        chunk = await first_chunk(client)
        await server.services.hub.close_all(code=1001, reason="server shutting down")
        interrupted = await client.wait_for("interrupted")
        assert interrupted["reason"] == "shutdown"
        assert await closed_code(client) == 1001
        profile = await server.services.persistence.get_profile("u-shutdown")
        assert profile is not None
        assert profile.history[-1].content == chunk["text"]
        assert profile.history[-1].interrupted
        # Not a barge-in: no context for a next reply.
        assert server.services.interruptions.count(client.session_id) == 0


async def test_a_handler_cancelled_from_outside_cancels_its_reader_and_lets_go() -> None:
    # What a server does to a handler that outlives its shutdown deadline: the
    # cancellation reaches the read loop (a task of its own), the handler
    # still ends with it, and the connection is detached.
    async with live_server(make_app()) as server:
        hub = server.services.hub
        victim = await open_client(server, "u-cancelled")
        bystander = await open_client(server, "u-on")
        (connection,) = hub.connections_of("u-cancelled")
        reader = connection._reading
        assert reader is not None
        # The handler's task is the one waiting on the reader (CPython's Task
        # keeps what it waits on in ``_fut_waiter``).
        (handler,) = [t for t in asyncio.all_tasks() if getattr(t, "_fut_waiter", None) is reader]
        handler.cancel()
        async with asyncio.timeout(10):
            await connection.finished.wait()
            await asyncio.wait({handler})
        assert reader.cancelled()
        # Not taken for the writer's end, which would close with 1011 first.
        assert connection.closing is None
        assert hub.connections_of("u-cancelled") == ()
        assert (await bystander.ask("still here?", within=5)).reply.complete
        await victim.close()
        await bystander.close()


async def test_authentication_checks_the_token_of_the_start_frame() -> None:
    async def verify(token: str) -> str:
        if token.startswith("good-"):
            return token.removeprefix("good-")
        raise Unauthorized("invalid token")

    async with live_server(make_app(verify, auth="firebase")) as server:
        with pytest.raises(ServerError, match="unauthorized"):
            await open_client(server, "u-auth")
        with pytest.raises(ServerError, match="unauthorized"):
            await open_client(server, "u-auth", token="bad")
        with pytest.raises(ServerError, match="forbidden"):
            await open_client(server, "u-auth", token="good-someone-else")
        client = await open_client(server, "u-auth", token="good-u-auth")
        assert (await client.ask("hi")).reply.complete
        await client.close()


async def test_unauthorized_start_closes_with_4401() -> None:
    async with (
        live_server(make_app(auth="firebase")) as server,
        connect(f"{server.ws_url}/ws") as ws,
    ):
        await ws.send(json.dumps({"type": "start", "userId": "u-x"}))
        error = json.loads(await ws.recv())
        assert error["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as caught:
            await ws.recv()
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 4401


async def test_a_crashing_reply_task_closes_its_session_with_1011_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with live_server(make_app()) as server:
        persistence = server.services.persistence
        victim = await open_client(server, "u-crash")
        bystander = await open_client(server, "u-fine")
        held_state = persistence.held_state

        # The reply reads the user's state first (from the cache, as it is held).
        def broken(user_id: str) -> Any:
            if user_id == "u-crash":
                raise RuntimeError("a bug")
            return held_state(user_id)

        persistence.held_state = broken  # type: ignore[method-assign]
        await victim.message("hello")
        error = await victim.wait_for("error")
        assert error["code"] == "internal_error"
        assert await closed_code(victim) == 1011
        assert any(r.exc_info and "failed" in r.getMessage() for r in caplog.records)
        assert (await bystander.ask("and me?")).reply.complete
        await bystander.close()


async def test_a_bug_handling_a_frame_closes_that_connection_with_1011_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with live_server(make_app()) as server:
        persistence = server.services.persistence
        victim = await open_client(server, "u-bug")
        bystander = await open_client(server, "u-ok")
        save_state = persistence.save_state

        def broken(user_id: str, data: Any) -> Any:
            if user_id == "u-bug":
                raise RuntimeError("a bug")
            return save_state(user_id, data)

        persistence.save_state = broken  # type: ignore[method-assign]
        await victim.set_state({"x": 1})
        assert (await victim.wait_for("error"))["code"] == "internal_error"
        assert await closed_code(victim) == 1011
        assert any(r.exc_info for r in caplog.records if r.name == "samvad.web.realtime")
        await bystander.set_state({"y": 2})
        assert (await bystander.wait_for("state"))["state"]["y"] == 2
        await bystander.close()


async def test_a_full_write_backlog_is_an_error_frame_not_a_crash() -> None:
    # Nothing is flushed during the test: the backlog only grows.
    app = make_app(max_pending_documents=2, flush_interval=600.0, flush_linger=600.0)
    async with live_server(app) as server:
        client = await open_client(server, "u-backlog")  # the session: 1 pending document
        exchange = await client.ask("fits")  # the profile: 2 pending documents
        assert exchange.reply.complete
        await client.set_state({"too": "many"})  # a third document: refused
        error = await client.wait_for("error")
        assert error["code"] == "backlog_full"
        assert (await client.ask("still usable")).reply.complete
        await client.close()


async def test_state_saved_over_rest_reaches_the_users_live_devices() -> None:
    async with live_server(make_app()) as server, httpx.AsyncClient(base_url=server.url) as http:
        phone = await open_client(server, "u-rest-state")
        stranger = await open_client(server, "u-stranger")
        response = await http.post("/api/session/u-rest-state/state", json={"topic": "loans"})
        assert response.status_code == 200
        state = await phone.wait_for("state")
        assert state["state"]["topic"] == "loans"
        await stranger.ping("probe")
        seen: list[dict[str, Any]] = []
        assert (await stranger.wait_for("pong", seen=seen))["ts"] == "probe"
        assert [f["type"] for f in seen] == ["pong"]  # nothing before it
        await phone.close()
        await stranger.close()


async def test_a_state_frame_follows_the_same_rules_as_rest() -> None:
    async with live_server(make_app(max_merged_object_bytes=2_000)) as server:
        client = await open_client(server, "u-state-rules")
        await client.set_state({"topic": "loans", "updatedAt": "forged", "isActive": False})
        state = (await client.wait_for("state"))["state"]
        assert state["topic"] == "loans"
        assert state["updatedAt"] != "forged"
        await client.set_state({"big": "x" * 3_000})
        error = await client.wait_for("error")
        assert error["code"] == "payload_too_large"
        stored = await server.services.persistence.get_state("u-state-rules")
        assert stored is not None and stored.data == {"topic": "loans"}
        assert (await client.ask("still usable")).reply.complete
        await client.close()


async def test_a_start_follows_the_same_rules_as_rest_for_metadata_and_language() -> None:
    async with live_server(make_app(max_merged_object_bytes=2_000)) as server:

        async def start(ws: Any, **fields: Any) -> dict[str, Any]:
            await ws.send(json.dumps({"type": "start", "userId": "u-meta", **fields}))
            frame: dict[str, Any] = json.loads(await ws.recv())
            return frame

        async with connect(f"{server.ws_url}/ws") as ws:
            big = {"big": "x" * 3_000}
            refused = await start(ws, sessionId="s-meta", metadata=big)
            assert refused["code"] == "payload_too_large"
            # As POST /api/session/create refuses them: empty, or not printable.
            for language in ("", "en\r\nX-Injected: 1", "\x00"):
                refused = await start(ws, sessionId="s-meta", language=language)
                assert refused["code"] == "invalid_field", language
            assert await server.services.persistence.get_session("s-meta") is None
            started = await start(ws, sessionId="s-meta", metadata={"a": "x" * 1_500})
            assert started["type"] == "started"

            # Another device: its metadata merges into the stored one, bounded as a whole.
            async with connect(f"{server.ws_url}/ws") as other:
                refused = await start(other, sessionId="s-meta", metadata={"b": "x" * 1_500})
                assert refused["code"] == "payload_too_large"
                joined = await start(other, sessionId="s-meta", metadata={"b": "y"})
                assert joined["type"] == "started"
        session = await server.services.persistence.get_session("s-meta")
        assert session is not None and session.metadata == {"a": "x" * 1_500, "b": "y"}

        async with httpx.AsyncClient(base_url=server.url) as http:
            create = "/api/session/create"
            body = {"sessionId": "s-rest", "userId": "u-meta", "metadata": big}
            assert (await http.post(create, json=body)).status_code == 413
            for language in ("", "en\r\nX-Injected: 1", "\x00"):
                body = {"sessionId": "s-rest", "userId": "u-meta", "language": language}
                assert (await http.post(create, json=body)).status_code == 400, language


class Burst:
    """Yields its words without awaiting; with a clock, moves it on before
    each word as if the connection's writer had been kept waiting."""

    def __init__(self, words: list[str], clock: ManualClock | None = None) -> None:
        self.words = words
        self.clock = clock

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        for word in self.words:
            if self.clock is not None:
                self.clock.advance(0.01)
            yield word


def merging_app(clock: ManualClock) -> Starlette:
    return create_app(Settings(store="memory", ws_reply_chunk_delay=0.0), clock=clock)


async def read_reply(client: SamvadClient) -> list[dict[str, Any]]:
    """The frames from now to the next ``reply.end``, inclusive."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not frames or frames[-1]["type"] != "reply.end":
            frames.append(json.loads(await client.connection.recv()))
    return frames


async def test_chunks_that_waited_in_the_send_queue_are_merged_into_one_frame() -> None:
    clock = ManualClock()
    words = [f"w{i} " for i in range(50)]
    async with live_server(merging_app(clock), ws_per_message_deflate=True) as server:
        server.services.hub.responder = Burst(words, clock)
        # Compressed, so that no frame is written directly and the chunks
        # wait in the send queue (under either parameter).
        client = await open_client(server, "u-merge", compression="deflate")
        assert client.connection.protocol.extensions
        await client.message("go")
        frames = await read_reply(client)
        assert [f["type"] for f in frames] == ["ack", "reply.start", "reply.chunk", "reply.end"]
        chunk, end = frames[2], frames[3]
        assert chunk["firstIndex"] == 0 and chunk["index"] == len(words) - 1
        assert chunk["text"] == end["text"] == "".join(words)
        assert end["complete"]
        await client.close()


async def test_a_connection_that_keeps_up_gets_every_chunk_in_its_own_frame() -> None:
    words = [f"w{i} " for i in range(5)]
    async with live_server(merging_app(ManualClock())) as server:
        server.services.hub.responder = Burst(words)  # all at once, no time passes
        client = await open_client(server, "u-no-merge")
        await client.message("go")
        frames = await read_reply(client)
        chunks = [f for f in frames if f["type"] == "reply.chunk"]
        assert [c["index"] for c in chunks] == [0, 1, 2, 3, 4]
        assert all("firstIndex" not in c for c in chunks)
        assert [c["text"] for c in chunks] == words
        await client.close()


async def test_merged_chunks_keep_their_indexes_contiguous_and_their_size_bounded() -> None:
    from samvad.web.realtime import MERGE_MAX_CHARS

    clock = ManualClock()
    words = [f"{i:04d}" + "x" * 996 for i in range(20)]  # 20,000 characters
    async with live_server(merging_app(clock)) as server:
        server.services.hub.responder = Burst(words, clock)
        server.services.hub.max_reply_chars = 100_000
        client = await open_client(server, "u-merge-big")
        await client.message("go")
        frames = await read_reply(client)
        chunks = [f for f in frames if f["type"] == "reply.chunk"]
        assert len(chunks) > 1
        expected = 0
        for chunk in chunks:
            assert chunk.get("firstIndex", chunk["index"]) == expected
            assert len(chunk["text"]) <= MERGE_MAX_CHARS
            expected = chunk["index"] + 1
        assert expected == len(words)
        assert "".join(c["text"] for c in chunks) == frames[-1]["text"] == "".join(words)
        await client.close()


async def test_a_lone_chunk_is_sent_as_it_was_encoded() -> None:
    async with live_server(make_app()) as server:
        server.services.hub.responder = Burst(["all at once"])
        client = await open_client(server, "u-single")
        await client.message("go")
        frames = await read_reply(client)
        assert frames[2] == {
            "type": "reply.chunk",
            "replyId": frames[1]["replyId"],
            "index": 0,
            "text": "all at once",
        }
        await client.close()


async def test_a_connection_touches_its_session_once_per_touch_interval() -> None:
    clock = ManualClock()
    app = create_app(
        Settings(store="memory", ws_reply_chunk_delay=0.0, touch_interval=30.0), clock=clock
    )
    async with live_server(app) as server:
        persistence = server.services.persistence
        client = await open_client(server, "u-touch")
        session_id = client.session_id
        assert session_id is not None

        async def last_activity() -> Any:
            session = await persistence.get_session(session_id)
            assert session is not None
            return session.last_activity

        clock.advance(1)
        await client.ask("first")
        touched = clock.now()
        assert await last_activity() == touched
        clock.advance(5)
        await client.ask("within the interval")
        assert await last_activity() == touched
        clock.advance(30)
        await client.ask("after it")
        assert await last_activity() == clock.now()
        await client.close()


async def test_a_start_that_takes_longer_than_the_start_timeout_is_not_cut() -> None:
    # The deadlines count the time spent waiting for a frame, not handling one.
    async def slow_verify(token: str) -> str:
        await asyncio.sleep(0.5)  # an identity provider slower than the start timeout
        return token

    app = make_app(slow_verify, auth="firebase", ws_start_timeout=0.2, ws_idle_timeout=30)
    async with live_server(app) as server:
        client = await open_client(server, "u-slow-start", token="u-slow-start")
        assert (await client.ask("made it")).reply.complete
        await client.close()
