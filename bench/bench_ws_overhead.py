"""The WebSocket rows of ``bench_overhead.py`` with a second Samvad checkout in every round.

    .venv/bin/python bench/bench_ws_overhead.py --baseline-root BEFORE_TREE \\
        [--window 5] [--repetitions 3] [--json PATH]

``bench_overhead.py --baseline-root`` runs a third server (Samvad from another
checkout, e.g. ``git worktree add ../before main``) for its HTTP workloads
only; this runs the same for ``ws_message`` (one message, its ``ack`` and a
one-chunk reply, CPU per message) and ``ws_idle_memory`` (RSS per idle started
connection): each repetition measures this tree, the bare Starlette app and the
baseline one after the other, with the same servers, client, pinning and
settings as ``bench_overhead.py`` (whose docstring describes them). The report
gives this tree's figures and ratio to bare, and the baseline's under
``baseline`` against the same bare windows: before and after within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, emit, get_json
from bench.bench_overhead import (
    BARE_WS,
    HTTP_CONNECTIONS,
    IDLE_CONNECTIONS,
    SAMVAD_ENV,
    SAMVAD_IDLE,
    SAMVAD_WS,
    WS_CONNECTIONS,
    Bench,
    load1,
    summarize,
)

WORKLOADS = ["ws_message", "ws_idle_memory"]


class WsBench(Bench):
    """``Bench`` whose WebSocket workloads run every server, the baseline included."""

    def ws_message(self) -> dict[str, Any]:
        assert self.ws is not None
        ws = self.ws
        exchanges = {"samvad": SAMVAD_WS, "bare": BARE_WS, "base": SAMVAD_WS}
        connected = {
            name: ws.connect(name, server.ws_url, WS_CONNECTIONS, exchanges[name])
            for name, server in self.servers()
        }
        warm = {name: ws.run(name, self.args.warmup)["completed"] for name, _ in self.servers()}
        self.settle()

        def make(name: str, server: ServerProcess, rep: int) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                figures = ws.run(name, self.args.window)
                figures["requests"] = figures["completed"]
                return figures

            return run

        figures = self.alternate("ws_message", make)
        figures["connections"] = {k: v["connected"] for k, v in connected.items()}
        figures["warmup_exchanges"] = warm
        figures["frames_per_message"] = {
            name: round(
                statistics.fmean(r["frames"] / r["requests"] for r in figures["runs"][name]), 2
            )
            for name, _ in self.servers()
        }
        for name, _ in self.servers():
            ws.close(name)
        return figures

    def ws_idle_memory(self) -> dict[str, Any]:
        # As Bench.ws_idle_memory, with the baseline's connections started too.
        assert self.ws is not None
        ws = self.ws
        exchanges = {"samvad": SAMVAD_IDLE, "bare": BARE_WS, "base": SAMVAD_IDLE}
        held: dict[str, int] = {}
        for name, server in self.servers():  # first connections: lazy imports, caches
            held[name] = ws.connect(f"idle-{name}", server.ws_url, 50, exchanges[name])["connected"]
        time.sleep(0.5)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in self.servers()}
        for _ in range(self.args.repetitions):
            for name, server in self.servers():
                before = server.rss_kib()
                result = ws.connect(
                    f"idle-{name}", server.ws_url, IDLE_CONNECTIONS, exchanges[name]
                )
                time.sleep(0.5)
                after = server.rss_kib()
                added = result["connected"] - held[name]
                held[name] = result["connected"]
                runs[name].append(
                    {
                        "connected": added,
                        "held": result["connected"],
                        "failures": result["failures"],
                        "rss_before_kib": before,
                        "rss_after_kib": after,
                        "kib_per_connection": round((after - before) / added, 2) if added else None,
                        "load1": load1(),
                    }
                )
        for name, _ in self.servers():
            ws.close(f"idle-{name}")
        return summarize(runs, key="kib_per_connection", throughput=None)


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
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()
    # What Bench reads besides the options above.
    args.generator = "python"
    args.store = "memory"
    bench = WsBench(args)
    began = time.monotonic()
    figures: dict[str, Any] = {
        "store": args.store,
        "baseline_root": args.baseline_root.name,
        "window_s": args.window,
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
