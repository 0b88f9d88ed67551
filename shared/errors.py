"""Domain exceptions. Raise these; one handler per app turns them into `{"error": {code, message, details}}`."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: dict[str, Any] | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(DomainError):
    pass


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="flywheel"'}


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"


class Unprocessable(DomainError):
    status = 422
    code = "unprocessable"


class _RetryLater(DomainError):
    def __init__(self, message: str, details: dict[str, Any] | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message, details)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(_RetryLater):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(_RetryLater):
    status = 503
    code = "unavailable"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}
