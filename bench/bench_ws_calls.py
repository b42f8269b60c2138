"""Python function calls per WebSocket message: a CPU figure the machine's load cannot blur.

    .venv/bin/python bench/bench_ws_calls.py [--baseline ../other-tree] [--seconds 5] \\
        [--json bench/results/ws-calls.json]

Runs ``python -m cProfile -m samvad serve --store memory`` (the settings of
``bench_overhead.py``'s ``ws_message``: the one-chunk responder, the rate limit
lifted) and the lean client of ``bench/_ws_raw.py`` over ``--connections``
started connections for ``--seconds``; each exchange is ``message`` → ``ack``,
``reply.start``, one ``reply.chunk``, ``reply.end``. After SIGINT the profile
gives the calls the server made; divided by the exchanges completed (the
start-up's and the connections' own calls, measured in a run without
exchanges, subtracted), that is the Python work per message, write-behind
included. cProfile slows everything, so its times mean nothing here; the call
counts do not depend on the machine's load. ``--word-by-word`` answers with
the built-in responder, no delay between words (about 38 frames per message:
what streaming costs). ``--baseline`` runs another
checkout of Samvad the same way first (its ``samvad``, this client).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._ws_raw import WsClientProcess  # noqa: E402
from bench.bench_overhead import SAMVAD_ENV, SAMVAD_WS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def profile_run(
    tree: Path, *, connections: int, seconds: float, word_by_word: bool
) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "server.prof"
        env = {**os.environ, **SAMVAD_ENV, "PYTHONPATH": str(tree)}
        if word_by_word:
            env["SAMVAD_RESPONDER"] = "builtin"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(out),
                "-m",
                "samvad",
                "serve",
                "--store",
                "memory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        client = WsClientProcess()
        try:
            client.connect("calls", f"ws://127.0.0.1:{port}/ws", connections, SAMVAD_WS)
            completed = client.run("calls", seconds)["completed"] if seconds > 0 else 0
            client.close("calls")
        finally:
            client.stop()
        time.sleep(1.5)  # the write-behind flushes what the run queued
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        stats = pstats.Stats(str(out))
    total = 0
    by_module: Counter[str] = Counter()
    for (filename, _, _), (_, calls, _, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += calls
        name = filename.split("site-packages/")[-1]
        if str(tree) in name:
            name = name.split(str(tree) + "/")[-1]
        by_module[name] += calls
    return {"completed": completed, "calls": total, "by_module": dict(by_module)}


def per_message(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    idle = profile_run(
        tree, connections=args.connections, seconds=0, word_by_word=args.word_by_word
    )
    run = profile_run(
        tree, connections=args.connections, seconds=args.seconds, word_by_word=args.word_by_word
    )
    n = run["completed"]
    modules = {
        name: round((calls - idle["by_module"].get(name, 0)) / n, 1)
        for name, calls in run["by_module"].items()
    }
    top = sorted(modules.items(), key=lambda kv: -kv[1])[:20]
    return {
        "exchanges": n,
        "calls_per_message": round((run["calls"] - idle["calls"]) / n, 1),
        "top_modules": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--word-by-word",
        action="store_true",
        help="the built-in responder without delay (about 38 frames per message)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve()} if args.baseline else {}
    trees["this"] = ROOT
    results = {}
    for name, tree in trees.items():
        results[name] = per_message(tree, args)
        print(
            f"{name}: {results[name]['calls_per_message']} Python calls per message "
            f"({results[name]['exchanges']} exchanges)",
            flush=True,
        )
        for module, calls in results[name]["top_modules"]:
            print(f"    {calls:8.1f}  {module}")
    if "baseline" in results:
        ratio = results["this"]["calls_per_message"] / results["baseline"]["calls_per_message"]
        print(f"this / baseline: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), **results}, indent=2))


if __name__ == "__main__":
    main()
