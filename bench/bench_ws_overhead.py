"""The WebSocket rows of ``bench_overhead.py`` with a second Samvad checkout in every round.

    .venv/bin/python bench/bench_ws_overhead.py --baseline-root BEFORE_TREE \\
        [--window 5] [--repetitions 3] [--json PATH]

The same as ``bench_overhead.py --baseline-root BEFORE_TREE --only ws_message
--only ws_idle_memory`` (a third server, Samvad from another checkout, e.g.
``git worktree add ../before main``), kept as the command the benchmarks page
gives: ``ws_message`` (one message, its ``ack`` and a one-chunk reply, CPU per
message) and ``ws_idle_memory`` (RSS per idle started connection), each
repetition measuring this tree, the bare Starlette app and the
baseline one after the other (in reverse order every other repetition), with
the same servers, client, pinning and settings as ``bench_overhead.py``
(whose docstring describes them). The report gives this tree's figures and
ratio to bare, and the baseline's under ``baseline`` against the same bare
windows: before and after within one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, get_json
from bench.bench_overhead import (
    HTTP_CONNECTIONS,
    SAMVAD_ENV,
    WS_CONNECTIONS,
    Bench,
    load1,
)

WORKLOADS = ["ws_message", "ws_idle_memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-root", type=Path, required=True, help="the other checkout")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per measured window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up")
    parser.add_argument("--settle", type=float, default=1.2)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="run only these")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--python", help="the interpreter that runs the servers")
    parser.add_argument(
        "--ws-client",
        choices=["polling", "sleeping"],
        default="polling",
        help="the client polls (default) or sleeps between frames (bench_overhead.py)",
    )
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()
    # What Bench reads besides the options above.
    args.generator = "python"
    args.store = "memory"
    bench = Bench(args)
    began = time.monotonic()
    figures: dict[str, Any] = {
        "store": args.store,
        "baseline_root": args.baseline_root.name,
        "window_s": args.window,
        "ws_client": args.ws_client,
        "settle_s": args.settle,
        "repetitions": args.repetitions,
        "ws_connections": WS_CONNECTIONS,
        "http_connections": HTTP_CONNECTIONS,
        "samvad_env": SAMVAD_ENV,
        "load1_at_start": load1(),
    }
    bench.start()
    try:
        figures["bare_server_settings"] = get_json(bench.bare.url + "/healthz")["server"]
        for workload in args.only or WORKLOADS:
            figures[workload] = getattr(bench, workload)()
    finally:
        bench.stop()
    figures["seconds"] = round(time.monotonic() - began, 1)
    figures["load1_at_end"] = load1()
    emit("ws_overhead", figures, args.json)


if __name__ == "__main__":
    main()
