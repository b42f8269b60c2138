"""Validation of what clients send: identifiers and JSON values.

Everything that reaches the store passes through here first, so a write that
Firestore would refuse (nested arrays, reserved field names, integers beyond
64 bits, NaN, maps nested too deep) is refused up front with a 400 that names
the field, instead of failing later in the write-behind where no caller waits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from samvad.errors import InvalidField

MAX_ID_LENGTH = 128
MAX_DEPTH = 20  # Firestore's limit on nested maps and arrays
MAX_FIELD_NAME_BYTES = 1500
_INT64 = (-(2**63), 2**63 - 1)
_RESERVED_NAME = re.compile(r"^__.*__$")
_ID_FORBIDDEN = re.compile(r"[/\x00-\x1f\x7f]")

#: Words of the REST API that can never be session ids (they are routes).
RESERVED_SESSION_IDS = frozenset({"stats", "create", "refresh", "user"})


def check_id(value: Any, field: str, *, reserved: frozenset[str] = frozenset()) -> str:
    """An identifier usable as a Firestore document id, or :class:`InvalidField`.

    Rejected: non-strings, empty, over 128 characters, ``/`` or control
    characters, ``.`` and ``..``, names like ``__name__``, and ``reserved`` words.
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
    if value in (".", ".."):
        raise InvalidField(field, "must not be '.' or '..'")
    if _RESERVED_NAME.match(value):
        raise InvalidField(field, "must not look like __name__ (reserved by Firestore)")
    if value in reserved:
        raise InvalidField(field, f"must not be the reserved word {value!r}")
    return value


def check_session_id(value: Any, field: str = "sessionId") -> str:
    return check_id(value, field, reserved=RESERVED_SESSION_IDS)


def check_value(value: Any, field: str, *, depth: int = 0, in_array: bool = False) -> None:
    """Raise :class:`InvalidField` unless ``value`` is JSON that Firestore can store."""
    if depth > MAX_DEPTH:
        raise InvalidField(field, f"nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | str):
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
        for index, item in enumerate(value):
            check_value(item, f"{field}[{index}]", depth=depth + 1, in_array=True)
        return
    if isinstance(value, Mapping):
        check_object(value, field, depth=depth + 1)
        return
    raise InvalidField(field, f"has an unsupported type {type(value).__name__}")


def check_object(value: Any, field: str, *, depth: int = 0) -> dict[str, Any]:
    """A JSON object whose keys and values Firestore can store."""
    if not isinstance(value, Mapping):
        raise InvalidField(field, "must be an object")
    for key, item in value.items():
        if not isinstance(key, str) or key == "":
            raise InvalidField(field, "has an empty key")
        if _RESERVED_NAME.match(key):
            raise InvalidField(f"{field}.{key}", "is a reserved name (__name__ form)")
        if len(key.encode()) > MAX_FIELD_NAME_BYTES:
            raise InvalidField(field, f"has a key longer than {MAX_FIELD_NAME_BYTES} bytes")
        check_value(item, f"{field}.{key}", depth=depth, in_array=False)
    return dict(value)
