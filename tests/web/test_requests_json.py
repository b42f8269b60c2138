"""Reading typed REST bodies (``samvad.web.requests_json.decode_body``): the fast
reader of string-only bodies takes exactly what the general reader takes, to
the same value, and leaves everything else to it."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from msgspec import Struct
from starlette.requests import Request

from samvad.errors import SamvadError
from samvad.web.requests_json import decode_body, flat_reader, parse_object
from samvad.web.schemas import (
    CreateSessionBody,
    EndFrame,
    HistoryBody,
    PingFrame,
    RefreshBody,
    UserMessageFrame,
    decode_struct,
)

HISTORY_BODIES = [
    b'{"role":"user","content":"What documents do I need?"}',
    b'{"role":"assistant","content":"hi","sessionId":"s-1"}',
    b'{"role":"user","content":"hi","sessionId":null}',
    b' {"content" : "line\\nbreak \\"quoted\\" \\\\ back\\/slash", "role":"system"} ',
    '{"role":"user","content":"नमस्ते 👋"}'.encode(),
    # Duplicate keys: refused, whichever way they are written.
    b'{"role":"user","content":"a","role":"assistant"}',
    b'{"role":"user","content":"a","r\\u006fle":"assistant"}',
    b'{"role":"user","content":"a","sessionId":"s","sessionId":"t"}',
    # A field's name as a value; a duplicate inside an unknown field.
    b'{"role":"user","content":"role"}',
    b'{"role":"user","content":"a","extra":{"k":1,"k":2}}',
    b'{"role":"user","content":"a","extra":NaN}',
    b'{"role":"user","content":"a","extra":1e999}',
    b'{"role":"user","content":"a","extra":' + b"[" * 1200 + b"]" * 1200 + b"}",
    b'{"role":"user","content":"a","extra":' + b"9" * 5000 + b"}",
    # Escapes, surrogates, control characters, encodings.
    b'{"role":"user","content":"\\u00e9t\\u00e9"}',
    b'{"role":"user","content":"\\ud800"}',
    b'{"role":"user","content":"\\ud83d\\ude00"}',
    b'{"role":"user","content":"tab\there"}',
    b'{"role":"user","content":"nul\\u0000"}',
    b'\xef\xbb\xbf{"role":"user","content":"bom"}',
    b'{"role":"user","content":"\xff"}',
    # Not UTF-8: overlong forms, a surrogate or a code point past U+10FFFF as bytes.
    b'{"role":"user","content":"a\xc0\x80"}',
    b'{"role":"user","content":"a\xed\xa0\x80"}',
    b'{"role":"user","content":"a\xf4\x90\x80\x80"}',
    b'{"role":"user","content":"a\xe0\x80\xaf"}',
    # Wrong shapes and values.
    b'{"role":"robot","content":"a"}',
    b'{"role":"user","content":""}',
    b'{"role":"user","content":5}',
    b'{"role":"user"}',
    b'{"role":"user","content":"a","sessionId":"bad/id"}',
    b'{"role":"user","content":"a","sessionId":""}',
    b"[]",
    b"",
    b"   ",
    b'{"role":"user","content":"a"} trailing',
    b'{"role":"user","content":"a"',
]


def _request(raw: bytes) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", b"application/json")],
    }
    return Request(scope, receive)


def _long_way(raw: bytes, shape: type[Struct]) -> tuple[str, Any]:
    try:
        return "ok", msgspec.structs.asdict(decode_struct(parse_object(raw), shape))
    except SamvadError as exc:
        return type(exc).__name__, str(exc)


async def _decoded(raw: bytes, shape: type[Struct]) -> tuple[str, Any]:
    try:
        body = await decode_body(_request(raw), shape, limit=1 << 20)
    except SamvadError as exc:
        return type(exc).__name__, str(exc)
    assert isinstance(body, shape)
    return "ok", msgspec.structs.asdict(body)


@pytest.mark.parametrize("raw", HISTORY_BODIES, ids=range(len(HISTORY_BODIES)))
async def test_a_history_body_reads_as_the_general_reader_reads_it(raw: bytes) -> None:
    assert await _decoded(raw, HistoryBody) == _long_way(raw, HistoryBody)


async def test_the_fast_reader_takes_the_plain_bodies_and_nothing_doubtful() -> None:
    reader = flat_reader(HistoryBody)
    assert reader is not None
    body = reader(HISTORY_BODIES[0])
    assert isinstance(body, HistoryBody)
    assert msgspec.structs.asdict(body) == {
        "role": "user",
        "content": "What documents do I need?",
        "session_id": None,
    }
    for raw in (HISTORY_BODIES[6], HISTORY_BODIES[8], HISTORY_BODIES[9], HISTORY_BODIES[14]):
        assert reader(raw) is None


def test_only_string_and_boolean_shapes_get_the_fast_reader() -> None:
    assert flat_reader(RefreshBody) is not None
    assert flat_reader(CreateSessionBody) is None  # metadata: any JSON object
    assert flat_reader(UserMessageFrame, EndFrame) is not None  # final: a boolean
    assert flat_reader(UserMessageFrame, PingFrame) is None  # ts: a number


def test_tagged_shapes_are_read_only_as_a_union_where_the_tag_is_required() -> None:
    # Alone, msgspec reads a tagged shape whether or not the tag is there.
    with pytest.raises(ValueError, match="tagged"):
        flat_reader(UserMessageFrame)
    with pytest.raises(ValueError, match="tagged"):
        flat_reader(HistoryBody, RefreshBody)
    reader = flat_reader(UserMessageFrame, EndFrame)
    assert reader is not None
    assert reader('{"text":"hi"}') is None
    assert reader(b'{"type":"message","text":"hi"}') == reader('{"type":"message","text":"hi"}')


async def test_the_fingerprint_of_a_body_is_the_same_either_way() -> None:
    raw = HISTORY_BODIES[1]
    fast = await decode_body(_request(raw), HistoryBody, limit=1 << 20)
    slow = decode_struct(parse_object(raw), HistoryBody)
    encoded = msgspec.json.encode([fast], order="sorted")
    assert encoded == msgspec.json.encode([slow], order="sorted")
    assert json.loads(encoded) == [{"role": "assistant", "content": "hi", "sessionId": "s-1"}]
