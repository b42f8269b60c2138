"""A TCP proxy that can cut every connection on demand, to simulate an outage.

Put it between a client and the emulator: ``cut()`` resets every open
connection (RST, both directions) and resets new ones as soon as they are
accepted; ``stall()`` keeps connections open but carries nothing over them
(packets dropped, not refused: a call in flight just waits); ``restore()``
proxies again.

Measured here (emulator 1.19.9, grpcio 1.85.1, google-cloud-firestore 2.34.1):
after a 10 s cut, an ``AsyncClient`` retrying ``set(..., retry=None,
timeout=1)`` every 200 ms succeeds again 0.2-6.5 s after ``restore()``
(11 runs: 0.2, 0.4, then 4.8-6.5 s in the other nine). During the cut every
attempt fails at once with ``ServiceUnavailable``; the delay after the restore
is gRPC's reconnect backoff (1 s, x1.6 per failure, +-20 % jitter, capped at
120 s): the channel stays in TRANSIENT_FAILURE until its next scheduled
connect (about 15-16 s after the cut starts), so longer outages recover more
slowly. A *new* client to the same target does not help: it shares gRPC's
global subchannel, backoff included, and fails the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_CLOSE_DEADLINE = 5.0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with a TCP RST instead of a FIN."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() send RST.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Connection:
    """One proxied client connection and, once connected, its upstream side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)

    def close(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()


class FaultProxy:
    """An asyncio TCP proxy in front of ``upstream_host:upstream_port``.

    Build it with :meth:`start`; every connection task is owned by the proxy
    and awaited by :meth:`close`.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        # Private: use FaultProxy.start(), which opens the listening socket.
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False
        self._closed = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections_accepted = 0
        """Connections proxied (or attempted to) while not cut."""
        self.connections_refused = 0
        """Connections reset on arrival because the proxy was cut."""

    @classmethod
    async def start(
        cls, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1"
    ) -> FaultProxy:
        """Listen on a free port of ``listen_host`` and proxy to the upstream."""
        proxy = cls(upstream_host, upstream_port)
        proxy._server = await asyncio.start_server(proxy._on_client, listen_host, 0)
        return proxy

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        host: str = self._sockname()[0]
        return host

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        port: int = self._sockname()[1]
        return port

    @property
    def host_port(self) -> str:
        """``host:port`` of the proxy, e.g. for ``FIRESTORE_EMULATOR_HOST``."""
        return f"{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        """Whether connections are being reset."""
        return self._cut

    @property
    def open_connections(self) -> int:
        """Connections currently proxied."""
        return len(self._connections)

    def cut(self) -> None:
        """Reset every open connection and every new one until :meth:`restore`."""
        self._cut = True
        for connection in list(self._connections):
            connection.reset()

    def stall(self) -> None:
        """Keep every connection open but forward nothing until :meth:`restore`."""
        self._flowing.clear()

    def restore(self) -> None:
        """Accept and proxy connections again."""
        self._cut = False
        self._flowing.set()

    async def close(self) -> None:
        """Stop listening, reset every connection and await their tasks."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.reset()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=_CLOSE_DEADLINE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _sockname(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("The proxy is not listening.")
        name: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return name

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would run a coroutine in a
        # task nobody owns. The proxy creates and supervises its own task.
        if self._cut or self._closed:
            self.connections_refused += 1
            _reset(writer)
            return
        self.connections_accepted += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("fault proxy connection failed", exc_info=exc)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        connection = _Connection(client_writer)
        self._connections.add(connection)
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                logger.debug("fault proxy could not reach the upstream", exc_info=True)
                connection.reset()
                return
            connection.upstream = upstream_writer
            if self._cut or self._closed:
                connection.reset()
                return
            await asyncio.gather(
                _pipe(client_reader, upstream_writer, connection, self._flowing),
                _pipe(upstream_reader, client_writer, connection, self._flowing),
            )
            connection.close()
        except asyncio.CancelledError:
            # Only close() cancels, after its deadline: end quietly.
            connection.reset()
        finally:
            self._connections.discard(connection)


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    connection: _Connection,
    flowing: asyncio.Event,
) -> None:
    """Copy ``reader`` to ``writer`` until EOF, holding data while ``flowing``
    is clear; a reset on either side resets both."""
    try:
        while data := await reader.read(_CHUNK):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()
    except OSError:
        # ConnectionResetError, BrokenPipeError: a peer or cut() reset a side.
        connection.reset()
