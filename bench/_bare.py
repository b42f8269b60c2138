"""A bare Starlette app on Samvad's server settings: the baseline of ``bench_overhead.py``.

    python -m bench._bare serve --port P

(the command line of ``samvad serve``, so ``bench._common.ServerProcess`` can
run it: ``--store`` is accepted and ignored). Three endpoints on Samvad's
paths, doing the trivial equivalent of Samvad's work and nothing else
(no middleware, no services, no persistence):

* ``GET /api/session/{userId}/state``: a JSON object of the size of Samvad's answer;
* ``POST /api/session/{userId}/history``: the body parsed as JSON, ``role`` and
  ``content`` checked to be strings, a JSON answer of the size of Samvad's;
* ``/ws``: a WebSocket JSON echo: each text frame parsed and sent back
  re-encoded (one frame in, one frame out).

It runs exactly as ``samvad serve`` runs an app: ``samvad.server.SamvadServer``
with ``samvad.server.uvicorn_config`` (uvloop, httptools, the same options)
and therefore the same garbage-collector tuning at start-up, logging at
WARNING like the benchmarked Samvad server. If those two names ever move, a
mirror of today's settings is used instead, and ``/healthz`` says which.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

_ids = itertools.count(1)
_settings_used = ["samvad.server"]


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "server": _settings_used[0]})


async def get_state(request: Request) -> JSONResponse:
    user_id = request.path_params["userId"]
    return JSONResponse(
        {
            "success": True,
            "userId": user_id,
            "state": {
                "language": "en",
                "conversationContext": {"topic": "home loans", "step": 1},
                "updatedAt": "2026-11-29T09:00:00.000Z",
                "isActive": True,
            },
        }
    )


async def post_history(request: Request) -> JSONResponse:
    user_id = request.path_params["userId"]
    body = await request.json()
    if not isinstance(body.get("role"), str) or not isinstance(body.get("content"), str):
        return JSONResponse({"success": False, "error": "role and content"}, status_code=400)
    return JSONResponse(
        {
            "success": True,
            "message": "Message appended to history",
            "userId": user_id,
            "messageId": f"bare-{next(_ids)}",
            "timestamp": "2026-11-29T09:00:00.000Z",
        }
    )


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            frame = json.loads(await websocket.receive_text())
            await websocket.send_text(json.dumps(frame))
    except WebSocketDisconnect:
        pass


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/api/session/{userId}/state", get_state, methods=["GET"]),
            Route("/api/session/{userId}/history", post_history, methods=["POST"]),
            WebSocketRoute("/ws", echo),
        ]
    )


class _MirrorServer(uvicorn.Server):
    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        gc.collect()
        gc.freeze()
        gc.set_threshold(700, 10, 10_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--store", help="ignored (there is no store)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = create_app()
    server: uvicorn.Server
    try:
        from samvad.config import Settings
        from samvad.server import SamvadServer, uvicorn_config

        config = uvicorn_config(app, Settings(), host=args.host, port=args.port)
        server = SamvadServer(config, app)
    except (ImportError, TypeError):
        _settings_used[0] = "mirror"
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            lifespan="on",
            ws="auto",
            ws_max_size=1024 * 1024,
            timeout_graceful_shutdown=5,
            proxy_headers=True,
            server_header=False,
        )
        server = _MirrorServer(config)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
