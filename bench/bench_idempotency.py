"""The price of ``Idempotency-Key`` on ``POST /api/session/{userId}/history``.

    python -m bench.bench_idempotency [--store firestore|memory] [--requests 600]
        [--connections 8] [--json PATH]

Starts ``samvad serve`` (on a Firestore emulator of its own with
``--store firestore``, journal on) and sends, over ``--connections``
keep-alive connections, ``--requests`` rounds each of three kinds of request,
interleaved in a rotating order so that the machine's drift hits all alike:

* ``plain``: no header;
* ``new key``: a fresh key (its first use: a miss, read through to the
  store, then a second document written with the message);
* ``replay``: the key of this connection's previous ``new key`` request with
  the same body (answered from memory, nothing written).

Reports the client-side latency per kind (p50/p90/p99) and the p50 ratios
against ``plain``; and the load average, since on a shared machine the
figures mean something only as ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench._common import ServerProcess, emit, ms, percentiles
from bench._http_load import Target, _read_response, _request_bytes
from samvad.emulator import FirestoreEmulator

KINDS = ("plain", "new key", "replay")


async def _connection(
    target: Target, index: int, rounds: int, samples: dict[str, list[int]], statuses: set[int]
) -> None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    user = f"bench-idem-{index}"
    last: tuple[str, bytes] | None = None
    try:
        for n in range(rounds):
            for step in range(3):
                kind = KINDS[(n + step) % 3]
                if kind == "replay" and last is None:
                    continue
                headers: dict[str, str] = {}
                body = json.dumps({"role": "user", "content": f"message {n} {step}"}).encode()
                if kind == "new key":
                    key = uuid.uuid4().hex
                    headers["Idempotency-Key"] = key
                    last = (key, body)
                elif kind == "replay":
                    assert last is not None
                    headers["Idempotency-Key"], body = last
                started = time.perf_counter_ns()
                writer.write(
                    _request_bytes(target, "POST", f"/api/session/{user}/history", body, headers)
                )
                statuses.add(await _read_response(reader))
                samples[kind].append(time.perf_counter_ns() - started)
    finally:
        writer.close()


async def _run(url: str, connections: int, rounds: int) -> dict[str, Any]:
    target = Target.parse(url)
    samples: dict[str, list[int]] = {kind: [] for kind in KINDS}
    statuses: set[int] = set()
    await asyncio.gather(
        *(_connection(target, i, rounds, samples, statuses) for i in range(connections))
    )
    figures: dict[str, Any] = {kind: ms(percentiles(samples[kind])) for kind in KINDS}
    plain = figures["plain"]["p50_ms"]
    figures["p50_ratio_to_plain"] = {
        kind: round(figures[kind]["p50_ms"] / plain, 3) for kind in KINDS if plain
    }
    figures["statuses"] = sorted(statuses)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=("firestore", "memory"), default="firestore")
    parser.add_argument("--requests", type=int, default=600, help="rounds per connection")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="samvad-bench-idem-")))
        env = {"SAMVAD_LOG_LEVEL": "WARNING", "SAMVAD_DATA_DIR": str(tmp / "data")}
        if args.store == "firestore":
            emulator = stack.enter_context(FirestoreEmulator.start())
            env["FIRESTORE_EMULATOR_HOST"] = emulator.host_port
            env["GOOGLE_CLOUD_PROJECT"] = f"bench-idem-{time.time_ns()}"
        server = stack.enter_context(ServerProcess(store=args.store, env=env))
        load_before = os.getloadavg()
        figures = asyncio.run(_run(server.url, args.connections, args.requests))
        load_after = os.getloadavg()
    emit(
        "idempotency",
        {
            "store": args.store,
            "connections": args.connections,
            "rounds_per_connection": args.requests,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            **figures,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
