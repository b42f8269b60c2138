"""The example under examples/adk_agent: its agent, served by Samvad, answers
over a real WebSocket with the offline scripted model and calls its tool."""

from __future__ import annotations

from google.adk.agents.llm_agent import LlmAgent

from examples.adk_agent.agent import get_order_status, offline_answer, root_agent
from samvad.adk.app import create_agent_app
from samvad.adk.scripted import ScriptedLlm
from samvad.client import SamvadClient
from samvad.config import Settings
from tests.support.server import live_server


async def test_the_example_agent_answers_over_the_websocket() -> None:
    # The same agent, pinned to the offline model whatever the environment holds.
    agent = LlmAgent(
        name=root_agent.name,
        model=ScriptedLlm(script=offline_answer),
        instruction=root_agent.instruction,
        tools=[get_order_status],
    )
    app = create_agent_app(agent, Settings(store="memory", ws_reply_chunk_delay=0.0))
    async with live_server(app) as server:
        client = await SamvadClient.connect(f"{server.ws_url}/ws", user_id="demo", heartbeat=None)
        hello = await client.ask("Hello there")
        assert hello.reply.complete
        assert hello.reply.text.startswith("I can check the status of your orders.")
        assert len(hello.reply.chunks) > 10
        order = await client.ask("Where is order b42?")
        assert order.reply.text == "Order B42 is being packed; it should arrive on Friday."
        unknown = await client.ask("And Z9?")
        assert unknown.reply.text == "I could not find an order Z9. Could you check the number?"
        await client.close()
