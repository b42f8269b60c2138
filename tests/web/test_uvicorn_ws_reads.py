"""What ``samvad serve``'s WebSocket protocol reads (samvad/web/uvicorn_ws.py):
whole text frames are read without websockets' parser, and an app must not be
able to tell. Every byte stream below goes to two live servers, uvicorn's own
sans-I/O protocol and ours, in the same writes; the app echoes what it
receives, and the client must get the same frames, pongs and close codes back
from both."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

import samvad.web.uvicorn_ws as uvicorn_ws
from samvad.web.uvicorn_ws import TurnWebSocketProtocol, whole_text_frames
from tests.support.server import live_server

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
MAX_SIZE = 4096  # the servers' ws_max_size: a larger frame is closed with 1009


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    wide: bool = False,
) -> bytes:
    """A client frame as RFC 6455 section 5.2 lays it out (``wide``: its
    length in eight bytes, whatever it is)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if wide:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    elif length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(value: str, **options: Any) -> bytes:
    return frame(TEXT, value.encode(), **options)


def echo_of(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


SENTINEL = text("sentinel")


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts, then answers every message with its length and digest."""
    if scope["type"] != "websocket":
        return
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            reply = "text " + echo_of(message["text"].encode())
        else:
            reply = "bytes " + echo_of(message["bytes"])
        await send({"type": "websocket.send", "text": reply})


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    try:
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        return first & 0x0F, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def upgrade_request(port: int, path: str = "/") -> bytes:
    """A client's WebSocket upgrade request (RFC 6455 section 4.1)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def upgraded(port: int, path: str = "/") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection upgraded to a WebSocket (the server's 101 read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request(port, path))
        async with asyncio.timeout(10):
            assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def exchange(port: int, writes: list[bytes]) -> list[tuple[int, bytes]]:
    """Send ``writes`` (each read by the server on its own), then a sentinel;
    every frame back until the sentinel's echo, a close frame or the end."""
    reader, writer = await upgraded(port)
    got: list[tuple[int, bytes]] = []
    try:
        async with asyncio.timeout(10):
            for data in [*writes, SENTINEL]:
                try:
                    writer.write(data)
                    await writer.drain()
                except ConnectionError:  # the server closed on an earlier frame
                    break
                await asyncio.sleep(0.01)  # the server reads it before the next write
            sentinel = ("text " + echo_of(b"sentinel")).encode()
            while (received := await _read_frame(reader)) is not None:
                got.append(received)
                if received[0] == CLOSE or received == (TEXT, sentinel):
                    break
    finally:
        writer.close()
    return got


async def both(cases: list[list[bytes]]) -> list[tuple[list[Any], list[Any]]]:
    """Each case's frames back from uvicorn's protocol and from ours."""
    seen: list[list[list[Any]]] = []
    for ws in (WebSocketsSansIOProtocol, TurnWebSocketProtocol):
        async with live_server(echo_app, ws=ws, lifespan="off", ws_max_size=MAX_SIZE) as server:
            seen.append([await exchange(server.port, writes) for writes in cases])
    return list(zip(seen[0], seen[1], strict=True))


