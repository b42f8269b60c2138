"""A scripted model for ADK agents: runs offline, for demos and tests.

:class:`ScriptedLlm` is an ADK ``BaseLlm`` whose answers come from a Python
function instead of a network call. The function sees the whole
``LlmRequest`` (instructions, history, tool results) and returns either text
(streamed word by word in ADK's SSE mode, then the aggregated response, as
Gemini does) or a tool call. Every request is kept in ``requests``, so a test
can check what the agent was told.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.genai import types
from pydantic import ConfigDict, Field

__all__ = [
    "Answer",
    "Pause",
    "Script",
    "ScriptedLlm",
    "last_tool_result",
    "last_user_text",
    "tool_call",
]

Answer = str | types.FunctionCall
"""Text to say, or a tool to call."""

Script = Callable[[LlmRequest], Answer]
Pause = Callable[[], Awaitable[None]]


async def _no_pause() -> None:
    await asyncio.sleep(0)


def last_user_text(request: LlmRequest) -> str:
    """The text of the newest user turn in ``request`` (empty when none)."""
    for content in reversed(request.contents):
        if content.role == "user" and content.parts:
            texts = [part.text for part in content.parts if part.text]
            if texts:
                return " ".join(texts)
    return ""


def last_tool_result(request: LlmRequest) -> types.FunctionResponse | None:
    """The newest tool result in ``request``, when it is the newest turn."""
    if not request.contents:
        return None
    last = request.contents[-1]
    for part in last.parts or ():
        if part.function_response is not None:
            return part.function_response
    return None


class ScriptedLlm(BaseLlm):
    """A ``BaseLlm`` answering by ``script``; ``pause`` runs between streamed words."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = "samvad-scripted"
    script: Script
    pause: Pause = _no_pause
    requests: list[LlmRequest] = Field(default_factory=list)

    @classmethod
    def supported_models(cls) -> list[str]:
        return [r"samvad-scripted.*"]

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        self.requests.append(llm_request)
        answer = self.script(llm_request)
        if isinstance(answer, types.FunctionCall):
            yield LlmResponse(
                content=types.Content(role="model", parts=[types.Part(function_call=answer)]),
                turn_complete=True,
            )
            return
        if stream:
            words = answer.split(" ")
            for index, word in enumerate(words):
                if index:
                    await self.pause()
                chunk = word if index == len(words) - 1 else word + " "
                yield LlmResponse(
                    content=types.Content(role="model", parts=[types.Part(text=chunk)]),
                    partial=True,
                )
        yield LlmResponse(
            content=types.Content(role="model", parts=[types.Part(text=answer)]),
            turn_complete=True,
        )


def tool_call(name: str, **args: Any) -> types.FunctionCall:
    """A tool call for a script to return."""
    return types.FunctionCall(name=name, args=args)
