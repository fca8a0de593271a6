"""HTTP conventions that hold for every route: trailing slashes, JSON's charset, 405's Allow, CORS.

Applied around the router once, so routes added anywhere follow them without knowing.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .errors import problem

_JSON = b"application/json"
_JSON_UTF8 = b"application/json; charset=utf-8"


class Conventions:
    """`/files/` is `/files` (no 307 with an empty body to follow), and JSON answers name their
    charset (`application/json; charset=utf-8`, as API.md's conventions say)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            # In place, so the telemetry around us sees the route the router matches; noted, for a
            # page whose relative links depend on it (/docs).
            scope["path"] = path.rstrip("/") or "/"
            scope["mediad.trailing_slash"] = True
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"

        async def send_with_charset(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(name, _JSON_UTF8 if name.lower() == b"content-type" and value == _JSON
                                       else value) for name, value in message.get("headers", ())]
            await send(message)

        await self.app(scope, receive, send_with_charset)


def allowed_methods(routes: Iterable[BaseRoute], path: str) -> str:
    """Every method some route serves at `path` (RFC 9110 §15.5.6: a 405's Allow lists them all;
    Starlette lists only the first route's when a path is served by several)."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return ", ".join(sorted(methods))


# The tus request headers, and what a cross-origin client must be able to read from the answers.
_TUS_REQUEST_HEADERS = ["Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata",
                        "Upload-Checksum", "Upload-Defer-Length", "Upload-Concat", "X-HTTP-Method-Override"]
_EXPOSED = ["Location", "Upload-Offset", "Upload-Length", "Upload-Expires", "Upload-Metadata",
            "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm",
            "Mediad-File-Id", "ETag", "Content-Range", "Content-Disposition", "Content-Length",
            "Retry-After", "X-Request-Id"]


class _ProblemCORS(CORSMiddleware):
    """Starlette's, but a refused preflight is problem+json like every other error (Starlette
    answers it in plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # "origin, headers"…
        return problem(400, f"this cross-origin request is not allowed, by its {refused}: see "
                            "MEDIAD_CORS_ORIGINS and the request headers mediad accepts", "cors-refused",
                       {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")})


def cors(settings: Settings) -> list[Middleware]:
    """MEDIAD_CORS_ORIGINS as Starlette's CORSMiddleware; unset → none (same-origin only).
    Bearer tokens travel in a header, never a cookie, so credentials stay off."""
    origins = settings.cors_origin_list
    if not origins:
        return []
    return [Middleware(_ProblemCORS, allow_origins=origins, allow_credentials=False,
                       allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Disposition", "Range", "If-Match",
                                      "If-None-Match", "If-Modified-Since", "If-Unmodified-Since",
                                      "If-Range", "X-Request-Id", *_TUS_REQUEST_HEADERS],
                       expose_headers=_EXPOSED, max_age=600)]
