"""The WebSocket endpoint over the real Firestore emulator: what a conversation,
a barge-in and an outage leave in Firestore."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from pathlib import Path
from typing import Any

import pytest
from google.cloud.firestore import AsyncClient
from websockets.exceptions import ConnectionClosed

from samvad.client import SamvadClient
from samvad.config import Settings
from samvad.models import Mode
from samvad.responder import EchoResponder
from samvad.web.app import create_app
from tests.support.server import LiveServer, live_server, outage_settings

pytestmark = pytest.mark.firestore

#: Every answer must come within this, Firestore or not. It catches waiting on
#: the client library's own retries (40-50 s for a write, minutes for a read,
#: with Firestore gone), not speed: the 0.5 s deadline of outage_settings is
#: the most any answer may wait, and a loaded CI machine needs a wide margin.
ANSWER_WITHIN = 10.0


class Gate:
    """A responder sleep that holds every chunk after the first until opened."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.opened.wait()


async def _call(action: Any) -> None:
    result = action()
    if inspect.isawaitable(result):
        await result


async def flush(server: LiveServer) -> None:
    async with asyncio.timeout(30):
        await server.services.persistence.writes.flush()
        # Views that writes warm in the background are loaded too: a cut
        # right after must meet the next write, not a late warm-up read.
        await server.services.persistence.settle()


async def document(client: AsyncClient, collection: str, doc_id: str) -> dict[str, Any]:
    snapshot = await client.collection(collection).document(doc_id).get()
    assert snapshot.exists, f"{collection}/{doc_id} is not in Firestore"
    data = snapshot.to_dict()
    assert data is not None
    return data


def settings_for(emulator_host: str, project: str, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "store": "firestore",
        "emulator_host": emulator_host,
        "project": project,
        "flush_linger": 0.0,
        "ws_reply_chunk_delay": 0.0,
        "shutdown_flush_deadline": 5.0,
    }
    options.update(overrides)
    return Settings(**options)


async def open_client(server: LiveServer, user_id: str, **options: Any) -> SamvadClient:
    return await SamvadClient.connect(
        f"{server.ws_url}/ws", user_id=user_id, heartbeat=None, **options
    )


