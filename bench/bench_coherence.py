"""Several instances on one Firestore: staleness, the cost of coherence, workers.

    python bench/bench_coherence.py staleness [--samples 200]
    python bench/bench_coherence.py cost [--users 1000 --users 10000]
                                         [--writes-per-user-hour 60] [--duration 60]
    python bench/bench_coherence.py workers [--connections 200] [--rate 200] [--duration 20]
    python bench/bench_coherence.py ratelimit [--samples 200]

Every mode runs real ``samvad serve`` processes on the Firestore emulator
(``FIRESTORE_EMULATOR_HOST``, or one started here), a fresh project each.

* ``staleness`` — two instances A and B. B reads a user's state and history
  (so it caches them); A writes; B is polled every 2 ms until it serves the
  new value. A sample is the time from just before A's request to B's first
  answer with the value: cross-instance staleness, A's own request included.
* ``cost`` — two instances. B caches ``--users`` users (their states read
  once), A writes their states at ``--writes-per-user-hour`` each, spread
  evenly, for ``--duration`` seconds. Firestore reads added by coherence are
  the feed documents B's listener receives (one billed read each: a listener
  is charged per document added to its results); there are no re-reads (a
  write is applied from the feed, not read again). Reported per hour and per
  cached user-hour, with the feed writes and deletes A added.
* ``workers`` — ``--workers 1`` and ``--workers 2`` against the same
  WebSocket load (word-by-word replies), one run each, interleaved:
  throughput and message → ack percentiles (``bench/_ws_load.py``).
* ``ratelimit`` — what a rate limit shared through Firestore would cost: one
  transaction (read + write) on a per-user document per limited request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, emit, ms, percentiles, raise_open_files
from bench._ws_load import LoadConfig, LoadRun
from bench.bench_ws_load import summarize


@contextmanager
def emulator() -> Iterator[str]:
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        yield existing
        return
    from samvad.emulator import FirestoreEmulator

    log = Path(tempfile.mkdtemp(prefix="samvad-bench-emulator-")) / "emulator.log"
    with FirestoreEmulator.start(log_path=log) as running:
        yield running.host_port


def instances(host: str, count: int, **env: str) -> list[ServerProcess]:
    project = "bench-coherence-" + uuid.uuid4().hex[:8]
    base = {
        "FIRESTORE_EMULATOR_HOST": host,
        "GOOGLE_CLOUD_PROJECT": project,
        "SAMVAD_LOG_LEVEL": "WARNING",
        **env,
    }
    return [ServerProcess(store="firestore", env=base) for _ in range(count)]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- staleness -----------------------------------------------------------------------------


async def _staleness(a: str, b: str, samples: int) -> dict[str, Any]:
    users = [f"stale-{i}" for i in range(20)]
    state_ns: list[int] = []
    history_ns: list[int] = []
    async with httpx.AsyncClient(timeout=10) as http:
        for user in users:  # B caches every user
            (await http.post(f"{a}/api/session/{user}/state", json={"v": -1})).raise_for_status()
            first = {"role": "user", "content": "0"}
            (await http.post(f"{a}/api/session/{user}/history", json=first)).raise_for_status()
        for user in users:
            # Polling the other instance is the measurement.
            while (await http.get(f"{b}/api/session/{user}/profile")).status_code != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            while (await http.get(f"{b}/api/session/{user}/state")).status_code != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        lengths = dict.fromkeys(users, 1)
        for i in range(samples):
            user = users[i % len(users)]
            began = time.perf_counter_ns()
            (await http.post(f"{a}/api/session/{user}/state", json={"v": i})).raise_for_status()
            while (await http.get(f"{b}/api/session/{user}/state")).json()["state"]["v"] != i:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            state_ns.append(time.perf_counter_ns() - began)
            began = time.perf_counter_ns()
            message = {"role": "user", "content": str(i)}
            (await http.post(f"{a}/api/session/{user}/history", json=message)).raise_for_status()
            lengths[user] += 1
            while True:
                profile = (await http.get(f"{b}/api/session/{user}/profile")).json()["profile"]
                if len(profile["conversationHistory"]) >= min(lengths[user], 100):
                    break
                await asyncio.sleep(0.002)
            history_ns.append(time.perf_counter_ns() - began)
    return {
        "state_write_on_a_to_read_on_b": ms(percentiles(state_ns)),
        "history_append_on_a_to_read_on_b": ms(percentiles(history_ns)),
    }


def run_staleness(args: argparse.Namespace) -> None:
    with emulator() as host:
        a, b = instances(host, 2)
        with a, b:
            before = load_average()
            figures = asyncio.run(_staleness(a.url, b.url, args.samples))
            figures["feed_b"] = b.healthz()["instance"]["feed"]
    figures.update(samples=args.samples, load_average_before=before, after=load_average())
    emit("coherence_staleness", figures, args.json)


# -- cost --------------------------------------------------------------------------------------


async def _cost(a: str, b: str, users: int, per_hour: float, duration: float) -> dict[str, Any]:
    ids = [f"cost-{i}" for i in range(users)]
    limit = asyncio.Semaphore(64)

    async def call(http: httpx.AsyncClient, method: str, url: str, **kw: Any) -> None:
        async with limit:
            (await http.request(method, url, **kw)).raise_for_status()

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(
            *(call(http, "POST", f"{a}/api/session/{u}/state", json={"v": 0}) for u in ids)
        )
        await asyncio.sleep(2)
        await asyncio.gather(*(call(http, "GET", f"{b}/api/session/{u}/state") for u in ids))
        feed_b = (await http.get(f"{b}/healthz")).json()["instance"]["feed"]
        feed_a = (await http.get(f"{a}/healthz")).json()["instance"]["feed"]
        rate = users * per_hour / 3600.0
        began = time.monotonic()
        sent = 0
        running: set[asyncio.Task[None]] = set()
        while (elapsed := time.monotonic() - began) < duration:
            # Writes go out on schedule; a slow answer does not hold the next ones back.
            while sent < int(elapsed * rate):
                user = ids[sent % users]
                url = f"{a}/api/session/{user}/state"
                task = asyncio.create_task(call(http, "POST", url, json={"v": sent}))
                running.add(task)
                task.add_done_callback(running.discard)
                sent += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*running)
        await asyncio.sleep(5)  # the last feed documents arrive
        span = time.monotonic() - began
        after_b = (await http.get(f"{b}/healthz")).json()["instance"]["feed"]
        after_a = (await http.get(f"{a}/healthz")).json()["instance"]["feed"]
        cached = (await http.get(f"{b}/healthz")).json()
    docs_read = after_b["docsReceived"] - feed_b["docsReceived"]
    events = after_b["eventsReceived"] - feed_b["eventsReceived"]
    published = after_a["docsPublished"] - feed_a["docsPublished"]
    reads_per_hour = docs_read / span * 3600
    return {
        "cached_users_on_b": users,
        "writes_per_user_hour": per_hour,
        "writes_sent": sent,
        "write_rate_per_second": round(sent / span, 1),
        "feed_docs_read_by_b": docs_read,
        "events_in_them": events,
        "events_per_feed_doc": round(events / docs_read, 2) if docs_read else None,
        "reads_per_hour_per_listening_instance": round(reads_per_hour),
        "reads_per_cached_user_hour": round(reads_per_hour / users, 3),
        "feed_writes_per_hour_by_a": round(published / span * 3600),
        "feed_lag_b_ms": {"p50": after_b["lagP50Ms"], "p99": after_b["lagP99Ms"]},
        "b_persistence": cached["persistence"],
    }


def run_cost(args: argparse.Namespace) -> None:
    results = []
    with emulator() as host:
        for users in args.users or [1000, 10_000]:
            a, b = instances(host, 2, SAMVAD_CACHE_MAX_ENTRIES=str(max(50_000, 2 * users)))
            with a, b:
                before = load_average()
                figures = asyncio.run(
                    _cost(a.url, b.url, users, args.writes_per_user_hour, args.duration)
                )
                figures["load_average_before"] = before
                results.append(figures)
    emit("coherence_cost", {"runs": results, "duration_s": args.duration}, args.json)


# -- workers -----------------------------------------------------------------------------------


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the workers)."""
    from bench._common import cpu_seconds

    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(_tree_cpu(int(child)) for child in children)


