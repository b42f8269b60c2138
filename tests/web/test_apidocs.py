"""The wire shapes and the API documents generated from them.

- Today's encodings: every response and frame, encoded from ``samvad.web.schemas``,
  is byte for byte what the hand-written encoders (``wire.py``, the frame
  dictionaries of ``protocol.py``, Starlette's ``JSONResponse``) produced for
  the same values; ``GOLDEN`` was recorded from them before they were deleted.
  The one difference: floats in exponent form lose the ``+`` (``1.5e300``).
- The AsyncAPI document against the frames of a real WebSocket session.
- Both documents are served and generated from one definition per shape.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import websockets
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from samvad.clock import to_iso
from samvad.config import Settings
from samvad.conversation import Acked, ReplyChunk, ReplyEnded, ReplyStarted
from samvad.models import (
    Message,
    Mode,
    PersistenceStatus,
    Profile,
    Role,
    Session,
    SessionStatus,
    UserState,
)
from samvad.web import schemas as s
from samvad.web.apidocs import asyncapi_document, openapi_document
from samvad.web.app import create_app
from samvad.web.protocol import (
    ResumeFailure,
    ResumePlan,
    ack_frame,
    encode,
    ended_frame,
    error_frame,
    interrupted_frame,
    merged_chunk_frame,
    message_frame,
    pong_frame,
    reply_chunk_frame,
    reply_end_frame,
    reply_start_frame,
    resume_frame,
    started_frame,
    state_frame,
)
from tests.support.server import LiveServer, live_server

# -- representative values ------------------------------------------------------------------

T0 = datetime(2025, 1, 10, 17, 0, 0, 123456, tzinfo=UTC)
FULL = Message(
    id="m1",
    role=Role.ASSISTANT,
    content='नमस्ते "quoted" \\ \n\t\x00 \u2028 🙂 </script>',
    timestamp=T0,
    session_id="s1",
    interrupted=True,
    seq=7,
)
BARE = Message(id="m2", role=Role.USER, content="hi", timestamp=T0)
DATA = {
    "language": "en",
    "ctx": {"topic": "loans", "n": [1, 2.5, None, True, -0.0, 1e-3]},
    "big": 2**63 - 1,
    "neg": -(2**63),
    "f": 0.1,
    "x": 1.5e300,
    "empty": {},
    "list": [],
    "emoji🙂": "é",
}
STATE = UserState(user_id="u1", data=DATA, updated_at=T0, is_active=True)
STATE_BARE = UserState(user_id="u2", data={}, updated_at=None, is_active=False)
PROFILE = Profile.of(
    "u1",
    history=(BARE, FULL),
    preferences={"voice": "slow", "speed": 1.25, "nested": {"a": [1, {"b": None}]}},
    created_at=T0,
    last_updated=T0,
)
PROFILE_BARE = Profile.of("u3")
SESSION = Session(
    id="s1",
    user_id="u1",
    language="hi-IN",
    metadata={"deviceId": "d1", "k": [1, "2"]},
    status=SessionStatus.ENDED,
    created_at=T0,
    last_activity=T0,
    ended_at=T0,
    expire_at=T0,
)
SESSION_BARE = Session(id="s2", user_id="u1")
STATUS = PersistenceStatus(
    mode=Mode.FIRESTORE,
    backend="firestore",
    pending_documents=3,
    pending_in_flight=1,
    oldest_pending_age=0.0423456,
    replay_lag=12.0,
    writes_issued=10,
    write_failures=2,
    mode_since=T0,
    last_error=None,
)
STATUS_DOWN = PersistenceStatus(
    mode=Mode.MEMORY,
    backend="firestore",
    pending_documents=0,
    pending_in_flight=0,
    oldest_pending_age=0.0,
    replay_lag=0.0,
    writes_issued=0,
    write_failures=5,
    mode_since=T0,
    last_error="UNAVAILABLE: connection refused",
)
LIMITS = {
    "maxFrameBytes": 65536,
    "ratePerSecond": 20.0,
    "rateBurst": 40,
    "idleTimeoutSeconds": 120.0,
    "resumeWindow": 200,
}
IN_FLIGHT = {"replyId": "r1", "inReplyTo": 3, "text": "You said", "chunks": 2}


def _stats(source: str, status: PersistenceStatus, *counts: int) -> s.StatsFound:
    a, b, c, d, e, f = counts
    return s.StatsFound(
        stats=s.stats_view(
            active_users=a,
            active_sessions=b,
            total_profiles=c,
            total_interruptions=d,
            persisted_interruptions=e,
            live_interruptions=f,
            source=source,
            status=status,
        )
    )


def _frame(frame: Any) -> bytes:
    return encode(frame).encode()


# Each new encoding, by the name of its golden bytes.
NEW: dict[str, Callable[[], bytes]] = {
    "state_saved": lambda: s.encode(s.StateSaved(user_id="u1")),
    "state_found": lambda: s.encode(s.StateFound(user_id="u1", state=s.state_view(STATE))),
    "state_found_bare": lambda: s.encode(
        s.StateFound(user_id="u2", state=s.state_view(STATE_BARE))
    ),
    "profile_found": lambda: s.encode(
        s.ProfileFound(user_id="u1", profile=s.profile_view(PROFILE))
    ),
    "profile_found_bare": lambda: s.encode(
        s.ProfileFound(user_id="u3", profile=s.profile_view(PROFILE_BARE))
    ),
    "message_appended": lambda: s.encode(
        s.MessageAppended(user_id="u1", message_id="m1", timestamp=to_iso(T0))
    ),
    "session_saved": lambda: s.encode(
        s.SessionSaved(
            session_id="s1", user_id="u1", session=s.session_view(SESSION, SESSION.status)
        )
    ),
    "session_found": lambda: s.encode(
        s.SessionFound(session=s.session_view(SESSION_BARE, SessionStatus.ABANDONED))
    ),
    "session_ended": lambda: s.encode(s.SessionEnded(session_id="s1")),
    "active_sessions": lambda: s.encode(
        s.ActiveSessions(
            user_id="u1",
            count=2,
            sessions=[s.session_view(x, SessionStatus.ACTIVE) for x in (SESSION, SESSION_BARE)],
        )
    ),
    "active_sessions_none": lambda: s.encode(s.ActiveSessions(user_id="u1", count=0, sessions=[])),
    "session_page": lambda: s.encode(
        s.SessionPage(
            user_id="u1",
            count=1,
            sessions=[s.session_view(SESSION, SessionStatus.ENDED)],
            next_cursor="abc",
        )
    ),
    "session_page_last": lambda: s.encode(
        s.SessionPage(user_id="u1", count=0, sessions=[], next_cursor=None)
    ),
    "recent_history": lambda: s.encode(
        s.RecentHistory(
            user_id="u1", count=2, history_length=5, messages=s.history_messages([BARE, FULL])
        )
    ),
    "preferences_saved": lambda: s.encode(
        s.PreferencesSaved(user_id="u1", preferences=s.plain_json(PROFILE.preferences))
    ),
    "user_refreshed": lambda: s.encode(
        s.UserRefreshed(
            user_id="u1",
            cleared=s.UserCleared(user_state=True, user_profile=False, sessions=2, interruptions=0),
        )
    ),
    "session_deleted": lambda: s.encode(
        s.SessionDeleted(session_id="s1", cleared=s.SessionCleared(session=True, interruptions=3))
    ),
    "stats": lambda: s.encode(_stats("firestore", STATUS, 42, 58, 1234, 5678, 0, 5678)),
    "stats_memory": lambda: s.encode(_stats("memory", STATUS_DOWN, 0, 0, 0, 1, 0, 1)),
    # Today's fields, then ``instance`` (added for several workers: additive).
    "health": lambda: s.encode(
        s.Health(
            version="0.1.0",
            persistence=s.persistence_view(STATUS),
            instance=s.InstanceView(pid=1, feed=None),
        )
    ),
    "ready": lambda: s.encode(s.Ready(mode=Mode.MEMORY)),
    "not_ready": lambda: s.encode(s.NotReady()),
    # ``historyIncomplete`` last (added for memory-only mode: additive).
    "frame_started": lambda: _frame(
        started_frame(
            session_id="s1",
            user_id="u1",
            mode="firestore",
            state=STATE,
            history=[BARE, FULL],
            last_seq=7,
            resumed=True,
            limits=LIMITS,
        )
    ),
    "frame_started_empty": lambda: _frame(
        started_frame(
            session_id="s1",
            user_id="u1",
            mode="memory",
            state=None,
            history=[],
            last_seq=0,
            resumed=False,
            limits=LIMITS,
        )
    ),
    "frame_resume_recovered": lambda: _frame(
        resume_frame(ResumePlan(recovered=True, messages=(FULL,)), last_seq=7, in_flight=IN_FLIGHT)
    ),
    "frame_resume_lost": lambda: _frame(
        resume_frame(
            ResumePlan(recovered=False, reason=ResumeFailure.HISTORY_TRIMMED),
            last_seq=7,
            in_flight=None,
        )
    ),
    "frame_ack": lambda: _frame(ack_frame(Acked(FULL, "c-1"))),
    "frame_ack_no_client_id": lambda: _frame(ack_frame(Acked(FULL, None))),
    "frame_ack_duplicate": lambda: _frame(ack_frame(Acked(FULL, "c-1", duplicate=True))),
    "frame_message": lambda: _frame(message_frame(BARE)),
    "frame_reply_start": lambda: _frame(reply_start_frame(ReplyStarted("r1", in_reply_to=3))),
    "frame_reply_start_none": lambda: _frame(
        reply_start_frame(ReplyStarted("r1", in_reply_to=None))
    ),
    "frame_reply_chunk": lambda: _frame(reply_chunk_frame(ReplyChunk("r1", index=0, text="You "))),
    "frame_reply_chunk_merged": lambda: _frame(
        merged_chunk_frame("r1", first_index=2, index=4, text="said it")
    ),
    "frame_reply_end": lambda: _frame(
        reply_end_frame(ReplyEnded("r1", message=FULL, text="You said", complete=True))
    ),
    "frame_reply_end_unstored": lambda: _frame(
        reply_end_frame(ReplyEnded("r1", message=None, text="", complete=False))
    ),
    "frame_interrupted": lambda: _frame(
        interrupted_frame("r1", heard="You ", message=FULL, reason="barge_in", late=False)
    ),
    "frame_interrupted_nothing": lambda: _frame(
        interrupted_frame("r1", heard="", message=None, reason="new_message", late=True)
    ),
    "frame_state": lambda: _frame(state_frame(STATE)),
    "frame_pong_0": lambda: _frame(pong_frame(1736528400000, to_iso(T0))),
    "frame_pong_1": lambda: _frame(pong_frame(12.5, to_iso(T0))),
    "frame_pong_2": lambda: _frame(pong_frame("t-1", to_iso(T0))),
    "frame_pong_3": lambda: _frame(pong_frame(None, to_iso(T0))),
    "frame_error": lambda: _frame(error_frame("invalid_field", "text must not be empty")),
    "frame_ended": lambda: _frame(ended_frame("s1")),
}

# Recorded from the hand-written encoders (wire.py, protocol.py's dictionaries,
# Starlette's JSONResponse) for the values above, before they were replaced.
# One literal per line, as recorded: easier to read than split byte strings.
GOLDEN = {
    "state_saved": b'{"success":true,"message":"User state saved successfully","userId":"u1"}',
    "state_found": b'{"success":true,"userId":"u1","state":{"language":"en","ctx":{"topic":"loans","n":[1,2.5,null,true,-0.0,0.001]},"big":9223372036854775807,"neg":-9223372036854775808,"f":0.1,"x":1.5e+300,"empty":{},"list":[],"emoji\xf0\x9f\x99\x82":"\xc3\xa9","updatedAt":"2025-01-10T17:00:00.123Z","isActive":true}}',  # noqa: E501
    "state_found_bare": b'{"success":true,"userId":"u2","state":{"updatedAt":null,"isActive":false}}',  # noqa: E501
    "profile_found": b'{"success":true,"userId":"u1","profile":{"userId":"u1","conversationHistory":[{"id":"m2","role":"user","content":"hi","timestamp":"2025-01-10T17:00:00.123Z"},{"id":"m1","role":"assistant","content":"\xe0\xa4\xa8\xe0\xa4\xae\xe0\xa4\xb8\xe0\xa5\x8d\xe0\xa4\xa4\xe0\xa5\x87 \\"quoted\\" \\\\ \\n\\t\\u0000 \xe2\x80\xa8 \xf0\x9f\x99\x82 </script>","timestamp":"2025-01-10T17:00:00.123Z","sessionId":"s1","interrupted":true,"seq":7}],"preferences":{"voice":"slow","speed":1.25,"nested":{"a":[1,{"b":null}]}},"historyLength":2,"createdAt":"2025-01-10T17:00:00.123Z","lastUpdated":"2025-01-10T17:00:00.123Z"}}',  # noqa: E501
    "profile_found_bare": b'{"success":true,"userId":"u3","profile":{"userId":"u3","conversationHistory":[],"preferences":{},"historyLength":0,"createdAt":null,"lastUpdated":null}}',  # noqa: E501
    "message_appended": b'{"success":true,"message":"Message appended to history","userId":"u1","messageId":"m1","timestamp":"2025-01-10T17:00:00.123Z"}',  # noqa: E501
    "session_saved": b'{"success":true,"message":"Session created/updated successfully","sessionId":"s1","userId":"u1","session":{"id":"s1","userId":"u1","language":"hi-IN","metadata":{"deviceId":"d1","k":[1,"2"]},"isActive":false,"status":"ended","createdAt":"2025-01-10T17:00:00.123Z","lastActivity":"2025-01-10T17:00:00.123Z","endedAt":"2025-01-10T17:00:00.123Z","expireAt":"2025-01-10T17:00:00.123Z"}}',  # noqa: E501
    "session_found": b'{"success":true,"session":{"id":"s2","userId":"u1","language":null,"metadata":{},"isActive":false,"status":"abandoned","createdAt":null,"lastActivity":null,"endedAt":null,"expireAt":null}}',  # noqa: E501
    "session_ended": b'{"success":true,"message":"Session ended successfully","sessionId":"s1"}',
    "active_sessions": b'{"success":true,"userId":"u1","count":2,"sessions":[{"id":"s1","userId":"u1","language":"hi-IN","metadata":{"deviceId":"d1","k":[1,"2"]},"isActive":true,"status":"active","createdAt":"2025-01-10T17:00:00.123Z","lastActivity":"2025-01-10T17:00:00.123Z","endedAt":"2025-01-10T17:00:00.123Z","expireAt":"2025-01-10T17:00:00.123Z"},{"id":"s2","userId":"u1","language":null,"metadata":{},"isActive":true,"status":"active","createdAt":null,"lastActivity":null,"endedAt":null,"expireAt":null}]}',  # noqa: E501
    "active_sessions_none": b'{"success":true,"userId":"u1","count":0,"sessions":[]}',
    "session_page": b'{"success":true,"userId":"u1","count":1,"sessions":[{"id":"s1","userId":"u1","language":"hi-IN","metadata":{"deviceId":"d1","k":[1,"2"]},"isActive":false,"status":"ended","createdAt":"2025-01-10T17:00:00.123Z","lastActivity":"2025-01-10T17:00:00.123Z","endedAt":"2025-01-10T17:00:00.123Z","expireAt":"2025-01-10T17:00:00.123Z"}],"nextCursor":"abc"}',  # noqa: E501
    "session_page_last": b'{"success":true,"userId":"u1","count":0,"sessions":[],"nextCursor":null}',  # noqa: E501
    "recent_history": b'{"success":true,"userId":"u1","count":2,"historyLength":5,"messages":[{"id":"m2","role":"user","content":"hi","timestamp":"2025-01-10T17:00:00.123Z"},{"id":"m1","role":"assistant","content":"\xe0\xa4\xa8\xe0\xa4\xae\xe0\xa4\xb8\xe0\xa5\x8d\xe0\xa4\xa4\xe0\xa5\x87 \\"quoted\\" \\\\ \\n\\t\\u0000 \xe2\x80\xa8 \xf0\x9f\x99\x82 </script>","timestamp":"2025-01-10T17:00:00.123Z","sessionId":"s1","interrupted":true,"seq":7}]}',  # noqa: E501
    "preferences_saved": b'{"success":true,"message":"Preferences saved successfully","userId":"u1","preferences":{"voice":"slow","speed":1.25,"nested":{"a":[1,{"b":null}]}}}',  # noqa: E501
    "user_refreshed": b'{"success":true,"message":"User data cleared successfully","userId":"u1","cleared":{"userState":true,"userProfile":false,"sessions":2,"interruptions":0}}',  # noqa: E501
    "session_deleted": b'{"success":true,"message":"Session cleared successfully","sessionId":"s1","cleared":{"session":true,"interruptions":3}}',  # noqa: E501
    "stats": b'{"success":true,"stats":{"activeUsers":42,"activeSessions":58,"totalProfiles":1234,"totalInterruptions":5678,"persistedInterruptions":0,"liveInterruptions":5678,"source":"firestore","mode":"firestore","backend":"firestore","pendingWrites":3,"pendingInFlight":1,"oldestPendingAgeSeconds":0.042,"replayLagSeconds":12.0,"writesIssued":10,"writeFailures":2,"writesSetAside":0,"modeSince":"2025-01-10T17:00:00.123Z","lastError":null}}',  # noqa: E501
    "stats_memory": b'{"success":true,"stats":{"activeUsers":0,"activeSessions":0,"totalProfiles":0,"totalInterruptions":1,"persistedInterruptions":0,"liveInterruptions":1,"source":"memory","mode":"memory","backend":"firestore","pendingWrites":0,"pendingInFlight":0,"oldestPendingAgeSeconds":0.0,"replayLagSeconds":0.0,"writesIssued":0,"writeFailures":5,"writesSetAside":0,"modeSince":"2025-01-10T17:00:00.123Z","lastError":"UNAVAILABLE: connection refused"}}',  # noqa: E501
    "health": b'{"status":"ok","version":"0.1.0","persistence":{"mode":"firestore","backend":"firestore","pendingWrites":3,"pendingInFlight":1,"oldestPendingAgeSeconds":0.042,"replayLagSeconds":12.0,"writesIssued":10,"writeFailures":2,"writesSetAside":0,"modeSince":"2025-01-10T17:00:00.123Z","lastError":null},"instance":{"pid":1,"feed":null}}',  # noqa: E501
    "ready": b'{"ready":true,"mode":"memory"}',
    "not_ready": b'{"ready":false}',
    "frame_started": b'{"type":"started","protocol":1,"sessionId":"s1","userId":"u1","mode":"firestore","state":{"language":"en","ctx":{"topic":"loans","n":[1,2.5,null,true,-0.0,0.001]},"big":9223372036854775807,"neg":-9223372036854775808,"f":0.1,"x":1.5e+300,"empty":{},"list":[],"emoji\xf0\x9f\x99\x82":"\xc3\xa9","updatedAt":"2025-01-10T17:00:00.123Z","isActive":true},"history":[{"id":"m2","role":"user","content":"hi","timestamp":"2025-01-10T17:00:00.123Z"},{"id":"m1","role":"assistant","content":"\xe0\xa4\xa8\xe0\xa4\xae\xe0\xa4\xb8\xe0\xa5\x8d\xe0\xa4\xa4\xe0\xa5\x87 \\"quoted\\" \\\\ \\n\\t\\u0000 \xe2\x80\xa8 \xf0\x9f\x99\x82 </script>","timestamp":"2025-01-10T17:00:00.123Z","sessionId":"s1","interrupted":true,"seq":7}],"lastSeq":7,"resumed":true,"limits":{"maxFrameBytes":65536,"ratePerSecond":20.0,"rateBurst":40,"idleTimeoutSeconds":120.0,"resumeWindow":200},"historyIncomplete":false}',  # noqa: E501
    "frame_started_empty": b'{"type":"started","protocol":1,"sessionId":"s1","userId":"u1","mode":"memory","state":{},"history":[],"lastSeq":0,"resumed":false,"limits":{"maxFrameBytes":65536,"ratePerSecond":20.0,"rateBurst":40,"idleTimeoutSeconds":120.0,"resumeWindow":200},"historyIncomplete":false}',  # noqa: E501
    "frame_resume_recovered": b'{"type":"resume","recovered":true,"lastSeq":7,"messages":[{"id":"m1","role":"assistant","content":"\xe0\xa4\xa8\xe0\xa4\xae\xe0\xa4\xb8\xe0\xa5\x8d\xe0\xa4\xa4\xe0\xa5\x87 \\"quoted\\" \\\\ \\n\\t\\u0000 \xe2\x80\xa8 \xf0\x9f\x99\x82 </script>","timestamp":"2025-01-10T17:00:00.123Z","sessionId":"s1","interrupted":true,"seq":7}],"inFlight":{"replyId":"r1","inReplyTo":3,"text":"You said","chunks":2}}',  # noqa: E501
    "frame_resume_lost": b'{"type":"resume","recovered":false,"lastSeq":7,"reason":"history_trimmed","inFlight":null}',  # noqa: E501
    "frame_ack": b'{"type":"ack","seq":7,"messageId":"m1","clientId":"c-1","timestamp":"2025-01-10T17:00:00.123Z"}',  # noqa: E501
    "frame_ack_no_client_id": b'{"type":"ack","seq":7,"messageId":"m1","clientId":null,"timestamp":"2025-01-10T17:00:00.123Z"}',  # noqa: E501
    "frame_ack_duplicate": b'{"type":"ack","seq":7,"messageId":"m1","clientId":"c-1","timestamp":"2025-01-10T17:00:00.123Z","duplicate":true}',  # noqa: E501
    "frame_message": b'{"type":"message","message":{"id":"m2","role":"user","content":"hi","timestamp":"2025-01-10T17:00:00.123Z"}}',  # noqa: E501
    "frame_reply_start": b'{"type":"reply.start","replyId":"r1","inReplyTo":3}',
    "frame_reply_start_none": b'{"type":"reply.start","replyId":"r1","inReplyTo":null}',
    "frame_reply_chunk": b'{"type":"reply.chunk","replyId":"r1","index":0,"text":"You "}',
    "frame_reply_chunk_merged": b'{"type":"reply.chunk","replyId":"r1","index":4,"text":"said it","firstIndex":2}',  # noqa: E501
    "frame_reply_end": b'{"type":"reply.end","replyId":"r1","seq":7,"messageId":"m1","text":"You said","complete":true}',  # noqa: E501
    "frame_reply_end_unstored": b'{"type":"reply.end","replyId":"r1","seq":null,"messageId":null,"text":"","complete":false}',  # noqa: E501
    "frame_interrupted": b'{"type":"interrupted","replyId":"r1","heard":"You ","seq":7,"messageId":"m1","reason":"barge_in","late":false}',  # noqa: E501
    "frame_interrupted_nothing": b'{"type":"interrupted","replyId":"r1","heard":"","seq":null,"messageId":null,"reason":"new_message","late":true}',  # noqa: E501
    "frame_state": b'{"type":"state","state":{"language":"en","ctx":{"topic":"loans","n":[1,2.5,null,true,-0.0,0.001]},"big":9223372036854775807,"neg":-9223372036854775808,"f":0.1,"x":1.5e+300,"empty":{},"list":[],"emoji\xf0\x9f\x99\x82":"\xc3\xa9","updatedAt":"2025-01-10T17:00:00.123Z","isActive":true}}',  # noqa: E501
    "frame_pong_0": b'{"type":"pong","ts":1736528400000,"serverTime":"2025-01-10T17:00:00.123Z"}',
    "frame_pong_1": b'{"type":"pong","ts":12.5,"serverTime":"2025-01-10T17:00:00.123Z"}',
    "frame_pong_2": b'{"type":"pong","ts":"t-1","serverTime":"2025-01-10T17:00:00.123Z"}',
    "frame_pong_3": b'{"type":"pong","ts":null,"serverTime":"2025-01-10T17:00:00.123Z"}',
    "frame_error": b'{"type":"error","code":"invalid_field","message":"text must not be empty"}',
    "frame_ended": b'{"type":"ended","sessionId":"s1"}',
}

_EXPONENT_PLUS = re.compile(rb"(?<=\d)e\+(?=\d)")


def test_every_golden_encoding_has_a_new_one() -> None:
    assert set(NEW) == set(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_the_new_encoding_is_todays_byte_for_byte(name: str) -> None:
    new = NEW[name]()
    # The one difference: msgspec writes 1.5e300 where json.dumps wrote 1.5e+300.
    assert new == _EXPONENT_PLUS.sub(b"e", GOLDEN[name])
    assert json.loads(new) == json.loads(GOLDEN[name])


def test_exponent_floats_are_the_only_difference_and_the_same_number() -> None:
    assert s.encode({"x": 1e16, "y": 1e-7}) == b'{"x":1e16,"y":1e-7}'
    assert json.loads(b'{"x":1e16,"y":1e-7}') == {"x": 1e16, "y": 1e-7}


def test_stored_values_of_other_writers_render_as_plain_json() -> None:
    value = {"at": T0, "n": float("nan"), "raw": b"\x00\x01", "ref": object, "list": (1, 2.5)}
    assert s.plain_json(value) == {
        "at": "2025-01-10T17:00:00.123Z",
        "n": None,
        "raw": "AAE=",
        "ref": str(object),
        "list": [1, 2.5],
    }


# -- the AsyncAPI document against the frames of a real session -------------------------------

_DOC_URI = "urn:samvad:asyncapi"


def _frame_validators(document: dict[str, Any]) -> dict[str, Draft202012Validator]:
    """A validator per server frame type, from the document's own messages and schemas."""
    registry: Registry[Any] = Registry().with_resource(
        _DOC_URI, Resource(contents=document, specification=DRAFT202012)
    )
    messages = document["components"]["messages"]
    validators = {}
    for ref in document["operations"]["sendServerFrames"]["messages"]:
        message = messages[ref["$ref"].rsplit("/", 1)[1]]
        schema = {"$ref": _DOC_URI + message["payload"]["$ref"]}
        validators[message["name"]] = Draft202012Validator(schema, registry=registry)
    return validators


