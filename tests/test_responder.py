"""The responder interface and the deterministic built-in responder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.interruptions import Interruption
from samvad.responder import EchoResponder, ReplyContext, Responder, load_responder

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


async def test_chunk_delay_goes_through_the_injected_sleep() -> None:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    responder = EchoResponder(chunk_delay=0.25, sleep=sleep)
    chunks = await collect(responder, context("hi"))
    assert delays == [0.25] * (len(chunks) - 1)  # the first chunk comes at once


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
