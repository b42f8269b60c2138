"""Reading JSON from clients defensively: REST bodies and WebSocket frames alike.

:func:`parse_json` is the one JSON reader of both doors. ``NaN``/``Infinity``,
numbers that overflow a float and duplicate keys are refused as malformed
(``bad_json``: a parser that let the last duplicate win would read
``{"type":"ping","type":"message"}`` as a message); strings with lone
surrogates, which neither Firestore nor a JSON response could encode, are
refused naming the field (``invalid_field``).

A REST body is read in chunks and refused with 413 as soon as it passes the
limit (a declared ``Content-Length`` over the limit is refused before a byte
is read), so an oversized request never sits whole in memory; it must be one
JSON object, which :func:`decode_body` turns into the body's shape from
``samvad.web.schemas``.
"""

from __future__ import annotations

import json
import math
import re
import types
from enum import StrEnum
from typing import Any, Generic, TypeVar, Union

import msgspec
from msgspec import Struct
from starlette.requests import Request

from samvad.errors import BadRequest, InvalidField, MalformedJson, PayloadTooLarge
from samvad.validation import check_text
from samvad.web.schemas import decode_struct, type_candidates

__all__ = [
    "decode_body",
    "flat_reader",
    "parse_json",
    "parse_object",
    "read_body",
    "read_json_object",
]

_S = TypeVar("_S", bound=Struct)

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
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the key {key[:60]!r} appears twice in one object")
            seen.add(key)
    return result


