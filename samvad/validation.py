"""Validation of what clients send: identifiers, text and JSON values.

Both doors (REST bodies and path ids, WebSocket frames) pass everything that
can reach the store through here first, so a write that Firestore would refuse
is refused up front with a 400 (or an ``error`` frame) that names the field,
instead of failing later in the write-behind where no caller waits — and where
one refused document would hold back every later write of the same user.

The rules, each one a limit of Firestore (checked against the emulator) or of
this API:

- Text must be encodable as UTF-8: no lone surrogates (``"\\ud800"`` parses as
  JSON but can be neither stored nor sent back).
- Nesting is counted from the document root: every map and every array is one
  level, at most :data:`MAX_DEPTH`. A value stored under ``preferences`` or
  ``metadata`` sits one level deeper than the same value sent as ``state``;
  callers pass that ``depth``.
- No arrays directly inside arrays; integers within 64 bits; finite numbers;
  keys non-empty, at most 1,500 bytes, not of the form ``__name__``.
- A merged object (state, preferences, metadata) is bounded in top-level keys,
  total fields and bytes (:class:`Bounds`): the Firestore client's merge is
  quadratic in the number of fields, so an object with thousands of keys would
  stall the event loop for seconds.
- A message's text is not empty or only white space.
- Ids: 1 to 128 characters, no ``/`` or control characters, no white space at
  either end, not ``.``/``..``/``__name__``. An id taken from a URL path is
  checked on its raw bytes first (:func:`check_path_id`): percent-encoded bytes
  that are not UTF-8 are refused rather than decoded to U+FFFD, so two distinct
  raw ids can never address one document.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec

from samvad.clock import to_iso
from samvad.errors import InvalidField, PayloadTooLarge

__all__ = [
    "MAX_DEPTH",
    "MAX_FIELD_NAME_BYTES",
    "MAX_ID_LENGTH",
    "MAX_LANGUAGE_LENGTH",
    "RESERVED_SESSION_IDS",
    "Bounds",
    "check_id",
    "check_language",
    "check_merged",
    "check_message_text",
    "check_object",
    "check_path_id",
    "check_session_id",
    "check_text",
    "check_value",
    "count_fields",
    "decode_path_segment",
    "json_size",
]

MAX_ID_LENGTH = 128
MAX_LANGUAGE_LENGTH = 64
MAX_DEPTH = 20  # Firestore: maps and arrays nested at most 20 levels, counted from the root
MAX_FIELD_NAME_BYTES = 1500
_INT64 = (-(2**63), 2**63 - 1)
_RESERVED_NAME = re.compile(r"^__.*__$")
_ID_FORBIDDEN = re.compile(r"[/\x00-\x1f\x7f]")

#: Words of the REST API that can never be session ids (they are routes).
RESERVED_SESSION_IDS = frozenset({"stats", "create", "refresh", "user"})


@dataclass(frozen=True, slots=True)
class Bounds:
    """Limits on one object the API merges into over time (state, preferences, metadata).

    Far above real use; they exist so that no single request can make a
    document expensive to write (``max_keys``, ``max_fields``) or grow it
    toward Firestore's 1 MiB limit (``max_bytes``).
    """

    max_keys: int = 200
    max_fields: int = 2000
    max_bytes: int = 256 * 1024


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, field: str) -> str:
    """A string that is valid Unicode (no lone surrogates), or :class:`InvalidField`."""
    if not isinstance(value, str):
        raise InvalidField(field, "must be a string")
    if not _is_text(value):
        raise InvalidField(field, "contains a lone surrogate (not valid Unicode)")
    return value


def check_message_text(value: str, field: str) -> str:
    """A message's text (REST ``content``, WebSocket ``text``): not empty and
    not only white space, or :class:`InvalidField`."""
    if not value.strip():
        raise InvalidField(field, "must not be empty")
    return value


def check_language(value: Any) -> str | None:
    """A session's language (a tag such as ``hi-IN``, not checked against a
    list): None, or 1 to 64 printable characters."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_LANGUAGE_LENGTH
        or not value.isprintable()
    ):
        raise InvalidField("language", f"must be 1 to {MAX_LANGUAGE_LENGTH} printable characters")
    return value


