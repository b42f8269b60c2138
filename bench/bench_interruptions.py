"""Cost of the interruption stack on the hot path: one push plus one read.

    python bench/bench_interruptions.py [--iterations N] [--sessions N] [--json PATH]

Each sample times ``stack.push(interruption)`` followed by
``stack.recent(session_id)`` (what a barge-in and the next reply do), over
many sessions so the dictionary is realistically full. Aim: p99 under 5 µs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, percentiles
from samvad.interruptions import Interruption, InterruptionStack


def run(iterations: int, sessions: int) -> dict[str, object]:
    stack = InterruptionStack()
    at = datetime.now(UTC)
    records = [
        Interruption(
            session_id=f"session-{i % sessions}",
            user_id=f"user-{i % sessions}",
            at=at,
            reason="barge_in",
            heard="You said: tell me about",
            cut=" home loans and the documents",
            message_id=f"m{i}",
        )
        for i in range(iterations)
    ]
    for record in records[:sessions]:  # warm: every session has a stack
        stack.push(record)
    clock = time.perf_counter_ns
    push_read: list[int] = []
    push_only: list[int] = []
    read_only: list[int] = []
    gc.collect()
    gc.disable()
    try:
        for record in records:
            session_id = record.session_id
            start = clock()
            stack.push(record)
            stack.recent(session_id)
            push_read.append(clock() - start)
        for record in records:
            start = clock()
            stack.push(record)
            push_only.append(clock() - start)
        for record in records:
            session_id = record.session_id
            start = clock()
            stack.recent(session_id)
            read_only.append(clock() - start)
        overhead: list[int] = []
        for _ in range(iterations):
            start = clock()
            overhead.append(clock() - start)
    finally:
        gc.enable()
    return {
        "iterations": iterations,
        "sessions": sessions,
        "push_plus_read": percentiles(push_read),
        "push": percentiles(push_only),
        "read": percentiles(read_only),
        "timer_overhead": percentiles(overhead),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    emit("interruptions", run(args.iterations, args.sessions), args.json)


if __name__ == "__main__":
    main()
