"""Responders: what turns the conversation so far into the assistant's reply.

A responder gets a :class:`ReplyContext` (the user's message, recent history,
state, and what was cut off when the user last interrupted) and returns an
async iterator of text chunks, which the WebSocket layer streams to the client
as they come. Cancelling the iteration (barge-in) must be safe at any ``await``.

The built-in :class:`EchoResponder` is deterministic and needs no network, so
tests and demos run offline; ``docs/protocol.md`` shows how to plug in an LLM
(``SAMVAD_RESPONDER=package.module:factory``).

Each reply runs in a task of its own, unless its responder has a true
``task_free`` attribute: it promises that ``reply`` binds nothing to the task
it runs in (no ``asyncio.timeout``, task group or anyio cancel scope around a
wait, no context variable set), so the reply can start in the caller's task
and move to a task only when it first waits. A reply whose chunks are ready
then costs no task at all. :class:`EchoResponder` is task-free; an LLM
client's HTTP call usually is not.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.interruptions import Interruption
from samvad.models import Message, Role

__all__ = [
    "EchoResponder",
    "ReplyContext",
    "Responder",
    "ResponderFactory",
    "Sleep",
    "load_responder",
]

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """Everything a responder may use to answer one user message.

    ``interruption`` is set when the user cut off the previous reply (it is
    handed to exactly one reply); ``interruptions`` is the session's recent
    interruption stack, oldest first.
    """

    user_id: str
    session_id: str
    message: str
    history: tuple[Message, ...] = ()
    state: Mapping[str, Any] = field(default_factory=dict)
    language: str | None = None
    interruption: Interruption | None = None
    interruptions: tuple[Interruption, ...] = ()


@runtime_checkable
class Responder(Protocol):
    """Turns a conversation context into a stream of text chunks."""

    def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        """The reply to ``context.message``, chunk by chunk."""
        ...


ResponderFactory = Callable[[Settings], Responder]


def _tail(text: str, words: int) -> str:
    return " ".join(text.split()[-words:])


def _turns(context: ReplyContext) -> int:
    """The user's messages in this session so far (at least this one)."""
    seen = sum(
        1 for m in context.history if m.role is Role.USER and m.session_id == context.session_id
    )
    return max(seen, 1)


class EchoResponder:
    """The built-in responder: deterministic, offline, streamed word by word.

    The reply quotes the user's message and, after a barge-in, says where it
    was cut off. ``chunk_delay`` seconds pass between chunks (through ``sleep``,
    injectable for tests); the first chunk comes at once.
    """

    #: ``reply`` only sleeps (see the module's docstring).
    task_free = True

    def __init__(self, *, chunk_delay: float = 0.0, sleep: Sleep = asyncio.sleep) -> None:
        if chunk_delay < 0:
            raise ValueError("A chunk delay cannot be negative.")
        self.chunk_delay = chunk_delay
        self._sleep = sleep

    def text_for(self, context: ReplyContext) -> str:
        """The whole reply the stream will spell out."""
        parts: list[str] = []
        cut = context.interruption
        if cut is not None:
            if cut.heard.strip():
                parts.append(f'(You stopped me after "{_tail(cut.heard, 6)}".)')
            else:
                parts.append("(You stopped me before I could say anything.)")
        words = context.message.split()
        parts.append(f'You said: "{" ".join(words)}".')
        parts.append(
            f"That is {len(words)} word{'s' if len(words) != 1 else ''}; "
            f"message {_turns(context)} of this conversation."
        )
        parts.append("I am the built-in responder, so I simply reflect what I hear back to you.")
        return " ".join(parts)

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        words = self.text_for(context).split(" ")
        for index, word in enumerate(words):
            if index:
                await self._sleep(self.chunk_delay)
            yield word if index == len(words) - 1 else word + " "


def load_responder(settings: Settings) -> Responder:
    """The responder ``settings.ws_responder`` names.

    ``builtin`` is :class:`EchoResponder`; otherwise ``package.module:factory``,
    a callable taking the :class:`Settings` and returning a :class:`Responder`.
    """
    spec = settings.ws_responder
    if spec == "builtin":
        return EchoResponder(chunk_delay=settings.ws_reply_chunk_delay)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"SAMVAD_RESPONDER must be 'builtin' or 'package.module:factory'; got {spec!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"SAMVAD_RESPONDER names {spec!r}, which cannot be loaded: {exc}"
        ) from exc
    responder = factory(settings)
    if not isinstance(responder, Responder):
        raise ConfigError(f"SAMVAD_RESPONDER factory {spec!r} did not return a responder")
    return responder