# Only a \uD800-\uDFFF escape can put a surrogate into a parsed string (UTF-8
# text cannot hold one): documents without such an escape skip the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_strings(value: Any) -> None:
    """Refuse strings (keys or values) that are not valid Unicode, naming the field."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path or "body")
        elif isinstance(item, dict):
            for key, child in item.items():
                name = f"{path}.{key}" if path else key
                if not _is_text(key):
                    raise InvalidField(path or "body", "has a key with a lone surrogate")
                stack.append((child, name))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


# One decoder for every document: ``json.loads`` with hooks builds a new one per
# call, which costs more than the parse of a typical frame.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_parse_float,
    object_pairs_hook=_no_duplicates,
)


def parse_json(text: str) -> Any:
    """Parse one JSON document, or raise :class:`MalformedJson` / :class:`InvalidField`."""
    try:
        value = _DECODER.decode(text)
    except _Refused as exc:
        raise MalformedJson(f"Malformed JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MalformedJson(
            f"Malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise MalformedJson("Malformed JSON: nested too deeply") from None
    except ValueError:
        # int() refusing a number with thousands of digits, among others.
        raise MalformedJson("Malformed JSON: a number is too large") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(value)
    return value


def _body_headers(request: Request) -> tuple[str | None, str | None]:
    """The first ``Content-Type`` and ``Content-Length``, in one pass over the
    raw headers (``request.headers`` scans them again for each name)."""
    content_type: bytes | None = None
    content_length: bytes | None = None
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            if content_type is None:
                content_type = value
        elif name == b"content-length" and content_length is None:
            content_length = value
    return (
        content_type.decode("latin-1") if content_type is not None else None,
        content_length.decode("latin-1") if content_length is not None else None,
    )


def _check_content_type(raw: str | None) -> None:
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
    return await _read_body(request, _body_headers(request)[1], limit=limit)


async def _read_body(request: Request, declared: str | None, *, limit: int) -> bytes:
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
    # Straight from the ASGI messages: ``request.stream()``, an async
    # generator, cost about as much as parsing a short message's JSON. The
    # handlers read a body once, here, and never through Starlette again.
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            # Nobody will read the answer; this keeps it out of the error log.
            raise BadRequest("The client went away before sending the whole body")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_object(raw: bytes) -> dict[str, Any]:
    """Parse ``raw`` as one JSON object, or raise :class:`BadRequest` saying why."""
    if not raw.strip():
        raise BadRequest("Request body must be a JSON object; it is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MalformedJson("Request body is not valid UTF-8") from None
    value = parse_json(text)
    if not isinstance(value, dict):
        raise BadRequest(f"Request body must be a JSON object, not {_json_kind(value)}")
    return value


async def read_json_object(request: Request, *, limit: int) -> dict[str, Any]:
    """Read, bound and parse a request body that must be one JSON object."""
    content_type, declared = _body_headers(request)
    _check_content_type(content_type)
    return parse_object(await _read_body(request, declared, limit=limit))


async def decode_body(request: Request, shape: type[_S], *, limit: int) -> _S:
    """Read a request body as ``shape`` (a struct of ``samvad.web.schemas``)."""
    content_type, declared = _body_headers(request)
    _check_content_type(content_type)
    raw = await _read_body(request, declared, limit=limit)
    flat = flat_reader(shape)
    if flat is not None:
        body = flat(raw)
        if body is not None:
            return body
    return decode_struct(parse_object(raw), shape)


class _FlatBody(Generic[_S]):
    """msgspec's decoder for a body (or a WebSocket frame) of string and
    boolean fields, taking only what :func:`parse_object` (or
    :func:`parse_json`) and :func:`~samvad.web.schemas.decode_struct` would
    take, to the same value (about a tenth of their cost); None for anything
    else, which goes the long way and gets its answer or its error there.

    It takes no unknown field (one could hold a duplicate key, ``NaN`` or a
    nesting the long way refuses), no ``\\u`` escape (the only way to write a
    lone surrogate, or a field's name other than literally), and no field's
    name twice in the text (so no duplicate key: a name can appear in the
    text only as itself), the tag field of tagged shapes (a frame's ``type``)
    included. Tagged shapes are read as a union of two or more, where msgspec
    requires the tag (it does not when it reads a single tagged shape).
    """

    __slots__ = ("_decoder", "_names", "_text_names")

    def __init__(self, *shapes: type[_S]) -> None:
        strict = [
            types.new_class(f"_Strict{shape.__name__}", (shape,), {"forbid_unknown_fields": True})
            for shape in shapes
        ]
        tags = {shape.__struct_config__.tag_field for shape in shapes}
        if len(tags) != 1 or (None in tags) != (len(shapes) == 1):
            raise ValueError("One untagged shape, or two or more tagged by one field.")
        self._decoder: msgspec.json.Decoder[_S] = msgspec.json.Decoder(
            strict[0] if len(strict) == 1 else Union[tuple(strict)]  # noqa: UP007
        )
        names = {f.encode_name for shape in shapes for f in msgspec.structs.fields(shape)}
        names.update(tag for tag in tags if tag is not None)
        self._text_names = [f'"{name}"' for name in sorted(names)]
        self._names = [name.encode() for name in self._text_names]

    def __call__(self, raw: bytes | str) -> _S | None:
        if isinstance(raw, str):
            if "\\u" in raw:
                return None
            for text_name in self._text_names:
                if raw.count(text_name) > 1:
                    return None
        else:
            if b"\\u" in raw:
                return None
            for name in self._names:
                if raw.count(name) > 1:
                    return None
        try:
            return self._decoder.decode(raw)
        except (msgspec.MsgspecError, UnicodeEncodeError):  # text with a lone surrogate
            return None


_flat_readers: dict[tuple[type[Struct], ...], _FlatBody[Any] | None] = {}


def flat_reader(*shapes: type[_S]) -> _FlatBody[_S] | None:
    """The fast reader of a body of ``shapes`` (one untagged shape, or a union
    of tagged ones) when all their fields are strings or booleans (or enums of
    strings, or null); None for shapes with numbers, arrays or objects. It
    reads bytes (a REST body) or text (a WebSocket frame)."""
    try:
        return _flat_readers[shapes]
    except KeyError:
        pass
    flat = all(
        candidate in (str, bool, type(None))
        or (isinstance(candidate, type) and issubclass(candidate, StrEnum))
        for shape in shapes
        for field in msgspec.structs.fields(shape)
        for candidate in type_candidates(field.type)
    )
    reader = _FlatBody(*shapes) if flat else None
    _flat_readers[shapes] = reader
    return reader


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
