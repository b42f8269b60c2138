from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from samvad.history import (
    extended,
    follows,
    history_bytes,
    in_time_order,
    merge,
    new_message_id,
    newer_than,
    order_key,
    trim,
)
from samvad.models import MESSAGE_OVERHEAD_BYTES, Message, Profile, Role

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)


def msg(i: int, content: str = "x", *, at: datetime | None = None) -> Message:
    return Message(
        id=f"m{i}", role=Role.USER, content=content, timestamp=at or T0 + timedelta(seconds=i)
    )


def test_trim_keeps_the_newest_messages_up_to_the_cap() -> None:
    messages = [msg(i) for i in range(150)]
    kept, size = trim(messages, cap=100, max_bytes=10**9)
    assert [m.id for m in kept] == [f"m{i}" for i in range(50, 150)]
    assert size == history_bytes(kept)


def test_trim_drops_oldest_until_under_the_byte_bound() -> None:
    big = "é" * 1000  # 2000 bytes in UTF-8
    messages = [msg(i, big) for i in range(10)]
    per_message = 2000 + MESSAGE_OVERHEAD_BYTES
    kept, size = trim(messages, cap=100, max_bytes=per_message * 4 + 10)
    assert [m.id for m in kept] == ["m6", "m7", "m8", "m9"]
    assert size == per_message * 4


def test_trim_keeps_the_newest_message_even_when_it_alone_is_too_big() -> None:
    kept, _ = trim([msg(0), msg(1, "y" * 5000)], cap=100, max_bytes=1000)
    assert [m.id for m in kept] == ["m1"]


def profile_after(profile: Profile, new: list[Message], *, cap: int, max_bytes: int) -> Profile:
    """``profile`` with ``new`` appended by :func:`extended` (as ``profile_with`` does)."""
    window = extended(profile, new, cap=cap, max_bytes=max_bytes)
    assert window is not None
    log, start, end, size, spent = window
    assert spent == history_bytes(log[:start])
    return Profile(profile.user_id, {}, None, None, size, log, start, end, spent)


@given(
    held=st.lists(st.integers(0, 3000), max_size=12),
    steps=st.lists(
        st.tuples(st.integers(0, 50), st.lists(st.integers(0, 3000), min_size=1, max_size=4)),
        min_size=1,
        max_size=30,
    ),
    cap=st.integers(1, 10),
    max_bytes=st.integers(0, 12_000),
)
def test_extended_is_merge_then_trim_and_leaves_every_earlier_history_alone(
    held: list[int], steps: list[tuple[int, list[int]]], cap: int, max_bytes: int
) -> None:
    """Appends onto shared logs give what merge then trim give, history and size,
    whichever profile they extend (the newest, or an older one whose log another
    profile has appended to since), and no profile's history ever changes."""
    existing, size = trim(
        [msg(i, "é" * n) for i, n in enumerate(held)], cap=cap, max_bytes=max_bytes
    )
    profiles = [Profile.of("u", history=existing, history_bytes=size)]
    histories = [(existing, size)]
    next_id = 100
    for pick, sizes in steps:
        which = pick % len(profiles)
        base = profiles[which]
        new = [msg(next_id + i, "x" * n) for i, n in enumerate(sizes)]
        next_id += len(new)
        assert follows(base.newest(), new)
        expected = trim(merge(base.history, new), cap=cap, max_bytes=max_bytes)
        after = profile_after(base, new, cap=cap, max_bytes=max_bytes)
        assert (after.history, after.history_bytes) == expected
        profiles.append(after)
        histories.append(expected)
        for profile, (history, history_size) in zip(profiles, histories, strict=True):
            assert profile.history == history
            assert profile.history_bytes == history_size
            assert profile.recent(3) == history[-3:]
            assert profile.newest() is (history[-1] if history else None)


