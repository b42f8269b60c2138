"""Reading JSON request bodies defensively.

The body is read in chunks and refused with 413 as soon as it passes the
limit (a declared ``Content-Length`` over the limit is refused before a byte
is read), so an oversized request never sits whole in memory. What is read
must be one JSON object: ``NaN``/``Infinity``, numbers that overflow a float,
duplicate keys and strings that are not valid Unicode (lone surrogates, which
neither Firestore nor a JSON response could encode) are refused with a 400
that says what was wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import ClientDisconnect, Request

from samvad.errors import BadRequest, PayloadTooLarge

_JSON_TYPES = ("application/json",)


class _Refused(ValueError):
    """Raised from inside the JSON parser's hooks."""


def _reject_constant(name: str) -> Any:
    raise _Refused(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"the key {key[:60]!r} appears twice in one object")
        result[key] = value
    return result


def _check_strings(value: Any) -> None:
    """Refuse strings (keys or values) that are not encodable as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise BadRequest("Request body contains an invalid Unicode escape") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_content_type(request: Request) -> None:
    raw = request.headers.get("content-type")
    if raw is None:
        return  # curl -d without -H, scripts: the body still has to parse as JSON
    media_type = raw.split(";", 1)[0].strip().lower()
    if media_type in _JSON_TYPES or media_type.endswith("+json"):
        return
    # Refusing form and text types keeps cross-site HTML forms (which cannot
    # send application/json without a CORS preflight) from reaching the API.
    raise BadRequest("Content-Type must be application/json")


async def read_body(request: Request, *, limit: int) -> bytes:
    """The raw body, or :class:`PayloadTooLarge` once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; this keeps it out of the error log.
        raise BadRequest("The client went away before sending the whole body") from None
    return b"".join(chunks)


def parse_object(raw: bytes) -> dict[str, Any]:
    """Parse ``raw`` as one JSON object, or raise :class:`BadRequest` saying why."""
    if not raw.strip():
        raise BadRequest("Request body must be a JSON object; it is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("Request body is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            object_pairs_hook=_no_duplicates,
        )
    except _Refused as exc:
        raise BadRequest(f"Malformed JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"Malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise BadRequest("Malformed JSON: nested too deeply") from None
    except ValueError:
        # int() refusing a number with thousands of digits, among others.
        raise BadRequest("Malformed JSON: a number is too large") from None
    if not isinstance(value, dict):
        raise BadRequest(f"Request body must be a JSON object, not {_json_kind(value)}")
    _check_strings(value)
    return value


async def read_json_object(request: Request, *, limit: int) -> dict[str, Any]:
    """Read, bound and parse a request body that must be one JSON object."""
    _check_content_type(request)
    return parse_object(await read_body(request, limit=limit))


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"