class Frames:
    """The frames one socket received, in order, with a wait for the next of a kind."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def collect(self, ws: Any, until: str = "ended") -> None:
        async for text in ws:
            frame = json.loads(text)
            async with self._changed:
                self.items.append(frame)
                self._changed.notify_all()
            if frame["type"] == until:
                return

    async def wait_for(self, kind: str, count: int = 1) -> dict[str, Any]:
        def enough() -> bool:
            return sum(f["type"] == kind for f in self.items) >= count

        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(enough)
        return [f for f in self.items if f["type"] == kind][count - 1]


@pytest.fixture
async def ws_server() -> AsyncIterator[LiveServer]:
    settings = Settings(store="memory", ws_reply_chunk_delay=0.05)
    async with live_server(create_app(settings)) as running:
        yield running


async def test_every_frame_of_a_real_session_matches_the_asyncapi_document(
    ws_server: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=ws_server.url) as http:
        served = (await http.get("/asyncapi.json")).json()
    assert served == asyncapi_document()
    validators = _frame_validators(served)
    assert len(validators) == len(s.SERVER_FRAMES)

    url = f"{ws_server.ws_url}/ws"
    start = {"type": "start", "userId": "u-async", "sessionId": "s-async", "language": "en"}
    one, two, three = Frames(), Frames(), Frames()
    async with websockets.connect(url) as ws1, websockets.connect(url) as ws2:
        readers = [asyncio.create_task(one.collect(ws1)), asyncio.create_task(two.collect(ws2))]
        await ws1.send(json.dumps({**start, "metadata": {"device": "phone"}}))
        await one.wait_for("started")
        await ws2.send(json.dumps(start))
        await two.wait_for("started")
        await ws1.send(json.dumps({"type": "message", "text": "one two three four five six"}))
        await one.wait_for("reply.chunk")
        await ws1.send(json.dumps({"type": "interrupt", "heardChars": 3}))
        await one.wait_for("interrupted")
        await ws2.send(json.dumps({"type": "message", "text": "hi", "clientId": "c-2"}))
        last_seq = (await one.wait_for("reply.end"))["seq"]
        await ws1.send(json.dumps({"type": "state", "state": {"topic": "loans", "n": [1, 2.5]}}))
        await one.wait_for("state")
        await ws1.send(json.dumps({"type": "ping", "ts": 12.5}))
        await one.wait_for("pong")
        await ws1.send(json.dumps({"type": "interrupt"}))  # nothing to interrupt: error
        await one.wait_for("error")
        async with websockets.connect(url) as ws3:
            reader3 = asyncio.create_task(three.collect(ws3, until="resume"))
            await ws3.send(json.dumps({**start, "resume": {"lastSeq": last_seq - 2}}))
            await reader3
        await ws1.send(json.dumps({"type": "end"}))
        await asyncio.gather(*readers)

    frames = one.items + two.items + three.items
    seen = {frame["type"] for frame in frames}
    # ``durable`` needs a durable store: tests/web/test_durable.py checks those frames.
    assert seen == set(validators) - {"durable"}, set(validators) - seen
    for frame in frames:
        validators[frame["type"]].validate(frame)
    resumed = next(f for f in three.items if f["type"] == "resume")
    assert resumed["recovered"] is True and len(resumed["messages"]) == 2


def test_the_frame_schemas_refuse_what_the_server_never_sends() -> None:
    validators = _frame_validators(asyncapi_document())
    ack = {"type": "ack", "seq": 1, "messageId": "m", "clientId": None, "timestamp": "t"}
    validators["ack"].validate(ack)
    for broken in (
        {k: v for k, v in ack.items() if k != "messageId"},
        {**ack, "seq": "1"},
        {**ack, "type": "pong"},
    ):
        with pytest.raises(ValidationError):
            validators["ack"].validate(broken)
    with pytest.raises(ValidationError):
        validators["reply.end"].validate({"type": "reply.end", "replyId": "r", "text": "x"})
    with pytest.raises(ValidationError):
        validators["ack"].validate({k: v for k, v in ack.items() if k != "type"})


def test_the_documents_are_generated_from_the_shapes() -> None:
    openapi = openapi_document()
    schemas = openapi["components"]["schemas"]
    # Every field of a response is required unless it may be left out.
    assert schemas["HistoryMessage"]["required"] == ["id", "role", "content", "timestamp"]
    assert set(schemas["SessionView"]["required"]) == set(schemas["SessionView"]["properties"])
    assert schemas["ErrorBody"]["required"] == ["success", "error", "code"]
    # What the decoders enforce is what the document says.
    history_body = schemas["HistoryBody"]
    assert history_body["required"] == ["role", "content"]
    assert history_body["properties"]["content"]["minLength"] == 1
    assert {"type": "null"} in history_body["properties"]["sessionId"]["anyOf"]
    asyncapi = asyncapi_document()
    assert asyncapi["asyncapi"] == "3.0.0"
    client = asyncapi["operations"]["receiveClientFrames"]["messages"]
    assert len(client) == len(s.CLIENT_FRAMES) == 6
    assert asyncapi["components"]["schemas"]["AckFrame"]["required"] == [
        "type",
        "seq",
        "messageId",
        "clientId",
        "timestamp",
    ]
    start = asyncapi["components"]["schemas"]["StartFrame"]
    assert start["required"] == ["type", "userId"]
    assert start["properties"]["historyLimit"]["anyOf"][0]["maximum"] == 100


async def test_both_documents_are_served() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get("/openapi.json")).json() == openapi_document()
        assert (await http.get("/asyncapi.json")).json() == asyncapi_document()
