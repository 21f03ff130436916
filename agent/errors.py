"""The API's error names and statuses (SPEC 8).  Every error the RPC layer returns is
one of these; the message names the offending field where there is one."""

from __future__ import annotations


class ApiError(Exception):
    name = "InternalError"
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_wire(self) -> dict:
        out = {"error": self.name, "message": self.message, "status": self.status}
        if self.field is not None:
            out["field"] = self.field
        return out


class BadRequest(ApiError):
    name, status = "BadRequest", 400


class Unauthorized(ApiError):
    name, status = "Unauthorized", 401


class QuotaExceeded(ApiError):
    name, status = "QuotaExceeded", 402


class NotFound(ApiError):
    name, status = "NotFound", 404


class Conflict(ApiError):
    name, status = "Conflict", 409


class RateLimited(ApiError):
    name, status = "RateLimited", 429


class InternalError(ApiError):
    name, status = "InternalError", 500


class Unavailable(ApiError):
    name, status = "Unavailable", 503


BY_NAME = {c.name: c for c in (BadRequest, Unauthorized, QuotaExceeded, NotFound, Conflict,
                                RateLimited, InternalError, Unavailable)}
