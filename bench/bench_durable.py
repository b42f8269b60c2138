"""From ``ack`` to ``durable``: how long a WebSocket client keeps a message
before Firestore has it (issue 10, item 4).

    python -m bench.bench_durable [--users 20] [--messages 10] [--pause 0.5] [--json PATH]

Starts one Firestore emulator and ``samvad serve`` on it with the default
flush timing (``SAMVAD_FLUSH_LINGER_SECONDS`` 0.05, ``SAMVAD_FLUSH_INTERVAL_SECONDS``
1) and the default journal. ``--users`` WebSocket clients, one session each,
talk at once: each sends ``--messages`` messages, waiting for the ack and the
whole reply (the built-in responder, no pause between words) and then
``--pause`` seconds, like a user reading. For every user message the time from
its ``ack`` to the first ``durable`` frame covering its ``seq`` is recorded.

A message's wait depends on its user's profile document: written after the
linger when the document was not written within the last flush interval, else
at the end of that interval (that is what coalesces a burst into one write).
Besides all messages, the figures are split by whether everything before the
message was already durable when it was acknowledged (``nothing_waiting``) or
not (``behind_others``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from bench._common import ServerProcess, emit, ms, percentiles
from samvad.emulator import FirestoreEmulator


async def _user(
    url: str, index: int, messages: int, pause: float, run: str
) -> tuple[list[int], list[int]]:
    """One client: ack→durable nanoseconds of the messages acknowledged with
    everything before them durable, and of the others."""
    idle: list[int] = []
    busy: list[int] = []
    acked: dict[int, tuple[int, bool]] = {}  # seq -> (ack time, nothing was waiting)
    durable = 0
    async with websockets.connect(url, max_queue=None) as ws:
        session = f"bench-durable-{run}-{index}"
        await ws.send(json.dumps({"type": "start", "userId": session, "sessionId": session}))

        async def until(kind: str) -> dict[str, Any]:
            nonlocal durable
            while True:
                frame: dict[str, Any] = json.loads(await ws.recv())
                now = time.perf_counter_ns()
                if frame["type"] == "durable":
                    durable = max(durable, frame["seq"])
                    for seq in [s for s in acked if s <= durable]:
                        at, was_idle = acked.pop(seq)
                        (idle if was_idle else busy).append(now - at)
                if frame["type"] == kind:
                    if kind == "ack":
                        acked[frame["seq"]] = (now, not acked and durable >= frame["seq"] - 1)
                    return frame

        await until("started")
        for n in range(messages):
            await ws.send(json.dumps({"type": "message", "text": f"m{n}", "clientId": f"c{n}"}))
            await until("ack")
            await until("reply.end")
            await asyncio.sleep(pause)
        async with asyncio.timeout(30):
            while acked:
                await until("durable")
    return idle, busy


async def _run(url: str, users: int, messages: int, pause: float) -> dict[str, Any]:
    run = str(time.time_ns())
    began = time.perf_counter()
    results = await asyncio.gather(*(_user(url, i, messages, pause, run) for i in range(users)))
    elapsed = time.perf_counter() - began
    idle = [s for r in results for s in r[0]]
    busy = [s for r in results for s in r[1]]
    return {
        "users": users,
        "messages_per_user": messages,
        "pause_seconds": pause,
        "seconds": round(elapsed, 2),
        "ack_to_durable_all": ms(percentiles(idle + busy)),
        "ack_to_durable_nothing_waiting": ms(percentiles(idle)),
        "ack_to_durable_behind_others": ms(percentiles(busy)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.5)
    parser.add_argument("--json")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="samvad-bench-durable-") as tmp,
        FirestoreEmulator.start() as emulator,
        ServerProcess(
            store="firestore",
            env={
                "FIRESTORE_EMULATOR_HOST": emulator.host_port,
                "GOOGLE_CLOUD_PROJECT": f"bench-durable-{time.time_ns()}",
                "SAMVAD_DATA_DIR": str(Path(tmp) / "data"),
                "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS": "0",
                "SAMVAD_LOG_LEVEL": "WARNING",
            },
        ) as server,
    ):
        figures = asyncio.run(_run(server.ws_url, args.users, args.messages, args.pause))
    emit("durable", figures, args.json)


if __name__ == "__main__":
    main()
