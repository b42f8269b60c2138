"""GeminiResponder against a fake Gemini: an httpx transport that answers the
way the API does (server-sent events), so nothing reaches the network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
from google import genai
from google.genai import types

from samvad.config import Settings
from samvad.interruptions import Interruption
from samvad.models import Message, Role
from samvad.responder import ReplyContext, Responder
from samvad.responders.gemini import GeminiResponder, from_settings

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)


def sse(text: str) -> bytes:
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}]}
    return f"data: {json.dumps(body)}\r\n\r\n".encode()


class FakeGemini:
    """Answers streamGenerateContent with ``words``; waits on ``gate`` after the first."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests: list[dict[str, Any]] = []
        self.urls: list[str] = []
        self.closed = asyncio.Event()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        self.requests.append(json.loads(request.content))

        async def body() -> AsyncIterator[bytes]:
            try:
                for index, word in enumerate(self.words):
                    if index:
                        await self.gate.wait()
                    yield sse(word)
            finally:
                self.closed.set()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    def responder(self, **options: Any) -> GeminiResponder:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        client = genai.Client(
            api_key="test-key-not-real",
            http_options=types.HttpOptions(httpx_async_client=http),
        )
        return GeminiResponder(client=client, model="gemini-test", **options)


def message(i: int, role: Role, content: str, *, interrupted: bool = False) -> Message:
    return Message(
        id=f"m{i}",
        role=role,
        content=content,
        timestamp=T0,
        session_id="s1",
        interrupted=interrupted,
    )


async def test_a_reply_streams_with_the_history_and_the_interruption() -> None:
    fake = FakeGemini(["Sure, ", "the fee ", "is 2%."])
    responder = fake.responder(system_instruction="Be brief.")
    assert isinstance(responder, Responder)
    context = ReplyContext(
        user_id="u1",
        session_id="s1",
        message="And the fee?",
        history=(
            message(1, Role.USER, "Tell me about loans"),
            message(2, Role.ASSISTANT, "Loans are", interrupted=True),
            message(3, Role.USER, "And the fee?"),
        ),
        interruption=Interruption(
            session_id="s1",
            user_id="u1",
            at=T0,
            reason="user_spoke",
            heard="Loans are",
            cut="money you borrow.",
        ),
    )
    chunks = [chunk async for chunk in responder.reply(context)]
    assert chunks == ["Sure, ", "the fee ", "is 2%."]
    assert ":streamGenerateContent" in fake.urls[0]
    assert "models/gemini-test" in fake.urls[0]
    sent = fake.requests[0]
    assert sent["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert [(c["role"], [p["text"] for p in c["parts"]]) for c in sent["contents"]] == [
        ("user", ["Tell me about loans"]),
        ("model", ["Loans are"]),
        (
            "user",
            [
                '[The user interrupted your previous reply. They heard only: "Loans are". '
                'They did not hear: "money you borrow.".]',
                "And the fee?",
            ],
        ),
    ]


async def test_barge_in_cancels_the_reply_and_closes_the_stream() -> None:
    fake = FakeGemini(["One ", "two ", "three."])
    fake.gate.clear()
    responder = fake.responder()
    received: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in responder.reply(
            ReplyContext(user_id="u", session_id="s", message="Count")
        ):
            received.append(chunk)
            first.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(10):
        await first.wait()
    task.cancel()
    async with asyncio.timeout(10):
        await asyncio.gather(task, return_exceptions=True)
        await fake.closed.wait()
    assert task.cancelled()
    assert received == ["One "]


async def test_history_is_bounded_and_the_factory_builds_one() -> None:
    fake = FakeGemini(["ok"])
    responder = fake.responder(history_turns=1)
    history = tuple(message(i, Role.USER if i % 2 else Role.ASSISTANT, f"m{i}") for i in range(5))
    contents = responder.contents(
        ReplyContext(user_id="u", session_id="s", message="new", history=history)
    )
    assert [c.parts[0].text for c in contents] == ["m4", "new"]
    assert isinstance(from_settings(Settings()), GeminiResponder)
