"""The agent: an order-status assistant with one tool.

With ``GOOGLE_API_KEY`` set it runs on Gemini; without it, on a scripted model
that answers offline (``samvad.adk.scripted.ScriptedLlm``), so the example
works anywhere. ``root_agent`` is the name ``adk web`` looks for.
"""

from __future__ import annotations

import os
import re

from google.adk.agents.llm_agent import LlmAgent
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest

from samvad.adk.scripted import Answer, ScriptedLlm, last_tool_result, last_user_text, tool_call

ORDERS = {
    "A17": {"status": "shipped", "eta": "tomorrow"},
    "B42": {"status": "being packed", "eta": "on Friday"},
}


def get_order_status(order_id: str) -> dict[str, str]:
    """Look up an order by its number (for example A17): its status and arrival."""
    order = ORDERS.get(order_id.strip().upper())
    if order is None:
        return {"order_id": order_id, "status": "unknown", "eta": "unknown"}
    return {"order_id": order_id.upper(), **order}


def offline_answer(request: LlmRequest) -> Answer:
    """What the scripted model says: calls the tool for an order number it hears."""
    result = last_tool_result(request)
    if result is not None:
        found = result.response or {}
        if found.get("status") == "unknown":
            return f"I could not find an order {found.get('order_id')}. Could you check the number?"
        return f"Order {found['order_id']} is {found['status']}; it should arrive {found['eta']}."
    text = last_user_text(request)
    lead = "Sure, I will keep it short. " if "[The user interrupted" in text else ""
    number = re.search(r"\b([A-Za-z]\d{1,6})\b", text)
    if number is not None:
        return tool_call("get_order_status", order_id=number.group(1).upper())
    if "order" in text.lower():
        return lead + "Which order? Tell me its number, for example A17."
    return (
        lead + "I can check the status of your orders. Ask me about an order by its number, "
        "for example A17, and I will look it up for you right away."
    )


def model() -> str | BaseLlm:
    if os.environ.get("GOOGLE_API_KEY"):
        return os.environ.get("SAMVAD_EXAMPLE_MODEL", "gemini-2.5-flash")
    return ScriptedLlm(script=offline_answer)


root_agent = LlmAgent(
    name="order_helper",
    model=model(),
    instruction=(
        "You help customers with the status of their orders. Use get_order_status to look an "
        "order up. Answer in one or two short spoken sentences. If the user interrupted you, "
        "do not repeat what they already heard."
    ),
    tools=[get_order_status],
)
