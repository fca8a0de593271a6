"""The download routes' fast path: GET/HEAD answered from the lookup cache (cache.py) without
Starlette's routing and exception middleware or a database round trip.

Profiled under wrk (64 KiB ranges of a hot file), a cached answer costs the server about a third
of a full one; the rest of a request's cost is the server's own and the socket's. Everything the
fast path is not sure of (a cache miss, any error, a file not on this disk or in the cloud) goes
on to the app, whose handlers (downloads.py) answer as they always did and fill the cache. Both
build the answer with `downloads.respond`, so they answer byte for byte alike.
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from . import links
from .auth import bearer_token, cached_user, token_hash
from .cache import LookupCache
from .downloads import AccelResponse, BlobResponse, Representation, download_lookup, respond
from .errors import MediaError
from .files import parse_file_id


class _Route(NamedTuple):
    path: str  # the route template, as metrics.route_template reads it from scope["route"]


_CONTENT = _Route("/files/{file_id}/content")
_FAST_ROUTES = {"/download": _Route("/download"), "/record": _Route("/record")}
_CONTENT_PATH = re.compile(r"/files/([^/]+)/content")


class FastDownloads:
    """ASGI middleware: the download routes' cache hits answered here, all else passed on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and not scope.get("root_path"):
            response = await self._answer(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope) -> BlobResponse | AccelResponse | None:
        path = scope["path"]
        route = _FAST_ROUTES.get(path)
        match = None if route is not None else _CONTENT_PATH.fullmatch(path)
        if route is None and match is None:
            return None
        request = Request(scope)
        cache: LookupCache | None = request.app.state.cache
        if cache is None:
            return None
        try:
            rep = _cached(request, cache, route, match.group(1) if match else None)
            if rep is None:
                return None
            # /download answers ?id= or ?path=, exactly one (download_lookup made sure of it).
            by_path = route is _FAST_ROUTES["/download"] and "path" in request.query_params
            response = await respond(request, rep, on_loop=True, by_path=by_path)
        except MediaError:
            return None  # the app answers it, from the database, as it would have anyway
        if response is None:
            cache.forget_file(rep.id)
            return None
        scope["route"] = route or _CONTENT
        return response


def _cached(request: Request, cache: LookupCache, route: _Route | None,
            file_id: str | None) -> Representation | None:
    """The File this request may be served, as the cache knows it; None when it does not know.
    Raises MediaError where the app's handler would answer an error."""
    params = request.query_params
    if file_id is not None and "signature" in params:
        query = links.parse_query(params)
        links.check_expiry(query, time.time())
        rep: Representation | None = cache.file(parse_file_id(file_id))
        if rep is not None:
            links.verify(request.app.state.link_key, rep.id, query, rep.sha256, rep.blob_id)
        return rep
    if route is _FAST_ROUTES["/record"]:
        if "id" not in params or "user" not in params:
            return None
        rep = cache.file(parse_file_id(params["id"]))
        user_id = parse_file_id(params["user"])
        return rep if rep is not None and rep.record and rep.owner_id == user_id else None
    caller = cached_user(cache, token_hash(bearer_token(request)), request.app.state.settings)
    if caller is None:
        return None  # the app's handler asks the database (and answers 401 or records the use)
    lookup: dict[str, Any] = download_lookup(params) if file_id is None else {"file_id": parse_file_id(file_id)}
    if "path" in lookup:
        return cache.file_at(caller, lookup["path"])
    rep = cache.file(lookup["file_id"])
    return rep if rep is not None and rep.owner_id == caller else None
