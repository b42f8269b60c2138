"""A lean closed-loop WebSocket client in its own process, for CPU-per-message figures.

Each connection is an ``asyncio.Protocol`` (on uvloop when installed) that
speaks just enough RFC 6455: the upgrade, masked text frames (a zero masking
key, so masking costs nothing; servers do not check the key), unmasked server
frames, pong for ping. In a run every connection sends a message, waits for
the frame that ends the exchange (``{"type":"reply.end"`` for Samvad, any
frame for an echo) and sends the next one straight from ``data_received``:
no task, no parsing of JSON, so a client exchange costs a few microseconds
and the server, not the generator, is what saturates.

The parent drives it through :class:`WsClientProcess`: ``connect`` a named
group of connections (optionally with a ``start`` frame that must be answered
by ``started``), ``run`` a group for some seconds, ``close`` a group.

``pace`` is the open-loop counterpart: messages at a fixed rate in total,
round robin over a group's connections, whatever the replies are doing, and
message → ``ack`` timed per message (the ``clientId`` each message carries
comes back in its ``ack``). Every other frame is only counted, so the
generator stays far below the server's CPU while a thousand replies stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast
from urllib.parse import urlsplit

from bench._common import raise_open_files

_KEY = base64.b64encode(b"samvad-bench-key").decode()


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame: FIN, ``opcode``, masked with a zero key."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


@dataclass(frozen=True, slots=True)
class Exchange:
    """What a connection sends and what ends one exchange."""

    message: bytes
    #: the frame that completes an exchange starts with this (None: any frame)
    end_prefix: bytes | None
    #: sent once after the upgrade, ``{i}`` replaced by the connection's number in
    #: its group; None: send one ``message`` and await the end of its exchange
    hello: bytes | None = None
    #: the frame answering ``hello`` starts with this
    hello_reply: bytes = b'{"type":"started"'


class _Conn(asyncio.Protocol):
    def __init__(self, group: _Group, host: str, path: str, number: int) -> None:
        self.group = group
        self.number = number
        self.host = host
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed during the handshake"))
        if self.in_flight:
            self.in_flight = False
            self.group.finished_one()

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame(payload))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in buf[: buf.find(b"\r\n")]:
                self.ready.set_exception(ConnectionError(bytes(buf[:end]).decode("latin-1")))
                assert self.transport is not None
                self.transport.close()
                return
            del buf[: end + 4]
            self.upgraded = True
            exchange = self.group.exchange
            if exchange.hello is not None:
                self.send(exchange.hello.replace(b"{i}", str(self.number).encode()))
            else:
                self.send(exchange.message)
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            offset = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = int.from_bytes(buf[2:4], "big")
                offset = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = int.from_bytes(buf[2:10], "big")
                offset = 10
            if len(buf) < offset + n:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[offset : offset + n])
            del buf[: offset + n]
            self.on_frame(opcode, payload)

    def on_frame(self, opcode: int, payload: bytes) -> None:
        group = self.group
        if opcode == 0x9:  # ping
            assert self.transport is not None
            self.transport.write(frame(payload, 0xA))
            return
        if opcode == 0x8:  # close
            group.closes += 1
            assert self.transport is not None
            self.transport.close()
            return
        if opcode != 0x1:
            return
        group.frames += 1
        if group.pacing is not None:
            if payload.startswith(b'{"type":"ack"'):
                group.pacing.acked(payload)
                return
            if payload.startswith(b'{"type":"interrupted"'):
                group.pacing.interrupted += 1
        if payload.startswith(b'{"type":"error"'):
            group.errors += 1
        if not self.ready.done():
            exchange = group.exchange
            if exchange.hello is not None:
                if payload.startswith(exchange.hello_reply):
                    self.ready.set_result(None)
                elif payload.startswith(b'{"type":"error"'):
                    self.ready.set_exception(ConnectionError(payload.decode()))
            elif exchange.end_prefix is None or payload.startswith(exchange.end_prefix):
                self.ready.set_result(None)
            return
        end = group.exchange.end_prefix
        if self.in_flight and (end is None or payload.startswith(end)):
            group.completed += 1
            if group.running:
                self.send(group.exchange.message)
            else:
                self.in_flight = False
                group.finished_one()

    def start_exchange(self) -> None:
        if not self.closed:
            self.in_flight = True
            self.send(self.group.exchange.message)


class _Group:
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.conns: list[_Conn] = []
        self.opened = 0
        self.running = False
        self.completed = 0
        self.frames = 0
        self.errors = 0
        self.closes = 0
        self.in_flight = 0
        self.drained: asyncio.Event = asyncio.Event()
        self.pacing: _Pacing | None = None

    def finished_one(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.drained.set()


_CLIENT_ID = re.compile(rb'"clientId":"([^"]+)"')


class _Pacing:
    """Send times of the messages not yet acknowledged, and the latencies."""

    def __init__(self) -> None:
        self.sent: dict[bytes, int] = {}
        self.latencies_ns: list[int] = []
        self.unknown_acks = 0
        self.interrupted = 0

    def acked(self, payload: bytes) -> None:
        now = time.perf_counter_ns()
        found = _CLIENT_ID.search(payload)
        sent = self.sent.pop(found.group(1), None) if found else None
        if sent is None:
            self.unknown_acks += 1
        else:
            self.latencies_ns.append(now - sent)


class _Client:
    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}

    async def connect(
        self, name: str, url: str, count: int, exchange: Exchange, concurrency: int = 50
    ) -> dict[str, Any]:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        group = self.groups.setdefault(name, _Group(exchange))
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        failures: list[str] = []

        first = group.opened
        group.opened += count

        async def one(number: int) -> None:
            async with gate:
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(group, f"{host}:{port}", parts.path or "/", number),
                        host,
                        port,
                    )
                    await asyncio.wait_for(conn.ready, 30)
                    group.conns.append(conn)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])

        await asyncio.gather(*(one(first + i) for i in range(count)))
        return {"connected": len(group.conns), "failures": len(failures), "first": failures[:3]}

    async def run(self, name: str, seconds: float, poll: bool = False) -> dict[str, Any]:
        """Closed loop for ``seconds``; with ``poll`` the loop never sleeps (see
        :meth:`WsClientProcess.run`)."""
        group = self.groups[name]
        group.completed = group.frames = group.errors = 0
        group.drained = asyncio.Event()
        live = [c for c in group.conns if not c.closed]
        group.in_flight = len(live)
        group.running = True
        started = time.perf_counter()
        cpu = sum(os.times()[:2])
        for conn in live:
            conn.start_exchange()
        if poll:
            # A ready callback always waiting: the loop polls its sockets
            # without blocking.
            until = started + seconds
            while time.perf_counter() < until:  # noqa: ASYNC110 (a poll, not a wait)
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(seconds)
        group.running = False
        sending = time.perf_counter() - started
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(group.drained.wait(), 10)
        return {
            "completed": group.completed,
            "frames": group.frames,
            "errors": group.errors,
            "closes": group.closes,
            "sending_s": round(sending, 3),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "not_drained": group.in_flight,
            "client_cpu_s": round(sum(os.times()[:2]) - cpu, 3),
        }

    async def pace(
        self, name: str, rate: float, seconds: float, text: str, drain: float = 10.0
    ) -> dict[str, Any]:
        """``rate`` messages a second in total for ``seconds``, round robin
        over the group's connections; then up to ``drain`` seconds for the
        last acks. The latencies (ns, in the order the acks came) and the counts."""
        group = self.groups[name]
        live = [c for c in group.conns if not c.closed]
        pacing = group.pacing = _Pacing()
        group.frames = group.errors = 0
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        total = int(rate * seconds)
        cpu = sum(os.times()[:2])
        began = loop.time()
        sent = 0
        while sent < total:
            # Every message due by now goes out (the loop may wake late).
            due = min(total, int((loop.time() - began) / interval) + 1)
            while sent < due:
                conn = live[sent % len(live)]
                client_id = b"m%d" % sent
                payload = (
                    b'{"type":"message","text":'
                    + text.encode()
                    + b',"clientId":"'
                    + client_id
                    + b'"}'
                )
                pacing.sent[client_id] = time.perf_counter_ns()
                if not conn.closed:
                    conn.send(payload)
                sent += 1
            # At least a millisecond: the loop's timers count whole ones, and a
            # shorter sleep spins. Messages due meanwhile go out together.
            await asyncio.sleep(max(0.001, began + sent * interval - loop.time()))
        sending = loop.time() - began
        deadline = loop.time() + drain
        while pacing.sent and loop.time() < deadline:  # noqa: ASYNC110 (acks come on protocols)
            await asyncio.sleep(0.05)
        group.pacing = None
        return {
            "sent": sent,
            "acked": len(pacing.latencies_ns),
            "unacked": len(pacing.sent),
            "unknown_acks": pacing.unknown_acks,
            "latencies_ns": pacing.latencies_ns,
            "interrupted": pacing.interrupted,
            "frames": group.frames,
            "errors": group.errors,
            "closes": group.closes,
            "sending_s": round(sending, 3),
            "client_cpu_s": round(sum(os.times()[:2]) - cpu, 3),
        }

    async def close(self, name: str) -> dict[str, Any]:
        group = self.groups.pop(name)
        for conn in group.conns:
            if conn.transport is not None and not conn.closed:
                conn.transport.write(frame(b"\x03\xe8", 0x8))
                conn.transport.close()
        await asyncio.sleep(0.2)
        return {"closed": len(group.conns)}


async def _serve(pipe: Connection) -> None:
    client = _Client()
    loop = asyncio.get_running_loop()
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "exit":
            for name in list(client.groups):
                await client.close(name)
            pipe.send({})
            return
        try:
            result = await getattr(client, command)(*args)
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        pipe.send(result)


def _main(pipe: Connection, cpus: set[int] | None, open_files: int) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_open_files(open_files)
    try:
        import uvloop

        uvloop.run(_serve(pipe))
    except ImportError:
        asyncio.run(_serve(pipe))


class WsClientProcess:
    """The client above in a child process (pinned to ``cpus`` when given)."""

    def __init__(self, *, cpus: Iterable[int] | None = None, open_files: int = 20_000) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_main, args=(child, set(cpus) if cpus else None, open_files), daemon=True
        )
        self._process.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _call(self, command: str, *args: Any) -> dict[str, Any]:
        self._pipe.send((command, args))
        result: dict[str, Any] = self._pipe.recv()
        if "failed" in result:
            raise RuntimeError(f"WebSocket client {command}: {result['failed']}")
        return result

    def connect(self, name: str, url: str, count: int, exchange: Exchange) -> dict[str, Any]:
        return self._call("connect", name, url, count, exchange)

    def run(self, name: str, seconds: float, *, poll: bool = False) -> dict[str, Any]:
        """Closed loop over group ``name`` for ``seconds``.

        ``poll``: the client's loop polls instead of sleeping in ``epoll_wait``
        between frames (its CPU runs at 100 %). A server that is the slower
        side otherwise finds the client asleep at most of its writes, and each
        such write wakes it: on these VMs that wake-up (``sock_def_readable``
        → ``try_to_wake_up`` → an inter-processor interrupt, in the writer's
        system time) cost about 17 µs per Samvad exchange, which a bare echo,
        whose client is the slower side and hardly ever asleep, does not pay
        (docs/benchmarks.md, section 27). Polling puts both servers on the same
        footing: neither pays to wake the load generator.
        """
        return self._call("run", name, seconds, poll)

    def close(self, name: str) -> dict[str, Any]:
        return self._call("close", name)

    def pace(self, name: str, rate: float, seconds: float, text: str) -> dict[str, Any]:
        """Open loop: see :meth:`_Client.pace` (``text`` is a JSON string literal)."""
        return self._call("pace", name, rate, seconds, text)

    def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(Exception):
                self._call("exit")
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
