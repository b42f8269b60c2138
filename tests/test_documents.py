from __future__ import annotations

from datetime import UTC, datetime, timedelta

from samvad.documents import (
    decode_message,
    decode_profile,
    empty_profile,
    encode_message,
    profile_with,
)
from samvad.history import history_bytes
from samvad.models import Message, Role

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)


def msg(i: int, content: str = "x") -> Message:
    return Message(
        id=f"m{i:03d}", role=Role.USER, content=content, timestamp=T0 + timedelta(seconds=i)
    )


def test_decode_profile_puts_a_history_written_out_of_order_in_time_order() -> None:
    doc = {"conversationHistory": [encode_message(msg(i)) for i in (2, 0, 1)]}
    profile = decode_profile("u1", doc, cap=100, max_bytes=10**6)
    assert [m.id for m in profile.history] == ["m000", "m001", "m002"]


def test_decode_profile_keeps_the_newest_of_an_unordered_history_at_the_cap() -> None:
    doc = {"conversationHistory": [encode_message(msg(i)) for i in (3, 0, 2, 1)]}
    profile = decode_profile("u1", doc, cap=2, max_bytes=10**6)
    assert [m.id for m in profile.history] == ["m002", "m003"]


def test_profile_with_keeps_the_size_exact_as_messages_fall_off_the_cap() -> None:
    profile = empty_profile("u1")
    for i in range(250):
        profile = profile_with(
            profile,
            messages=[msg(i, "é" * (i % 7))],
            preferences=None,
            now=T0,
            cap=100,
            max_bytes=10**6,
        )
    assert [m.id for m in profile.history] == [f"m{i:03d}" for i in range(150, 250)]
    assert profile.history_bytes == history_bytes(profile.history)


def test_profile_with_is_idempotent_for_a_replayed_message() -> None:
    profile = empty_profile("u1")
    for i in range(3):
        profile = profile_with(
            profile, messages=[msg(i)], preferences=None, now=T0, cap=100, max_bytes=10**6
        )
    again = profile_with(
        profile, messages=[msg(2)], preferences=None, now=T0, cap=100, max_bytes=10**6
    )
    assert again.history == profile.history
    assert again.history_bytes == profile.history_bytes


def test_a_message_keeps_its_client_id_in_the_history_document() -> None:
    sent = Message(
        id="m1", role=Role.USER, content="hi", timestamp=T0, session_id="s1", seq=1, client_id="c1"
    )
    doc = encode_message(sent)
    assert doc["clientId"] == "c1"
    assert decode_message(doc) == sent
    assert "clientId" not in encode_message(msg(2))
    assert decode_message({**doc, "clientId": 7}).client_id is None  # not ours: ignored
