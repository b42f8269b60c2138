"""Message-to-ack latency over a real WebSocket.

    python bench/bench_ws_ack.py [--messages N] [--clients N] [--json PATH]

Starts a Samvad server (memory store, built-in responder without delay, rate
limit lifted) in a child process on a free port, connects ``--clients``
``samvad.client`` connections and has each send ``--messages`` messages one
after the other. A sample is the time from sending a ``message`` frame to
receiving its ``ack``; each reply is read to its end before the next message
(a message sent mid-reply would cut it). Clients run concurrently, so with
more than one the figures include queueing behind the other clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import emit, percentiles  # noqa: E402
from samvad.client import SamvadClient  # noqa: E402

SERVER = """
import uvicorn
from samvad.web.app import create_app
from samvad.config import Settings
settings = Settings(
    store="memory",
    ws_reply_chunk_delay=0.0,
    ws_rate_per_second=1e6,
    ws_rate_burst=1_000_000,
    ws_send_queue=4096,
)
uvicorn.run(create_app(settings), host="127.0.0.1", port={port}, ws="auto",
            log_level="warning", lifespan="on")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the server exited during start-up") from None
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("the server did not start within 30 s")


async def one_client(url: str, index: int, messages: int, samples: list[int]) -> None:
    clock = time.perf_counter_ns
    async with await SamvadClient.connect(url, user_id=f"bench-{index}", heartbeat=None) as client:
        for i in range(messages + 20):
            started = clock()
            await client.message(f"How do I apply for loan number {i}?")
            await client.wait_for("ack")
            elapsed = clock() - started
            if i >= 20:  # warm-up
                samples.append(elapsed)
            await client.wait_for("reply.end")


async def run(port: int, messages: int, clients: int) -> dict[str, object]:
    url = f"ws://127.0.0.1:{port}/ws"
    samples: list[int] = []
    began = time.perf_counter()
    await asyncio.gather(*(one_client(url, i, messages, samples) for i in range(clients)))
    elapsed = time.perf_counter() - began
    return {
        "messages_per_client": messages,
        "clients": clients,
        "message_to_ack": percentiles(samples),
        "exchanges_per_second": round(len(samples) / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        figures = asyncio.run(run(port, args.messages, args.clients))
    finally:
        server.terminate()
        server.wait(timeout=30)
    emit("ws_ack", figures, args.json)


if __name__ == "__main__":
    main()
