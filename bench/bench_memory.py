"""Memory per cached user, in a server and in-process, next to a bare baseline.

    .venv/bin/python bench/bench_memory.py --json bench/results/memory.json
    .venv/bin/python bench/bench_memory.py --only inprocess --users 20000 --top 15

``server``: ``python -m samvad serve --store memory`` and the bare Starlette app
of ``bench_overhead.py`` (``python -m bench._bare serve``) run side by side;
each gets ``--users`` users loaded in ``--steps`` equal steps, alternately
(A B A B ...), each user through two requests: ``POST .../state`` with a tiny
state and ``POST .../history`` with one message of about 200 bytes (the bare
app, which has no state route, gets the history request twice). After each
step the write-behind is given ``--settle`` seconds and the resident memory
(VmRSS) of both processes is read; the figure is the RSS growth per user
between the first and the last step (the first step grows the allocator's
arenas and the servers' tables for both).

``inprocess``: :class:`samvad.persistence.Persistence` over the memory store in
this process (no HTTP): ``--users`` users each get the same state and message,
the write-behind is flushed, and ``tracemalloc`` gives the bytes held per user
and the lines that allocated them (``--top``). ``--cache-max-bytes`` sets
``SAMVAD_CACHE_MAX_BYTES``'s setting, to see the bound hold.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, emit, rss_kib
from bench._http_load import Target, _read_response, _request_bytes

CONTENT = ("Could you tell me which documents I need for a home loan application? " * 3)[:200]
STATE = b'{"language":"en","step":1}'
HISTORY = ('{"role":"user","content":"' + CONTENT + '"}').encode()
CONNECTIONS = 8


async def _load_users(url: str, prefix: str, first: int, count: int, bare: bool) -> int:
    target = Target.parse(url)
    todo = iter(range(first, first + count))
    failures = 0

    async def connection() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            for i in todo:
                user = f"{prefix}{i}"
                requests = [
                    ("POST", f"/api/session/{user}/state", STATE),
                    ("POST", f"/api/session/{user}/history", HISTORY),
                ]
                if bare:
                    requests[0] = requests[1]
                for method, path, body in requests:
                    writer.write(_request_bytes(target, method, path, body, {}))
                    status = await _read_response(reader)
                    if status >= 300:
                        failures += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return failures


def server_run(args: argparse.Namespace) -> dict[str, Any]:
    env = {"SAMVAD_LOG_LEVEL": "WARNING"}
    if args.store == "firestore":
        # A journal of its own for this run (on by default with a durable store).
        env.setdefault("SAMVAD_DATA_DIR", tempfile.mkdtemp(prefix="samvad-bench-memory-"))
    if args.cache_max_bytes is not None:
        env["SAMVAD_CACHE_MAX_BYTES"] = str(args.cache_max_bytes)
    servers = {
        "samvad": ServerProcess(store=args.store, env=env, python=args.python),
        "bare": ServerProcess(module="bench._bare", env={}, python=args.python),
    }
    for server in servers.values():
        server.start()
    try:
        per_step = args.users // args.steps
        rss: dict[str, list[int]] = {name: [server.rss_kib()] for name, server in servers.items()}
        failures = {name: 0 for name in servers}
        pending: list[int] = []
        for step in range(args.steps):
            for name, server in servers.items():
                failures[name] += asyncio.run(
                    _load_users(server.url, "m-", step * per_step, per_step, name == "bare")
                )
            time.sleep(args.settle)
            for name, server in servers.items():
                rss[name].append(server.rss_kib())
            pending.append(servers["samvad"].healthz()["persistence"]["pendingWrites"])
            print(f"step {step + 1}: rss {rss}, pending {pending}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    users_measured = per_step * (args.steps - 1)
    out: dict[str, Any] = {
        "users": per_step * args.steps,
        "rss_kib_by_step": rss,
        "failures": failures,
        "pending_writes_by_step": pending,
    }
    for name, series in rss.items():
        out[f"{name}_kib_per_user"] = round((series[-1] - series[1]) / users_measured, 3)
        out[f"{name}_rss_mib_end"] = round(series[-1] / 1024, 1)
    out["samvad_minus_bare_kib_per_user"] = round(
        out["samvad_kib_per_user"] - out["bare_kib_per_user"], 3
    )
    return out


async def _inprocess(args: argparse.Namespace) -> dict[str, Any]:
    from samvad.config import Settings
    from samvad.models import Role
    from samvad.persistence import Persistence
    from samvad.stores.factory import build_store
    from samvad.stores.memory import MemoryStore

    overrides: dict[str, Any] = {}
    if args.cache_max_bytes is not None:
        overrides["cache_max_bytes"] = args.cache_max_bytes
    if args.store == "firestore":
        import os

        overrides.update(
            store="firestore",
            emulator_host=os.environ["FIRESTORE_EMULATOR_HOST"],
            project=os.environ["GOOGLE_CLOUD_PROJECT"],
            journal=True,
            data_dir=Path(tempfile.mkdtemp(prefix="samvad-bench-memory-")),
        )
    settings = Settings(**overrides)
    store = build_store(settings) if args.store == "firestore" else MemoryStore()
    async with store, Persistence(store, settings=settings) as persistence:
        # Warm every code path once, so its one-off allocations are not counted.
        for i in range(100):
            persistence.save_state(f"w-{i}", {"language": "en", "step": 1})
            persistence.append_message(f"w-{i}", role=Role.USER, content=CONTENT)
        await persistence.settle()
        await persistence.writes.flush()
        gc.collect()
        rss_before = rss_kib_self()
        tracing = args.top > 0
        if tracing:
            tracemalloc.start(3)
            before = tracemalloc.take_snapshot()
        for i in range(args.users):
            user = f"m-{i}"
            persistence.save_state(user, {"language": "en", "step": 1})
            persistence.append_message(user, role=Role.USER, content=CONTENT)
            if i % 1000 == 999:
                await persistence.settle()
                await persistence.writes.flush()
        await persistence.settle()
        await persistence.writes.flush()
        gc.collect()
        traced = 0
        top: list[dict[str, Any]] = []
        if tracing:
            after = tracemalloc.take_snapshot()
            traced = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
            top = [
                {
                    "where": str(stat.traceback[0]),
                    "bytes_per_user": round(stat.size_diff / args.users, 1),
                    "blocks_per_user": round(stat.count_diff / args.users, 2),
                }
                for stat in after.compare_to(before, "lineno")[: args.top]
            ]
            tracemalloc.stop()
        rss_after = rss_kib_self()
        stats = persistence.cache_stats()
    return {
        "users": args.users,
        "traced_bytes_per_user": round(traced / args.users, 1),
        "store": args.store,
        "rss_kib_per_user": round((rss_after - rss_before) / args.users, 3),
        "cache_entries": {name: s.entries for name, s in stats.items()},
        "top": top,
    }


def rss_kib_self() -> int:
    import os

    return rss_kib(os.getpid())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", action="append", choices=("server", "inprocess"))
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--cache-max-bytes", type=int, default=None)
    parser.add_argument(
        "--store",
        choices=("memory", "firestore"),
        default="memory",
        help="the server's store (firestore: set FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT)",
    )
    parser.add_argument("--python", default=None, help="interpreter for the servers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    only = args.only or ["inprocess", "server"]
    figures: dict[str, Any] = {}
    if "inprocess" in only:
        figures["inprocess"] = asyncio.run(_inprocess(args))
        print(figures["inprocess"], file=sys.stderr)
    if "server" in only:
        figures["server"] = server_run(args)
    emit("memory", figures, args.json)


if __name__ == "__main__":
    main()
