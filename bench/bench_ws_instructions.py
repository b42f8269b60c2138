"""Instructions per WebSocket message, Samvad against a bare echo: a CPU ratio load cannot blur.

    .venv/bin/python bench/bench_ws_instructions.py [--baseline ../other-tree] \\
        [--seconds 20] [--repetitions 2] [--json bench/results/ws-instructions.json]

The CPU time per message of ``bench_ws_overhead.py`` moves by a third from
one window to the next on a shared machine, more than most changes to the
server. Instructions do not: this runs each server under Valgrind's
``callgrind`` (Debian package ``valgrind``) with counting off, warms it up
with ``--connections`` connections of the lean client (``bench/_ws_raw.py``),
turns counting on (``callgrind_control -i on``) for ``--seconds`` of
exchanges and ``--settle`` seconds after them (the write-behind's flushes of
what the window queued), dumps the count, and divides the user-space
instructions the server executed by the exchanges completed.

Servers and exchanges are those of ``bench_overhead.py``'s ``ws_message``:
Samvad with the memory store, the one-chunk responder and the rate limit
lifted (``message`` → ``ack``, ``reply.start``, one ``reply.chunk``,
``reply.end``; the user's message and the reply appended and written behind)
against ``bench/_bare.py``'s echo (one JSON frame parsed and sent back), both
on ``samvad.server``'s uvicorn settings and collector tuning.

What it does not count: the kernel's share (the socket reads and writes,
one of each per exchange for both servers when they keep up), so the ratio is
of the servers' own work. Under Valgrind the servers run some fifty times
slower; time-driven work (the write-behind's flush interval, the scheduled
young collections) then comes once per fewer exchanges than at full speed,
so compare trees and servers within one run, as with every other figure here.
Counts vary by a few per cent between repetitions, with how the exchanges of
a window fall into flushes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import ServerProcess, emit  # noqa: E402
from bench._ws_raw import Exchange, WsClientProcess  # noqa: E402
from bench.bench_overhead import BARE_WS, SAMVAD_ENV, SAMVAD_WS  # noqa: E402


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _dumped_instructions(out: Path) -> int:
    """The instruction count of the dump ``callgrind_control -d`` wrote (the
    part whose trigger is a dump, not the program's end)."""
    for part in sorted(out.parent.glob(out.name + ".*")):
        lines = part.read_text(errors="replace").splitlines()
        if not any(line.startswith("desc: Trigger: dump") for line in lines):
            continue
        for line in lines:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no dump in {out.parent}")


def count(tree: Path, module: str, exchange: Exchange, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``python -m MODULE serve`` from ``tree`` under callgrind; instructions per exchange."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        server = ServerProcess(
            env=SAMVAD_ENV,
            module=module,
            root=tree,
            log_path=Path(scratch) / "server.log",
            wrapper=(
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
            ),
        )
        server.start(timeout=180)  # valgrind slows start-up too
        try:
            client = WsClientProcess()
            try:
                client.connect("ir", server.ws_url, args.connections, exchange)
                client.run("ir", args.warmup)
                time.sleep(args.settle)
                _control(server.pid, "-i", "on")
                completed = client.run("ir", args.seconds)["completed"]
                time.sleep(args.settle)
                _control(server.pid, "-d")
                _control(server.pid, "-i", "off")
                client.close("ir")
            finally:
                client.stop()
        finally:
            server.stop(timeout=120)
        instructions = _dumped_instructions(out)
        if args.keep_dumps is not None:
            args.keep_dumps.mkdir(parents=True, exist_ok=True)
            for part in out.parent.glob(out.name + ".*"):
                shutil.copy(part, args.keep_dumps / f"{module}-{tree.name}-{part.name}")
    return {
        "exchanges": completed,
        "instructions": instructions,
        "per_exchange": round(instructions / completed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another Samvad checkout, counted too")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="counted exchanges")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument(
        "--keep-dumps",
        type=Path,
        metavar="DIR",
        help="copy callgrind's dumps there (for callgrind_annotate)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs Valgrind: apt-get install valgrind")
    servers: dict[str, tuple[Path, str, Exchange]] = {"samvad": (ROOT, "samvad", SAMVAD_WS)}
    if args.baseline is not None:
        servers["baseline"] = (args.baseline.resolve(), "samvad", SAMVAD_WS)
    servers["bare"] = (ROOT, "bench._bare", BARE_WS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for rep in range(1, args.repetitions + 1):
        for name, (tree, module, exchange) in servers.items():
            result = count(tree, module, exchange, args)
            runs[name].append(result)
            print(
                f"rep {rep} {name}: {result['per_exchange']:,} instructions per exchange "
                f"({result['exchanges']} exchanges)",
                flush=True,
            )
    medians = {
        name: statistics.median(r["per_exchange"] for r in results)
        for name, results in runs.items()
    }
    ratios = {"samvad / bare": round(medians["samvad"] / medians["bare"], 2)}
    if "baseline" in medians:
        ratios["baseline / bare"] = round(medians["baseline"] / medians["bare"], 2)
        ratios["samvad / baseline"] = round(medians["samvad"] / medians["baseline"], 3)
    for name, ratio in ratios.items():
        print(f"{name}: {ratio}")
    emit("ws_instructions", {"runs": runs, "medians": medians, "ratios": ratios}, args.json)


if __name__ == "__main__":
    main()
