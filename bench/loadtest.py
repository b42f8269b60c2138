"""Load-test a running Samvad deployment: REST and WebSocket figures, as in docs/benchmarks.md.

    scripts/loadtest URL [--mode both|rest|ws] [--connections 1000] [--rate 1000]
                     [--duration 30] [--rest-connections 50] [--processes 2]
                     [--token TOKEN] [--header 'Name: value'] [--json PATH]

``URL`` is the server's base URL (``http(s)://host:port``) or its WebSocket
endpoint (``ws(s)://host:port/ws``); the other is derived from it.

* REST: saves a state for ``--users`` test users (``POST .../state``), then
  runs closed-loop ``GET /api/session/{userId}/state`` and
  ``POST /api/session/{userId}/history`` for ``--duration`` seconds each with
  ``--rest-connections`` connections (``wrk`` when installed, else a Python
  generator): requests/s, latency p50/p90/p99, non-2xx responses.
* WebSocket: opens ``--connections`` sessions (``start`` with ``--token`` when
  given) from ``--processes`` generator processes, then sends ``--rate``
  messages per second in total for ``--duration`` seconds: message-to-ack
  p50/p99, errors, unexpected closes, messages never acknowledged.

``--header`` (repeatable) adds an HTTP header to every REST request and
WebSocket handshake, e.g. ``--header 'Authorization: Bearer KEY'``. Test
users are named ``--user-prefix``-N (a random prefix by default); they stay
in the deployment's store unless it is erased by other means. Run the
generator on another machine than the server when you can: on one machine
they share the cores, and the figures say how much CPU the generator used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
import uuid
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cpu_seconds, emit, ms, percentiles, raise_open_files
from bench._http_load import run_load
from bench._wrk import GET_STATE, POST_HISTORY, run_wrk, wrk_available
from bench._ws_load import LoadConfig, LoadRun, merge_results

QUESTION = b'{"role":"user","content":"What documents do I need for a home loan?"}'


def urls(url: str) -> tuple[str, str]:
    """(REST base URL, WebSocket URL) from either."""
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    if parts.scheme in ("ws", "wss"):
        path = parts.path[: -len("/ws")] if parts.path.endswith("/ws") else parts.path
        base = urlunsplit(("https" if secure else "http", parts.netloc, path.rstrip("/"), "", ""))
        return base, url
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    base = url.rstrip("/")
    ws = urlunsplit(
        ("wss" if secure else "ws", parts.netloc, parts.path.rstrip("/") + "/ws", "", "")
    )
    return base, ws


def parse_headers(items: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"a header is 'Name: value'; got {item!r}")
        headers[name.strip()] = value.strip()
    return headers


def get_state_request(prefix: str, users: int, n: int) -> tuple[str, str, bytes | None]:
    return "GET", f"/api/session/{prefix}{n % users}/state", None


def post_history_request(prefix: str, users: int, n: int) -> tuple[str, str, bytes | None]:
    return "POST", f"/api/session/{prefix}{n % users}/history", QUESTION


def seed_states(base: str, prefix: str, users: int, headers: dict[str, str]) -> int:
    failures = 0
    for i in range(users):
        body = json.dumps({"language": "en", "conversationContext": {"topic": "load test"}})
        request = urllib.request.Request(
            f"{base}/api/session/{prefix}{i}/state",
            data=body.encode(),
            headers={"Content-Type": "application/json", **headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except OSError:
            failures += 1
    return failures


def rest(args: argparse.Namespace, base: str, headers: dict[str, str]) -> dict[str, Any]:
    prefix = f"{args.user_prefix}-rest-"
    generator = args.generator or ("wrk" if wrk_available() else "python")
    figures: dict[str, Any] = {
        "generator": generator,
        "connections": args.rest_connections,
        "duration_s": args.duration,
        "users": args.users,
        "seed_failures": seed_states(base, prefix, args.users, headers),
    }
    for name in ("get_state", "post_history"):
        if generator == "wrk":
            script = (GET_STATE if name == "get_state" else POST_HISTORY).format(
                users=args.users, prefix=prefix
            )
            figures[name], _ = run_wrk(
                base,
                script,
                connections=args.rest_connections,
                duration=args.duration,
                headers=headers,
            )
        else:
            request = get_state_request if name == "get_state" else post_history_request
            figures[name] = run_load(
                base,
                partial(request, prefix, args.users),
                connections=args.rest_connections,
                duration=args.duration,
                processes=args.processes,
                headers=headers,
            )
    return figures


def websocket(args: argparse.Namespace, ws_url: str, headers: dict[str, str]) -> dict[str, Any]:
    config = LoadConfig(
        url=ws_url,
        connections=args.connections,
        rate=args.rate,
        duration=args.duration,
        processes=args.processes,
        user_prefix=f"{args.user_prefix}-ws",
        token=args.token,
        headers=tuple(headers.items()),
    )
    run = LoadRun(config)
    began = time.monotonic()
    run.start()
    connect_seconds = time.monotonic() - began
    cpu_before = sum(cpu_seconds(pid) for pid in run.pids)
    wall = time.monotonic()
    run.go()
    time.sleep(args.duration)
    generator_cpu = sum(cpu_seconds(pid) for pid in run.pids) - cpu_before
    active = time.monotonic() - wall
    merged = merge_results(run.results())
    return {
        "connections": args.connections,
        "rate_per_second": args.rate,
        "duration_s": args.duration,
        "generator_processes": args.processes,
        "connect_seconds": round(connect_seconds, 1),
        "connected": merged.connected,
        "connect_failures": merged.connect_failures,
        "sent": merged.sent,
        "acked": merged.acked,
        "unacked": merged.unacked,
        "achieved_rate_per_second": round(merged.acked / args.duration, 1),
        "message_to_ack": ms(percentiles([latency for _, latency in merged.samples])),
        "replies_complete": merged.replies_complete,
        "replies_incomplete": merged.replies_incomplete,
        "interrupted": merged.interrupted,
        "errors": dict(merged.errors),
        "unexpected_closes": dict(merged.closes),
        "generator_cpu_percent": round(100 * generator_cpu / active, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/loadtest",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("url", help="http(s)://host:port or ws(s)://host:port/ws")
    parser.add_argument("--mode", choices=["both", "rest", "ws"], default="both")
    parser.add_argument("--connections", type=int, default=1000, help="WebSocket connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="WebSocket messages/s, total")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--rest-connections", type=int, default=50)
    parser.add_argument("--users", type=int, default=1000, help="REST test users")
    parser.add_argument("--processes", type=int, default=2, help="generator processes")
    parser.add_argument("--generator", choices=["wrk", "python"], help="REST load generator")
    parser.add_argument("--token", help="token for the WebSocket start frame")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--user-prefix", default="loadtest-" + uuid.uuid4().hex[:6])
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        base, ws_url = urls(args.url)
        headers = parse_headers(args.header)
    except ValueError as exc:
        parser.error(str(exc))
    raise_open_files(args.connections + 1000)
    figures: dict[str, Any] = {"target": base, "websocket": ws_url, "user_prefix": args.user_prefix}
    if args.mode in ("both", "rest"):
        figures["rest"] = rest(args, base, headers)
    if args.mode in ("both", "ws"):
        figures["ws"] = websocket(args, ws_url, headers)
    emit("loadtest", figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
