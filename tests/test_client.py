"""The Python client (``samvad.client``) against a live server."""

from __future__ import annotations

import pytest

from samvad.client import SamvadClient, ServerError
from samvad.config import Settings
from samvad.web.app import create_app
from tests.support.server import live_server


def make_app() -> object:
    return create_app(Settings(store="memory", ws_reply_chunk_delay=0.0))


async def test_connect_starts_a_session_and_ask_returns_ack_and_reply() -> None:
    async with live_server(make_app()) as server:
        url = f"{server.ws_url}/ws"
        async with await SamvadClient.connect(url, user_id="c-user", heartbeat=None) as client:
            assert client.started is not None
            assert client.session_id == client.started.session_id
            exchange = await client.ask("hello", client_id="first")
            assert exchange.ack["clientId"] == "first"
            assert exchange.reply.complete
            assert exchange.frames[0]["type"] == "ack"
            assert exchange.frames[-1]["type"] == "reply.end"
            assert client.last_seq == 2


async def test_last_seq_follows_acks_replies_and_resume() -> None:
    async with live_server(make_app()) as server:
        url = f"{server.ws_url}/ws"
        first = await SamvadClient.connect(url, user_id="c-seq", session_id="c-s", heartbeat=None)
        await first.ask("one")
        await first.ask("two")
        assert first.last_seq == 4
        await first.close()
        back = await SamvadClient.connect(
            url, user_id="c-seq", session_id="c-s", resume_from=2, heartbeat=None
        )
        assert back.started is not None and back.started.resume is not None
        assert [m["seq"] for m in back.started.resume["messages"]] == [3, 4]
        assert back.last_seq == 4
        await back.close()


async def test_a_refused_start_raises_server_error_with_the_code() -> None:
    async with live_server(make_app()) as server:
        url = f"{server.ws_url}/ws"
        with pytest.raises(ServerError) as caught:
            await SamvadClient.connect(url, user_id="bad/id", heartbeat=None)
        assert caught.value.code == "invalid_field"
        assert "userId" in caught.value.message


async def test_the_heartbeat_sends_pings() -> None:
    async with live_server(make_app()) as server:
        url = f"{server.ws_url}/ws"
        async with await SamvadClient.connect(url, user_id="c-beat", heartbeat=0.01) as client:
            pong = await client.wait_for("pong")
            assert "serverTime" in pong


def test_the_session_id_is_unknown_before_start() -> None:
    client = SamvadClient.__new__(SamvadClient)
    client.started = None
    with pytest.raises(RuntimeError, match="before it has started"):
        _ = client.session_id
