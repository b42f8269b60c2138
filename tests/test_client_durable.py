"""``SamvadClient`` keeps each message until Firestore has it, and sends the
rest again after a reconnect: the Cloud Run shape (no journal), ``kill -9``
of a real ``samvad serve`` process, the real emulator."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest
from google.cloud.firestore import AsyncClient

from samvad.client import SamvadClient
from samvad.config import Settings
from samvad.documents import PROFILES
from samvad.web.app import create_app
from tests.support.serve import ServeProcess, serve_on_firestore
from tests.support.server import live_server

MESSAGES = 20  # 40 with the replies: below the history cap


async def serve(tmp_path: Path, name: str, emulator: str, project: str, **env: str) -> ServeProcess:
    return await serve_on_firestore(
        tmp_path,
        name,
        emulator,
        project,
        SAMVAD_JOURNAL="off",  # Cloud Run: the disk is memory, gone with the instance
        SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS="0",
        **env,
    )


@pytest.mark.firestore
@pytest.mark.timeout(300)
async def test_kill_9_before_durable_then_the_client_sends_again_nothing_lost_or_doubled(
    tmp_path: Path,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    user, session = "cr-user", "cr-session"
    texts = [f"message {i:02d}" for i in range(MESSAGES)]
    # A document written again within a minute of its last write waits: after
    # the first flush, nothing more of this user reaches Firestore before the kill.
    first = await serve(
        tmp_path, "first", firestore_emulator, firestore_project,
        SAMVAD_FLUSH_INTERVAL_SECONDS="60",
    )  # fmt: skip
    try:
        client = await SamvadClient.connect(
            first.ws_url, user_id=user, session_id=session, heartbeat=None
        )
        for text in texts:
            await client.ask(text)
        assert client.keeps_until_durable
        kept = [entry.text for entry in client.pending]
        assert kept, "every message was durable before the kill: the test proves nothing"
        assert kept == texts[len(texts) - len(kept) :]
    finally:
        assert await asyncio.to_thread(first.stop, signal.SIGKILL) == -signal.SIGKILL

    second = await serve(tmp_path, "second", firestore_emulator, firestore_project)
    try:
        await client.reconnect(second.ws_url)
        # A kill during the first instance's transaction on the profile leaves
        # its lock on the emulator until it expires, about a minute later:
        # the second instance's writes of that document wait for it (runs of
        # 70 s against 10 s, its log showing one write timing out every 10 s
        # until then). Nothing is lost meanwhile; the bound allows for it.
        await client.wait_durable(within=150)
        assert client.pending == []
        await client.close()
    finally:
        assert await asyncio.to_thread(second.stop) == 0

    snapshot = await firestore_client.collection(PROFILES).document(user).get()
    history = (snapshot.to_dict() or {})["conversationHistory"]
    ours = [m for m in history if m.get("sessionId") == session]
    assert [m["content"] for m in ours if m["role"] == "user"] == texts
    seqs = [m["seq"] for m in ours]
    assert seqs == sorted(set(seqs))


async def test_without_durable_frames_a_message_is_kept_until_its_ack() -> None:
    settings = Settings(store="memory", ws_reply_chunk_delay=0.0)
    async with live_server(create_app(settings)) as server:
        client = await SamvadClient.connect(
            f"{server.ws_url}/ws", user_id="mem-user", session_id="mem-s", heartbeat=None
        )
        async with client:
            client_id = await client.message("hello")
            assert [e.client_id for e in client.pending] == [client_id]
            ack = await client.wait_for("ack")
            assert ack["clientId"] == client_id
            assert client.pending == [] and not client.keeps_until_durable
            await client.read_reply()
            # Sent again (as a reconnect would): the original ack, no second reply.
            await client.message("hello", client_id=client_id)
            again = await client.wait_for("ack")
            assert again == {**ack, "duplicate": True}


@pytest.mark.firestore
@pytest.mark.timeout(300)
async def test_messages_another_instance_heard_but_never_wrote_are_written_when_sent_again(
    tmp_path: Path,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    # Instance B hears A's messages through the change feed and lays them over
    # its view; A dies (kill -9, no journal) before writing them. Heard of is
    # not stored: B must neither call them durable nor answer their re-send
    # with a duplicate ack alone, or the client drops them and they are lost.
    user, session = "cr-heard", "cr-heard-s"
    texts = [f"heard {i:02d}" for i in range(8)]
    b = await serve(tmp_path, "b", firestore_emulator, firestore_project)
    # A writes the first message at once (no linger: however fast the next
    # asks come, they are not in that write), then nothing for a minute.
    a = await serve(
        tmp_path, "a", firestore_emulator, firestore_project,
        SAMVAD_FLUSH_INTERVAL_SECONDS="60", SAMVAD_FLUSH_LINGER_SECONDS="0",
    )  # fmt: skip
    try:
        client = await SamvadClient.connect(
            a.ws_url, user_id=user, session_id=session, heartbeat=None
        )
        for text in texts:
            await client.ask(text)
        kept = [entry.text for entry in client.pending]
        assert len(kept) >= len(texts) - 1, kept  # A flushed at most its first write

        async def b_heard_them() -> None:
            async with httpx.AsyncClient(base_url=b.url) as http:
                while True:
                    response = await http.get(f"/api/session/{user}/history")
                    contents = [m["content"] for m in response.json().get("messages", [])]
                    if response.status_code == 200 and texts[-1] in contents:
                        return
                    await asyncio.sleep(0.1)

        async with asyncio.timeout(30):
            await b_heard_them()
        assert await asyncio.to_thread(a.stop, signal.SIGKILL) == -signal.SIGKILL

        snapshot = await firestore_client.collection(PROFILES).document(user).get()
        stored = {
            m["seq"]
            for m in (snapshot.to_dict() or {}).get("conversationHistory", [])
            if m.get("sessionId") == session
        }
        started = await client.reconnect(b.ws_url)
        assert started.last_seq >= 2 * len(texts) - 1, "B did not hear A's messages"
        # B's first word on durability counts only what Firestore holds.
        first = await client.wait_for("durable")
        assert set(range(1, first["seq"] + 1)) <= stored, (first, sorted(stored))
        await client.wait_durable(within=60)
        assert client.pending == []
        await client.close()
    finally:
        a.stop(signal.SIGKILL)
        assert await asyncio.to_thread(b.stop) == 0

    snapshot = await firestore_client.collection(PROFILES).document(user).get()
    history = (snapshot.to_dict() or {})["conversationHistory"]
    ours = [m for m in history if m.get("sessionId") == session and m["role"] == "user"]
    assert [m["content"] for m in ours] == texts
