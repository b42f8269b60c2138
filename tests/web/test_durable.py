"""End-to-end durability for WebSocket clients (issue 10, item 4), over real
sockets and the real Firestore emulator: ``durable`` frames say how far
Firestore has a session's messages, and a message sent again with its
``clientId`` is stored once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
import websockets
from google.cloud.firestore import AsyncClient
from websockets.asyncio.client import ClientConnection

from samvad.config import Settings
from samvad.documents import PROFILES
from samvad.models import Message, Role
from samvad.web import schemas
from samvad.web.app import create_app
from tests.support.faultproxy import FaultProxy
from tests.support.server import LiveServer, live_server, outage_settings

_server_frame = msgspec.json.Decoder(schemas.ServerFrame)


class Socket:
    """One WebSocket: every frame it received, in order, each checked against
    the wire shapes (``/asyncapi.json`` is generated from them)."""

    def __init__(
        self,
        ws: ClientConnection,
        on_durable: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.on_durable = on_durable

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(30):
            text = await self.ws.recv()
        assert isinstance(text, str)
        _server_frame.decode(text)  # the documented shape, or it raises
        frame: dict[str, Any] = json.loads(text)
        self.frames.append(frame)
        if frame["type"] == "durable" and self.on_durable is not None:
            await self.on_durable(frame)
        return frame

    async def next(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next frame of type ``kind`` with ``fields`` (others are kept in ``frames``)."""
        while True:
            frame = await self.recv()
            if frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]


async def stored_messages(client: AsyncClient, user_id: str) -> list[dict[str, Any]]:
    snapshot = await client.collection(PROFILES).document(user_id).get()
    doc = snapshot.to_dict() or {}
    history: list[dict[str, Any]] = doc.get("conversationHistory", [])
    return history


def firestore_settings(emulator: str, project: str, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "store": "firestore",
        "emulator_host": emulator,
        "project": project,
        "ws_reply_chunk_delay": 0.0,
        "shutdown_flush_deadline": 5.0,
    }
    options.update(overrides)
    return Settings(**options)


