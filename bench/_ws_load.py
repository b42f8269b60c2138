"""A WebSocket load generator for Samvad's ``/ws`` protocol, spread over processes.

Each worker process opens its share of the connections (``start`` then
``started``), reports that it is connected, waits for the go signal, and then
sends user messages at its share of the total rate, round robin over its
connections, for the given duration. A sample is the time from sending a
``message`` frame to receiving its ``ack`` on that connection. Replies are
read (every frame is received) but only ``ack``, ``reply.end``,
``interrupted`` and ``error`` frames are parsed, to keep the generator cheap.

Used by ``bench/bench_ws_load.py``, ``bench/bench_outage.py`` and
``scripts/loadtest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench._common import raise_open_files
from samvad.server import YoungCollections

QUESTION = "What documents do I need for a home loan?"


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """What one load run does (shared by every worker)."""

    url: str
    connections: int
    rate: float  # messages per second, in total
    duration: float  # seconds of sending after the go signal
    processes: int = 1
    user_prefix: str = "load"
    token: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    text: str = QUESTION
    connect_concurrency: int = 100
    ack_timeout: float = 10.0
    drain: float = 5.0  # seconds to wait for the last acks and replies
    collect_acks: bool = False  # keep (userId, sessionId, seq, messageId) of every ack
    heartbeat: float = 20.0
    open_timeout: float = 30.0


@dataclass(slots=True)
class _Conn:
    ws: ClientConnection
    user_id: str
    session_id: str = ""
    pending: dict[str, int] = field(default_factory=dict)  # clientId -> send time (ns)
    last_sent: float = 0.0


@dataclass(slots=True)
class WorkerResult:
    """What one worker measured (plain data: it crosses a process boundary)."""

    index: int
    connected: int = 0
    connect_failures: int = 0
    sent: int = 0
    acked: int = 0
    #: (seconds since the go signal at sending, message-to-ack in ns)
    samples: list[tuple[float, int]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    replies_complete: int = 0
    replies_incomplete: int = 0
    interrupted: int = 0
    frames: int = 0
    unacked: int = 0
    acks: list[tuple[str, str, int, str]] = field(default_factory=list)
    #: send time (seconds since go) of messages that never got an ack
    unacked_at: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


class _Worker:
    def __init__(self, config: LoadConfig, index: int, count: int) -> None:
        self.config = config
        self.index = index
        self.count = count
        self.result = WorkerResult(index=index)
        self.conns: list[_Conn] = []
        self.go_at_ns = 0
        self.go_at = 0.0
        self.readers: list[asyncio.Task[None]] = []

    def _headers(self) -> dict[str, str]:
        return dict(self.config.headers)

    async def _open(self, number: int, gate: asyncio.Semaphore) -> None:
        config = self.config
        user_id = f"{config.user_prefix}-{number}"
        async with gate:
            try:
                async with asyncio.timeout(config.open_timeout):
                    ws = await connect(
                        config.url,
                        additional_headers=self._headers() or None,
                        max_size=2**22,
                        ping_interval=None,
                        compression=None,
                    )
                    start: dict[str, Any] = {"type": "start", "userId": user_id, "historyLimit": 0}
                    if config.token:
                        start["token"] = config.token
                    await ws.send(json.dumps(start))
                    while True:
                        frame = json.loads(await ws.recv())
                        if frame.get("type") == "started":
                            break
                        if frame.get("type") == "error":
                            raise RuntimeError(f"start refused: {frame.get('code')}")
            except Exception as exc:
                self.result.connect_failures += 1
                self.result.errors[f"connect:{type(exc).__name__}"] += 1
                return
        conn = _Conn(ws=ws, user_id=user_id, session_id=frame["sessionId"])
        self.conns.append(conn)
        self.readers.append(asyncio.create_task(self._read(conn)))

    async def _read(self, conn: _Conn) -> None:
        result = self.result
        clock = time.perf_counter_ns
        try:
            async for data in conn.ws:
                result.frames += 1
                if not isinstance(data, str):
                    continue
                # The server writes "type" first: most frames (reply chunks)
                # need no parsing at all.
                if data.startswith('{"type":"ack"'):
                    now = clock()
                    frame = json.loads(data)
                    sent = conn.pending.pop(frame.get("clientId") or "", None)
                    if sent is not None:
                        result.acked += 1
                        result.samples.append(((sent - self.go_at_ns) / 1e9, now - sent))
                        if self.config.collect_acks:
                            result.acks.append(
                                (conn.user_id, conn.session_id, frame["seq"], frame["messageId"])
                            )
                elif data.startswith('{"type":"reply.end"'):
                    frame = json.loads(data)
                    if frame.get("complete"):
                        result.replies_complete += 1
                    else:
                        result.replies_incomplete += 1
                elif data.startswith('{"type":"interrupted"'):
                    result.interrupted += 1
                elif data.startswith('{"type":"error"'):
                    frame = json.loads(data)
                    result.errors[str(frame.get("code"))] += 1
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else "none"
            result.closes[str(code)] += 1
            return
        except Exception as exc:
            result.errors[f"read:{type(exc).__name__}"] += 1
            return
        close_code = conn.ws.close_code
        if close_code is not None and close_code != 1000:
            result.closes[str(close_code)] += 1

    async def connect_all(self) -> None:
        config = self.config
        numbers = range(self.index, config.connections, self.count)
        gate = asyncio.Semaphore(max(1, config.connect_concurrency // self.count))
        await asyncio.gather(*(self._open(n, gate) for n in numbers))
        self.result.connected = len(self.conns)

    async def heartbeat(self, stop: asyncio.Event) -> None:
        interval = self.config.heartbeat
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval / 2):
                    await stop.wait()
            now = time.monotonic()
            for conn in list(self.conns):
                if now - conn.last_sent > interval:
                    conn.last_sent = now
                    with contextlib.suppress(Exception):
                        await conn.ws.send('{"type":"ping"}')

    async def send_load(self) -> None:
        config = self.config
        conns = self.conns
        if not conns:
            return
        rate = config.rate / self.count
        interval = 1.0 / rate if rate > 0 else config.duration
        total = int(config.duration * rate)
        result = self.result
        clock = time.perf_counter_ns
        started = time.monotonic()
        # Stagger the workers so their sends interleave instead of coinciding.
        offset = interval * self.index / self.count
        for i in range(total):
            target = started + offset + i * interval
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            conn = conns[i % len(conns)]
            client_id = f"{self.index}-{i}"
            frame = (
                '{"type":"message","text":'
                + json.dumps(config.text)
                + ',"clientId":"'
                + client_id
                + '"}'
            )
            conn.pending[client_id] = clock()
            conn.last_sent = time.monotonic()
            try:
                await conn.ws.send(frame)
                result.sent += 1
            except ConnectionClosed:
                conn.pending.pop(client_id, None)
                result.errors["send:closed"] += 1

    async def finish(self) -> None:
        deadline = time.monotonic() + self.config.ack_timeout
        # Polled: acks arrive on many reader tasks; nothing to gain from an event.
        while time.monotonic() < deadline and any(c.pending for c in self.conns):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.config.drain)
        for conn in self.conns:
            for sent in conn.pending.values():
                self.result.unacked += 1
                self.result.unacked_at.append((sent - self.go_at_ns) / 1e9)
            conn.pending.clear()
        await asyncio.gather(*(c.ws.close() for c in self.conns), return_exceptions=True)
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


async def _worker_main(
    config: LoadConfig, index: int, count: int, connected: Any, go: Event
) -> WorkerResult:
    worker = _Worker(config, index, count)
    await worker.connect_all()
    connected.put((index, worker.result.connected, worker.result.connect_failures))
    stop = asyncio.Event()
    beat = asyncio.create_task(worker.heartbeat(stop))
    # The generator's own collector as the server's: the connections made so
    # far frozen, the young generations collected on a schedule; otherwise its
    # pauses (up to 30 ms and more at 1,000 messages/s) are counted as the
    # server's latency.
    gc.collect()
    gc.freeze()
    young = YoungCollections(asyncio.get_running_loop())
    young.start()
    await asyncio.to_thread(go.wait)
    worker.go_at_ns = time.perf_counter_ns()
    await worker.send_load()
    await worker.finish()
    young.stop()
    stop.set()
    beat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beat
    worker.result.cpu_seconds = round(sum(os.times()[:2]), 2)
    return worker.result


def _process(
    config: LoadConfig, index: int, count: int, connected: Any, go: Event, results: Any
) -> None:
    raise_open_files(config.connections + 1000)
    try:
        result = asyncio.run(_worker_main(config, index, count, connected, go))
    except BaseException as exc:  # report, so the parent never waits forever
        result = WorkerResult(index=index)
        result.errors[f"worker:{type(exc).__name__}:{exc}"[:200]] += 1
        connected.put((index, 0, 0))
    results.put(result)


class LoadRun:
    """Worker processes driving one load; the caller controls the phases.

    ``start()`` forks the workers and returns once every connection is open;
    ``go()`` starts the sending; ``results()`` waits for the workers' figures.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        context = multiprocessing.get_context("fork")
        self._connected = context.Queue()
        self._results = context.Queue()
        self._go = context.Event()
        count = max(1, min(config.processes, config.connections))
        self._processes = [
            context.Process(
                target=_process,
                args=(config, i, count, self._connected, self._go, self._results),
                daemon=True,
            )
            for i in range(count)
        ]
        self.connected = 0
        self.connect_failures = 0
        self.go_at = 0.0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def start(self, timeout: float = 600.0) -> None:
        for process in self._processes:
            process.start()
        for _ in self._processes:
            _, ok, failed = self._connected.get(timeout=timeout)
            self.connected += ok
            self.connect_failures += failed

    def go(self) -> None:
        self.go_at = time.time()
        self._go.set()

    def results(self, timeout: float | None = None) -> list[WorkerResult]:
        timeout = timeout or self.config.duration + self.config.ack_timeout + 120
        found: list[WorkerResult] = []
        deadline = time.monotonic() + timeout
        while len(found) < len(self._processes):
            try:
                found.append(self._results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        return sorted(found, key=lambda r: r.index)


def merge_results(results: list[WorkerResult]) -> WorkerResult:
    merged = WorkerResult(index=-1)
    for part in results:
        merged.connected += part.connected
        merged.connect_failures += part.connect_failures
        merged.sent += part.sent
        merged.acked += part.acked
        merged.samples.extend(part.samples)
        merged.errors.update(part.errors)
        merged.closes.update(part.closes)
        merged.replies_complete += part.replies_complete
        merged.replies_incomplete += part.replies_incomplete
        merged.interrupted += part.interrupted
        merged.frames += part.frames
        merged.unacked += part.unacked
        merged.acks.extend(part.acks)
        merged.unacked_at.extend(part.unacked_at)
        merged.cpu_seconds += part.cpu_seconds
    merged.samples.sort()
    return merged
