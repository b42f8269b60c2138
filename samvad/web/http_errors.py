"""The one place where errors become HTTP responses.

Every error body has the original's shape, ``{"success": false, "error": "..."}``,
plus the error's stable ``code`` (``samvad.web.schemas.ErrorBody``).
"""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from samvad.errors import (
    AuthUnavailable,
    BadRequest,
    DataUnavailable,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    SamvadError,
    Unauthorized,
)
from samvad.web.schemas import ErrorBody, WireResponse

__all__ = [
    "EXCEPTION_HANDLERS",
    "error_response",
    "http_exception",
    "samvad_error",
    "unexpected_error",
]

logger = logging.getLogger(__name__)

_HTTP_MESSAGES = {
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
}
_HTTP_CODES = {
    404: NotFound.code,
    405: MethodNotAllowed.code,
    413: PayloadTooLarge.code,
}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, *, code: str
) -> Response:
    return WireResponse(ErrorBody(error=message, code=code), status_code=status, headers=headers)


async def samvad_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SamvadError)
    headers = None
    if isinstance(exc, RateLimited | DataUnavailable):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="samvad"'}
    elif isinstance(exc, AuthUnavailable):
        headers = {"Retry-After": "5"}
    return error_response(exc.status_code, exc.message, headers, code=exc.code)


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = _HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
    code = _HTTP_CODES.get(exc.status_code, BadRequest.code)
    return error_response(exc.status_code, message, dict(exc.headers or {}) or None, code=code)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal server error", code=SamvadError.code)


EXCEPTION_HANDLERS = {
    SamvadError: samvad_error,
    HTTPException: http_exception,
    Exception: unexpected_error,
}