def test_a_full_history_appends_without_copying_and_holds_little_beyond_itself() -> None:
    """A hundred appends to a full history of a hundred share one log most of the
    time; the log never holds more than an eighth of the cap beyond the window."""
    profile = Profile.of("u", history=[msg(i) for i in range(100)])
    logs = set()
    for i in range(100, 300):
        profile = profile_after(profile, [msg(i)], cap=100, max_bytes=10**9)
        logs.add(id(profile.log))
        assert [m.id for m in profile.history] == [f"m{j}" for j in range(i - 99, i + 1)]
        assert len(profile.log) <= 100 + 12
        assert profile.memory_bytes() >= Profile.of("u", history=profile.history).memory_bytes()
    assert len(logs) <= 200 // 12 + 1


def test_big_messages_that_fall_off_are_let_go_by_bytes_too() -> None:
    """Messages near the byte bound fall off a few at a time: the log is copied
    once what fell off outweighs a quarter of what stays."""
    profile = Profile.of("u")
    for i in range(40):
        profile = profile_after(profile, [msg(i, "x" * 3000)], cap=100, max_bytes=12_000)
        assert profile.log_spent <= profile.history_bytes // 4 + 3000 + MESSAGE_OVERHEAD_BYTES
    assert len(profile.history) == 3


def test_profiles_compare_by_history_not_by_log() -> None:
    shared = profile_after(
        Profile.of("u", history=[msg(i) for i in range(3)]), [msg(3)], cap=3, max_bytes=10**9
    )
    fresh = Profile.of("u", history=[msg(1), msg(2), msg(3)])
    assert shared.log != fresh.log
    assert shared == fresh
    assert (shared != fresh) is False  # __ne__ too: msgspec's would compare identity
    assert shared != Profile.of("u", history=[msg(1), msg(2)])
    assert repr(shared) == (
        "Profile(user_id='u', history=<3 messages>, created_at=None, last_updated=None)"
    )


def test_merge_skips_known_ids_so_a_replay_is_idempotent() -> None:
    existing = [msg(0), msg(1)]
    merged = merge(existing, [msg(1), msg(2)])
    assert [m.id for m in merged] == ["m0", "m1", "m2"]
    assert merge(merged, [msg(1), msg(2)]) == merged


def test_merge_keeps_history_chronological_when_a_replay_is_older() -> None:
    existing = [msg(0), msg(5)]
    merged = merge(existing, [msg(3), msg(4)])
    assert [m.id for m in merged] == ["m0", "m3", "m4", "m5"]


def test_merge_keeps_arrival_order_for_equal_timestamps() -> None:
    same = [msg(i, at=T0) for i in range(4)]
    merged = merge(same[:2], same[2:])
    assert [m.id for m in merged] == ["m0", "m1", "m2", "m3"]


def test_trim_with_a_known_size_subtracts_what_falls_off() -> None:
    messages = [msg(i, "é" * i) for i in range(101)]
    kept, size = trim(messages, cap=100, max_bytes=10**9, size=history_bytes(messages))
    assert [m.id for m in kept] == [f"m{i}" for i in range(1, 101)]
    assert size == history_bytes(kept)


def test_trim_with_a_known_size_still_honours_the_byte_bound() -> None:
    messages = [msg(i, "x" * 1000) for i in range(102)]
    per_message = 1000 + MESSAGE_OVERHEAD_BYTES
    kept, size = trim(messages, cap=100, max_bytes=per_message * 10, size=history_bytes(messages))
    assert [m.id for m in kept] == [f"m{i}" for i in range(92, 102)]
    assert size == per_message * 10


def test_merge_appends_newer_messages_in_order() -> None:
    existing = [msg(0), msg(1)]
    merged = merge(existing, [msg(2), msg(3)])
    assert [m.id for m in merged] == ["m0", "m1", "m2", "m3"]
    assert existing == [msg(0), msg(1)]  # not modified


def test_merge_does_not_duplicate_a_replayed_newest_message() -> None:
    existing = [msg(0), msg(1)]
    assert [m.id for m in merge(existing, [msg(1)])] == ["m0", "m1"]
    assert [m.id for m in merge(existing, [msg(1), msg(2)])] == ["m0", "m1", "m2"]


def test_merge_takes_a_message_given_twice_once() -> None:
    merged = merge([msg(0)], [msg(1), msg(1)])
    assert [m.id for m in merged] == ["m0", "m1"]


