"""The WebSocket protocol ``samvad serve`` runs under uvicorn: one socket write per loop turn.

uvicorn's websockets (sans-I/O) protocol hands every frame to the transport
with its own ``transport.write``, and uvloop's transport tries each write on
the socket at once: one ``send`` system call per frame. A user message
answered in one chunk makes four frames (``ack``, ``reply.start``,
``reply.chunk``, ``reply.end``), all produced in one turn of the event loop by
the connection's writer (:mod:`samvad.web.realtime`). :class:`TurnWebSocketProtocol`
changes three things, none on the wire nor in what the app receives, and
offers the app three extensions:

- **Writes are gathered per loop turn.** The protocol writes through a
  :class:`TurnBuffer` around the transport: what the connection writes while a
  turn of the loop runs (frames, pongs, the handshake, a close frame) is
  handed to the socket in one write when the next turn begins, by one loop
  callback for every connection written to in that turn. Every write
  goes through the same buffer, so the bytes keep the order they were made
  in; closing the transport writes the buffer first. A frame leaves no earlier
  than the app hands it over (:data:`FLUSH` below only moves the write from the
  turn's end to the moment the app asks), so the journal hold (no frame before
  the journal has the writes before it) is untouched.
- **Whole text frames are read here.** When a read holds nothing but whole,
  masked, unfragmented text frames and websockets' parser waits between two
  frames, the protocol unmasks and decodes them itself
  (:func:`whole_text_frames`) and hands them to the app as uvicorn would;
  anything else (control frames, fragments, a frame split across reads, an
  error to report) goes through websockets, as before.
- **A text frame is framed here** when the handshake negotiated no extension
  (a client that asked for ``permessage-deflate`` goes through websockets as
  before): the two-to-ten-byte header of RFC 6455 section 5.2 and the payload,
  the bytes websockets would write, without a ``Frame`` object and its checks.

- **An app may write a text frame without a coroutine**: the scope's
  ``extensions`` offer :data:`SEND_TEXT`, a plain function that writes the
  frame as above and says whether it could; the connection's writer drains
  its queue through it (:mod:`samvad.web.realtime`), instead of one awaited
  ASGI ``send`` per frame through every middleware's wrapper. When it cannot
  (not writable: the client reads slowly; an extension; closing), the frame
  goes through ``send`` as before.
- **An app may take a text frame without a coroutine**: :data:`ON_TEXT` in
  the same ``extensions`` installs a plain function that the protocol calls
  with each whole text frame it reads while nothing waits in its inbox. When
  the function says it took the frame, nothing is queued and no task wakes;
  otherwise the frame is queued for ``receive`` as before. The connection
  takes its messages so (:mod:`samvad.web.realtime`): a message no longer
  costs its read loop's task a wake-up, nor a new future and coroutine to
  wait with, which the young collections walked for every busy connection.
- **An app may hand a frame to the socket at once**: :data:`FLUSH` in the
  same ``extensions`` writes what the connection has buffered in this turn
  now, instead of when the next turn begins. The connection does so once it
  has handled a message it acknowledged (the ``ack`` and the start of the
  reply in one write): under load a turn of the loop is long (every reply
  streaming on every connection has a chunk in it), and the sender should
  not wait for it to end to learn that its message is stored.

Selected in :func:`samvad.server.uvicorn_config` (``ws=``); an app served by
another server simply gets that server's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

try:  # the C version websockets itself uses when it is built (as in its wheels)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

__all__ = [
    "FLUSH",
    "ON_TEXT",
    "SEND_TEXT",
    "TurnBuffer",
    "TurnWebSocketProtocol",
    "between_frames",
    "text_frame_header",
    "whole_text_frames",
]

#: The ASGI extension (``scope["extensions"]``) through which an app may write
#: a text frame without a coroutine: ``send_text(text) -> bool``, False when
#: it must go through the ASGI ``send`` instead (the frame is then not written).
SEND_TEXT = "samvad.websocket.send_text"
#: The ASGI extension through which an app may hand what it has written during
#: this turn of the loop to the socket at once: ``flush() -> None``.
FLUSH = "samvad.websocket.flush"
#: The ASGI extension through which an app may take whole text frames as they
#: are read, without a coroutine: ``on_text(take)`` installs ``take(text) ->
#: bool`` (None removes it). It is called only while nothing waits in the
#: inbox, so what it takes and what ``receive`` returns keep the order of the
#: frames; False means "queue it for ``receive``", as without it.
ON_TEXT = "samvad.websocket.on_text"

#: FIN and the text opcode: the first byte of an unfragmented text frame.
_FIN_TEXT = 0x81
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
# Compared with websockets' ``Protocol._state``, the attribute under its
# ``state`` property, read directly five times per message
# (tests/web/test_uvicorn_ws.py checks they agree).
_OPEN = State.OPEN
#: Where websockets' parser waits between two frames: ``Protocol.parse``
#: asking its reader whether the stream has ended.
_PARSE = Protocol.parse.__code__
_AT_EOF = StreamReader.at_eof.__code__


def between_frames(parser: Any) -> bool:
    """Whether websockets' ``parser`` (a generator) waits for a new frame, not
    for the rest of one: ``Protocol.parse`` in ``at_eof``, under the server's
    own ``parse``. False for anything else, a websockets that parses another
    way included (then every read goes through it, as before)."""
    outer, inner = parser, parser.gi_yieldfrom
    while inner is not None:
        if getattr(inner, "gi_code", None) is _AT_EOF:
            return getattr(outer, "gi_code", None) is _PARSE
        outer, inner = inner, getattr(inner, "gi_yieldfrom", None)
    return False


def whole_text_frames(data: bytes, max_size: int | None) -> list[str] | None:
    """The texts of ``data`` when it is nothing but whole, masked, unfragmented
    text frames a client may send with no extension (RFC 6455 section 5.2) of
    at most ``max_size`` bytes each, in valid UTF-8; None for anything else,
    which websockets must parse (a control frame, a fragment, a frame split
    across reads, set reserved bits, an unmasked or oversized frame, a 64-bit
    length, bad UTF-8).
    """
    texts: list[str] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 6 or data[pos] != _FIN_TEXT:
            return None
        second = data[pos + 1]
        if not second & 0x80:
            return None  # unmasked
        length = second & 0x7F
        if length < 126:
            mask_at = pos + 2
        elif length == 126:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            mask_at = pos + 4
        else:
            return None
        start = mask_at + 4
        stop = start + length
        if stop > end or (max_size is not None and length > max_size):
            return None
        try:
            texts.append(apply_mask(data[start:stop], data[mask_at:start]).decode())
        except UnicodeDecodeError:
            return None
        pos = stop
    return texts


def text_frame_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of ``length`` payload
    bytes (RFC 6455 section 5.2), as a server sends it."""
    if length < 126:
        return _SHORT.pack(_FIN_TEXT, length)
    if length < 65536:
        return _MEDIUM.pack(_FIN_TEXT, 126, length)
    return _LONG.pack(_FIN_TEXT, 127, length)


