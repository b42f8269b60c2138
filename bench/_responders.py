"""Responders for benchmarks (``SAMVAD_RESPONDER=bench._responders:one_chunk``).

``one_chunk`` answers with the built-in responder's text in a single chunk
(``reply.start``, one ``reply.chunk``, ``reply.end``: 4 frames per message
with the ``ack``) instead of word by word (about 38 frames), to separate what
a message costs from what streaming its reply costs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from samvad.config import Settings
from samvad.responder import EchoResponder, ReplyContext


class OneChunkResponder:
    task_free = True  # as EchoResponder's: reply() binds nothing to its task

    def __init__(self) -> None:
        self._echo = EchoResponder()

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        yield self._echo.text_for(context)


def one_chunk(settings: Settings) -> OneChunkResponder:
    return OneChunkResponder()
