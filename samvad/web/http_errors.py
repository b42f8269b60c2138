"""The one place where errors become HTTP responses.

Every error body has the original's shape, ``{"success": false, "error": "..."}``.
"""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from samvad.errors import AuthUnavailable, RateLimited, SamvadError, Unauthorized

logger = logging.getLogger(__name__)

_HTTP_MESSAGES = {
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"success": False, "error": message}, status_code=status, headers=headers)


async def samvad_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SamvadError)
    headers = None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="samvad"'}
    elif isinstance(exc, AuthUnavailable):
        headers = {"Retry-After": "5"}
    return error_response(exc.status_code, exc.message, headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = _HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
    return error_response(exc.status_code, message, dict(exc.headers or {}) or None)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal server error")


EXCEPTION_HANDLERS = {
    SamvadError: samvad_error,
    HTTPException: http_exception,
    Exception: unexpected_error,
}