def check_id(value: Any, field: str, *, reserved: frozenset[str] = frozenset()) -> str:
    """An identifier usable as a Firestore document id, or :class:`InvalidField`.

    Rejected: non-strings, empty, over 128 characters, ``/`` or control
    characters, lone surrogates, ``.`` and ``..``, names like ``__name__``,
    and ``reserved`` words.
    """
    if not isinstance(value, str):
        raise InvalidField(field, "must be a string")
    if value == "":
        raise InvalidField(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidField(field, f"must be at most {MAX_ID_LENGTH} characters")
    if value.strip() != value:
        raise InvalidField(field, "must not start or end with white space")
    if _ID_FORBIDDEN.search(value):
        raise InvalidField(field, "must not contain '/' or control characters")
    if not _is_text(value):
        raise InvalidField(field, "contains a lone surrogate (not valid Unicode)")
    if value in (".", ".."):
        raise InvalidField(field, "must not be '.' or '..'")
    if _RESERVED_NAME.match(value):
        raise InvalidField(field, "must not look like __name__ (reserved by Firestore)")
    if value in reserved:
        raise InvalidField(field, f"must not be the reserved word {value!r}")
    return value


def check_session_id(value: Any, field: str = "sessionId") -> str:
    """A session id: an id that is none of the REST API's literal words."""
    return check_id(value, field, reserved=RESERVED_SESSION_IDS)


def check_path_id(raw: bytes, field: str, *, reserved: frozenset[str] = frozenset()) -> str:
    """An id from one raw (still percent-encoded) URL path segment.

    The bytes are percent-decoded and must then be UTF-8: a server that decoded
    ``a%FFb`` and ``a%FEb`` leniently would map both to ``a\\ufffdb``, one document.
    """
    return check_id(decode_path_segment(raw, field), field, reserved=reserved)


def decode_path_segment(raw: bytes, field: str) -> str:
    """One raw URL path segment, percent-decoded, as UTF-8 (else :class:`InvalidField`)."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidField(field, "is not valid UTF-8 once percent-decoded") from None


def _check_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or key == "":
        raise InvalidField(field, "has an empty key")
    if not _is_text(key):
        raise InvalidField(field, "has a key with a lone surrogate (not valid Unicode)")
    if _RESERVED_NAME.match(key):
        raise InvalidField(f"{field}.{key}", "is a reserved name (__name__ form)")
    if len(key.encode()) > MAX_FIELD_NAME_BYTES:
        raise InvalidField(field, f"has a key longer than {MAX_FIELD_NAME_BYTES} bytes")
    return key


def check_value(value: Any, field: str, *, depth: int = 0, in_array: bool = False) -> None:
    """Raise :class:`InvalidField` unless ``value`` is JSON that Firestore can store.

    ``depth`` is the number of maps and arrays that enclose ``value`` in its
    document (0 for a top-level field of the document).
    """
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if not _is_text(value):
            raise InvalidField(field, "contains a lone surrogate (not valid Unicode)")
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidField(field, "is an integer outside the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidField(field, "must be a finite number")
        return
    if isinstance(value, list):
        if in_array:
            raise InvalidField(field, "contains an array directly inside an array")
        if depth + 1 > MAX_DEPTH:
            raise InvalidField(field, f"nests deeper than {MAX_DEPTH} levels")
        for index, item in enumerate(value):
            check_value(item, f"{field}[{index}]", depth=depth + 1, in_array=True)
        return
    if isinstance(value, Mapping):
        if depth + 1 > MAX_DEPTH:
            raise InvalidField(field, f"nests deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            _check_key(key, field)
            check_value(item, f"{field}.{key}", depth=depth + 1)
        return
    raise InvalidField(field, f"has an unsupported type {type(value).__name__}")


def check_object(value: Any, field: str, *, depth: int = 0) -> dict[str, Any]:
    """A JSON object whose keys and values Firestore can store.

    ``depth`` is where the object's own fields sit: 0 when they are the fields
    of a document (a user's state), 1 when the object is stored as one map
    field of its document (``preferences`` of a profile, ``metadata`` of a
    session).
    """
    if not isinstance(value, Mapping):
        raise InvalidField(field, "must be an object")
    if depth > MAX_DEPTH:
        raise InvalidField(field, f"nests deeper than {MAX_DEPTH} levels")
    for key, item in value.items():
        _check_key(key, field)
        check_value(item, f"{field}.{key}", depth=depth)
    return dict(value)


def count_fields(value: Any) -> int:
    """Map fields in ``value``, nested ones included (what a merge walks over)."""
    return _walk(value)[0]


def _walk(value: Any) -> tuple[int, bool]:
    """Map fields in ``value``, and whether it is plain JSON: dicts with string
    keys, lists, strings, booleans, integers, floats and None only (what
    :func:`json_size` can size with one encoder call). Exact types first:
    this runs for every state saved, where ``isinstance`` against the
    ``Mapping`` ABC cost more than the rest of the walk."""
    total = 0
    plain = True
    stack = [value]
    extend = stack.extend
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            total += len(item)
            extend(item.values())
            if plain:
                for key in item:
                    if type(key) is not str:
                        plain = False
                        break
        elif kind is list:
            extend(item)
        elif kind is str or kind is int or kind is float or kind is bool or item is None:
            continue
        elif isinstance(item, Mapping):
            total += len(item)
            extend(item.values())
            plain = False
        else:
            if isinstance(item, list):
                extend(item)
            plain = False
    return total, plain


def check_merged(merged: Mapping[str, Any], field: str, bounds: Bounds) -> None:
    """Refuse a merged object over ``bounds``: keys and fields with
    :class:`InvalidField` (400), bytes with :class:`PayloadTooLarge` (413)."""
    if len(merged) > bounds.max_keys:
        raise InvalidField(
            field, f"would hold {len(merged)} top-level keys; at most {bounds.max_keys} are kept"
        )
    fields, plain = _walk(merged)
    if fields > bounds.max_fields:
        raise InvalidField(
            field, f"would hold {fields} fields in all; at most {bounds.max_fields} are kept"
        )
    size = len(_encode(merged)) if plain else json_size(merged)
    if size > bounds.max_bytes:
        raise PayloadTooLarge(
            f"{field} would grow to {size} bytes; at most {bounds.max_bytes} are kept"
        )


#: Compact UTF-8 JSON, as the API's responses encode it: the same msgspec
#: encoder as ``samvad.web.schemas.encode`` (non-finite floats as ``null``).
_encode = msgspec.json.Encoder().encode


def json_size(value: Mapping[str, Any]) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON, as the API would send it back.

    Any value: Firestore types written by other clients (timestamps, bytes and
    the like) count as the API formats them (``samvad.web.schemas.plain_json``).
    :func:`check_merged` encodes plain JSON as it is, without that copy.
    """
    return len(_encode(_as_plain(value)))


def _as_plain(value: Any) -> Any:
    """``value`` as plain JSON: ``samvad.web.schemas.plain_json``'s rules."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return to_iso(value)
    if isinstance(value, Mapping):
        return {str(k): _as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_plain(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)
