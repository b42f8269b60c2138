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
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import msgspec

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.interruptions import Interruption
from samvad.models import Message, Role

__all__ = [
    "EchoResponder",
    "ReplyContext",
    "Responder",
    "ResponderFactory",
    "SharedTimerSleep",
    "Sleep",
    "load_responder",
]

Sleep = Callable[[float], Awaitable[None]]


class ReplyContext(msgspec.Struct, frozen=True):
    """Everything a responder may use to answer one user message.

    ``interruption`` is set when the user cut off the previous reply (it is
    handed to exactly one reply); ``interruptions`` is the session's recent
    interruption stack, oldest first.
    """

    user_id: str
    session_id: str
    message: str
    history: tuple[Message, ...] = ()
    state: Mapping[str, Any] = msgspec.field(default_factory=dict)
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


class SharedTimerSleep:
    """``asyncio.sleep`` for many paced streams at once: the sleeps that end in
    the same ``resolution`` seconds share one timer of the event loop, and a
    turn of the loop wakes at most ``per_turn`` of them.

    A reply streamed word by word sleeps between every two words; a thousand
    such replies make tens of thousands of loop timers a second, and one timer
    (uvloop's ``call_later``) costs more than the rest of a chunk's handling.
    Here a sleep waits on a future filed under the moment it ends, rounded up
    to ``resolution``; one timer wakes every future of that moment. A sleep
    lasts at least ``delay`` and at most ``resolution`` more (libuv's timers
    count whole milliseconds anyway), unless the loop is behind.

    When it is behind, the sleepers that are due wait in line, oldest first,
    and each turn of the loop wakes the next ``per_turn`` of them. The loop
    reads its sockets between two turns, so a message that comes in is
    handled after at most ``per_turn`` replies' next words, not after every
    reply streaming on the server has had its turn. A reply woken late sends
    what is due by then (:class:`EchoResponder`), so the words still arrive on
    schedule as far as the CPU allows. Cancelling a sleeper is safe at any
    point: a cancelled future is skipped when its moment comes.
    """

    __slots__ = ("_due", "_ready", "per_turn", "resolution")

    def __init__(self, resolution: float = 0.001, per_turn: int = 32) -> None:
        if resolution <= 0:
            raise ValueError("A timer resolution must be positive.")
        if per_turn < 1:
            raise ValueError("A turn must wake at least one sleeper.")
        self.resolution = resolution
        self.per_turn = per_turn
        self._due: dict[tuple[asyncio.AbstractEventLoop, int], list[asyncio.Future[None]]] = {}
        #: Per loop, the due sleepers not woken yet, oldest first.
        self._ready: dict[asyncio.AbstractEventLoop, deque[asyncio.Future[None]]] = {}

    def __call__(self, delay: float) -> Awaitable[None]:
        # A plain function returning what to await (the future itself): no
        # coroutine of its own per sleep.
        if delay <= 0:
            return asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        tick = math.ceil((loop.time() + delay) / self.resolution)
        key = (loop, tick)
        waiting = self._due.get(key)
        if waiting is None:
            waiting = self._due[key] = []
            loop.call_at(tick * self.resolution, self._wake, key)
        future: asyncio.Future[None] = loop.create_future()
        waiting.append(future)
        return future

    def _wake(self, key: tuple[asyncio.AbstractEventLoop, int]) -> None:
        loop = key[0]
        line = self._ready.get(loop)
        if line is None:  # woken by one callback, turn after turn, while it lasts
            line = self._ready[loop] = deque()
            loop.call_soon(self._wake_next, loop)
        line.extend(self._due.pop(key))

    def _wake_next(self, loop: asyncio.AbstractEventLoop) -> None:
        ready = self._ready[loop]
        woken = 0
        while ready and woken < self.per_turn:
            future = ready.popleft()
            if not future.done():
                future.set_result(None)
                woken += 1
        if ready:
            loop.call_soon(self._wake_next, loop)
        else:
            del self._ready[loop]


def _tail(text: str, words: int) -> str:
    return " ".join(text.split()[-words:])


def _turns(context: ReplyContext) -> int:
    """The user's messages in this session so far (at least this one)."""
    # A plain loop with the member in a local: on Python 3.11 each
    # ``Role.USER`` costs a slow enum lookup, and a generator a frame switch
    # per message (4 µs for twenty messages, against 0.7 µs).
    user, session_id, seen = Role.USER, context.session_id, 0
    for message in context.history:
        if message.role is user and message.session_id == session_id:
            seen += 1
    return max(seen, 1)


class EchoResponder:
    """The built-in responder: deterministic, offline, streamed word by word.

    The reply quotes the user's message and, after a barge-in, says where it
    was cut off. Word ``i`` is due ``i * chunk_delay`` seconds after the first,
    which comes at once; the responder sleeps until the next word is due
    (through ``sleep``, injectable for tests; by default a
    :class:`SharedTimerSleep`, so that many replies streaming at once share
    the loop's timers). Words are paced on that schedule, as a speech or model
    stream produces them whatever the server is doing: when the event loop
    wakes the responder late, every word due by then goes out in one chunk,
    instead of each waiting a further delay of its own. On a loop that keeps
    up that is one word per chunk. ``clock`` (seconds; the loop's by default)
    is what the schedule is read on.
    """

    #: ``reply`` only sleeps (see the module's docstring).
    task_free = True

    def __init__(
        self,
        *,
        chunk_delay: float = 0.0,
        sleep: Sleep | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if chunk_delay < 0:
            raise ValueError("A chunk delay cannot be negative.")
        self.chunk_delay = chunk_delay
        self._sleep: Sleep = sleep if sleep is not None else SharedTimerSleep()
        #: What yields between words when there is no delay.
        self._yield: Sleep = sleep if sleep is not None else asyncio.sleep
        self._clock = clock

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
        last = len(words) - 1
        delay = self.chunk_delay
        clock = self._clock or asyncio.get_running_loop().time
        began = clock()
        first = 0  # the first word not yet sent
        while True:
            upto = first  # the last word of this chunk
            if first:
                if delay > 0:
                    await self._sleep(max(0.0, began + first * delay - clock()))
                    upto = max(first, min(last, int((clock() - began) / delay)))
                else:
                    await self._yield(0.0)
            chunk = " ".join(words[first : upto + 1])
            if upto == last:
                yield chunk
                return
            yield chunk + " "
            first = upto + 1


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
