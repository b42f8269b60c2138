"""The sans-I/O protocol core, driven without sockets."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from samvad.clock import ManualClock
from samvad.errors import (
    BadFrame,
    BadRequest,
    FrameTooLarge,
    InvalidField,
    MalformedJson,
    SamvadError,
    UnknownFrameType,
)
from samvad.models import Message, Role
from samvad.web import protocol, schemas
from samvad.web.protocol import (
    ERROR_CODES,
    FRAME_ERRORS,
    Close,
    CloseCode,
    ConnectionState,
    End,
    Interrupt,
    Ping,
    RateDecision,
    RateLimiter,
    Reject,
    ResumeFailure,
    ServerProtocol,
    Start,
    StateUpdate,
    TokenBucket,
    UserMessage,
    encode,
    frame_too_large,
    heard_part,
    last_seq,
    parse_frame,
    plan_resume,
    resume_frame,
)

T0 = datetime(2025, 1, 10, 17, 0, 0, tzinfo=UTC)


def make_protocol(
    clock: ManualClock | None = None,
    *,
    max_frame_bytes: int = 1024,
    rate: float = 100.0,
    burst: int = 100,
    strikes: int = 3,
) -> ServerProtocol:
    clock = clock or ManualClock()
    return ServerProtocol(
        max_frame_bytes=max_frame_bytes,
        rate=rate,
        burst=burst,
        strikes=strikes,
        clock=clock.monotonic,
    )


def frame(**fields: object) -> str:
    return json.dumps(fields)


def rejected_code(received: object) -> str:
    assert isinstance(received, Reject), received
    return received.error.code


def msg(seq: int, session: str = "s1", role: Role = Role.USER) -> Message:
    return Message(
        id=f"m{seq}", role=role, content=f"text {seq}", timestamp=T0, session_id=session, seq=seq
    )


# -- parsing ---------------------------------------------------------------------


def test_start_frame_parses_every_field() -> None:
    parsed = parse_frame(
        frame(
            type="start",
            userId="u1",
            sessionId="s1",
            language="hi-IN",
            metadata={"device": "phone"},
            token="t",
            resume={"lastSeq": 4},
            historyLimit=5,
        )
    )
    assert parsed == Start(
        user_id="u1",
        session_id="s1",
        language="hi-IN",
        metadata={"device": "phone"},
        token="t",
        resume_from=4,
        history_limit=5,
    )


def test_start_frame_defaults() -> None:
    parsed = parse_frame(frame(type="start", userId="u1"))
    assert parsed == Start(user_id="u1")
    assert parsed.history_limit == 20


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({}, "userId is required"),
        ({"userId": "a/b"}, "userId must not contain"),
        ({"userId": "u", "sessionId": "stats"}, "sessionId must not be the reserved word"),
        ({"userId": "u", "resume": {"lastSeq": 1}}, "resume needs a sessionId"),
        ({"userId": "u", "sessionId": "s", "resume": {}}, "resume.lastSeq is required"),
        ({"userId": "u", "sessionId": "s", "resume": {"lastSeq": -1}}, "lastSeq must be"),
        ({"userId": "u", "metadata": [1]}, "metadata must be an object"),
        ({"userId": "u", "historyLimit": 1000}, "historyLimit must be at most 100"),
        ({"userId": "u", "language": 7}, "language must be a string"),
    ],
)
def test_invalid_start_fields_are_named(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_frame(frame(type="start", **fields))
    assert caught.value.code == InvalidField.code
    assert needle in caught.value.message


def test_message_frame_parses_text_final_and_client_id() -> None:
    assert parse_frame(frame(type="message", text="hi", clientId="c1")) == UserMessage(
        text="hi", final=True, client_id="c1"
    )
    assert parse_frame(frame(type="message", text="hel", final=False)) == UserMessage(
        text="hel", final=False
    )


@pytest.mark.parametrize(
    "fields",
    [{}, {"text": ""}, {"text": "   "}, {"text": 3}, {"text": "x", "final": "yes"}],
)
def test_message_frame_needs_non_empty_text(fields: dict[str, object]) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_frame(frame(type="message", **fields))
    assert caught.value.code == InvalidField.code


def test_interrupt_frame_takes_heard_chars_or_heard_text() -> None:
    assert parse_frame(frame(type="interrupt")) == Interrupt(reason="barge_in")
    assert parse_frame(frame(type="interrupt", heardChars=3, reason="cough")) == Interrupt(
        heard_chars=3, reason="cough"
    )
    assert parse_frame(frame(type="interrupt", heardText="You")) == Interrupt(heard_text="You")
    with pytest.raises(BadRequest, match="cannot both be given"):
        parse_frame(frame(type="interrupt", heardChars=3, heardText="You"))
    with pytest.raises(BadRequest, match="heardChars must be an integer"):
        parse_frame(frame(type="interrupt", heardChars=True))


def test_state_ping_and_end_frames() -> None:
    assert parse_frame(frame(type="state", state={"language": "en"})) == StateUpdate(
        state={"language": "en"}
    )
    assert parse_frame(frame(type="ping", ts=12.5)) == Ping(ts=12.5)
    assert parse_frame(frame(type="end")) == End()
    with pytest.raises(BadRequest, match="state must be an object"):
        parse_frame(frame(type="state", state="x"))
    with pytest.raises(BadRequest, match="state is required"):
        parse_frame(frame(type="state"))
    with pytest.raises(BadRequest, match="ts must be"):
        parse_frame(frame(type="ping", ts=False))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{not json", MalformedJson.code),
        ('{"type": "ping", "type": "message", "text": "x"}', MalformedJson.code),
        ('{"type": "ping", "ts": NaN}', MalformedJson.code),
        ("[" * 5000, MalformedJson.code),
        ("[1, 2]", BadFrame.code),
        ('{"text": "no type"}', BadFrame.code),
        ('{"type": 5}', BadFrame.code),
        ('{"type": "dance"}', UnknownFrameType.code),
        (b"\x00\x01", BadFrame.code),
    ],
)
def test_malformed_frames_are_rejected_with_a_stable_code(data: str | bytes, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_frame(data)
    assert caught.value.code == code


# Message and end frames the fast reader reads into their shapes (the rules
# past the types, such as text that is only white space, come after it) ...
FLAT_READ = [
    '{"type":"message","text":"hello"}',
    '{"type":"end"}',
    '{"type": "message", "text": "hi", "final": false, "clientId": "c-1"}',
    '{"text":"hi","type":"message"}',
    '{"type":"message","text":"hi","final":true,"clientId":null}',
    ' {"type" : "end"} ',
    '{"type":"message","text":"नमस्ते 👋 \\n \\"q\\""}',
    '{"type":"message","text":"   "}',
    '{"type":"message","text":"a","clientId":""}',
    '{"type":"message","text":"a","clientId":"bad/id"}',
]
# ... and what it leaves to the long way, which answers or names the error.
FLAT_LEFT = [
    # The tag: missing, twice, as a value, of another frame, escaped.
    '{"text":"type"}',
    '{"text":"no type"}',
    '{"type":"message","type":"end","text":"x"}',
    '{"type":"ping","type":"message","text":"x"}',
    '{"type":"message","text":"type"}',
    '{"type":"end","text":"x"}',
    '{"type":"ping"}',
    '{"type":"state","state":{}}',
    '{"typ\\u0065":"message","text":"x"}',
    '{"type":"m\\u0065ssage","text":"x"}',
    # Duplicates, unknown fields, values of the wrong type or out of bounds.
    '{"type":"message","text":"a","text":"b"}',
    '{"type":"message","text":"a","final":true,"final":false}',
    '{"type":"message","text":"a","extra":{"k":1,"k":2}}',
    '{"type":"message","text":"a","extra":NaN}',
    '{"type":"message","text":"a","final":1}',
    '{"type":"message","text":"a","final":"yes"}',
    '{"type":"message","text":""}',
    '{"type":"message","text":5}',
    '{"type":"message"}',
    '{"type":"message","text":"a","clientId":"' + "x" * 500 + '"}',
    '{"type":"message","text":"\\ud800"}',
    '{"type":"message","text":"a\ud800b"}',  # not from a socket (strict UTF-8)
    '{"type":"message","text":"tab\there"}',
    '{"type":"message","text":"a"} trailing',
    '{"type":"message","text":"a"',
    '["type","message"]',
    '"message"',
    "",
]


def _outcome(parse: Callable[[str], object], data: str) -> tuple[str, object]:
    try:
        return "ok", parse(data)
    except BadRequest as exc:
        return exc.code, str(exc)


@pytest.mark.parametrize("data", FLAT_READ + FLAT_LEFT, ids=range(len(FLAT_READ + FLAT_LEFT)))
def test_message_and_end_frames_read_fast_as_the_long_way_reads_them(data: str) -> None:
    assert _outcome(parse_frame, data) == _outcome(protocol._parse_any, data)


def test_the_fast_reader_takes_plain_message_and_end_frames_and_nothing_doubtful() -> None:
    for data in FLAT_READ:
        read = protocol._read_flat(data)
        assert isinstance(read, schemas.UserMessageFrame | schemas.EndFrame), data
    for data in FLAT_LEFT:
        assert protocol._read_flat(data) is None, data


@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "end", "ping", "type"])},
        optional={
            "text": st.text(max_size=20),
            "final": st.one_of(st.booleans(), st.integers(), st.none()),
            "clientId": st.one_of(st.text(max_size=12), st.none()),
            "type ": st.text(max_size=3),
        },
    ),
    st.booleans(),
)
def test_generated_frames_read_fast_as_the_long_way_reads_them(
    fields: dict[str, object], ascii_only: bool
) -> None:
    data = json.dumps(fields, ensure_ascii=ascii_only)
    assert _outcome(parse_frame, data) == _outcome(protocol._parse_any, data)


# -- the state machine -----------------------------------------------------------------


def test_only_start_and_ping_are_accepted_before_start() -> None:
    proto = make_protocol()
    assert rejected_code(proto.receive(frame(type="message", text="hi"))) == "not_started"
    assert rejected_code(proto.receive(frame(type="end"))) == "not_started"
    assert isinstance(proto.receive(frame(type="ping")), Ping)
    assert isinstance(proto.receive(frame(type="start", userId="u1")), Start)
    assert proto.state is ConnectionState.AWAITING_START  # until the glue confirms


def test_start_twice_is_rejected_once_active() -> None:
    proto = make_protocol()
    proto.started()
    assert proto.state is ConnectionState.ACTIVE
    assert rejected_code(proto.receive(frame(type="start", userId="u1"))) == "already_started"
    assert isinstance(proto.receive(frame(type="message", text="hi")), UserMessage)


def test_frames_after_end_are_rejected() -> None:
    proto = make_protocol()
    proto.started()
    proto.ended()
    assert rejected_code(proto.receive(frame(type="message", text="hi"))) == "session_ended"


def test_illegal_transitions_raise_a_sentence() -> None:
    proto = make_protocol()
    with pytest.raises(RuntimeError, match='from "awaiting_start" to "ended"'):
        proto.ended()
    proto.closed()
    proto.closed()  # idempotent
    with pytest.raises(RuntimeError, match='from "closed" to "active"'):
        proto.started()
    with pytest.raises(RuntimeError, match="once the connection is closed"):
        proto.receive(frame(type="ping"))


def test_a_rejected_frame_leaves_the_connection_usable() -> None:
    proto = make_protocol()
    proto.started()
    assert rejected_code(proto.receive("{oops")) == "bad_json"
    assert isinstance(proto.receive(frame(type="message", text="still here")), UserMessage)


# -- size and rate -------------------------------------------------------------------------


def test_frames_over_the_limit_close_with_1009() -> None:
    proto = make_protocol(max_frame_bytes=100)
    received = proto.receive(frame(type="message", text="x" * 200))
    assert received == Close(CloseCode.MESSAGE_TOO_BIG, "frame over 100 bytes", FrameTooLarge.code)


def test_frame_size_counts_utf8_bytes() -> None:
    assert not frame_too_large("a" * 100, 100)
    assert frame_too_large("a" * 101, 100)
    assert frame_too_large("\u0928" * 40, 100)  # 40 characters, 120 bytes
    assert not frame_too_large("\u0928" * 33, 100)
    assert frame_too_large(b"x" * 101, 100)


def test_token_bucket_refills_with_the_injected_clock() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock.monotonic)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert bucket.take()
    assert not bucket.take()
    clock.advance(100)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_rejects_then_closes_after_strikes() -> None:
    clock = ManualClock()
    limiter = RateLimiter(TokenBucket(rate=1.0, burst=2, clock=clock.monotonic), strikes=2)
    decisions = [limiter.check() for _ in range(5)]
    assert decisions == [
        RateDecision.ALLOW,
        RateDecision.ALLOW,
        RateDecision.REJECT,
        RateDecision.REJECT,
        RateDecision.CLOSE,
    ]


def test_an_allowed_frame_clears_the_strikes() -> None:
    clock = ManualClock()
    limiter = RateLimiter(TokenBucket(rate=1.0, burst=1, clock=clock.monotonic), strikes=1)
    assert limiter.check() is RateDecision.ALLOW
    assert limiter.check() is RateDecision.REJECT
    clock.advance(1.0)
    assert limiter.check() is RateDecision.ALLOW
    assert limiter.check() is RateDecision.REJECT
    assert limiter.check() is RateDecision.CLOSE


def test_protocol_answers_rate_limited_then_closes_with_1008() -> None:
    clock = ManualClock()
    proto = make_protocol(clock, rate=1.0, burst=2, strikes=1)
    ping = frame(type="ping")
    assert isinstance(proto.receive(ping), Ping)
    assert isinstance(proto.receive(ping), Ping)
    assert rejected_code(proto.receive(ping)) == "rate_limited"
    closed = proto.receive(ping)
    assert isinstance(closed, Close)
    assert closed.code == CloseCode.POLICY_VIOLATION == 1008
    assert closed.error == "rate_limited"


def test_invalid_token_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket(rate=0, burst=1, clock=ManualClock().monotonic)


# -- barge-in, sequence numbers and resume ----------------------------------------------------


def test_heard_defaults_to_everything_sent() -> None:
    assert heard_part("Hello there", heard_chars=None, heard_text=None) == "Hello there"


def test_heard_chars_are_clamped_to_what_was_sent() -> None:
    assert heard_part("Hello there", heard_chars=5, heard_text=None) == "Hello"
    assert heard_part("Hello", heard_chars=50, heard_text=None) == "Hello"
    assert heard_part("Hello", heard_chars=0, heard_text=None) == ""


def test_heard_text_is_cut_to_the_common_prefix() -> None:
    assert heard_part("Hello there", heard_chars=None, heard_text="Hello") == "Hello"
    assert heard_part("Hello there", heard_chars=None, heard_text="Help me") == "Hel"
    assert heard_part("Hi", heard_chars=None, heard_text="Hi and more") == "Hi"


def test_last_seq_is_the_highest_of_the_session() -> None:
    messages = [msg(1), msg(7, session="other"), msg(3), msg(2)]
    assert last_seq(messages, "s1") == 3
    assert last_seq(messages, "none") == 0


def test_resume_with_nothing_missed_is_recovered_and_empty() -> None:
    plan = plan_resume([msg(1), msg(2)], session_id="s1", last_seen=2, current=2, window=10)
    assert plan.recovered
    assert plan.messages == ()


def test_resume_replays_the_missed_messages_in_order() -> None:
    candidates = [msg(4), msg(1), msg(9, session="other"), msg(2), msg(3), msg(3)]
    plan = plan_resume(candidates, session_id="s1", last_seen=1, current=4, window=10)
    assert plan.recovered
    assert [m.seq for m in plan.messages] == [2, 3, 4]


def test_resume_after_the_history_cap_dropped_messages_is_not_recovered() -> None:
    plan = plan_resume([msg(5), msg(6)], session_id="s1", last_seen=2, current=6, window=10)
    assert not plan.recovered
    assert plan.reason is ResumeFailure.HISTORY_TRIMMED


def test_resume_from_a_seq_the_server_never_issued_is_not_recovered() -> None:
    plan = plan_resume([msg(1)], session_id="s1", last_seen=9, current=1, window=10)
    assert plan.reason is ResumeFailure.UNKNOWN_SEQ


def test_resume_beyond_the_window_is_not_recovered() -> None:
    messages = [msg(i) for i in range(1, 21)]
    plan = plan_resume(messages, session_id="s1", last_seen=0, current=20, window=5)
    assert plan.reason is ResumeFailure.TOO_MANY_MISSED


# -- server frames -----------------------------------------------------------------------


def test_history_messages_have_the_rest_history_shape() -> None:
    m = Message(
        id="m1",
        role=Role.ASSISTANT,
        content="Hel",
        timestamp=T0,
        session_id="s1",
        interrupted=True,
        seq=2,
    )
    assert json.loads(schemas.encode(schemas.history_message(m))) == {
        "id": "m1",
        "role": "assistant",
        "content": "Hel",
        "timestamp": "2025-01-10T17:00:00.000Z",
        "sessionId": "s1",
        "interrupted": True,
        "seq": 2,
    }


def test_resume_frames_say_explicitly_when_not_recovered() -> None:
    failed = plan_resume([], session_id="s1", last_seen=0, current=3, window=10)
    out = json.loads(encode(resume_frame(failed, last_seq=3, in_flight=None)))
    assert out == {
        "type": "resume",
        "recovered": False,
        "reason": "history_trimmed",
        "lastSeq": 3,
        "inFlight": None,
    }


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"type": "message", "text": "\\ud800"}', "text"),
        ('{"type": "message", "text": "ok", "clientId": "\\udc00"}', "clientId"),
        ('{"type": "state", "state": {"k": ["a", "\\ud83d"]}}', "state.k[1]"),
        ('{"type": "ping", "ts": "\\udfff"}', "ts"),
        ('{"type": "interrupt", "reason": "x\\ud800"}', "reason"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        parse_frame(text)
    assert caught.value.message == f"{field} contains a lone surrogate (not valid Unicode)"


def test_a_duplicate_type_key_is_refused_not_taken_as_the_last() -> None:
    proto = make_protocol()
    proto.started()
    received = proto.receive('{"type": "ping", "type": "message", "text": "stored?"}')
    assert isinstance(received, Reject)
    assert received.error.code == "bad_json"
    assert received.error.message == "Malformed JSON: the key 'type' appears twice in one object"


def test_start_metadata_is_counted_from_the_session_document_root() -> None:
    deep: dict[str, object] = {}
    for _ in range(19):
        deep = {"n": deep}
    # metadata (level 1) + 19 maps + the innermost {} = level 21 in sessions/{id}
    with pytest.raises(InvalidField, match="nests deeper than 20 levels"):
        parse_frame(frame(type="start", userId="u", metadata={"d": deep}))
    assert parse_frame(frame(type="start", userId="u", metadata=deep)) == Start(
        user_id="u", metadata=deep
    )


def test_encode_keeps_non_ascii_text() -> None:
    assert encode({"text": "नमस्ते"}) == '{"text":"नमस्ते"}'


def test_the_documented_error_codes_are_the_error_frames_codes() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    table = docs.split("Error frames carry a stable `code`", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `([a-z_]+)`(?: / `([a-z_]+)`)?", table, re.M))
    codes = {code for pair in documented for code in pair if code}
    assert codes == ERROR_CODES
    # Each is the code of an error class: the classes are the one list.
    assert {error.code for error in FRAME_ERRORS} == ERROR_CODES
    assert all(issubclass(error, SamvadError) for error in FRAME_ERRORS)
