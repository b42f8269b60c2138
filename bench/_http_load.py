"""A small closed-loop HTTP/1.1 load generator on asyncio streams (no wrk needed).

Each of ``connections`` keep-alive connections sends a request, reads the
whole response, and sends the next, for ``duration`` seconds. It is a
fallback for machines without ``wrk``: one Python process tops out at a few
thousand requests per second, so for a fast server it measures the generator
(``processes`` spreads the connections over several processes).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench._common import ms, percentiles

RequestFor = Callable[[int], tuple[str, str, bytes | None]]
"""Request number -> (method, path, body)."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    tls: bool
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        tls = parts.scheme in ("https", "wss")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        return cls(host=host, port=port, tls=tls, base_path=parts.path.rstrip("/"))


def _request_bytes(
    target: Target, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
) -> bytes:
    lines = [f"{method} {target.base_path}{path} HTTP/1.1", f"Host: {target.host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + (body or b"")


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            length = int(value)
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _connection(
    target: Target,
    request_for: RequestFor,
    headers: Mapping[str, str],
    offset: int,
    stride: int,
    until: float,
    samples: list[int],
    statuses: dict[int, int],
    errors: list[str],
) -> None:
    context = ssl.create_default_context() if target.tls else None
    clock = time.perf_counter_ns
    n = offset
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.monotonic() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, ssl=context
                )
            assert reader is not None
            method, path, body = request_for(n)
            n += stride
            started = clock()
            writer.write(_request_bytes(target, method, path, body, headers))
            status = await _read_response(reader)
            samples.append(clock() - started)
            statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


async def _run(
    url: str,
    request_for: RequestFor,
    headers: Mapping[str, str],
    connections: int,
    duration: float,
    offset: int,
    stride: int,
) -> tuple[list[int], dict[int, int], list[str], float]:
    target = Target.parse(url)
    samples: list[int] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    started = time.monotonic()
    until = started + duration
    await asyncio.gather(
        *(
            _connection(
                target,
                request_for,
                headers,
                offset + i,
                stride,
                until,
                samples,
                statuses,
                errors,
            )
            for i in range(connections)
        )
    )
    return samples, statuses, errors, time.monotonic() - started


def _worker(args: tuple[Any, ...]) -> tuple[list[int], dict[int, int], list[str], float]:
    url, request_for, headers, connections, duration, offset, stride = args
    return asyncio.run(_run(url, request_for, headers, connections, duration, offset, stride))


def run_load(
    url: str,
    request_for: RequestFor,
    *,
    connections: int,
    duration: float,
    processes: int = 1,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Closed-loop load; returns requests/s, latency percentiles (ms) and status counts."""
    headers = dict(headers or {})
    processes = max(1, min(processes, connections))
    shares = [
        connections // processes + (1 if i < connections % processes else 0)
        for i in range(processes)
    ]
    jobs = []
    offset = 0
    for share in shares:
        jobs.append((url, request_for, headers, share, duration, offset, connections))
        offset += share
    if processes == 1:
        results = [_worker(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_worker, jobs)
    samples: list[int] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    elapsed = 0.0
    for part, part_statuses, part_errors, part_elapsed in results:
        samples.extend(part)
        for status, count in part_statuses.items():
            statuses[status] = statuses.get(status, 0) + count
        errors.extend(part_errors)
        elapsed = max(elapsed, part_elapsed)
    figures = ms(percentiles(samples))
    figures["requests_per_second"] = round(len(samples) / elapsed, 1) if elapsed else 0.0
    figures["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    figures["non_2xx"] = sum(v for k, v in statuses.items() if not 200 <= k < 400)
    figures["socket_errors"] = len(errors)
    figures["generator_processes"] = processes
    return figures
