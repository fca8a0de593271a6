"""Typed errors raised by domain code; the app turns each into RFC 9457 problem+json."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import ClassVar

from sqlalchemy import exc as sa_exc
from starlette.responses import JSONResponse

log = logging.getLogger("mediad")
PROBLEM_TYPE_BASE = "https://mediad.dev/problems/"
# RFC 9110's names where Python's http.HTTPStatus (before 3.13) still has RFC 2616's, so that a
# title does not change with the Python that runs the server; 460 is tus's own.
_TITLES = {413: "Content Too Large", 416: "Range Not Satisfiable", 422: "Unprocessable Content",
           460: "Checksum Mismatch"}


class MediaError(Exception):
    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"

    def __init__(self, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class BadRequest(MediaError):
    status, slug = 400, "malformed-request"


class Unauthorized(MediaError):
    status, slug = 401, "unauthorized"

    def __init__(self, detail: str = "a valid bearer token is required") -> None:
        super().__init__(detail, {"WWW-Authenticate": 'Bearer realm="mediad"'})


class Forbidden(MediaError):
    status, slug = 403, "forbidden"


class NotFound(MediaError):
    status, slug = 404, "not-found"


class Conflict(MediaError):
    status, slug = 409, "conflict"


class Locked(MediaError):
    status, slug = 423, "locked"


class ChecksumMismatch(MediaError):
    status, slug = 460, "checksum-mismatch"  # tus checksum extension


class PreconditionFailed(MediaError):
    status, slug = 412, "precondition-failed"


class PayloadTooLarge(MediaError):
    status, slug = 413, "payload-too-large"


class UnsupportedMediaType(MediaError):
    status, slug = 415, "unsupported-media-type"


class RangeNotSatisfiable(MediaError):
    status, slug = 416, "range-not-satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"no requested range overlaps the {size} bytes of the file",
                         {"Content-Range": f"bytes */{size}"})


class Unprocessable(MediaError):
    status, slug = 422, "invalid-field"


class TooManyRequests(MediaError):
    status, slug = 429, "too-many-requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, {"Retry-After": str(retry_after)})


class ServiceUnavailable(MediaError):
    status, slug = 503, "service-unavailable"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail, {"Retry-After": str(retry_after)})


class InsufficientStorage(MediaError):
    status, slug = 507, "insufficient-storage"


class QuotaExceeded(InsufficientStorage):
    slug = "quota-exceeded"


def problem(status: int, detail: str, slug: str | None = None,
            headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An application/problem+json response (RFC 9457)."""
    return JSONResponse(problem_body(status, detail, slug), status_code=status, headers=dict(headers or {}),
                        media_type="application/problem+json")


def problem_body(status: int, detail: str, slug: str | None = None) -> dict[str, object]:
    """The RFC 9457 members every mediad error carries (also for the server's own answers)."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return {"type": PROBLEM_TYPE_BASE + (slug or phrase.lower().replace(" ", "-")),
            "title": _TITLES.get(status, phrase), "status": status, "detail": detail}


def error_response(exc: MediaError) -> JSONResponse:
    return problem(exc.status, exc.detail, exc.slug, exc.headers)


# Whatever layer notices that the database cannot serve us now (db.py maps driver errors to these).
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, ConnectionError)


def database_unavailable(exc: Exception) -> JSONResponse:
    """503 + Retry-After for one of DATABASE_UNAVAILABLE, logged once here for every route."""
    log.warning("database unavailable: %s", exc.__class__.__name__, extra={"error": str(exc)[:500]})
    return problem(503, "the database is unavailable; retry shortly", "service-unavailable", {"Retry-After": "2"})
