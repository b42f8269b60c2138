"""``GeminiResponder``: Gemini answering on Samvad's WebSocket, via ``google-genai``.

Each user message becomes one streaming ``generate_content`` call with the
recent conversation (the user's Samvad history, where a reply the user cut off
holds only what they heard) and the new message, led by a note about the last
barge-in when there was one (:func:`samvad.responders.interruption_note`).
Text streams out as reply chunks as Gemini sends it; cancelling the reply
(barge-in) closes the HTTP stream.

The API key comes from ``GOOGLE_API_KEY`` (``google-genai`` reads it), or a
client passed in; nothing is sent or read before the first reply. Needs the
``samvad[gemini]`` extra. As ``SAMVAD_RESPONDER``:
``samvad.responders.gemini:from_settings``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google import genai
from google.genai import types

from samvad.config import Settings
from samvad.models import Role
from samvad.responder import ReplyContext
from samvad.responders import interruption_note

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MODEL",
    "GeminiResponder",
    "from_settings",
]

DEFAULT_MODEL = "gemini-2.5-flash"
DEFAULT_INSTRUCTION = (
    "You are a helpful voice assistant. Answer briefly, in plain spoken sentences, "
    "in the user's language."
)


class GeminiResponder:
    """A :class:`samvad.responder.Responder` streaming Gemini's answers.

    ``client`` defaults to ``genai.Client(http_options=http_options)``, built on
    first use. ``history_turns`` bounds how many earlier messages are sent.
    """

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        client: genai.Client | None = None,
        http_options: types.HttpOptions | None = None,
        system_instruction: str | None = DEFAULT_INSTRUCTION,
        history_turns: int = 20,
        config: types.GenerateContentConfig | None = None,
    ) -> None:
        if history_turns < 0:
            raise ValueError("history_turns cannot be negative.")
        self.model = model
        self._client = client
        self._http_options = http_options
        self.history_turns = history_turns
        self.config = config or types.GenerateContentConfig()
        if system_instruction is not None and self.config.system_instruction is None:
            self.config = self.config.model_copy(update={"system_instruction": system_instruction})

    @property
    def client(self) -> genai.Client:
        if self._client is None:
            self._client = genai.Client(http_options=self._http_options)
        return self._client

    def contents(self, context: ReplyContext) -> list[types.Content]:
        """What Gemini is sent for ``context``: earlier turns, then the message."""
        history = list(context.history)
        # The WebSocket layer stores the message before it asks for a reply.
        if history and history[-1].role is Role.USER and history[-1].content == context.message:
            history.pop()
        history = history[-self.history_turns :] if self.history_turns else []
        contents = [
            types.Content(
                role="user" if message.role is Role.USER else "model",
                parts=[types.Part(text=message.content)],
            )
            for message in history
            if message.content
        ]
        parts: list[types.Part] = []
        if context.interruption is not None:
            parts.append(types.Part(text=interruption_note(context.interruption)))
        parts.append(types.Part(text=context.message))
        contents.append(types.Content(role="user", parts=parts))
        return contents

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        stream: Any = await self.client.aio.models.generate_content_stream(
            model=self.model, contents=self.contents(context), config=self.config
        )
        # Closing the stream on the way out (barge-in) ends the HTTP response.
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                text = chunk.text
                if text:
                    yield text


def from_settings(settings: Settings) -> GeminiResponder:
    """The factory ``SAMVAD_RESPONDER=samvad.responders.gemini:from_settings`` names."""
    return GeminiResponder()