async def test_a_conversation_is_in_firestore_after_the_flush(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    app = create_app(settings_for(firestore_emulator, firestore_project))
    async with live_server(app) as server:
        client = await open_client(server, "fs-user", session_id="fs-s1", language="hi")
        assert client.started is not None and client.started.mode == "firestore"
        first = await client.ask("namaste")
        second = await client.ask("loan documents")
        await client.set_state({"step": 2})
        await client.wait_for("state")
        await flush(server)
        session = await document(firestore_client, "sessions", "fs-s1")
        assert session["userId"] == "fs-user"
        assert session["isActive"] is True
        assert session["language"] == "hi"
        await client.end()
        await flush(server)
    session = await document(firestore_client, "sessions", "fs-s1")
    assert session["isActive"] is False
    assert session["endedAt"] is not None
    profile = await document(firestore_client, "user_profiles", "fs-user")
    history = profile["conversationHistory"]
    assert [(m["role"], m["seq"], m["sessionId"]) for m in history] == [
        ("user", 1, "fs-s1"),
        ("assistant", 2, "fs-s1"),
        ("user", 3, "fs-s1"),
        ("assistant", 4, "fs-s1"),
    ]
    assert history[1]["content"] == first.reply.text
    assert history[3]["content"] == second.reply.text
    state = await document(firestore_client, "user_states", "fs-user")
    assert state["step"] == 2


async def test_a_barge_in_leaves_the_heard_text_marked_interrupted_in_firestore(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    gate = Gate()
    settings = settings_for(firestore_emulator, firestore_project, persist_interruptions=True)
    async with live_server(create_app(settings)) as server:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await open_client(server, "fs-barge", session_id="fs-barge-s")
        await client.message("Tell me everything about home loans")
        chunk = await client.wait_for("reply.chunk")
        await client.interrupt(heard_chars=2, reason="barge_in")
        interrupted = await client.wait_for("interrupted")
        gate.opened.set()
        follow_up = await client.ask("Shorter please")
        assert follow_up.reply.text.startswith(f'(You stopped me after "{chunk["text"][:2]}".)')
        await flush(server)
        await client.close()
    profile = await document(firestore_client, "user_profiles", "fs-barge")
    cut = profile["conversationHistory"][1]
    assert cut["role"] == "assistant"
    assert cut["content"] == chunk["text"][:2]
    assert cut["interrupted"] is True
    assert cut["id"] == interrupted["messageId"]
    assert cut["seq"] == 2
    records = [
        snapshot.to_dict()
        async for snapshot in firestore_client.collection("interruptions").stream()
    ]
    assert len(records) == 1
    assert records[0]["sessionId"] == "fs-barge-s"
    assert records[0]["heard"] == chunk["text"][:2]
    assert records[0]["cut"] == chunk["text"][2:]
    assert records[0]["messageId"] == cut["id"]


async def test_a_firestore_outage_mid_conversation_is_invisible_to_the_client(
    fault_proxy: Any, firestore_project: str, firestore_client: AsyncClient
) -> None:
    settings = outage_settings(fault_proxy.host_port, firestore_project, ws_reply_chunk_delay=0.0)
    async with live_server(create_app(settings)) as server:
        persistence = server.services.persistence
        client = await open_client(server, "fs-outage", session_id="fs-out-s")
        await client.ask("before the outage")
        await flush(server)

        await _call(fault_proxy.cut)
        seen: list[dict[str, Any]] = []

        async def converse(i: int) -> None:
            began = time.monotonic()
            exchange = await client.ask(f"during the outage {i}", within=ANSWER_WITHIN)
            assert time.monotonic() - began < ANSWER_WITHIN
            assert exchange.reply.complete
            seen.extend(exchange.frames)

        await converse(0)
        await converse(1)
        # Make the write-behind try now: the writes fail, it goes memory-only.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):
                await persistence.writes.flush()
        assert persistence.mode is Mode.MEMORY
        await converse(2)
        await converse(3)
        await client.set_state({"during": "outage"})
        await client.wait_for("state", seen=seen)
        assert not [f for f in seen if f["type"] == "error"]
        assert persistence.status().pending_documents > 0

        await _call(fault_proxy.restore)
        await flush(server)
        assert persistence.mode is Mode.FIRESTORE
        await client.end()
        await flush(server)

    profile = await document(firestore_client, "user_profiles", "fs-outage")
    history = profile["conversationHistory"]
    assert [m["seq"] for m in history] == list(range(1, 11))
    assert [m["content"] for m in history if m["role"] == "user"] == [
        "before the outage",
        *(f"during the outage {i}" for i in range(4)),
    ]
    state = await document(firestore_client, "user_states", "fs-outage")
    assert state["during"] == "outage"
    session = await document(firestore_client, "sessions", "fs-out-s")
    assert session["isActive"] is False


async def test_no_frame_leaves_before_the_journal_has_the_writes_before_it(
    tmp_path: Path, firestore_emulator: str, firestore_project: str
) -> None:
    settings = settings_for(firestore_emulator, firestore_project, journal=True, data_dir=tmp_path)
    async with live_server(create_app(settings)) as server:
        journal = server.services.persistence.journal
        assert journal is not None
        client = await open_client(server, "u-journal")
        assert (await client.ask("written")).reply.complete

        def broken(fd: int) -> None:
            raise OSError("the disk went away")

        journal._fsync = broken  # the next writes never reach the disk
        await client.message("never on disk")
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            try:
                while True:
                    frames.append(json.loads(await client.connection.recv()))
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
        # The message was not acknowledged, nor anything after it sent: the
        # connection was closed instead.
        assert [f for f in frames if f["type"] not in ("durable",)] == []
        assert code == 1011
