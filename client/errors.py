"""Exceptions raised by the Loom SDK.

Hierarchy (mirrors tinker/openai naming so ``except`` clauses port over)::

    LoomError
    ├── APIError
    │   ├── APIConnectionError ── APITimeoutError
    │   └── APIStatusError (status_code, code, body)
    │       ├── BadRequestError 400        ├── ConflictError 409
    │       ├── AuthenticationError 401    ├── UnprocessableEntityError 422
    │       ├── PermissionDeniedError 403  ├── RateLimitError 429
    │       ├── NotFoundError 404          └── InternalServerError 5xx
    └── RequestFailedError (request_id, category)  — a future finished failed

``APIStatusError.code`` is the server's machine-readable error code, read from
whichever of the common body shapes the server used (``{"code"}``,
``{"error": {"code"}}``, ``{"detail": {"code"}}``); ``None`` if absent.
Every exception pickles (worker processes may re-raise them).
"""

from __future__ import annotations

from typing import Any


class LoomError(Exception):
    """Base class of every SDK error."""


class APIError(LoomError):
    """A problem talking to the server."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> Any:
        return (self.__class__, (self.message,))


class APIConnectionError(APIError):
    """The request never got an HTTP response (connect/read failure)."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIStatusError(APIError):
    """The server answered with a 4xx/5xx status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.body = body
        self.request_id = request_id

    @property
    def param(self) -> str | None:
        """The offending request field, when the server names one (``error.param``)."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        value = error.get("param") if isinstance(error, dict) else None
        return str(value) if value is not None else None

    def __reduce__(self) -> Any:
        return (
            _rebuild_status_error,
            (self.__class__, self.message, self.status_code, self.code, self.body, self.request_id),
        )

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        return f"HTTP {self.status_code}{code}: {self.message}"


def _rebuild_status_error(
    cls: type, message: str, status_code: int, code: Any, body: Any, request_id: Any
) -> APIStatusError:
    return cls(message, status_code=status_code, code=code, body=body, request_id=request_id)


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


_STATUS_TO_CLASS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


class RequestFailedError(LoomError):
    """A submitted request finished in the failed state (``RequestFailedResponse``)."""

    def __init__(self, message: str, *, request_id: str | None = None, category: str = "unknown") -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category
        """``"user"`` (bad input; do not retry), ``"server"`` or ``"unknown"``."""

    def __reduce__(self) -> Any:
        return (_rebuild_request_failed, (self.message, self.request_id, self.category))

    def __str__(self) -> str:
        return f"request {self.request_id} failed ({self.category}): {self.message}"


def _rebuild_request_failed(message: str, request_id: Any, category: str) -> RequestFailedError:
    return RequestFailedError(message, request_id=request_id, category=category)


def _code_and_message(body: Any) -> tuple[str | None, str | None]:
    """Pull ``(code, message)`` out of the usual JSON error shapes."""
    if isinstance(body, str):
        return None, body
    if not isinstance(body, dict):
        return None, None
    code = body.get("code") or body.get("error_code")
    message = body.get("message")
    for key in ("error", "detail"):
        inner = body.get(key)
        if isinstance(inner, dict):
            code = code or inner.get("code") or inner.get("error_code") or inner.get("type")
            message = message or inner.get("message") or inner.get("msg") or inner.get("detail")
        elif isinstance(inner, str):
            message = message or inner
        elif isinstance(inner, list) and inner:  # FastAPI validation errors
            message = message or "; ".join(
                str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in inner
            )
            code = code or ("validation_error" if key == "detail" else None)
    return (str(code) if code is not None else None), (str(message) if message is not None else None)


def status_error(status_code: int, body: Any, *, request_id: str | None = None) -> APIStatusError:
    """Build the typed error for an HTTP error response."""
    code, message = _code_and_message(body)
    if status_code >= 500:
        cls: type[APIStatusError] = InternalServerError
    else:
        cls = _STATUS_TO_CLASS.get(status_code, APIStatusError)
    return cls(message or f"HTTP {status_code}", status_code=status_code, code=code, body=body, request_id=request_id)
