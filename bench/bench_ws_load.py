"""Thousands of WebSocket connections to one server process at a steady message rate.

    python bench/bench_ws_load.py [--connections 1000] [--rate 1000] [--duration 30]
                                  [--processes 2] [--chunk-delay 0.02] [--json PATH]

Starts ``python -m samvad serve --store memory`` (one process) and a load of
``--processes`` generator processes (``bench/_ws_load.py``). Phases:

1. server started, idle: RSS measured;
2. every connection opened and started (``start`` → ``started``), idle: RSS again;
   (RSS after - RSS before) / connections is the server memory per connection;
3. ``--rate`` user messages per second in total, round robin over the
   connections, for ``--duration`` seconds; each message is acknowledged and
   answered by the built-in responder, streamed word by word (about 38 frames
   per message) with ``--chunk-delay`` seconds between words;
4. RSS and the CPU used by the server and the generators during phase 3.

A sample is message → ``ack`` on the client, so it includes the generator's
own scheduling delay: when a generator saturates its core, the figures say so
(``generator_cpu_percent``). ``--generator lean`` replaces the ``websockets``
generators with one process of ``bench/_ws_raw.py`` (``pace``: raw frames, no
task per connection, only the acks parsed), which uses a fraction of their
CPU: on a two-core machine the server then has a core to itself, as it would
with its clients elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, cpu_seconds, emit, ms, percentiles, raise_open_files
from bench._ws_load import QUESTION, LoadConfig, LoadRun, merge_results
from bench._ws_raw import Exchange, WsClientProcess


def start_profiler(path: str, pid: int, duration: float) -> subprocess.Popen[bytes]:
    """py-spy (``pip install py-spy``) sampling the server while the load runs."""
    fmt = (
        "speedscope"
        if path.endswith(".json")
        else ("raw" if path.endswith(".txt") else "flamegraph")
    )
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(duration)),
            "--rate",
            "200",
            "--format",
            fmt,
            "--output",
            path,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize(run: LoadRun, duration: float) -> dict[str, Any]:
    merged = merge_results(run.results())
    latencies = [latency for _, latency in merged.samples]
    return {
        "connected": merged.connected,
        "connect_failures": merged.connect_failures,
        "sent": merged.sent,
        "acked": merged.acked,
        "unacked": merged.unacked,
        "achieved_rate_per_second": round(merged.acked / duration, 1),
        "message_to_ack": ms(percentiles(latencies)),
        "frames_received": merged.frames,
        "replies_complete": merged.replies_complete,
        "replies_incomplete": merged.replies_incomplete,
        "interrupted": merged.interrupted,
        "errors": dict(merged.errors),
        "unexpected_closes": dict(merged.closes),
    }


def run_lean(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """The phases of :func:`main` with the lean generator (``bench/_ws_raw.py``)."""
    time.sleep(1)
    rss_idle = server.rss_kib()
    client = WsClientProcess(open_files=args.connections + 1000)
    try:
        hello = b'{"type":"start","userId":"lean-{i}","historyLimit":0}'
        began = time.monotonic()
        opened = client.connect(
            "load", server.ws_url, args.connections, Exchange(b"", None, hello=hello)
        )
        connect_seconds = round(time.monotonic() - began, 1)
        time.sleep(2)
        rss_connected = server.rss_kib()
        assert client.pid is not None
        server_cpu, load_cpu = server.cpu_seconds(), cpu_seconds(client.pid)
        wall = time.monotonic()
        profiler = start_profiler(args.profile, server.pid, args.duration) if args.profile else None
        paced = client.pace("load", args.rate, args.duration, json.dumps(QUESTION))
        if profiler is not None:
            profiler.wait()
        active = time.monotonic() - wall
        server_cpu = server.cpu_seconds() - server_cpu
        load_cpu = cpu_seconds(client.pid) - load_cpu
        rss_active = server.rss_kib()
    finally:
        client.stop()
    connected = max(1, opened["connected"])
    return {
        "generator": "lean (bench/_ws_raw.py, one process)",
        "connect_seconds": connect_seconds,
        "connected": opened["connected"],
        "connect_failures": opened["failures"],
        "sent": paced["sent"],
        "acked": paced["acked"],
        "unacked": paced["unacked"],
        "unknown_acks": paced["unknown_acks"],
        "achieved_rate_per_second": round(paced["acked"] / args.duration, 1),
        "message_to_ack": ms(percentiles(paced["latencies_ns"])),
        "frames_received": paced["frames"],
        "interrupted": paced["interrupted"],
        "errors": {"error_frames": paced["errors"]} if paced["errors"] else {},
        "unexpected_closes": {"closes": paced["closes"]} if paced["closes"] else {},
        "server_rss_mib": {
            "idle": round(rss_idle / 1024, 1),
            "connected": round(rss_connected / 1024, 1),
            "after_load": round(rss_active / 1024, 1),
        },
        "server_kib_per_connection": {
            "connected_idle": round((rss_connected - rss_idle) / connected, 1),
            "after_load": round((rss_active - rss_idle) / connected, 1),
        },
        # CPU over the sending and the wait for the last acks.
        "server_cpu_percent": round(100 * server_cpu / active, 1),
        "generator_cpu_percent": round(100 * load_cpu / active, 1),
        "server_health_after": server.healthz()["persistence"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s in total")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--processes", type=int, default=2, help="generator processes")
    parser.add_argument(
        "--generator",
        choices=("websockets", "lean"),
        default="websockets",
        help="the load generator: websockets clients (default) or the lean raw client",
    )
    parser.add_argument("--chunk-delay", type=float, default=0.02)
    parser.add_argument("--python", help="the interpreter that runs the server")
    parser.add_argument(
        "--server-root",
        type=Path,
        help="the Samvad checkout the server runs from (default: this one); "
        "the generators are always this checkout's",
    )
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--gc",
        help="run the server through bench/_serve.py with this GC mode "
        "(default, freeze, off or T0,T1,T2) and report its collection pauses",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="record the server with py-spy during phase 3 (svg/speedscope)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.generator == "lean" and args.gc:
        parser.error("--gc reports with the websockets generators only")
    raise_open_files(args.connections + 1000)

    env = {
        "SAMVAD_LOG_LEVEL": "WARNING",
        "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS": str(args.chunk_delay),
    }
    for item in args.server_env:
        name, _, value = item.partition("=")
        env[name] = value
    gc_stats = Path(tempfile.gettempdir()) / f"samvad-bench-gc-{os.getpid()}.json"
    gc_types = Path(tempfile.gettempdir()) / f"samvad-bench-gc-types-{os.getpid()}.json"
    if args.gc:
        env["SAMVAD_BENCH_GC"] = args.gc
        env["SAMVAD_BENCH_GC_STATS"] = str(gc_stats)
        env["SAMVAD_BENCH_GC_TYPES"] = str(gc_types)
    server = ServerProcess(
        store="memory",
        env=env,
        open_files=args.connections + 1000,
        python=args.python,
        module="bench._serve" if args.gc else "samvad",
        root=args.server_root.resolve() if args.server_root else None,
    )
    figures: dict[str, Any] = {
        "connections": args.connections,
        "rate_per_second": args.rate,
        "duration_s": args.duration,
        "generator_processes": args.processes,
        "server_env": env,
        "server": "python -m samvad serve --store memory (1 process)",
        "server_root": str(args.server_root or "this checkout"),
    }
    if args.generator == "lean":
        figures["generator_processes"] = 1
        with server:
            figures.update(run_lean(server, args))
        emit("ws_load", figures, args.json)
        return
    with server:
        time.sleep(1)
        rss_idle = server.rss_kib()
        config = LoadConfig(
            url=server.ws_url,
            connections=args.connections,
            rate=args.rate,
            duration=args.duration,
            processes=args.processes,
        )
        run = LoadRun(config)
        began = time.monotonic()
        run.start()
        figures["connect_seconds"] = round(time.monotonic() - began, 1)
        time.sleep(2)
        rss_connected = server.rss_kib()
        server_cpu, load_cpu = server.cpu_seconds(), sum(cpu_seconds(p) for p in run.pids)
        wall = time.monotonic()
        run.go()
        profiler = start_profiler(args.profile, server.pid, args.duration) if args.profile else None
        time.sleep(args.duration)
        if profiler is not None:
            profiler.wait()
        active = time.monotonic() - wall
        server_cpu = server.cpu_seconds() - server_cpu
        load_cpu = sum(cpu_seconds(p) for p in run.pids) - load_cpu
        rss_active = server.rss_kib()
        if args.gc:
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(3)
        figures.update(summarize(run, args.duration))
        connected = max(1, figures["connected"])
        figures["server_rss_mib"] = {
            "idle": round(rss_idle / 1024, 1),
            "connected": round(rss_connected / 1024, 1),
            "after_load": round(rss_active / 1024, 1),
        }
        figures["server_kib_per_connection"] = {
            "connected_idle": round((rss_connected - rss_idle) / connected, 1),
            "after_load": round((rss_active - rss_idle) / connected, 1),
        }
        figures["server_cpu_percent"] = round(100 * server_cpu / active, 1)
        figures["generator_cpu_percent"] = round(100 * load_cpu / active, 1)
        figures["server_health_after"] = server.healthz()["persistence"]
    if args.gc and gc_stats.exists():
        figures["server_gc"] = json.loads(gc_stats.read_text())
        gc_stats.unlink()
    if args.gc and gc_types.exists():
        figures["server_gc_tracked_after_load"] = json.loads(gc_types.read_text())
        gc_types.unlink()
    emit("ws_load", figures, args.json)


if __name__ == "__main__":
    main()