def run_workers(args: argparse.Namespace) -> None:
    raise_open_files(args.connections + 1000)
    runs = []
    with emulator() as host:
        for workers in (1, 2):
            (server,) = instances(
                host,
                1,
                SAMVAD_WORKERS=str(workers),
                SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS=str(args.chunk_delay),
            )
            with server:
                time.sleep(3 if workers > 1 else 1)  # every worker started
                config = LoadConfig(
                    url=server.ws_url,
                    connections=args.connections,
                    rate=args.rate,
                    duration=args.duration,
                    processes=2,
                    user_prefix=f"w{workers}",
                )
                run = LoadRun(config)
                run.start()
                time.sleep(1)
                before = load_average()
                cpu = _tree_cpu(server.pid)
                began = time.monotonic()
                run.go()
                time.sleep(args.duration)
                busy = _tree_cpu(server.pid) - cpu
                figures = summarize(run, args.duration)
                figures.update(
                    workers=workers,
                    server_cpu_percent=round(100 * busy / (time.monotonic() - began), 1),
                    load_average_before=before,
                )
                runs.append(figures)
    emit(
        "coherence_workers",
        {
            "connections": args.connections,
            "rate_per_second": args.rate,
            "duration_s": args.duration,
            "chunk_delay_s": args.chunk_delay,
            "runs": runs,
        },
        args.json,
    )


