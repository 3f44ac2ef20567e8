"""Machine-readable API errors: one exception type, one JSON shape, one set of handlers.

Every 4xx/5xx the API produces has the body
``{"error": {"code": "<snake_case>", "message": "<human text>", "param": <field or null>, "type": "<kind>",
"request_id": "<the x-request-id of the request>"}, "detail": "<message>"}`` — the OpenAI error shape (with its
`type` vocabulary, derived from the status) plus `detail` for FastAPI-style clients and the request id to quote in a
bug report (`REQUEST_ID`, set per request by `api/middleware.py`). Request-validation failures map to 400 `invalid_request` with
the offending field in `param`; oversized bodies to 413 `body_too_large`. A database that is unreachable, paused,
timing out or out of pooled connections answers 503 `service_unavailable` with `Retry-After`, never a 500: the
request may be retried as is (submits are idempotent by seq_id / `X-Idempotency-Key`).

Limits: error codes are a closed vocabulary documented in `ErrorCode`; messages are for humans and may change.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.db.session import database_unavailable

logger = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str | None] = ContextVar("loom_request_id", default=None)
"""The id of the request being answered (the `x-request-id` header), for error bodies and logs."""

RETRY_AFTER_S = 2
"""What a 503 asks clients to wait before retrying (`Retry-After`, in seconds)."""


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    """403: a credential other than an API key (a signed download or trace link) is wrong or expired."""
    NOT_FOUND = "not_found"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_NOT_FOUND = "model_not_found"
    RATE_LIMITED = "rate_limit_exceeded"
    """429: a tenant's requests or tokens per minute are used up (`api/rate_limits.py`); `Retry-After` says when."""
    QUOTA_EXCEEDED = "quota_exceeded"
    """429: a tenant's live runs or stored bytes are at its quota; waiting does not help (`x-should-retry: false`)."""
    CONFLICT = "conflict"
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TOO_LARGE = "request_too_large"
    """The request is well-formed but costs more than a worker of its base model can ever run (`api/admission.py`)."""
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNSUPPORTED = "unsupported"
    """A Tinker feature a self-hosted Loom does not offer; the message says why."""
    INTERNAL = "internal_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INVALID_IMAGE = "invalid_image"
    """400: an image is corrupt, too large, animated, of another format than declared, or not fetchable."""
    IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
    """400: an image chunk's `expected_tokens` is not the number of tokens the server computes for the image."""
    SESSION_FINISHED = "session_finished"
    """410: the session was finished (`ServiceClient.close()`); it takes no new work, its futures still resolve."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers
        """Extra response headers (`Retry-After`, or what a Hugging Face Hub client reads from an error)."""


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_body(code: str, message: str, param: str | None = None, status: int = 400) -> dict:
    kind = ERROR_TYPES.get(status, "api_error")
    error = {"code": code, "message": message, "param": param, "type": kind, "request_id": REQUEST_ID.get()}
    return {"error": error, "detail": message}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, ErrorCode.INVALID_REQUEST, message, param)


def not_found(message: str) -> APIError:
    return APIError(404, ErrorCode.NOT_FOUND, message)


REQUEST_PARTS = ("body", "query", "path", "header", "cookie")
"""Where FastAPI says a rejected value came from (the first element of its `loc`); `param` names the field only."""


def invalid_from_validation(errors: list[dict]) -> APIError:
    """A 400 naming the first field pydantic rejected (from FastAPI's body validation or `model_validate`)."""
    first = errors[0] if errors else {}
    loc = list(first.get("loc", ()))
    if loc and loc[0] in REQUEST_PARTS:
        loc = loc[1:]
    param = ".".join(str(p) for p in loc) or None
    return invalid(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)


def unavailable(message: str) -> APIError:
    """A 503 the client may retry as is, after `Retry-After`."""
    return APIError(503, ErrorCode.SERVICE_UNAVAILABLE, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def unavailable_response(message: str = "the database is temporarily unavailable; retry shortly") -> JSONResponse:
    return JSONResponse(
        error_body(ErrorCode.SERVICE_UNAVAILABLE, message, status=503),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, exc.param, exc.status), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_from_validation(exc.errors())
        return JSONResponse(error_body(error.code, error.message, error.param), status_code=400)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            raise exc  # an ordinary bug: the server error middleware answers 500
        logger.warning("database unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return unavailable_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_REQUEST
        return JSONResponse(error_body(code, str(exc.detail), status=exc.status_code), status_code=exc.status_code)