@pytest.mark.firestore
async def test_durable_frames_follow_the_acks_and_firestore_has_every_seq_they_cover(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    user, session = "dur-a", "dur-a-s"
    checked: list[int] = []

    async def in_firestore(frame: dict[str, Any]) -> None:
        # Read the emulator the moment the frame arrives.
        stored = {
            m["seq"]
            for m in await stored_messages(firestore_client, user)
            if m.get("sessionId") == session
        }
        assert set(range(1, frame["seq"] + 1)) <= stored, (frame, sorted(stored))
        checked.append(frame["seq"])

    # The default flush timing: the first write at once, then one a second.
    app = create_app(firestore_settings(firestore_emulator, firestore_project))
    async with live_server(app) as server, websockets.connect(f"{server.ws_url}/ws") as ws:
        sock = Socket(ws, on_durable=in_firestore)
        await sock.send(type="start", userId=user, sessionId=session)
        await sock.next("started")
        # Right after started: how far Firestore has the session (nothing yet).
        assert await sock.recv() == {"type": "durable", "sessionId": session, "seq": 0}
        for i in range(6):
            await sock.send(type="message", text=f"question {i}", clientId=f"c{i}")
            await sock.next("ack", clientId=f"c{i}")
            await sock.next("reply.end")
            # Told along the way, not only at the end: each exchange (its
            # message and reply, seqs 2i+1 and 2i+2) is announced in its turn.
            while not checked or checked[-1] < 2 * i + 2:
                await sock.next("durable")

    assert checked == sorted(set(checked)), "durable seqs only grow"
    assert len(checked) > 2
    # Each durable frame came after the ack of every user message it covers.
    acked: set[int] = set()
    for frame in sock.frames:
        if frame["type"] == "ack":
            acked.add(frame["seq"])
        elif frame["type"] == "durable":
            assert {s for s in range(1, frame["seq"] + 1) if s % 2 == 1} <= acked
    history = await stored_messages(firestore_client, user)
    assert [m["clientId"] for m in history if m["role"] == "user"] == [f"c{i}" for i in range(6)]


async def _converse(sock: Socket, text: str, client_id: str) -> dict[str, Any]:
    await sock.send(type="message", text=text, clientId=client_id)
    ack = await sock.next("ack", clientId=client_id)
    await sock.next("reply.end")
    return ack


@pytest.mark.firestore
async def test_messages_sent_again_after_a_drop_before_durable_are_stored_once(
    fault_proxy: FaultProxy, firestore_project: str, firestore_client: AsyncClient
) -> None:
    user, session = "dur-b", "dur-b-s"
    settings = outage_settings(fault_proxy.host_port, firestore_project, ws_reply_chunk_delay=0.0)
    texts = {f"c{i}": f"message {i}" for i in range(1, 5)}
    async with live_server(create_app(settings)) as server:
        url = f"{server.ws_url}/ws"
        async with websockets.connect(url) as ws:
            first = Socket(ws)
            await first.send(type="start", userId=user, sessionId=session)
            await first.next("started")
            await first.next("durable", seq=0)
            fault_proxy.cut()  # acknowledged, never durable on this connection
            acks = {cid: await _converse(first, texts[cid], cid) for cid in ("c1", "c2", "c3")}
        assert [f["seq"] for f in first.of("durable")] == [0]
        assert [a["seq"] for a in acks.values()] == [1, 3, 5]

        async with websockets.connect(url) as ws:
            second = Socket(ws)
            await second.send(type="start", userId=user, sessionId=session, resume={"lastSeq": 6})
            await second.next("resume")
            for cid in ("c1", "c2", "c3", "c4"):
                await second.send(type="message", text=texts[cid], clientId=cid)
            again = [await second.next("ack") for _ in range(4)]
            end = await second.next("reply.end")
            for ack in again[:3]:
                original = acks[ack["clientId"]]
                assert ack == {**original, "duplicate": True}
            assert again[3]["seq"] == 7 and "duplicate" not in again[3]
            # One reply: to the new message only.
            assert [f["inReplyTo"] for f in second.of("reply.start")] == [7]
            assert end["seq"] == 8

            fault_proxy.restore()
            await second.next("durable", seq=8)
            # After the commit, the same id is still a duplicate.
            await second.send(type="message", text=texts["c2"], clientId="c2")
            assert await second.next("ack") == {**acks["c2"], "duplicate": True}
            await second.send(type="ping", ts=1)
            await second.next("pong")
            assert len(second.of("reply.start")) == 1

    history = await stored_messages(firestore_client, user)
    assert [m["seq"] for m in history] == list(range(1, 9))
    users = [m for m in history if m["role"] == "user"]
    assert [(m["clientId"], m["content"]) for m in users] == list(texts.items())
    assert [m["id"] for m in users[:3]] == [a["messageId"] for a in acks.values()]


@pytest.mark.firestore
async def test_a_fresh_server_on_the_same_firestore_knows_the_client_ids_from_the_history(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # A restart, or another instance the client reconnects to: only the
    # history in Firestore knows what was stored.
    user, session = "dur-c", "dur-c-s"
    settings = firestore_settings(firestore_emulator, firestore_project)
    async with (
        live_server(create_app(settings)) as one,
        websockets.connect(one.ws_url + "/ws") as ws,
    ):
        sock = Socket(ws)
        await sock.send(type="start", userId=user, sessionId=session)
        await sock.next("started")
        original = await _converse(sock, "only once", "c-once")
        await sock.next("durable", seq=2)

    async with (
        live_server(create_app(settings)) as two,
        websockets.connect(two.ws_url + "/ws") as ws,
    ):
        sock = Socket(ws)
        await sock.send(type="start", userId=user, sessionId=session, resume={"lastSeq": 1})
        await sock.next("resume")
        # It knows from Firestore that it has all of it (what it heard of
        # server one's writes through the change feed is checked there too).
        assert await sock.recv() == {"type": "durable", "sessionId": session, "seq": 2}
        await sock.send(type="message", text="only once", clientId="c-once")
        assert await sock.next("ack") == {**original, "duplicate": True}
        await sock.send(type="ping", ts=1)
        await sock.next("pong")
        assert sock.of("reply.start") == []

    history = await stored_messages(firestore_client, user)
    assert [(m["role"], m["seq"]) for m in history] == [("user", 1), ("assistant", 2)]


@pytest.fixture
async def memory_server() -> AsyncIterator[LiveServer]:
    async with live_server(create_app(Settings(store="memory", ws_reply_chunk_delay=0.0))) as s:
        yield s


@pytest.mark.parametrize(
    ("client_id", "why"),
    [
        ("x" * 129, "at most 128"),
        (12, "string"),
        ({"id": "c1"}, "string"),
        (["c1"], "string"),
        (True, "string"),
        ("", "empty"),
        ("c\u00001", "control"),
        ("c/1", "'/'"),
        (" c1", "white space"),
    ],
)
async def test_a_bad_client_id_is_refused_and_changes_nothing(
    memory_server: LiveServer, client_id: Any, why: str
) -> None:
    raw = json.dumps({"type": "message", "text": "hi", "clientId": client_id})
    await _refused_then_usable(memory_server, raw, why)


async def test_a_client_id_with_a_lone_surrogate_is_refused_and_changes_nothing(
    memory_server: LiveServer,
) -> None:
    raw = '{"type": "message", "text": "hi", "clientId": "c\\ud800"}'
    await _refused_then_usable(memory_server, raw, "surrogate")


async def _refused_then_usable(server: LiveServer, raw: str, why: str) -> None:
    user = "dur-bad"
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        sock = Socket(ws)
        await sock.send(type="start", userId=user, sessionId="dur-bad-s")
        await sock.next("started")
        await ws.send(raw)
        error = await sock.recv()
        assert error["type"] == "error" and error["code"] == "invalid_field", error
        assert "clientId" in error["message"] and why in error["message"], error
        # The connection goes on; nothing was stored or numbered.
        ack = await _converse(sock, "fine", "c-good")
        assert ack["seq"] == 1
    async with httpx.AsyncClient(base_url=server.url) as http:
        profile = (await http.get(f"/api/session/{user}/profile")).json()["profile"]
    assert [(m["role"], m["content"]) for m in profile["conversationHistory"]] == [
        ("user", "fine"),
        ("assistant", profile["conversationHistory"][1]["content"]),
    ]


async def test_the_memory_store_sends_no_durable_frames_and_still_deduplicates(
    memory_server: LiveServer,
) -> None:
    async with websockets.connect(f"{memory_server.ws_url}/ws") as ws:
        sock = Socket(ws)
        await sock.send(type="start", userId="dur-mem", sessionId="dur-mem-s")
        await sock.next("started")
        original = await _converse(sock, "hello", "c1")
        await sock.send(type="message", text="hello", clientId="c1")
        assert await sock.next("ack") == {**original, "duplicate": True}
        await sock.send(type="ping", ts=1)
        await sock.next("pong")
    assert sock.of("durable") == []
    assert len(sock.of("reply.start")) == 1


async def test_commits_close_together_make_one_durable_frame_with_the_highest_seq(
    memory_server: LiveServer,
) -> None:
    # The hub's side alone (the memory store commits nothing durable): what
    # the write-behind reports in one interval is told once, as its highest seq.
    hub = memory_server.services.hub
    session = "dur-round-s"

    def committed(*seqs: int) -> list[Message]:
        at = datetime.now(UTC)
        return [Message(f"m{s}", Role.USER, "x", at, session_id=session, seq=s) for s in seqs]

    async with websockets.connect(f"{memory_server.ws_url}/ws") as ws:
        sock = Socket(ws)
        await sock.send(type="start", userId="dur-round", sessionId=session)
        await sock.next("started")
        for i in range(3):
            await _converse(sock, f"m{i}", f"c{i}")  # seqs 1 to 6
        hub.messages_durable(committed(1))
        hub.messages_durable(committed(2, 3))
        hub.messages_durable([*committed(4), *committed(2)])
        assert await sock.next("durable") == {"type": "durable", "sessionId": session, "seq": 4}
        hub.messages_durable(committed(3))  # told already: nothing more
        hub.messages_durable(committed(5))
        hub.messages_durable(committed(99))  # never past the session's own numbering
        assert await sock.next("durable") == {"type": "durable", "sessionId": session, "seq": 6}
        await sock.send(type="ping", ts=1)
        await sock.next("pong")
    assert [f["seq"] for f in sock.of("durable")] == [4, 6]