def test_merge_accepts_any_iterable() -> None:
    merged = merge((msg(0),), (m for m in [msg(1), msg(2)]))
    assert [m.id for m in merged] == ["m0", "m1", "m2"]


@given(
    first=st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", "c"])),
    second=st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", "c"])),
)
def test_newer_than_one_message_compares_its_sort_key(
    first: tuple[int, str], second: tuple[int, str]
) -> None:
    older = Message(id=first[1], role=Role.USER, content="x", timestamp=T0 + timedelta(first[0]))
    newer = Message(id=second[1], role=Role.USER, content="x", timestamp=T0 + timedelta(second[0]))
    assert newer_than([older], [newer]) == (order_key(newer) > order_key(older))


def test_newer_than_needs_strictly_newer_messages_in_order() -> None:
    assert newer_than([], [msg(0)])
    assert newer_than([msg(0)], [msg(1), msg(2)])
    assert not newer_than([msg(0)], [])
    assert not newer_than([msg(1)], [msg(1)])
    assert not newer_than([msg(1)], [msg(0)])
    assert not newer_than([msg(0)], [msg(2), msg(1)])


def test_in_time_order() -> None:
    assert in_time_order([])
    assert in_time_order([msg(0), msg(1), msg(1)])
    assert not in_time_order([msg(1), msg(0)])


def test_message_ids_keep_their_wire_form_and_sort_by_time_then_creation() -> None:
    at = datetime(2025, 1, 10, 17, 0, 0, 123_000, tzinfo=UTC)
    ids = [new_message_id(at) for _ in range(1000)]
    later = new_message_id(at + timedelta(milliseconds=1))
    assert all(re.fullmatch(r"[0-9a-f]{28}", i) for i in [*ids, later])
    assert ids[0][:12] == f"{1736528400123:012x}"
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids) and later > ids[-1]
    # Each timestamp its own milliseconds, whichever came last (an equal but
    # distinct datetime included).
    again = new_message_id(at.replace())
    earlier = new_message_id(at - timedelta(seconds=1))
    assert again[:12] == ids[0][:12] and later[:12] == f"{1736528400124:012x}"
    assert earlier[:12] == f"{1736528399123:012x}"


def test_a_forked_child_makes_ids_of_its_own() -> None:
    at = datetime(2025, 1, 10, 17, 0, 0, tzinfo=UTC)
    parent = new_message_id(at)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, as its parent's next would be
        os.write(write, new_message_id(at).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert status == 0
    ours = new_message_id(at)
    # The same millisecond and counter (the child's count went on from the
    # parent's, as did ours): only the random part tells them apart.
    assert child[:20] == ours[:20]
    assert child != ours and child[20:] != parent[20:]


def test_a_message_is_counted_in_the_document_by_the_utf8_bytes_of_its_text() -> None:
    for text in ["", "hi", "x" * 5000, "é", "नमस्ते", "😀" * 3, "a\x7f"]:
        for client_id in [None, "c-1", "ç"]:
            message = Message(
                id="m", role=Role.USER, content=text, timestamp=T0, client_id=client_id
            )
            expected = len(text.encode()) + MESSAGE_OVERHEAD_BYTES
            expected += len(client_id.encode()) if client_id is not None else 0
            assert message.stored_size() == expected


def test_a_message_is_counted_in_memory_as_getsizeof_counts_its_text() -> None:
    """The shortcut for ASCII text gives ``sys.getsizeof``'s figure, and other
    text is still measured by it."""
    import sys

    from samvad.models import approx_bytes

    for text in ["", "hi", "x" * 5000, "é", "नमस्ते", "😀" * 3]:
        plain = msg(0, text)
        extra = plain.memory_bytes() - sys.getsizeof(text)
        assert extra == msg(1, "").memory_bytes() - sys.getsizeof("")
        assert approx_bytes(text) == sys.getsizeof(text)
        grown = 2 * (sys.getsizeof(text) - sys.getsizeof(""))
        assert approx_bytes({text: text}) == approx_bytes({"": ""}) + grown
