"""The write-ahead journal's price: acknowledgement latency and throughput with
the journal on and off, journal bytes per message, fsyncs per second.

    python -m bench.bench_journal [--rounds 3] [--duration 10] [--rate 1000] [--json PATH]

First the journal alone, in this process, paced at ``--rate`` appends per
second for ``--duration`` seconds: append-to-durable latency, fsyncs per
second, messages per group commit, and the event loop's longest stall.

Starts one Firestore emulator, then ``samvad serve`` on it with
``SAMVAD_JOURNAL=on`` and ``off`` in turn, ``--rounds`` times (interleaved, so
that the machine's drift hits both alike), each a closed-loop run of
``POST /api/session/{user}/history`` (32 connections, 200 users) for
``--duration`` seconds. With the journal on, its counters (``/metrics``) give
bytes per message, messages per group commit and fsyncs per second at the
rate the run achieved (the server's messages/s is what the machine allows: on
a shared 2-core machine less than 1,000). The journal lives in a temporary
directory on the same disk as the working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench._common import ServerProcess, emit, ms, percentiles
from bench._http_load import run_load
from samvad.emulator import FirestoreEmulator
from samvad.history import new_message_id
from samvad.journal import Journal
from samvad.models import Message, Role
from samvad.writes import ProfileWrite

USERS = 200
CONNECTIONS = 32


def _message(n: int) -> tuple[str, str, bytes]:
    body = json.dumps({"role": "user", "content": f"benchmark message {n}"}).encode()
    return "POST", f"/api/session/bench-user-{n % USERS}/history", body


def _journal_counters(url: str) -> dict[str, float]:
    counters: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("samvad_journal_") and not line.startswith("#"):
            name, _, value = line.partition(" ")
            counters[name] = float(value)
    return counters


async def _journal_alone(directory: Path, rate: float, duration: float) -> dict[str, Any]:
    """The journal by itself, paced at ``rate`` messages/s: append-to-durable latency,
    fsyncs per second and the event loop's longest stall while it runs."""
    journal = Journal.open(directory)
    journal.start()
    latencies: list[int] = []
    stalls: list[float] = []
    stop = asyncio.Event()

    async def watch_loop() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last - 0.001)
            last = now

    async def one(n: int) -> None:
        started = time.perf_counter_ns()
        await journal.append(message_write(n))
        latencies.append(time.perf_counter_ns() - started)

    watcher = asyncio.create_task(watch_loop())
    tasks = []
    start = time.perf_counter()
    for n in range(int(rate * duration)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    stop.set()
    await watcher
    stats = journal.stats()
    await journal.close()
    figures = ms(percentiles(latencies))
    figures.update(
        messages_per_second=round(len(latencies) / elapsed, 1),
        fsyncs_per_second=round(stats.fsyncs / elapsed, 1),
        records_per_group_commit=round(stats.records_appended / stats.batches, 2),
        bytes_per_record=round(stats.bytes_appended / stats.records_appended, 1),
        loop_stall_max_ms=round(1000 * max(stalls), 2),
    )
    return figures


def message_write(n: int) -> ProfileWrite:
    """What one ``POST /history`` journals."""
    message = Message(
        id=new_message_id(datetime.now(UTC)),
        role=Role.USER,
        content=f"benchmark message {n}",
        timestamp=datetime.now(UTC),
    )
    return ProfileWrite(user_id=f"bench-user-{n % USERS}", append=[message])


def _server(emulator: FirestoreEmulator, data_dir: Path, journal: bool) -> ServerProcess:
    return ServerProcess(
        store="firestore",
        env={
            "FIRESTORE_EMULATOR_HOST": emulator.host_port,
            "GOOGLE_CLOUD_PROJECT": f"bench-journal-{time.time_ns()}",
            "SAMVAD_DATA_DIR": str(data_dir),
            "SAMVAD_JOURNAL": "on" if journal else "off",
            "SAMVAD_LOG_LEVEL": "WARNING",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--json")
    args = parser.parse_args()

    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    alone: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-journal-") as tmp:
        alone = asyncio.run(_journal_alone(Path(tmp), args.rate, args.duration))
    with (
        tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-journal-") as tmp,
        FirestoreEmulator.start() as emulator,
    ):
        for round_ in range(args.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                data_dir = Path(tmp) / f"{mode}-{round_}"
                with _server(emulator, data_dir, mode == "on") as server:
                    figures = run_load(
                        server.url, _message, connections=CONNECTIONS, duration=args.duration
                    )
                    if mode == "on":
                        figures["journal"] = _journal_figures(
                            _journal_counters(server.url), figures
                        )
                runs[mode].append(figures)

    summary = {
        mode: {
            "messages_per_second_median": statistics.median(
                r["requests_per_second"] for r in results
            ),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in results),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in results),
            "non_2xx": sum(r["non_2xx"] for r in results),
        }
        for mode, results in runs.items()
    }
    emit(
        "journal",
        {
            "journal_alone": {"rate": args.rate, **alone},
            "server": {"connections": CONNECTIONS, "users": USERS, "summary": summary},
            "runs": runs,
        },
        args.json,
    )


def _journal_figures(counters: dict[str, float], load: dict[str, Any]) -> dict[str, Any]:
    """Journal cost per message and per second, at the rate the run achieved."""
    records = counters.get("samvad_journal_records_total", 0.0)
    batches = counters.get("samvad_journal_batches_total", 0.0)
    seconds = load["n"] / load["requests_per_second"] if load["requests_per_second"] else 0
    return {
        "records": records,
        "bytes_per_record": round(counters["samvad_journal_bytes_total"] / records, 1)
        if records
        else None,
        "records_per_group_commit": round(records / batches, 2) if batches else None,
        "fsyncs_per_second": round(counters["samvad_journal_fsyncs_total"] / seconds, 1)
        if seconds
        else None,
        "messages_per_second": load["requests_per_second"],
    }


if __name__ == "__main__":
    main()