# -- a shared rate limit ---------------------------------------------------------------------


async def _ratelimit(host: str, samples: int) -> dict[str, Any]:
    from google.cloud import firestore

    from samvad.firestore_client import close_client, make_client

    client = make_client(project="bench-ratelimit-" + uuid.uuid4().hex[:8], emulator_host=host)
    times: list[int] = []
    try:
        for i in range(samples):
            ref = client.collection("rate_limits").document(f"refresh-u{i % 50}")

            @firestore.async_transactional
            async def take(transaction: Any, ref: Any = ref) -> None:
                snapshot = await ref.get(transaction=transaction)
                tokens = (snapshot.to_dict() or {}).get("tokens", 5.0)
                transaction.set(ref, {"tokens": tokens - 1, "at": firestore.SERVER_TIMESTAMP})

            began = time.perf_counter_ns()
            await take(client.transaction())
            times.append(time.perf_counter_ns() - began)
    finally:
        await close_client(client)
    return {"transaction_per_limited_request": ms(percentiles(times))}


def run_ratelimit(args: argparse.Namespace) -> None:
    with emulator() as host:
        before = load_average()
        figures = asyncio.run(_ratelimit(host, args.samples))
    figures.update(samples=args.samples, load_average_before=before)
    emit("shared_rate_limit", figures, args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    stale = modes.add_parser("staleness")
    stale.add_argument("--samples", type=int, default=200)
    cost = modes.add_parser("cost")
    cost.add_argument("--users", type=int, action="append")
    cost.add_argument("--writes-per-user-hour", type=float, default=60.0)
    cost.add_argument("--duration", type=float, default=60.0)
    workers = modes.add_parser("workers")
    workers.add_argument("--connections", type=int, default=200)
    workers.add_argument("--rate", type=float, default=200.0)
    workers.add_argument("--duration", type=float, default=20.0)
    workers.add_argument("--chunk-delay", type=float, default=0.02)
    limit = modes.add_parser("ratelimit")
    limit.add_argument("--samples", type=int, default=200)
    for sub in (stale, cost, workers, limit):
        sub.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    {
        "staleness": run_staleness,
        "cost": run_cost,
        "workers": run_workers,
        "ratelimit": run_ratelimit,
    }[args.mode](args)


if __name__ == "__main__":
    main()