class _TurnFlush:
    """The turn buffers of one event loop written to during a turn, flushed
    by one callback at the start of the next: a thousand connections streaming
    at once cost one loop callback per turn, not one each."""

    __slots__ = ("_loop", "_pending", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: this is the value of a weak mapping keyed by the loop.
        self._loop = weakref.ref(loop)
        self._pending: list[TurnBuffer] = []
        self._scheduled = False

    def add(self, buffer: TurnBuffer) -> None:
        self._pending.append(buffer)
        if not self._scheduled:
            loop = self._loop()
            if loop is not None:
                self._scheduled = True
                loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for buffer in pending:
            try:
                buffer.flush()
            except Exception as exc:  # as a callback of its own would: the others go on
                loop = self._loop()
                if loop is not None:
                    loop.call_exception_handler(
                        {"message": "flushing a WebSocket turn buffer failed", "exception": exc}
                    )


_flushes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TurnFlush] = (
    weakref.WeakKeyDictionary()
)


def _turn_flush(loop: asyncio.AbstractEventLoop) -> _TurnFlush:
    flush = _flushes.get(loop)
    if flush is None:
        flush = _flushes[loop] = _TurnFlush(loop)
    return flush


class TurnBuffer(asyncio.Transport):
    """A transport that hands what is written during one loop turn to the
    transport under it in one write, at the start of the next turn.

    Everything else goes to the transport under it, after the buffer where
    order matters (closing, ``write_eof``); ``abort`` drops the buffer as it
    drops the transport's own. The buffers of one loop are flushed together,
    by one callback (:class:`_TurnFlush`).
    """

    __slots__ = ("_flush", "_parts", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._flush = _turn_flush(loop)
        self._parts: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._parts.append(bytes(data) if not isinstance(data, bytes) else data)
        self._schedule()

    def write_parts(self, head: bytes, payload: bytes) -> None:
        """Write ``head`` then ``payload`` (a frame's header and payload, unjoined)."""
        parts = self._parts
        parts.append(head)
        parts.append(payload)
        self._schedule()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._flush.add(self)

    def flush(self) -> None:
        """Hand what is buffered to the transport under this one, in one write."""
        self._scheduled = False
        parts = self._parts
        if not parts:
            return
        self._parts = []
        if self._transport.is_closing():
            return  # closed or aborted under us: as a write to it would be
        self._write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _write(self, data: bytes) -> None:
        self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._parts = []
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._parts))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class _Inbox:
    """What the protocol holds for the app to ``receive``: the three methods of
    ``asyncio.Queue`` uvicorn's protocol uses (``put_nowait``, ``get``,
    ``empty``), unbounded as uvicorn's queue is, without the task accounting
    (``task_done``/``join``) and the loop lookups that cost ``asyncio.Queue``
    a dozen Python calls per message. Getters are served in order; one
    cancelled after it was woken passes the wake-up on, as ``asyncio.Queue``
    does. ``drained`` is called when a ``get`` took the last item."""

    __slots__ = ("_drained", "_getters", "_items", "_loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, drained: Callable[[], None] = lambda: None
    ) -> None:
        self._loop = loop
        self._drained = drained
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake_one()

    def _wake_one(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    async def get(self) -> Any:
        items = self._items
        while not items:
            getter = self._loop.create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                with contextlib.suppress(ValueError):  # woken: put_nowait took it off
                    self._getters.remove(getter)
                if items and not getter.cancelled():
                    self._wake_one()  # woken, but leaving: the next getter takes it
                raise
        item = items.popleft()
        if not items:
            self._drained()
        return item


class TurnWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) WebSocket protocol, writing through a
    :class:`TurnBuffer` and framing plain text frames itself (module docstring)."""

    transport: TurnBuffer
    #: What the protocol writes through (a subclass may observe the writes).
    buffer_class: type[TurnBuffer] = TurnBuffer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbox = _Inbox(self.loop, self._drained)
        self.queue = cast("asyncio.Queue[Any]", self._inbox)
        # ``writable``'s state as a plain attribute, for ``send_text_now``: four
        # ``Event.is_set`` calls (Python methods) per message otherwise. It can
        # differ from ``writable`` only after ``connection_lost`` (which sets
        # the event without ``resume_writing``), when ``disconnected`` refuses.
        self._writing_paused = False
        #: What the app installed through :data:`ON_TEXT`.
        self._take_text: Callable[[str], bool] | None = None

    def pause_writing(self) -> None:
        self._writing_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        super().resume_writing()

    def receive(self) -> Coroutine[Any, Any, Any]:
        """uvicorn's ``receive``: the inbox's ``get`` itself, not a coroutine
        awaiting it, so the read loop's task resumes through one frame fewer
        per message (about 1 % of a message's instructions); reading resumes
        when the app has taken every message (``_drained``), as in uvicorn."""
        return self._inbox.get()

    def _drained(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        buffered = self.buffer_class(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(buffered)

    def data_received(self, data: bytes) -> None:
        """Whole text frames, with websockets' parser between two frames, are
        read here (:func:`whole_text_frames`) and handed to the app as
        uvicorn would; everything else goes through websockets."""
        conn = self.conn
        if (
            conn._state is _OPEN
            and not self.close_sent
            and not conn.extensions
            and conn.cur_size is None
            and not conn.reader.buffer
            and not conn.debug
            and between_frames(conn.parser)
        ):
            texts = whole_text_frames(data, conn.max_size)
            if texts is not None:
                inbox = self._inbox
                # The app has not taken what an earlier read brought: stop
                # reading until it has (``_drained``). uvicorn pauses after
                # every read, which costs a connection that keeps up a pause
                # and a resume per message; this holds at most two reads'
                # worth for one that does not.
                behind = bool(inbox._items)
                take = self._take_text
                for text in texts:
                    # Offered to the app while nothing waits before it (ON_TEXT).
                    if take is None or inbox._items or not take(text):
                        inbox.put_nowait({"type": "websocket.receive", "text": text})
                if behind and not self.read_paused:
                    self.read_paused = True
                    self.transport.pause_reading()
                return
        super().data_received(data)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # not made for a refused handshake
        if scope is not None:
            extensions = scope["extensions"]
            extensions[SEND_TEXT] = self.send_text_now
            extensions[FLUSH] = self.transport.flush
            extensions[ON_TEXT] = self._on_text

    def _on_text(self, take: Callable[[str], bool] | None) -> None:
        self._take_text = take

    def send_text_now(self, text: str) -> bool:
        """Write a text frame at once, if nothing stands in the way: True when
        written; False when the ASGI ``send`` must do it (not open or not
        writable, an extension negotiated, a fragmented message under way)."""
        if not (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.initial_response is None
            and not self._writing_paused
        ):
            return False
        conn = self.conn
        if conn.extensions or conn._state is not _OPEN or conn.expect_continuation_frame:
            return False
        payload = text.encode()
        length = len(payload)
        # text_frame_header and TurnBuffer.write_parts, inlined: once per frame.
        head = _SHORT.pack(_FIN_TEXT, length) if length < 126 else text_frame_header(length)
        buffer = self.transport
        buffer._parts += (head, payload)
        if not buffer._scheduled:
            buffer._scheduled = True
            flush = buffer._flush
            if flush._scheduled:  # _TurnFlush.add, inlined: once per frame
                flush._pending.append(buffer)
            else:
                flush.add(buffer)
        return True

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.send" and message.get("bytes") is None:
            text = message.get("text")
            if text is not None and self.send_text_now(text):
                return
        await super().send(message)
