"""REST throughput and latency under concurrency, load from a separate process.

    python bench/bench_rest.py [--connections 50] [--duration 20] [--generator wrk|python]
                               [--store memory|firestore] [--json PATH]

Starts ``python -m samvad serve`` (one process, one worker, memory store by
default; ``--store firestore`` with FIRESTORE_EMULATOR_HOST and
GOOGLE_CLOUD_PROJECT set uses the emulator) on a free port, saves a state for
1,000 users, then drives two closed-loop loads from another process:

* ``GET /api/session/{userId}/state`` over the 1,000 users (every one a cache hit);
* ``POST /api/session/{userId}/history`` over the same users (memory + write-behind).

The generator is ``wrk`` (Debian package ``wrk``, one thread) when installed,
else the Python generator in ``bench/_http_load.py``. Server and generator share
the machine's cores; the script reports the CPU each used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, emit, post_json
from bench._http_load import run_load
from bench._wrk import GET_STATE, POST_HISTORY, run_wrk, wrk_available

USERS = 1000
PREFIX = "bench-user-"
QUESTION = b'{"role":"user","content":"What documents do I need for a home loan?"}'


def get_state_request(n: int) -> tuple[str, str, bytes | None]:
    return "GET", f"/api/session/{PREFIX}{n % USERS}/state", None


def post_history_request(n: int) -> tuple[str, str, bytes | None]:
    return "POST", f"/api/session/{PREFIX}{n % USERS}/history", QUESTION


def seed(server: ServerProcess) -> None:
    for i in range(USERS):
        post_json(
            f"{server.url}/api/session/{PREFIX}{i}/state",
            {"language": "en", "conversationContext": {"topic": "home loans", "step": i}},
        )


def measure(
    server: ServerProcess, name: str, generator: str, connections: int, duration: float
) -> dict[str, Any]:
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    if generator == "wrk":
        script = (GET_STATE if name == "get_state" else POST_HISTORY).format(
            users=USERS, prefix=PREFIX
        )
        figures, _ = run_wrk(server.url, script, connections=connections, duration=duration)
    else:
        request_for = get_state_request if name == "get_state" else post_history_request
        figures = run_load(
            server.url, partial(request_for), connections=connections, duration=duration
        )
    wall = time.monotonic() - wall_before
    figures["server_cpu_percent"] = round(100 * (server.cpu_seconds() - cpu_before) / wall, 1)
    figures["server_rss_mib"] = round(server.rss_kib() / 1024, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--generator", choices=["wrk", "python"], default=None)
    parser.add_argument("--store", choices=["memory", "firestore"], default="memory")
    parser.add_argument("--python", help="the interpreter that runs the server")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    generator = args.generator or ("wrk" if wrk_available() else "python")
    env = {"SAMVAD_LOG_LEVEL": "WARNING"}
    if args.store == "firestore" and not os.environ.get("FIRESTORE_EMULATOR_HOST"):
        parser.error("--store firestore needs FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT")
    server = ServerProcess(store=args.store, env=env, python=args.python)
    figures: dict[str, Any] = {
        "generator": generator,
        "connections": args.connections,
        "duration_s": args.duration,
        "store": args.store,
        "server": "python -m samvad serve (1 process, 1 worker), SAMVAD_LOG_LEVEL=WARNING",
        "users": USERS,
    }
    with server:
        seed(server)
        for name in ("get_state", "post_history"):
            if args.warmup:
                measure(server, name, generator, args.connections, args.warmup)
            figures[name] = measure(server, name, generator, args.connections, args.duration)
            time.sleep(2)  # let the write-behind settle between runs
        figures["server_health_after"] = server.healthz()["persistence"]
    emit("rest", figures, args.json)


if __name__ == "__main__":
    main()
