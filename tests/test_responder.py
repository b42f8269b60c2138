"""The responder interface and the deterministic built-in responder."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from time import sleep as hold_the_loop
from typing import Any

import pytest

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.interruptions import Interruption
from samvad.responder import (
    EchoResponder,
    ReplyContext,
    Responder,
    SharedTimerSleep,
    load_responder,
)

T0 = datetime(2025, 1, 10, 17, 0, 0, tzinfo=UTC)


class FixedResponder:
    """A responder plugged in by ``package.module:factory`` in the tests below."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        yield "fixed"


def make_fixed(settings: Settings) -> FixedResponder:
    return FixedResponder(settings)


def make_nothing(settings: Settings) -> object:
    return object()


async def collect(responder: Responder, context: ReplyContext) -> list[str]:
    return [chunk async for chunk in responder.reply(context)]


def context(message: str, interruption: Interruption | None = None) -> ReplyContext:
    return ReplyContext(user_id="u1", session_id="s1", message=message, interruption=interruption)


async def test_builtin_reply_depends_on_the_message() -> None:
    responder = EchoResponder()
    first = "".join(await collect(responder, context("home loan documents")))
    second = "".join(await collect(responder, context("car insurance")))
    assert '"home loan documents"' in first
    assert '"car insurance"' in second
    assert first != second


async def test_builtin_reply_is_deterministic() -> None:
    responder = EchoResponder()
    assert await collect(responder, context("hello")) == await collect(responder, context("hello"))


async def test_builtin_reply_streams_word_by_word() -> None:
    responder = EchoResponder()
    chunks = await collect(responder, context("one two three"))
    assert len(chunks) > 10
    assert all(chunk.count(" ") <= 1 for chunk in chunks)
    assert "".join(chunks) == responder.text_for(context("one two three"))


async def test_builtin_reply_mentions_the_interruption() -> None:
    cut = Interruption(
        session_id="s1",
        user_id="u1",
        at=T0,
        reason="barge_in",
        heard="You said: the first part",
        cut="and the rest",
        message_id="m1",
    )
    text = "".join(await collect(EchoResponder(), context("wait", cut)))
    assert text.startswith('(You stopped me after "You said: the first part".)')


async def test_builtin_reply_mentions_an_interruption_before_any_word() -> None:
    cut = Interruption(
        session_id="s1", user_id="u1", at=T0, reason="barge_in", heard="", cut="all of it"
    )
    text = "".join(await collect(EchoResponder(), context("wait", cut)))
    assert text.startswith("(You stopped me before I could say anything.)")


class FakeTime:
    """A clock that moves only when the responder sleeps: by the delay asked
    for, plus ``late`` seconds once for each entry of ``lags`` (a loop that
    woke the sleeper late)."""

    def __init__(self, lags: list[float] | None = None) -> None:
        self.now = 100.0
        self.asked: list[float] = []
        self.lags = list(lags or [])

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.now += seconds + (self.lags.pop(0) if self.lags else 0.0)


async def test_chunk_delay_goes_through_the_injected_sleep() -> None:
    time = FakeTime()
    responder = EchoResponder(chunk_delay=0.25, sleep=time.sleep, clock=time.clock)
    chunks = await collect(responder, context("hi"))
    assert time.asked == [0.25] * (len(chunks) - 1)  # the first chunk comes at once
    assert all(chunk.count(" ") <= 1 for chunk in chunks)  # word by word


async def test_a_responder_woken_late_sends_every_word_due_in_one_chunk() -> None:
    on_time = await collect(EchoResponder(), context("one two three four five"))
    # Woken 0.6 s late after the first word: words 2, 3 and 4 (due at 0.25,
    # 0.5 and 0.75 s) go out together at 0.85 s; the schedule then goes on.
    time = FakeTime(lags=[0.6])
    responder = EchoResponder(chunk_delay=0.25, sleep=time.sleep, clock=time.clock)
    chunks = await collect(responder, context("one two three four five"))
    assert chunks[0] == on_time[0]
    assert chunks[1] == "".join(on_time[1:4])
    assert chunks[2:] == on_time[4:]
    assert "".join(chunks) == "".join(on_time)
    assert time.asked[:2] == [0.25, pytest.approx(0.15)]  # the next word is due at 1.0 s


class CountedTimers:
    """Counts the loop timers a :class:`SharedTimerSleep` makes while it is entered."""

    def __init__(self, sleep: SharedTimerSleep) -> None:
        self.loop = asyncio.get_running_loop()
        self.sleep = sleep
        self.timers = 0

    def __enter__(self) -> CountedTimers:
        call_at = self.loop.call_at

        def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
            if callback == self.sleep._wake:  # not some other task's timer
                self.timers += 1
            return call_at(when, callback, *args, **kwargs)

        self.loop.call_at = counted  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *_: object) -> None:
        del self.loop.call_at


