"""The one validator both doors use, rule by rule, at and just past every bound.

The bounds are Firestore's, measured on the emulator: a map or array at level
20 (counted from the document root, every map and array one level) is
stored, one at level 21 — even an empty one — is refused; the store-level
checks at the end write the boundary values to the emulator to keep this true.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from google.cloud.firestore import AsyncClient
from hypothesis import given, settings
from hypothesis import strategies as st

from samvad.config import Settings
from samvad.errors import ConfigError, InvalidField, PayloadTooLarge
from samvad.validation import (
    MAX_DEPTH,
    MAX_FIELD_NAME_BYTES,
    MAX_ID_LENGTH,
    Bounds,
    check_id,
    check_language,
    check_merged,
    check_message_text,
    check_object,
    check_path_id,
    check_session_id,
    check_text,
    check_value,
    count_fields,
    json_size,
)
from samvad.web.schemas import encode, plain_json


def _maps(levels: int, leaf: Any) -> Any:
    """``leaf`` inside ``levels`` nested maps."""
    value = leaf
    for _ in range(levels):
        value = {"n": value}
    return value


def _refused(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidField) as caught:
        call(*args, **kwargs)
    return caught.value.message


# -- text ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello", "नमस्ते 🙂", "\U0010ffff", "\ufffd", "a\x00b"])
def test_check_text_accepts_any_valid_unicode(text: str) -> None:
    assert check_text(text, "text") == text


@pytest.mark.parametrize("text", ["\ud800", "a\udc00b", "\udbff\udbff", "🙂\ud83d"])
def test_check_text_refuses_lone_surrogates(text: str) -> None:
    assert _refused(check_text, text, "text") == (
        "text contains a lone surrogate (not valid Unicode)"
    )


@pytest.mark.parametrize("value", [None, 1, b"x", ["x"], {"x": 1}])
def test_check_text_refuses_what_is_not_a_string(value: Any) -> None:
    assert _refused(check_text, value, "text") == "text must be a string"


# -- ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["a", "u" * MAX_ID_LENGTH, "user_456", "a.b", "...", "_x_", "__x", "नमस्ते", "a b"]
)
def test_check_id_accepts_ordinary_ids(value: str) -> None:
    assert check_id(value, "userId") == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (7, "must be a string"),
        (None, "must be a string"),
        ("", "must not be empty"),
        ("u" * (MAX_ID_LENGTH + 1), f"must be at most {MAX_ID_LENGTH} characters"),
        (" a", "must not start or end with white space"),
        ("a\t", "must not start or end with white space"),
        ("a/b", "must not contain '/' or control characters"),
        ("a\x00b", "must not contain '/' or control characters"),
        ("a\x7fb", "must not contain '/' or control characters"),
        ("a\ud800", "contains a lone surrogate (not valid Unicode)"),
        (".", "must not be '.' or '..'"),
        ("..", "must not be '.' or '..'"),
        ("__name__", "must not look like __name__ (reserved by Firestore)"),
        ("__x__", "must not look like __name__ (reserved by Firestore)"),
    ],
)
def test_check_id_refuses_what_firestore_cannot_use(value: Any, problem: str) -> None:
    assert _refused(check_id, value, "userId") == f"userId {problem}"


@pytest.mark.parametrize("word", ["stats", "create", "refresh", "user"])
def test_session_ids_are_never_route_words(word: str) -> None:
    assert check_id(word, "userId") == word
    assert _refused(check_session_id, word) == f"sessionId must not be the reserved word {word!r}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"alice", "alice"),
        (b"a%62c", "abc"),
        (b"%E0%A4%A8", "न"),
        (b"%EF%BF%BD", "\ufffd"),  # a real U+FFFD, sent as its UTF-8 bytes
        (b"a%20b", "a b"),
    ],
)
def test_check_path_id_decodes_utf8_percent_escapes(raw: bytes, expected: str) -> None:
    assert check_path_id(raw, "userId") == expected


@pytest.mark.parametrize("raw", [b"a%FFb", b"a%FEb", b"%C0%AF", b"%ED%A0%80", b"%E0%A4"])
def test_check_path_id_refuses_bytes_that_are_not_utf8(raw: bytes) -> None:
    assert _refused(check_path_id, raw, "userId") == (
        "userId is not valid UTF-8 once percent-decoded"
    )


def test_no_two_distinct_raw_path_ids_map_to_one_document() -> None:
    raws = [b"a%FFb", b"a%FEb", b"a%EF%BF%BDb", b"a\xef\xbf\xbdb", b"ab", b"a%62"]
    decoded: dict[str, set[bytes]] = {}
    for raw in raws:
        try:
            decoded.setdefault(check_path_id(raw, "userId"), set()).add(raw)
        except InvalidField:
            continue
    # Only percent-encodings of the very same bytes share a document.
    assert decoded == {"a\ufffdb": {b"a%EF%BF%BDb", b"a\xef\xbf\xbdb"}, "ab": {b"ab", b"a%62"}}


def test_check_path_id_applies_the_id_rules_after_decoding() -> None:
    assert _refused(check_path_id, b"%2E%2E", "userId") == "userId must not be '.' or '..'"
    assert _refused(check_path_id, b"refresh", "sessionId", reserved=frozenset({"refresh"})) == (
        "sessionId must not be the reserved word 'refresh'"
    )


# -- values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        2**63 - 1,
        -(2**63),
        1.5,
        -0.0,
        "",
        "🙂",
        [],
        [1, "a", None, {"x": [1]}],
        {},
        {"a": {"b": {"c": [1, 2]}}},
    ],
)
def test_check_value_accepts_storable_json(value: Any) -> None:
    check_value(value, "state.x")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2**63, "state.x is an integer outside the 64-bit range"),
        (-(2**63) - 1, "state.x is an integer outside the 64-bit range"),
        (float("nan"), "state.x must be a finite number"),
        (float("inf"), "state.x must be a finite number"),
        ([[1]], "state.x[0] contains an array directly inside an array"),
        ([{"a": [[]]}], "state.x[0].a[0] contains an array directly inside an array"),
        ("\udfff", "state.x contains a lone surrogate (not valid Unicode)"),
        ({"k": ["ok", "\ud800"]}, "state.x.k[1] contains a lone surrogate (not valid Unicode)"),
        ({"\ud800": 1}, "state.x has a key with a lone surrogate (not valid Unicode)"),
        ({"": 1}, "state.x has an empty key"),
        ({"__name__": 1}, "state.x.__name__ is a reserved name (__name__ form)"),
        ({"k" * (MAX_FIELD_NAME_BYTES + 1): 1}, "state.x has a key longer than 1500 bytes"),
        ({1: 1}, "state.x has an empty key"),
        (b"bytes", "state.x has an unsupported type bytes"),
        ((1, 2), "state.x has an unsupported type tuple"),
    ],
)
def test_check_value_refuses_what_firestore_cannot_store(value: Any, message: str) -> None:
    assert _refused(check_value, value, "state.x") == message


def test_a_key_of_exactly_1500_bytes_is_accepted() -> None:
    check_value({"é" * (MAX_FIELD_NAME_BYTES // 2): 1}, "state.x")


# -- depth, counted from the document root ---------------------------------------------------


@pytest.mark.parametrize(
    "leaf", [{"leaf": 1}, {}, [1], []], ids=["map", "empty-map", "list", "empty"]
)
def test_containers_up_to_level_20_are_accepted_and_level_21_refused(leaf: Any) -> None:
    # The state's field ``f`` is a container at level 1; ``leaf`` ends MAX_DEPTH levels down.
    check_object({"f": _maps(MAX_DEPTH - 1, leaf)}, "state")
    message = _refused(check_object, {"f": _maps(MAX_DEPTH, leaf)}, "state")
    assert (
        message == "state.f" + ".n" * (MAX_DEPTH - 1) + f".n nests deeper than {MAX_DEPTH} levels"
    )


def test_an_array_and_a_map_in_it_are_one_level_each() -> None:
    # 17 maps, then the map holding "a" (18), the array (19) and a map in it (20): stored.
    check_object({"f": _maps(17, {"a": [{"x": 1}]})}, "state")
    message = _refused(check_object, {"f": _maps(17, {"a": [{"x": {}}]})}, "state")
    assert message.endswith(".a[0].x nests deeper than 20 levels")


def test_an_object_stored_under_a_field_sits_one_level_deeper() -> None:
    value = {"f": _maps(MAX_DEPTH - 1, {})}
    check_object(value, "state", depth=0)  # the fields of user_states/{u}
    # the same value as preferences (user_profiles/{u}.preferences) or metadata
    assert _refused(check_object, value, "preferences", depth=1).endswith(
        f"nests deeper than {MAX_DEPTH} levels"
    )
    check_object({"f": _maps(MAX_DEPTH - 2, {})}, "preferences", depth=1)


@pytest.mark.parametrize("value", [[], "x", 1, None])
def test_check_object_needs_an_object(value: Any) -> None:
    assert _refused(check_object, value, "state") == "state must be an object"


def test_check_object_returns_a_copy() -> None:
    original = {"a": 1}
    copied = check_object(original, "state")
    assert copied == original and copied is not original


# -- merged objects ---------------------------------------------------------------------------


def test_count_fields_counts_nested_map_fields() -> None:
    assert count_fields({}) == 0
    assert count_fields({"a": 1, "b": 2}) == 2
    assert count_fields({"a": {"b": {"c": 1}}}) == 3
    assert count_fields({"a": [{"b": 1}, {"c": 1, "d": 2}], "e": [1, 2]}) == 5


BOUNDS = Bounds(max_keys=3, max_fields=6, max_bytes=60)


def test_check_merged_accepts_objects_at_the_bounds() -> None:
    check_merged({"a": 1, "b": 2, "c": {"d": 1, "e": 2, "f": 3}}, "state", BOUNDS)


def test_check_merged_refuses_too_many_top_level_keys() -> None:
    message = _refused(check_merged, {"a": 1, "b": 2, "c": 3, "d": 4}, "state", BOUNDS)
    assert message == "state would hold 4 top-level keys; at most 3 are kept"


def test_check_merged_refuses_too_many_fields_in_all() -> None:
    merged = {"a": {"b": 1, "c": 2, "d": 3}, "e": {"f": 1, "g": 2}}
    assert _refused(check_merged, merged, "metadata", BOUNDS) == (
        "metadata would hold 7 fields in all; at most 6 are kept"
    )


def test_check_merged_refuses_too_many_bytes_with_413() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        check_merged({"a": "x" * 60}, "preferences", BOUNDS)
    assert caught.value.status_code == 413
    assert caught.value.message == "preferences would grow to 68 bytes; at most 60 are kept"


# What check_merged sizes is what the API sends back: plain JSON encoded as is,
# anything else (values other clients stored) through plain_json first.
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()  # NaN and infinities included: the API sends null
    | st.text()
)
_PLAIN = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_STORED = st.recursive(
    _LEAVES
    | st.datetimes(timezones=st.just(UTC))
    | st.binary(max_size=8)
    | st.decimals(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text() | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


def _wire_size(value: dict[str, Any]) -> int:
    return len(encode(plain_json(value)))


def _size_check(value: dict[str, Any], size: int) -> None:
    """check_merged passes at ``size`` bytes and refuses with ``size`` at one less."""
    check_merged(value, "state", Bounds(max_keys=10**6, max_fields=10**6, max_bytes=size))
    if size > 0:
        bounds = Bounds(max_keys=10**6, max_fields=10**6, max_bytes=size - 1)
        with pytest.raises(PayloadTooLarge) as caught:
            check_merged(value, "state", bounds)
        assert caught.value.message == (
            f"state would grow to {size} bytes; at most {size - 1} are kept"
        )


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _PLAIN, max_size=5))
def test_check_merged_sizes_plain_json_as_the_api_sends_it(value: dict[str, Any]) -> None:
    assert json_size(value) == _wire_size(value)
    _size_check(value, _wire_size(value))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _STORED, max_size=5))
def test_check_merged_sizes_stored_types_as_the_api_formats_them(value: dict[str, Any]) -> None:
    assert json_size(value) == _wire_size(value)
    _size_check(value, _wire_size(value))


def test_stored_types_count_in_their_wire_form() -> None:
    at = datetime(2025, 1, 10, 17, 0, 0, 123456, tzinfo=UTC)
    value: dict[Any, Any] = {"at": at, "raw": b"\x00\x01", 7: math.inf, "t": (1.5e16, "é")}
    assert json_size(value) == len(
        '{"at":"2025-01-10T17:00:00.123Z","raw":"AAE=","7":null,"t":[1.5e16,"é"]}'.encode()
    )
    assert count_fields(value) == 4
    assert count_fields({"a": [{"b": 1}, ({"c": 1},)]}) == 2  # a tuple is no list


def test_default_bounds_are_far_above_real_use() -> None:
    bounds = Bounds()
    assert (bounds.max_keys, bounds.max_fields, bounds.max_bytes) == (200, 2000, 256 * 1024)


# -- the bounds are Firestore's ----------------------------------------------------------------


@pytest.mark.firestore
async def test_what_the_validator_accepts_firestore_stores(firestore_client: AsyncClient) -> None:
    accepted = {
        "state": {"f": _maps(MAX_DEPTH - 1, {}), "arr": _maps(17, {"a": [{"x": 1}]})},
        "big": {"i": 2**63 - 1, "j": -(2**63), "k" * MAX_FIELD_NAME_BYTES: "🙂"},
    }
    for name, doc in accepted.items():
        check_object(doc, name)
        await firestore_client.collection("probe").document(name).set(doc)
        stored = await firestore_client.collection("probe").document(name).get()
        assert stored.to_dict() == doc
    profile = {"preferences": check_object({"f": _maps(MAX_DEPTH - 2, {})}, "p", depth=1)}
    await firestore_client.collection("probe").document("profile").set(profile)


@pytest.mark.firestore
async def test_what_the_validator_refuses_firestore_refuses(firestore_client: AsyncClient) -> None:
    refused: list[dict[str, Any]] = [
        {"f": _maps(MAX_DEPTH, {})},  # level 21
        {"f": _maps(17, {"a": [{"x": {}}]})},  # the map in the array's map at level 21
        {"preferences": {"f": _maps(MAX_DEPTH - 1, {})}},  # level 21 under preferences
        {"__x__": 1},
    ]
    for doc in refused:
        with pytest.raises(InvalidField):
            check_object(doc, "doc")
        with pytest.raises(Exception) as caught:
            await firestore_client.collection("probe").document("refused").set(doc)
        assert "nested" in str(caught.value) or "reserved" in str(caught.value)


def test_the_merge_bounds_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SAMVAD_MAX_OBJECT_KEYS": "50",
            "SAMVAD_MAX_OBJECT_FIELDS": "500",
            "SAMVAD_MAX_MERGED_OBJECT_BYTES": "4096",
        }
    )
    assert settings.merge_bounds == Bounds(max_keys=50, max_fields=500, max_bytes=4096)
    assert Settings.from_env({}).merge_bounds == Bounds()
    for name, value in (("SAMVAD_MAX_OBJECT_KEYS", "0"), ("SAMVAD_MAX_OBJECT_FIELDS", "10001")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


@pytest.mark.parametrize("language", ["hi-IN", "en", "x" * 64, "pt BR", None])
def test_a_language_is_one_to_64_printable_characters(language: str | None) -> None:
    assert check_language(language) == language


@pytest.mark.parametrize("language", ["", "x" * 65, "en\r\nX-Injected: 1", "\x00", "\u2028", 7])
def test_other_languages_are_refused(language: object) -> None:
    assert _refused(check_language, language) == ("language must be 1 to 64 printable characters")


@pytest.mark.parametrize("value", ["", " ", "\t\n", "\u3000\u00a0 ", "\u2028"])
def test_check_message_text_refuses_text_with_nothing_but_white_space(value: str) -> None:
    with pytest.raises(InvalidField, match=r"^text must not be empty$"):
        check_message_text(value, "text")


@pytest.mark.parametrize("value", ["hi", " hi ", "\u3000a", "."])
def test_check_message_text_keeps_text_as_given(value: str) -> None:
    assert check_message_text(value, "content") is value
