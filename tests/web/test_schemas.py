"""Wire shapes built from domain objects (``samvad.web.schemas``)."""

from __future__ import annotations

import gc
import math
from datetime import UTC, datetime

import msgspec

from samvad.models import UserState
from samvad.web import schemas
from samvad.web.schemas import StateFound, encode, state_view, state_view_json

T0 = datetime(2025, 1, 10, 17, 0, 0, 123_456, tzinfo=UTC)


def _states() -> list[UserState]:
    return [
        UserState(user_id="u1", data={}, updated_at=None, is_active=False),
        UserState(user_id="u2", data={"language": "en"}, updated_at=T0),
        UserState(
            user_id="u3",
            data={
                "nested": {"at": T0, "n": [1, 2.5, math.inf, None, True]},
                "blob": b"\x00\xff",
                "tuple": ("a", T0),
                "text": "नमस्ते \u2028",
            },
            updated_at=T0,
        ),
    ]


def test_the_encoded_state_view_is_the_views_encoding() -> None:
    for state in [*_states(), None]:
        expected = encode(StateFound(user_id="u", state=state_view(state)))
        assert encode(StateFound(user_id="u", state=state_view_json(state))) == expected
        # Served twice, the second time from the kept view.
        assert encode(StateFound(user_id="u", state=state_view_json(state))) == expected


def test_a_states_view_is_kept_while_it_lives_and_no_longer() -> None:
    gc.collect()  # views of other tests' states that were still to be collected
    views = schemas._state_views
    before_len, before_bytes = len(views), views.held_bytes
    state = UserState(user_id="kept", data={"language": "en"}, updated_at=T0)
    first = state_view_json(state)
    assert state_view_json(state) is first
    assert len(views) == before_len + 1
    assert views.held_bytes == before_bytes + len(encode(state_view(state)))
    # A changed state is a new object with a view of its own.
    changed = UserState(user_id="kept", data={"language": "hi"}, updated_at=T0)
    assert b'"hi"' in encode(state_view_json(changed))
    del state, first, changed
    gc.collect()
    assert (len(views), views.held_bytes) == (before_len, before_bytes)


def test_large_views_are_encoded_every_time_not_kept() -> None:
    gc.collect()
    views = schemas._state_views
    before = len(views)
    big = UserState(user_id="big", data={"text": "x" * schemas.STATE_VIEW_MAX_BYTES})
    view = state_view_json(big)
    assert len(views) == before
    assert msgspec.json.decode(encode(StateFound(user_id="u", state=view)))["state"]["text"]