async def test_sleeps_ending_in_the_same_moment_share_one_timer() -> None:
    sleep = SharedTimerSleep(resolution=0.05)
    loop = asyncio.get_running_loop()
    with CountedTimers(sleep) as counted:
        started = loop.time()
        # Ten sleepers started at the same instant (the loop's clock held
        # still while they start): their ends fall in one moment.
        loop.time = lambda: started  # type: ignore[method-assign]
        try:
            sleeps = [sleep(0.02) for _ in range(10)]
        finally:
            del loop.time
        await asyncio.gather(*sleeps)
        # One more, started once they are over: a moment (and a timer) of its own.
        await sleep(0.02)
    assert counted.timers == 2
    assert loop.time() - started >= 0.02


async def test_a_sleep_lasts_at_least_its_delay() -> None:
    sleep = SharedTimerSleep()
    loop = asyncio.get_running_loop()
    for delay in (0.001, 0.0104, 0.03):
        started = loop.time()
        await sleep(delay)
        assert loop.time() - started >= delay


async def test_a_cancelled_sleeper_does_not_disturb_the_others_of_its_moment() -> None:
    sleep = SharedTimerSleep(resolution=0.01)
    cancelled = asyncio.ensure_future(sleep(0.02))
    kept = asyncio.ensure_future(sleep(0.02))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait_for(kept, timeout=5)
    assert cancelled.cancelled()
    assert sleep._due == {}  # nothing is left behind


class Turns:
    """Counts the turns of the running loop: a callback that schedules itself
    once per turn, as a socket read or any other callback waits its turn."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.count = 0
        self._handle = self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self.loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_a_turn_of_the_loop_wakes_at_most_per_turn_sleepers_oldest_first() -> None:
    sleep = SharedTimerSleep(resolution=0.01, per_turn=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    loop.time = lambda: started  # type: ignore[method-assign]
    try:  # 45 sleepers of one moment, then 10 of the next
        first = [sleep(0.02) for _ in range(45)]
        loop.time = lambda: started + 0.01  # type: ignore[method-assign]
        second = [sleep(0.02) for _ in range(10)]
    finally:
        del loop.time
    sleepers = first + second
    # Sleepers cancelled before their moment are skipped and not counted.
    for future in first[:5]:
        future.cancel()
    woken_in: dict[int, int] = {}
    turns = Turns()
    for index, future in enumerate(sleepers):
        future.add_done_callback(lambda _, i=index: woken_in.setdefault(i, turns.count))
    # A loop that is behind: both moments pass before it looks at its timers,
    # so both fire in one turn and the second moment's sleepers join the line.
    hold_the_loop(0.05)  # noqa: ASYNC251 (holding the loop is the point)
    await asyncio.sleep(0.1)
    await asyncio.gather(*sleepers[5:])
    turns.stop()
    woken = [woken_in[i] for i in range(5, len(sleepers))]
    assert woken == sorted(woken)  # oldest first, across moments
    per_turn = Counter(woken)
    assert max(per_turn.values()) == 10
    assert len(per_turn) == 5  # 50 sleepers left, ten a turn: other callbacks ran between
    assert sleep._ready == {} and sleep._due == {}  # nothing is left behind


async def test_a_zero_delay_yields_once_without_a_timer() -> None:
    sleep = SharedTimerSleep()
    with CountedTimers(sleep) as counted:
        await sleep(0)
    assert counted.timers == 0


def test_a_timer_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        SharedTimerSleep(resolution=0)
    with pytest.raises(ValueError, match="at least one sleeper"):
        SharedTimerSleep(per_turn=0)


def test_negative_chunk_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        EchoResponder(chunk_delay=-1)


def test_builtin_responder_is_loaded_from_settings() -> None:
    responder = load_responder(Settings(ws_responder="builtin", ws_reply_chunk_delay=0.5))
    assert isinstance(responder, EchoResponder)
    assert responder.chunk_delay == 0.5


async def test_a_responder_factory_is_loaded_by_name() -> None:
    settings = Settings(ws_responder="tests.test_responder:make_fixed")
    responder = load_responder(settings)
    # pytest imported this file under another module name: compare by name.
    assert type(responder).__name__ == "FixedResponder"
    assert getattr(responder, "settings", None) is settings
    assert await collect(responder, context("x")) == ["fixed"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nonsense", "must be 'builtin' or 'package.module:factory'"),
        ("tests.no_such_module:make", "cannot be loaded"),
        ("tests.test_responder:no_such_factory", "cannot be loaded"),
        ("tests.test_responder:make_nothing", "did not return a responder"),
    ],
)
def test_bad_responder_specs_fail_naming_the_variable(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="SAMVAD_RESPONDER") as caught:
        load_responder(Settings(ws_responder=spec))
    assert needle in str(caught.value)


def test_responder_setting_is_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {"SAMVAD_RESPONDER": "pkg.mod:factory", "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS": "0.2"}
    )
    assert settings.ws_responder == "pkg.mod:factory"
    assert settings.ws_reply_chunk_delay == 0.2
