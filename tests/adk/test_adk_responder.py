"""An ADK agent answering on Samvad's WebSocket: a live server on the Firestore
emulator, real WebSocket clients, and a scripted model (nothing reaches a network)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from google.adk.agents.llm_agent import LlmAgent
from google.adk.models.llm_request import LlmRequest

from samvad.adk.app import create_agent_app
from samvad.adk.scripted import Answer, ScriptedLlm, last_tool_result, last_user_text, tool_call
from samvad.client import SamvadClient
from samvad.interruptions import Interruption
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.responders import interruption_note
from tests.adk.conftest import SETTINGS, firestore_store, samvad_service
from tests.support.server import LiveServer, live_server
from tests.web.test_realtime_firestore import settings_for

pytestmark = pytest.mark.firestore

STORY = "Once upon a time a small bank lent money to a baker and the bread was good"


class Gate:
    """Holds the model between streamed words while closed."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.opened.set()

    async def wait(self) -> None:
        await self.opened.wait()


def make_agent(gate: Gate, calls: list[str]) -> tuple[LlmAgent, ScriptedLlm]:
    def order_status(order_id: str) -> dict[str, str]:
        """The delivery status of an order."""
        calls.append(order_id)
        return {"order_id": order_id, "status": "ships tomorrow"}

    def script(request: LlmRequest) -> Answer:
        result = last_tool_result(request)
        if result is not None:
            response: dict[str, Any] = result.response or {}
            return f"Your order {response['order_id']} {response['status']}."
        text = last_user_text(request)
        if "order" in text:
            return tool_call("order_status", order_id="A17")
        if "story" in text:
            return STORY
        return "Of course."

    model = ScriptedLlm(script=script, pause=gate.wait)
    agent = LlmAgent(
        name="helper", model=model, instruction="Help with orders.", tools=[order_status]
    )
    return agent, model


async def open_client(server: LiveServer, user_id: str) -> SamvadClient:
    return await SamvadClient.connect(f"{server.ws_url}/ws", user_id=user_id, heartbeat=None)


async def test_an_adk_agent_streams_uses_its_tool_and_hears_about_barge_in(
    firestore_emulator: str, firestore_project: str
) -> None:
    gate, calls = Gate(), []
    agent, model = make_agent(gate, calls)
    settings = settings_for(firestore_emulator, firestore_project)
    async with live_server(create_agent_app(agent, settings)) as server:
        client = await open_client(server, "u-adk")
        session_id = client.session_id

        first = await client.ask("Where is my order?")
        assert first.reply.complete
        assert first.reply.text == "Your order A17 ships tomorrow."
        assert len(first.reply.chunks) == 5  # streamed word by word
        assert calls == ["A17"]

        gate.opened.clear()
        await client.message("Tell me a story")
        chunk = await client.wait_for("reply.chunk")
        assert chunk["text"] == "Once "
        await client.interrupt(heard_chars=3, reason="user_spoke")
        interrupted = await client.wait_for("interrupted")
        assert interrupted["heard"] == "Onc"
        gate.opened.set()

        third = await client.ask("Sorry, go on")
        assert third.reply.complete
        assert third.reply.text == "Of course."
        request = model.requests[-1]
        # The agent heard about the barge-in: its cut reply as its own
        # interrupted turn, and a note ahead of the new message.
        texts = [part.text for content in request.contents for part in content.parts or ()]
        assert texts[-2] == (
            '[The user interrupted your previous reply. They heard only: "Onc". '
            'They did not hear: "e".]'
        )
        assert texts[-1] == "Sorry, go on"
        model_turns = [
            "".join(p.text or "" for p in c.parts or ())
            for c in request.contents
            if c.role == "model"
        ]
        assert "Onc" in model_turns
        assert not any(STORY in turn for turn in model_turns)
        await client.close()

    # Both sides of every turn are in the user's Samvad history in Firestore,
    # and the agent's session (tool call and result included) in its own.
    async with firestore_store(firestore_emulator, firestore_project) as store:
        async with Persistence(store, settings=SETTINGS) as persistence:
            profile = await persistence.get_profile("u-adk")
        assert profile is not None
        assert [(m.role, m.content, m.interrupted) for m in profile.history] == [
            (Role.USER, "Where is my order?", False),
            (Role.ASSISTANT, "Your order A17 ships tomorrow.", False),
            (Role.USER, "Tell me a story", False),
            (Role.ASSISTANT, "Onc", True),
            (Role.USER, "Sorry, go on", False),
            (Role.ASSISTANT, "Of course.", False),
        ]
        async with samvad_service(store) as sessions:
            session = await sessions.get_session(
                app_name="helper", user_id="u-adk", session_id=session_id
            )
        assert session is not None
        kinds = []
        for event in session.events:
            part = event.content.parts[0] if event.content and event.content.parts else None
            if part is not None and part.function_call is not None:
                kinds.append("call")
            elif part is not None and part.function_response is not None:
                kinds.append("result")
            else:
                kinds.append(f"{event.author}:{'cut' if event.interrupted else 'text'}")
        assert kinds == [
            "user:text",
            "call",
            "result",
            "helper:text",
            "user:text",
            "helper:cut",
            "user:text",
            "helper:text",
        ]


async def test_a_refresh_erases_the_users_agent_sessions_too(
    firestore_emulator: str, firestore_project: str
) -> None:
    gate, calls = Gate(), []
    agent, _ = make_agent(gate, calls)
    settings = settings_for(firestore_emulator, firestore_project)
    async with live_server(create_agent_app(agent, settings)) as server:
        victim = await open_client(server, "u-gone")
        other = await open_client(server, "u-kept")
        assert (await victim.ask("Where is my order?")).reply.complete
        assert (await other.ask("Where is my order?")).reply.complete
        gone_session, kept_session = victim.session_id, other.session_id
        await victim.close()
        await other.close()
        async with httpx.AsyncClient(base_url=server.url) as http:
            refreshed = await http.post("/api/session/refresh", json={"userId": "u-gone"})
        assert refreshed.status_code == 200
    # After the server's flush at shutdown: the erased user's agent session is
    # gone from Firestore, the other user's is whole.
    async with (
        firestore_store(firestore_emulator, firestore_project) as store,
        samvad_service(store) as sessions,
    ):
        gone = await sessions.get_session(
            app_name="helper", user_id="u-gone", session_id=gone_session
        )
        kept = await sessions.get_session(
            app_name="helper", user_id="u-kept", session_id=kept_session
        )
    assert gone is None
    assert kept is not None
    assert len(kept.events) == 4  # the question, the tool call, its result, the answer


def test_the_interruption_note_says_what_was_heard_and_what_was_not() -> None:
    def cut(heard: str, rest: str) -> Interruption:
        from datetime import UTC, datetime

        return Interruption(
            session_id="s", user_id="u", at=datetime.now(UTC), reason="r", heard=heard, cut=rest
        )

    assert interruption_note(cut("", "all of it")) == (
        "[The user interrupted you before hearing any of your previous reply.]"
    )
    assert interruption_note(cut("Done.", "")) == (
        '[The user interrupted you just as you finished saying: "Done.".]'
    )
    assert 'They did not hear: "b"' in interruption_note(cut("a", "b"))