@pytest.fixture
def fast_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many frames each read through the fast path carried."""
    counts: list[int] = []
    real = whole_text_frames

    def counted(data: bytes, max_size: int | None) -> list[str] | None:
        texts = real(data, max_size)
        if texts is not None:
            counts.append(len(texts))
        return texts

    monkeypatch.setattr(uvicorn_ws, "whole_text_frames", counted)
    return counts


long_text = "ü" * 1500  # 3,000 bytes: a two-byte length
split_me = text("split me")
FIXED: dict[str, tuple[list[bytes], Callable[[list[int]], bool]]] = {
    # name: (the writes, what the fast path must have done with them)
    "one frame": ([text('{"type":"ping"}')], lambda fast: fast[:1] == [1]),
    "two frames in one read": ([text("one") + text("two")], lambda fast: fast[:1] == [2]),
    "a two-byte length": ([text(long_text)], lambda fast: fast[:1] == [1]),
    "a frame split across reads": (
        [split_me[:3], split_me[3:], text("after")],
        lambda fast: fast[:1] == [1],  # "after": the parser is between frames again
    ),
    "a ping before a text frame": ([frame(PING, b"hb") + text("after ping")], lambda _: True),
    "a fragmented message": (
        [text("frag", fin=False) + frame(CONT, b"ment", fin=False) + frame(CONT, b"ed")],
        lambda _: True,
    ),
    "a ping between fragments": (
        [text("a", fin=False), frame(PING, b"x"), frame(CONT, b"b"), text("c")],
        lambda _: True,
    ),
    "a binary frame": ([frame(BINARY, b"\x00\x01")], lambda fast: fast == [1]),  # the sentinel
    "an unmasked frame": ([text("bare", mask=False)], lambda fast: fast == []),
    "a reserved bit": ([text("rsv", rsv=4)], lambda fast: fast == []),
    "bad UTF-8": ([frame(TEXT, b"\xff\xfe")], lambda fast: fast == []),
    "bad UTF-8 after a good frame": ([text("ok") + frame(TEXT, b"\xc3")], lambda fast: fast == []),
    "too big": ([text("x" * (MAX_SIZE + 1))], lambda fast: fast == []),
    "just fits": ([text("x" * MAX_SIZE)], lambda fast: fast[:1] == [1]),
    "an eight-byte length": (  # read by websockets; then the sentinel is not
        [frame(TEXT, b"y" * 300, wide=True)],
        lambda fast: fast == [1],
    ),
    "a close frame after text": (
        [text("bye") + frame(CLOSE, struct.pack("!H", 1000) + b"done")],
        lambda fast: fast == [],
    ),
    "an empty text frame": ([text("")], lambda fast: fast[:1] == [1]),
}


@pytest.mark.parametrize("name", list(FIXED))
async def test_a_stream_reads_the_same_as_under_uvicorns_protocol(
    name: str, fast_reads: list[int]
) -> None:
    writes, fast_path_did = FIXED[name]
    ((uvicorns, ours),) = await both([writes])
    assert ours == uvicorns
    assert ours  # something came back: an echo, a pong or a close
    # ``fast_reads`` has the sentinel's read last, when the connection was
    # still open for it.
    assert fast_path_did(fast_reads), fast_reads


def _random_stream(rng: random.Random) -> list[bytes]:
    """A few valid frames of every kind, then cut into one to four reads."""
    parts: list[bytes] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["text", "text", "text", "unicode", "long", "ping", "fragments", "bin"])
        if kind == "text":
            parts.append(text("t" * rng.randint(0, 125)))
        elif kind == "unicode":
            parts.append(text("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(40))))
        elif kind == "long":
            parts.append(text("L" * rng.randint(126, MAX_SIZE)))
        elif kind == "ping":
            parts.append(frame(PING, os.urandom(rng.randint(0, 20))))
        elif kind == "bin":
            parts.append(frame(BINARY, os.urandom(rng.randint(0, 300))))
        else:
            pieces = [os.urandom(3).hex().encode() for _ in range(rng.randint(2, 4))]
            parts.append(text(pieces[0].decode(), fin=False))
            for index, piece in enumerate(pieces[1:], 1):
                parts.append(frame(CONT, piece, fin=index == len(pieces) - 1))
    data = b"".join(parts)
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(0, 3), len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def test_generated_streams_read_the_same_as_under_uvicorns_protocol(
    fast_reads: list[int],
) -> None:
    rng = random.Random(20261129)
    cases = [_random_stream(rng) for _ in range(40)]
    for index, (uvicorns, ours) in enumerate(await both(cases)):
        assert ours == uvicorns, f"case {index}: {cases[index]!r}"
        assert ours[-1] == (TEXT, ("text " + echo_of(b"sentinel")).encode())  # all were valid
    assert sum(fast_reads) > 40  # whole frames were read on the fast path


def test_whole_text_frames_refuses_what_it_does_not_read() -> None:
    assert whole_text_frames(text("a") + text("b"), None) == ["a", "b"]
    assert whole_text_frames(b"", None) == []
    assert whole_text_frames(text("a")[:-1], None) is None  # cut short
    assert whole_text_frames(text("abc"), 2) is None  # over max_size
    assert whole_text_frames(text("a", fin=False), None) is None
    assert whole_text_frames(frame(PING, b""), None) is None
