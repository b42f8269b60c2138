"""Word-by-word streaming at a steady message rate, two source trees interleaved.

    .venv/bin/python bench/bench_ws_stream.py --baseline ../other-tree \\
        [--rate 250 --rate 1000] [--repetitions 3] [--connections 1000] [--duration 15] \\
        [--generator lean] [--json bench/results/ws-stream.json]

Runs ``bench/bench_ws_load.py`` (one ``samvad serve --store memory`` process,
the built-in responder streaming word by word with ``--chunk-delay`` between
words: about 38 frames per message) once per rate and tree, alternating the
trees (baseline first) and repeating the round ``--repetitions`` times, so
that both trees see the same machine. ``--baseline`` is another checkout of
Samvad (e.g. a ``git worktree`` of ``main``): its ``samvad`` serves
(``bench_ws_load.py --server-root``), loaded by this checkout's generators, so
that both trees are measured by the same instrument; the interpreter is this one. Without
``--baseline`` only this tree runs.

``--generator lean`` loads the server with the lean raw client instead of
``websockets`` clients (``bench_ws_load.py --generator``): a quarter of a core
instead of a whole one at 1,000 messages/s, so that on a two-core machine the
figures are the server's rather than the two processes' fight for the cores.

Prints, per run, message → ``ack`` p50/p99 as the generators saw it, the
achieved message rate, the server's CPU, the frames received per message and
the 1-minute load average; then the medians per tree and rate, and the ratio
of this tree's p99 to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_once(tree: Path, *, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "load.json"
        command = [
            sys.executable,
            str(ROOT / "bench" / "bench_ws_load.py"),
            "--server-root",
            str(tree),
            "--connections",
            str(args.connections),
            "--rate",
            str(rate),
            "--duration",
            str(args.duration),
            "--chunk-delay",
            str(args.chunk_delay),
            "--generator",
            args.generator,
            "--json",
            str(out),
        ]
        subprocess.run(
            command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        figures: dict[str, Any] = json.loads(out.read_text())["figures"]
    ack = figures["message_to_ack"]
    sent = figures["sent"] or 1
    return {
        "rate": rate,
        "ack_p50_ms": ack["p50_ms"],
        "ack_p99_ms": ack["p99_ms"],
        "ack_max_ms": ack["max_ms"],
        "achieved_rate_per_second": figures["achieved_rate_per_second"],
        "acked": figures["acked"],
        "sent": figures["sent"],
        "frames_per_message": round(figures["frames_received"] / sent, 1),
        "interrupted": figures["interrupted"],
        "server_cpu_percent": figures["server_cpu_percent"],
        "generator_cpu_percent": figures["generator_cpu_percent"],
        "kib_per_idle_connection": figures["server_kib_per_connection"]["connected_idle"],
        "errors": figures["errors"],
        "load1": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another Samvad checkout to compare with")
    parser.add_argument("--rate", type=float, action="append", help="messages/s (repeatable)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--chunk-delay", type=float, default=0.02)
    parser.add_argument(
        "--generator",
        choices=("websockets", "lean"),
        default="websockets",
        help="bench_ws_load.py's load generator",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    rates = args.rate or [250.0, 1000.0]
    trees: dict[str, Path] = {}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    trees["this"] = ROOT
    runs: dict[str, dict[float, list[dict[str, Any]]]] = {
        name: {rate: [] for rate in rates} for name in trees
    }
    for rep in range(1, args.repetitions + 1):
        for rate in rates:
            for name, tree in trees.items():
                result = run_once(tree, rate=rate, args=args)
                runs[name][rate].append(result)
                print(
                    f"rep {rep} {name:8} {rate:6.0f}/s: ack p50 {result['ack_p50_ms']:8.1f} ms"
                    f"  p99 {result['ack_p99_ms']:8.1f} ms"
                    f"  achieved {result['achieved_rate_per_second']:6.0f}/s"
                    f"  server CPU {result['server_cpu_percent']:5.1f} %"
                    f"  frames/msg {result['frames_per_message']:5.1f}"
                    f"  idle {result['kib_per_idle_connection']:5.1f} KiB/conn"
                    f"  load {result['load1']}",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for rate in rates:
        row: dict[str, Any] = {}
        for name in trees:
            results = runs[name][rate]
            row[name] = {
                key: statistics.median(r[key] for r in results)
                for key in (
                    "ack_p50_ms",
                    "ack_p99_ms",
                    "achieved_rate_per_second",
                    "server_cpu_percent",
                    "frames_per_message",
                    "kib_per_idle_connection",
                )
            }
        if "baseline" in row and row["baseline"]["ack_p99_ms"]:
            row["p99_ratio_this_to_baseline"] = round(
                row["this"]["ack_p99_ms"] / row["baseline"]["ack_p99_ms"], 3
            )
        summary[str(int(rate))] = row
        print(f"median at {rate:.0f}/s: {json.dumps(row)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "trees": {k: str(v) for k, v in trees.items()},
                    "runs": {n: {str(r): v for r, v in d.items()} for n, d in runs.items()},
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
