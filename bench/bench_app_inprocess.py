"""Samvad's ASGI app against the bare Starlette app, in process: no server, no sockets.

    .venv/bin/python bench/bench_app_inprocess.py [--requests 3000] [--rounds 7]
    .venv/bin/python bench/bench_app_inprocess.py --root OTHER_CHECKOUT   # another version

What ``bench_overhead.py`` cannot separate on a loaded machine: the app's own
CPU per request. ``GET /api/session/{u}/state`` (100 users with a saved
state, memory store, no journal) and ``POST /api/session/{u}/history`` (one
200-character message to each of 100 users whose histories are at the
100-message cap, and to users new to each round) are sent straight into
each app's ASGI callable, the apps alternating round by round; the figure is the best round's
process CPU per request (``gc.freeze()`` and the server's GC thresholds, as
``samvad serve`` sets them). uvicorn's own work (parsing, socket writes) is the
same for both apps and is not in these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --root DIR: import samvad (and the bare app) from another checkout.
sys.path.insert(
    0,
    sys.argv[sys.argv.index("--root") + 1]
    if "--root" in sys.argv[:-1]
    else str(Path(__file__).resolve().parent.parent),
)

from bench._bare import create_app as bare_app
from bench._common import emit
from samvad.config import Settings
from samvad.web.app import create_app

_HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
_STATE = b'{"language":"en","conversationContext":{"topic":"home loans","step":1}}'
_MESSAGE = b'{"role":"user","content":"' + b"x" * 200 + b'"}'


def _scope(state: dict[str, Any], method: str, path: str, headers: list[Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": state,
    }


async def _send(message: Any) -> None:
    pass


class _Lifespan:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.done = {
            kind: asyncio.Event()
            for kind in ("lifespan.startup.complete", "lifespan.shutdown.complete")
        }
        self.task: asyncio.Task[None] | None = None

    async def _reply(self, message: Any) -> None:
        if message["type"] not in self.done:
            raise RuntimeError(f"the app's lifespan answered {message['type']}")
        self.done[message["type"]].set()

    async def _wait(self, kind: str) -> None:
        await self.done[kind].wait()

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        self.task = asyncio.create_task(self.app(scope, self.queue.get, self._reply))
        await self.queue.put({"type": "lifespan.startup"})
        await self._wait("lifespan.startup.complete")

    async def stop(self) -> None:
        await self.queue.put({"type": "lifespan.shutdown"})
        await self._wait("lifespan.shutdown.complete")
        if self.task is not None:
            await self.task


async def run(requests: int, rounds: int) -> dict[str, Any]:
    apps = {
        "samvad": _Lifespan(create_app(Settings(store="memory", journal=False))),
        "bare": _Lifespan(bare_app()),
    }
    for lifespan in apps.values():
        await lifespan.start()
    body_headers = [*_HEADERS, (b"content-type", b"application/json")]

    def with_body(payload: bytes) -> Any:
        async def body() -> dict[str, Any]:
            return {"type": "http.request", "body": payload, "more_body": False}

        return body

    state_body, message_body = with_body(_STATE), with_body(_MESSAGE)
    for i in range(100):
        scope = _scope(apps["samvad"].state, "POST", f"/api/session/s-{i}/state", body_headers)
        await apps["samvad"].app(scope, state_body, _send)
        for _ in range(100):
            scope = _scope(
                apps["samvad"].state, "POST", f"/api/session/s-{i}/history", body_headers
            )
            await apps["samvad"].app(scope, message_body, _send)

    # A request that finds its view uncached loads it in a task: let those
    # run, as a server's loop would between requests.
    await asyncio.sleep(0.2)

    async def no_body() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    # The path of request i of round r.
    workloads: dict[str, tuple[str, Callable[[int, int], str], Any, Any]] = {
        "get_state": ("GET", lambda r, i: f"/api/session/s-{i % 100}/state", _HEADERS, no_body),
        "post_history_full": (
            "POST",
            lambda r, i: f"/api/session/s-{i % 100}/history",
            body_headers,
            message_body,
        ),
        # Users new to each round (bench_overhead's post_history_empty).
        "post_history_empty": (
            "POST",
            lambda r, i: f"/api/session/n{r}-{i}/history",
            body_headers,
            message_body,
        ),
    }
    figures: dict[str, Any] = {"requests_per_round": requests, "rounds": rounds}
    for workload, (method, path, headers, body) in workloads.items():
        best = {name: float("inf") for name in apps}
        for round_ in range(rounds):
            for name, lifespan in apps.items():
                scopes = [
                    _scope(lifespan.state, method, path(round_, i), headers)
                    for i in range(requests)
                ]
                started = time.process_time()
                for scope in scopes:
                    await lifespan.app(dict(scope), body, _send)
                best[name] = min(best[name], (time.process_time() - started) / requests * 1e6)
                await asyncio.sleep(0)
        figures[f"{workload}_cpu_us"] = {name: round(value, 1) for name, value in best.items()}
        figures[f"{workload}_ratio_samvad_to_bare"] = round(best["samvad"] / best["bare"], 2)
    for lifespan in apps.values():
        await lifespan.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--root", metavar="DIR", help="the checkout to import samvad from")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 10_000)
    emit("app_inprocess", asyncio.run(run(args.requests, args.rounds)), args.json)


if __name__ == "__main__":
    main()
