"""The demo page (``/demo/``): chat and voice in the browser, with no build step.

Static files from the package (``samvad/web/static``): the page, its script and
style, and the JavaScript client (``clients/js/samvad.js``, linked into the
package). ``/demo/config.json`` tells the page whether to sign in with Firebase
Auth (anonymously, through the Auth REST API; the Auth emulator locally). The
page is served only when :attr:`Settings.demo_enabled` (``SAMVAD_DEMO``): by
default in local mode, never in production unless asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from samvad.config import Settings

__all__ = [
    "EMULATOR_API_KEY",
    "STATIC",
    "firebase_config",
    "routes",
]

STATIC = Path(__file__).parent / "static"
#: The Web API key the page uses against the Auth emulator, which accepts any.
EMULATOR_API_KEY = "demo-api-key"
_GOOGLE_AUTH_ORIGINS = "https://identitytoolkit.googleapis.com https://securetoken.googleapis.com"


def firebase_config(settings: Settings) -> dict[str, Any] | None:
    """What the page needs to sign in anonymously (None with auth off)."""
    if settings.auth != "firebase":
        return None
    emulator = settings.auth_emulator_host
    return {
        "projectId": settings.firebase_project,
        "apiKey": settings.demo_firebase_api_key or (EMULATOR_API_KEY if emulator else None),
        "authEmulatorHost": emulator,
    }


def _security_headers(settings: Settings, request: Request) -> dict[str, str]:
    # Scripts and styles from this server only; sockets to this host; the
    # Firebase Auth REST endpoints (or the Auth emulator) when auth is on.
    host = request.headers.get("host", "")
    connect = ["'self'", f"ws://{host}", f"wss://{host}"]
    if settings.auth == "firebase":
        if settings.auth_emulator_host:
            connect.append(f"http://{settings.auth_emulator_host}")
        else:
            connect.append(_GOOGLE_AUTH_ORIGINS)
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {' '.join(connect)}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def routes(settings: Settings) -> list[BaseRoute]:
    """The demo's routes, or none when the demo is off."""
    if not settings.demo_enabled:
        return []

    async def page(request: Request) -> Response:
        """``GET /demo/``: the demo page (``/demo`` redirects here)."""
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers=_security_headers(settings, request),
        )

    async def config(request: Request) -> JSONResponse:
        """``GET /demo/config.json``: how the page signs in."""
        return JSONResponse(
            {"auth": settings.auth, "firebase": firebase_config(settings)},
            headers={"Cache-Control": "no-store"},
        )

    static = StaticFiles(directory=STATIC, follow_symlink=True)

    async def assets(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"cache-control", b"no-cache"))
                message["headers"] = headers
            await send(message)

        await static(scope, receive, send_with_headers)

    # One mounted sub-application: static, public files, outside the REST API
    # (its OpenAPI document and security matrix cover the API routes).
    return [
        Mount(
            "/demo",
            routes=[
                Route("/", page, methods=["GET"]),
                Route("/config.json", config, methods=["GET"]),
                Mount("/static", app=assets),
            ],
        )
    ]
