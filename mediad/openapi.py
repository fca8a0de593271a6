"""The HTTP contract as an OpenAPI 3.1 document (GET /openapi.json) and its reader (GET /docs).

The document is written out here rather than derived from the handlers: it is the contract of
API.md, which the handlers follow, and tests check that every route the app registers is in it.
The docs page is Swagger UI, whose assets come from the swagger-ui-py wheel and are served by
mediad itself, so the page works offline and behind a firewall.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import __version__
from .errors import PROBLEM_TYPE_BASE

Schema = dict[str, Any]

_DOCS_DIR = Path(__file__).parent / "docs"


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


# ---- errors: one reusable response per status ---------------------------------------------------

_PROBLEMS: dict[int, tuple[str, dict[str, str]]] = {
    400: ("Malformed request: bad JSON or header; multipart without a boundary, unterminated, with more "
          "than 100 parts or more than 64 KiB of part headers.", {}),
    401: ("Missing or unknown bearer token.", {"WWW-Authenticate": "Bearer realm=\"mediad\""}),
    403: ("Expired or altered signed link; sign-up closed (POST /users); a missing or wrong password "
          "(DELETE /users/me, POST /users/me/password).", {}),
    404: ("No such resource for this caller (another user's file is indistinguishable from a missing one).",
          {}),
    409: ("Conflict with the current state (name taken, wrong tus offset, upload complete).", {}),
    412: ("A precondition does not hold (If-Match, If-Unmodified-Since; tus: missing Tus-Resumable).",
          {"Tus-Version": "Sent by /uploads: the tus versions supported."}),
    413: ("Over MEDIAD_MAX_UPLOAD_BYTES: refused from the declared length before the body is read, or "
          "as soon as the body grows past it.", {}),
    415: ("Unsupported content: not a WAV that decodes (/records), wrong Content-Type (tus PATCH).", {}),
    416: ("No requested range overlaps the file.", {"Content-Range": "`bytes */<size>`"}),
    422: ("Well-formed but invalid fields (name, path, limit, cursor, password…).", {}),
    423: ("Another PATCH holds this upload; retry when it is done.", {}),
    429: ("Too many failed sign-ins for this name or from this address; retry after Retry-After "
          "(even with the right password).", {"Retry-After": "Seconds until the block ends."}),
    460: ("tus checksum mismatch: the chunk was discarded and the offset is unchanged.", {}),
    503: ("The database (or the node holding the bytes) is unavailable; retry after Retry-After.",
          {"Retry-After": "Seconds to wait before retrying."}),
    507: ("Disk full, or the upload would leave less than MEDIAD_MIN_FREE_BYTES free; or it would take the "
          "user's bytes over their quota (type ending in /quota-exceeded, detail naming quota and usage).",
          {}),
}


def _problem_response(status: int) -> Schema:
    description, headers = _PROBLEMS[status]
    response: Schema = {"description": description,
                        "content": {"application/problem+json": {"schema": _ref("schemas", "Problem")}}}
    if headers:
        response["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                               for name, text in headers.items()}
    return response


def _errors(*statuses: int) -> Schema:
    found = {str(s): _ref("responses", f"Problem{s}") for s in statuses}
    found["default"] = _ref("responses", "ProblemDefault")
    return found


# ---- schemas -------------------------------------------------------------------------------------

_UUID: Schema = {"type": "string", "format": "uuid"}
_TIME: Schema = {"type": "string", "format": "date-time", "examples": ["2026-11-23T07:00:00Z"]}
_BINARY: Schema = {"type": "string", "format": "binary"}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_TEXT: Schema = {"type": "string"}
_ABSOLUTE: Schema = {"type": "string", "pattern": "^/",
                     "description": "Absolute; no `.`/`..` segments, NUL or control characters (else 422)."}


def _object(properties: Schema, required: list[str] | None = None, description: str = "") -> Schema:
    """A JSON object; every property is required unless `required` says otherwise."""
    schema: Schema = {"type": "object", "required": list(properties) if required is None else required,
                      "properties": properties}
    if description:
        schema["description"] = description
    return schema


def _described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description}


_SCHEMAS: dict[str, Schema] = {
    "Problem": _object({
        "type": {"type": "string", "format": "uri", "examples": [PROBLEM_TYPE_BASE + "payload-too-large"]},
        "title": {"type": "string", "examples": ["Content Too Large"]},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": _described(_TEXT, "A human sentence saying what was wrong."),
    }, description="RFC 9457 problem details: the shape of every error."),
    "File": _object({
        "id": _UUID,
        "name": {"type": "string", "examples": ["Отчёт за май.mp4"], "description":
                 "The client's file name (NFC, last path component); metadata only."},
        "extension": _described(_TEXT, "Lower case, no dot; empty if none."),
        "format": {"type": "string", "examples": ["video/mp4"], "description":
                   "MIME type sniffed from the leading bytes, then the extension, then "
                   "application/octet-stream; the client's declared type is not trusted."},
        "size": _COUNT,
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "path": {"type": ["string", "null"], "examples": ["/videos/Отчёт за май.mp4"],
                 "description": "Virtual path in the owner's tree, or null."},
        "created_at": _TIME,
        "updated_at": _TIME,
        "cloud": _object({"state": {"enum": ["pending", "stored", "failed"]},
                          "stored_at": {**_TIME, "type": ["string", "null"]}}),
        "local": {"type": "boolean", "description": "Whether this server's disk holds a copy."},
        "media": {"anyOf": [{"type": "null"}, _ref("schemas", "Media")],
                  "description": "What the content is, once probed (null until then)."},
    }),
    "FileList": _object({
        "files": {"type": "array", "items": _ref("schemas", "File")},
        "next_cursor": {"type": ["string", "null"],
                        "description": "Pass as ?cursor= for the next page; null on the last one."},
    }),
    "Usage": _object({"files": _COUNT, "bytes": _COUNT,
                      "quota": _described({"type": ["integer", "null"], "minimum": 0},
                                          "Bytes the caller's files may take; null: unlimited.")}),
    "Move": _object({
        "path": _described(_ABSOLUTE, "The new path; ending in / moves the file into that folder, "
                                      "keeping its name (or taking `name`)."),
        "name": _described(_TEXT, "The new name (in the file's folder, when no path is given)."),
        "replace": {"type": "boolean", "default": False,
                    "description": "Replace (delete) another of the caller's files at the target path."},
    }, required=[], description="At least one of path and name."),
    "Folder": _object({
        "path": {"type": "string", "examples": ["/videos/2026/"]},
        "files": _described(_COUNT, "Files anywhere below it."),
        "bytes": _described(_COUNT, "Their bytes."),
    }),
    "FolderListing": _object({
        "path": _TEXT,
        "folders": {"type": "array", "items": _ref("schemas", "Folder"),
                    "description": "The folders right below, in code point order (all of them before any file)."},
        "files": {"type": "array", "items": _ref("schemas", "File"),
                  "description": "The files right in it, newest first."},
        "next_cursor": {"type": ["string", "null"],
                        "description": "Pass as ?cursor= for the next page; null on the last one."},
    }),
    "FolderDeletion": _object({"deleted": _COUNT}),
    "Media": _object({
        "kind": {"enum": ["image", "video", "audio", "other"]},
        "status": {"enum": ["ready", "failed"]},
        "error": _described({"type": ["string", "null"]}, "Why probing failed (a sentence), else null."),
        "width": _described(_COUNT, "Pixels as displayed (after rotation or EXIF orientation)."),
        "height": _described(_COUNT, "Pixels as displayed."),
        "duration_s": {"type": "number", "minimum": 0},
        "container": _described(_TEXT, "FFmpeg's demuxer name, e.g. `mov,mp4,m4a,3gp,3g2,mj2`."),
        "video_codec": {"type": "string", "examples": ["h264"]},
        "audio_codec": {"type": "string", "examples": ["aac"]},
        "frame_rate": {"type": "number", "minimum": 0},
        "bitrate": _described(_COUNT, "Bits per second, the whole container."),
        "channels": _COUNT,
        "sample_rate": _COUNT,
        "rotation": _described({"enum": [0, 90, 180, 270]}, "Degrees clockwise the video is turned for display."),
        "orientation": _described({"type": "integer", "minimum": 1, "maximum": 8}, "An image's EXIF orientation."),
        "taken_at": _described(_TIME, "EXIF DateTimeOriginal, in UTC (the camera's clock when it gives no offset)."),
        "camera": _described(_TEXT, "EXIF make and model."),
    }, required=["kind", "status", "error"],
        description="Fields that do not apply are absent. Location (GPS) data is never included."),
    "LinkOptions": _object({
        "expires_in": {"type": "integer", "minimum": 1, "maximum": 604800, "default": 3600,
                       "description": "Seconds the link stays valid (1 s to 7 days)."},
        "inline": {"type": "boolean", "default": False, "description": "Content-Disposition: inline."},
        "thumbnail": {"type": "integer", "minimum": 16, "maximum": 2048, "description":
                      "A link to the thumbnail of this size (GET /files/{id}/thumbnail) instead of the bytes."},
    }, required=[]),
    "Link": _object({
        "url": {"type": "string", "description": "The link on MEDIAD_PUBLIC_URL."},
        "path": {"type": "string", "description": "The same link as a same-origin path (what the web app uses)."},
        "expires_at": {"type": "string", "format": "date-time"},
    }, required=["url", "path", "expires_at"]),
    "NewUser": _object({
        "name": {"type": "string", "minLength": 1, "maxLength": 64,
                 "description": "Unique case-insensitively; no control characters."},
        "password": {"type": "string", "minLength": 8,
                     "description": "Optional: without one, the token returned is the only credential."},
    }, required=["name"]),
    "User": _object({"id": _UUID, "name": _TEXT,
                     "token": _described(_TEXT, "The bearer token, shown this once.")}),
    "Login": _object({"name": _TEXT, "password": _TEXT,
                      "token_name": {"type": "string", "minLength": 1, "maxLength": 64, "default": "login",
                                     "description": "The new token's name, as GET /auth/tokens lists it."}},
                     required=["name", "password"]),
    "Token": _object({"token": _TEXT, "token_type": {"const": "bearer"},
                      "id": _described(_UUID, "The token's id (GET /auth/tokens, DELETE /auth/tokens/{id}).")}),
    "TokenInfo": _object({
        "id": _UUID, "name": _TEXT, "created_at": _TIME,
        "last_used_at": {**_TIME, "type": ["string", "null"],
                         "description": "Recorded in batches: may lag by up to a minute; null if never used."},
        "current": _described({"type": "boolean"}, "Whether this is the token of this request."),
        "expires_at": {**_TIME, "type": ["string", "null"],
                       "description": "When the token stops working (MEDIAD_TOKEN_TTL_S, MEDIAD_TOKEN_IDLE_S); "
                                      "null: never."},
    }),
    "TokenList": _object({"tokens": {"type": "array", "items": _ref("schemas", "TokenInfo")}}),
    "NewToken": _object({"name": {"type": "string", "minLength": 1, "maxLength": 64}}),
    "CreatedToken": _object({"id": _UUID, "name": _TEXT,
                             "token": _described(_TEXT, "The bearer token, shown this once.")}),
    "Me": _object({
        "id": _UUID, "name": _TEXT, "created_at": _TIME,
        "quota": _described({"type": ["integer", "null"], "minimum": 0}, "Bytes; null: unlimited."),
        "usage": _object({"files": _COUNT, "bytes": _COUNT}),
    }),
    "AccountDeletion": _object({"password": _described(_TEXT, "Required when the account has a password.")},
                               required=[]),
    "AuthConfig": _object({
        "signup": _described({"enum": ["open", "closed"]}, "Whether POST /users creates accounts (MEDIAD_SIGNUP)."),
        "token_ttl_s": _described({"type": ["number", "null"]}, "Tokens expire this long after creation; null: never."),
        "token_idle_s": _described({"type": ["number", "null"]}, "Tokens expire this long after their last use; "
                                   "null: never."),
    }),
    "PasswordChange": _object({
        "password": _described({"type": ["string", "null"]}, "The current password; null when none is set."),
        "new_password": {"type": "string", "minLength": 8, "maxLength": 1024},
    }, required=["new_password"]),
    "Record": _object({
        "id": _described(_UUID, "The record's id, which is its File's id."),
        "user": _UUID,
        "url": {"type": "string", "format": "uri",
                "description": "`<public base>/record?id=<id>&user=<user id>`; it needs no token."},
        "file": _ref("schemas", "File"),
    }),
    "Upload": _object({
        "id": _UUID, "offset": _COUNT, "length": _COUNT, "expires_at": _TIME,
        "file_id": {**_UUID, "type": ["string", "null"],
                    "description": "The File made from the finished upload, else null."},
    }),
    "Health": _object({"status": {"const": "ok"}}),
    "Ping": _object({
        "db": _described({"type": "number"}, "Milliseconds."),
        "storage": _described({"type": "number"}, "Milliseconds."),
        "cloud": _described({"type": ["number", "null"]},
                            "Milliseconds; null when no cloud is configured or it does not answer."),
        "disk_pressure": _described({"type": "boolean"}, "The last cleanup pass could not bring the disk "
                                    "under MEDIAD_DISK_HIGH_WATER."),
    }, required=["db", "storage", "cloud"]),
}


# ---- parameters, bodies, responses --------------------------------------------------------------

def _param(name: str, where: str, description: str, schema: Schema | None = None, *,
           required: bool = False) -> Schema:
    return {"name": name, "in": where, "description": description,
            "required": required or where == "path", "schema": schema or _TEXT}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _body(content: Schema, description: str = "", required: bool = True) -> Schema:
    return {"description": description, "required": required, "content": content}


def _ok(description: str, schema: Schema | None = None, headers: dict[str, str] | None = None,
        links: Schema | None = None) -> Schema:
    response: Schema = {"description": description}
    if schema is not None:
        response["content"] = _json(schema)
    if headers:
        response["headers"] = {name: {"description": text, "schema": _TEXT} for name, text in headers.items()}
    if links:
        response["links"] = links
    return response


# ---- links: what a response lets a client do next (OpenAPI 3.1 §4.8.20) ---------------------------

def _operation_ref(path: str, method: str) -> str:
    """A JSON pointer (RFC 6901) to an operation of this document."""
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def _link(path: str, method: str, description: str, **parameters: str) -> Schema:
    """A link to `method path`, its parameters filled from runtime expressions of the response."""
    return {"operationRef": _operation_ref(path, method), "description": description,
            "parameters": {name.replace("__", "."): value for name, value in parameters.items()}}


def _file_links(file_id: str) -> Schema:
    """Everything a client can do with a File whose id is at the runtime expression `file_id`."""
    return {
        "GetFile": _link("/files/{file_id}", "get", "The File's metadata.", file_id=file_id),
        "GetFileContent": _link("/files/{file_id}/content", "get", "Its bytes.", file_id=file_id),
        "HeadFileContent": _link("/files/{file_id}/content", "head", "Its download headers.", file_id=file_id),
        "DownloadById": _link("/download", "get", "Its bytes, by id.", query__id=file_id),
        "CreateLink": _link("/files/{file_id}/links", "post", "A signed link to it.", file_id=file_id),
        "DeleteFile": _link("/files/{file_id}", "delete", "Delete it.", file_id=file_id),
    }


def _op(summary: str, responses: Schema, *, description: str = "", params: list[Schema] | None = None,
        body: Schema | None = None, security: list[Schema] | None = None, tag: str = "files") -> Schema:
    operation: Schema = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = body
    if security is not None:
        operation["security"] = security
    return operation


_PUBLIC: list[Schema] = []  # no token
_FILE = _ref("schemas", "File")
_LOCATION = {"Location": "`/files/{id}`"}
_FILE_ID = _param("file_id", "path", "The File's id.", _UUID)
_UPLOAD_ID = _param("upload_id", "path", "The upload's id (from the Location of POST /uploads).", _UUID)
_RAW_BODY: Schema = {"*/*": {"schema": _BINARY}}
_OFFSET_STREAM: Schema = {"application/offset+octet-stream": {"schema": _BINARY}}
_TUS_RESUMABLE = _param("Tus-Resumable", "header", "The protocol version, 1.0.0 (else 412).",
                        {"const": "1.0.0"}, required=True)
_CHECKSUM = "`<sha1|sha256|md5> <base64 digest>` of this chunk."

_DOWNLOAD_PARAMS = [
    _param("inline", "query", "1: `Content-Disposition: inline`, for players and previews.",
           {"enum": ["0", "1"]}),
    _param("Range", "header", "`bytes=a-b`, `a-`, `-n`, or several; a malformed one is ignored (200)."),
    _param("If-Range", "header", "An ETag or date: the range applies only while it matches."),
    _param("If-None-Match", "header", "304 when the ETag matches."),
    _param("If-Modified-Since", "header", "304 when not modified since."),
    _param("If-Match", "header", "412 when the ETag does not match."),
    _param("If-Unmodified-Since", "header", "412 when modified since."),
]
_BYTES_HEADERS = {
    "ETag": "Strong: `\"<sha256>\"`.",
    "Last-Modified": "HTTP date.",
    "Accept-Ranges": "`bytes`.",
    "Content-Length": "Bytes in this answer.",
    "Content-Disposition": "`attachment` (or `inline`) with an ASCII `filename` and an RFC 8187 `filename*`.",
}
_BYTES = {"*/*": {"schema": _BINARY}}
_BYTES_RESPONSES: Schema = {
    "200": {**_ok("The whole file; Content-Type is the File's format.", headers=_BYTES_HEADERS),
            "content": _BYTES},
    "206": {**_ok("The requested range (with Content-Range), or several as multipart/byteranges.",
                  headers={**_BYTES_HEADERS, "Content-Range": "`bytes a-b/size`, for a single range."}),
            "content": {**_BYTES, "multipart/byteranges": {"schema": _BINARY}}},
    "304": _ok("Not modified (If-None-Match, If-Modified-Since).", headers={"ETag": "As for 200."}),
}


def _download(summary: str, extra: list[Schema], errors: Schema, security: list[Schema] | None = None,
              description: str = "") -> Schema:
    """GET (the bytes) and HEAD (the same headers, no body) of a download route."""
    params = [*extra, *_DOWNLOAD_PARAMS]
    get = _op(summary, {**_BYTES_RESPONSES, **errors}, params=params, security=security,
              description=description)
    # Ranges are defined for GET only (RFC 9110 §14.2): HEAD describes the full 200, never a 416.
    head_errors = {status: response for status, response in errors.items() if status != "416"}
    head = _op(summary + " (headers only)",
               {"200": _ok("The headers a GET would send.", headers=_BYTES_HEADERS),
                "304": _BYTES_RESPONSES["304"], **head_errors}, params=params, security=security)
    return {"get": get, "head": head}


# ---- the paths ----------------------------------------------------------------------------------

_SIGNUP_OPEN = _op(
    "Create a user",
    {"201": _ok("Created; the token is shown this once.", _ref("schemas", "User")),
     **_errors(400, 409, 422, 503)},
    body=_body(_json(_ref("schemas", "NewUser"))), security=_PUBLIC, tag="users")
# What POST /users is on a server with MEDIAD_SIGNUP=closed (document(signup_open=False)).
_SIGNUP_CLOSED = _op(
    "Create a user (sign-up is closed on this server)", _errors(403),
    description="Sign-up is closed (MEDIAD_SIGNUP=closed, or unset on a non-loopback MEDIAD_HOST): "
                "every request answers 403; an operator creates accounts with `mediad users create`.",
    body=_body(_json(_ref("schemas", "NewUser"))), security=_PUBLIC, tag="users")

_USERS: dict[str, Schema] = {
    "/users": {"post": _SIGNUP_OPEN},
    "/auth/login": {"post": _op(
        "Get a new token for a name and password",
        {"200": _ok("A new token.", _ref("schemas", "Token")), **_errors(400, 401, 422, 429, 503)},
        description="After 5 failures for one name within MEDIAD_SIGNIN_WINDOW_S, or 30 from one client "
                    "address, answers 429 with Retry-After until the block ends, even for the right password.",
        body=_body(_json(_ref("schemas", "Login"))), security=_PUBLIC, tag="users")},
    "/auth/config": {"get": _op(
        "What a sign-in page needs to know",
        {"200": _ok("Sign-up and token lifetimes.", _ref("schemas", "AuthConfig"))},
        security=_PUBLIC, tag="users")},
    "/users/me/password": {"post": _op(
        "Change the caller's password",
        {"204": _ok("Changed; every other token of the user is revoked, the one used here is kept."),
         **_errors(400, 401, 403, 422, 429, 503)},
        description="A wrong current password answers 403 and counts as a failed sign-in.",
        body=_body(_json(_ref("schemas", "PasswordChange"))), tag="users")},
}

_TOKEN_ID = _param("token_id", "path", "The token's id (from GET /auth/tokens).", _UUID)
_ACCOUNTS: dict[str, Schema] = {
    "/auth/tokens": {
        "get": _op("The caller's tokens (never their secrets)", {
            "200": _ok("Oldest first.", _ref("schemas", "TokenList")), **_errors(401, 503)}, tag="users"),
        "post": _op("A new token for the caller (one per device or app)", {
            "201": _ok("Created; the token is shown this once.", _ref("schemas", "CreatedToken")),
            **_errors(400, 401, 422, 503)}, body=_body(_json(_ref("schemas", "NewToken"))), tag="users"),
    },
    "/auth/tokens/{token_id}": {
        "parameters": [_TOKEN_ID],
        "delete": _op("Revoke one of the caller's tokens", {
            "204": _ok("Revoked: it stops working at once."), **_errors(401, 404, 503)}, tag="users"),
    },
    "/users/me": {
        "get": _op("The caller's account", {"200": _ok("The account.", _ref("schemas", "Me")),
                                            **_errors(401, 503)}, tag="users"),
        "delete": _op("Delete the caller's account", {
            "204": _ok("Deleted: the user, every token and every file (local bytes at once, cloud copies "
                       "asynchronously with retries)."), **_errors(400, 401, 403, 422, 429, 503)},
            description="An account with a password must send it: missing or wrong → 403, nothing deleted. "
                        "A wrong password counts as a failed sign-in (429 while the name or address is blocked).",
            body=_body(_json(_ref("schemas", "AccountDeletion")), required=False), tag="users"),
    },
    "/auth/token": {"delete": _op(
        "Sign out: revoke the presented token",
        {"204": _ok("Revoked: the token stops working on every node within 1 s."), **_errors(401, 503)},
        tag="users")},
}

_FILE_BODY_LINKS = _file_links("$response.body#/id")
_UPLOAD_RESPONSES: Schema = {
    "201": _ok("Created.", _FILE, _LOCATION, _FILE_BODY_LINKS),
    "200": _ok("Replaced the caller's file at that path (same id, new content).", _FILE, _LOCATION,
               _FILE_BODY_LINKS),
    **_errors(400, 401, 413, 422, 503, 507),
}

_FILES: dict[str, Schema] = {
    "/files": {
        "post": _op(
            "Upload a file", _UPLOAD_RESPONSES,
            description="`multipart/form-data` with exactly one file part named `file` and an optional "
                        "text field `path`; or any other content type, the raw body being the file, named "
                        "by `?name=` or a `Content-Disposition` request header. Streamed: memory stays "
                        "flat. A failed or aborted upload leaves no row and no file.",
            params=[_param("name", "query", "The file name, for a raw body."),
                    _param("path", "query", "A virtual path; ending in / makes it a folder.", _ABSOLUTE),
                    _param("Content-Disposition", "header",
                           "`attachment; filename*=UTF-8''…` names a raw body.")],
            body=_body({"multipart/form-data": {"schema": _object({
                "file": _described(_BINARY, "Exactly one part named file; its filename names the File."),
                "path": _described(_TEXT, "Optional virtual path (a folder if it ends in /)."),
            }, required=["file"])}, **_RAW_BODY})),
        "put": _op(
            "Upload a raw body to a virtual path", _UPLOAD_RESPONSES,
            params=[_param("path", "query", "`/dir/name.ext`, or a folder ending in /.", _ABSOLUTE, required=True),
                    _param("name", "query", "The file name, when the path is a folder.")],
            body=_body(_RAW_BODY)),
        "get": _op(
            "List the caller's files, newest first",
            {"200": _ok("One page.", _ref("schemas", "FileList")), **_errors(401, 422, 503)},
            description="Ordered by `created_at`, then `id`, descending: stable across pages.",
            params=[_param("prefix", "query", "Only paths that start with this (absolute).", _ABSOLUTE),
                    _param("limit", "query", "Page size.",
                           {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                    _param("cursor", "query", "The `next_cursor` of the previous page."),
                    _param("kind", "query", "Only files of this media kind (the probed one, else the "
                           "format's type); combinable with prefix.", {"enum": ["image", "video", "audio", "other"]})]),
    },
    "/files/{file_id}": {
        "parameters": [_FILE_ID],
        "get": _op("A File's metadata", {"200": _ok("The File.", _FILE, links=_FILE_BODY_LINKS),
                                         **_errors(401, 404, 503)}),
        "patch": _op("Move or rename a file", {
            "200": _ok("The moved File: same id, content, ETag and links.", _FILE, links=_FILE_BODY_LINKS),
            **_errors(400, 401, 404, 409, 422, 503)},
            description="No bytes are copied. The target path taken by another of the caller's files → 409, "
                        "unless `replace` is true (that file is deleted as DELETE would).",
            body=_body(_json(_ref("schemas", "Move")))),
        "delete": _op("Delete a file", {
            "204": _ok("Deleted: the row, the local bytes and (asynchronously, with retries) the cloud "
                       "copy."),
            **_errors(401, 404, 503)}),
    },
    "/files/{file_id}/content": {
        "parameters": [_FILE_ID],
        **_download("Download a file's bytes", [
            _param("expires", "query", "Signed links: expiry, unix seconds.", {"type": "integer"}),
            _param("signature", "query", "Signed links: the signature; with it no token is needed."),
        ], _errors(401, 403, 404, 412, 416, 503), [{"bearer": []}, {}],
            description="A file whose local copy was evicted is streamed from the cloud copy, with the same "
                        "headers and ranges. A signed link (from POST /files/{id}/links) needs no token; an "
                        "expired or altered one, or one whose file was replaced or deleted, answers 403."),
    },
    "/files/{file_id}/links": {
        "parameters": [_FILE_ID],
        "post": _op("Create a signed, expiring link", {
            "201": _ok("Created.", _ref("schemas", "Link")), **_errors(400, 401, 404, 422, 503)},
            body=_body(_json(_ref("schemas", "LinkOptions")), "Both fields optional.", required=False)),
    },
    "/download": _download("Download by id or by virtual path", [
        _param("id", "query", "The File's id (give exactly one of id and path).", _UUID),
        _param("path", "query", "The File's virtual path.", _ABSOLUTE)], _errors(401, 404, 412, 416, 422, 503)),
    "/folders": {
        "get": _op(
            "A folder's folders and files",
            {"200": _ok("One page.", _ref("schemas", "FolderListing")), **_errors(401, 404, 422, 503)},
            description="A folder exists while a file lies below it; `/` is the root and always exists. "
                        "Pages hold `limit` entries, folders first, then files.",
            params=[_param("path", "query", "The folder (a trailing / is implied).", _ABSOLUTE, required=True),
                    _param("limit", "query", "Page size (folders and files together).",
                           {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                    _param("cursor", "query", "The `next_cursor` of the previous page.")]),
        "delete": _op(
            "Delete a folder",
            {"200": _ok("Everything below it is deleted (rows, local bytes; cloud copies asynchronously).",
                        _ref("schemas", "FolderDeletion")), **_errors(401, 404, 409, 422, 503)},
            description="Without recursive=true → 409 when the folder is not empty.",
            params=[_param("path", "query", "The folder.", _ABSOLUTE, required=True),
                    _param("recursive", "query", "true (or 1): delete every file below the folder.",
                           {"enum": ["true", "false", "1", "0"]})]),
    },
    "/usage": {"get": _op("The caller's file count and bytes", {
        "200": _ok("Usage.", _ref("schemas", "Usage")), **_errors(401, 503)})},
}

_THUMBNAIL_PARAMS = [
    _param("size", "query", "The longer side at most, in px.",
           {"type": "integer", "minimum": 16, "maximum": 2048, "default": 256}),
    _param("v", "query", "Ignored: add the File's sha256 so the URL changes with the content."),
    _param("expires", "query", "Signed thumbnail links: expiry, unix seconds.", {"type": "integer"}),
    _param("signature", "query", "Signed thumbnail links (POST /files/{id}/links with `thumbnail`)."),
    _param("Accept", "header", "WebP when it allows image/webp, else JPEG."),
    _param("If-None-Match", "header", "304 when the ETag matches."),
]
_THUMBNAIL_HEADERS = {"ETag": "Strong, one per content, size and format.", "Vary": "`Accept`.",
                      "Cache-Control": "`private, max-age=31536000, immutable`."}
_THUMBNAIL_RESPONSES: Schema = {
    "200": {**_ok("The thumbnail.", headers=_THUMBNAIL_HEADERS),
            "content": {"image/webp": {"schema": _BINARY}, "image/jpeg": {"schema": _BINARY}}},
    "304": _ok("Not modified.", headers=_THUMBNAIL_HEADERS),
    **_errors(401, 403, 404, 412, 422, 503),
}
_MEDIA: dict[str, Schema] = {
    "/files/{file_id}/thumbnail": {
        "parameters": [_FILE_ID],
        "get": _op("A File's thumbnail", _THUMBNAIL_RESPONSES, params=_THUMBNAIL_PARAMS,
                   security=[{"bearer": []}, {}],
                   description="Images: the picture, EXIF orientation applied; videos: a frame about 10 % in; "
                               "audio: the embedded cover art. 404 says why when no picture is possible; 503 "
                               "with Retry-After when every generator is busy. Made once per content, size and "
                               "format and kept."),
        "head": _op("A File's thumbnail (headers only)", _THUMBNAIL_RESPONSES, params=_THUMBNAIL_PARAMS,
                    security=[{"bearer": []}, {}]),
    },
}

_RECORDS: dict[str, Schema] = {
    "/records": {"post": _op(
        "Upload a WAV recording, stored as MP3",
        {"201": _ok("Created.", _ref("schemas", "Record"), _LOCATION, {
            "GetRecord": _link("/record", "get", "Play the record (no token).",
                               query__id="$response.body#/id", query__user="$response.body#/user"),
            "HeadRecord": _link("/record", "head", "The record's download headers (no token).",
                                query__id="$response.body#/id", query__user="$response.body#/user"),
            **_FILE_BODY_LINKS}),
         **_errors(400, 401, 413, 415, 422, 503, 507)},
        description="The caller is identified by the bearer token or by the form fields `user` and "
                    "`token`. The WAV is validated (else 415) and converted to MP3 (`audio/mpeg`, named "
                    "`<stem>.mp3`).",
        body=_body({"multipart/form-data": {"schema": _object({
            "file": {**_BINARY, "contentMediaType": "audio/wav"},
            "user": _described(_UUID, "Without a bearer token: the user's id…"),
            "token": _described(_TEXT, "…and that user's token."),
        }, required=["file"])}}),
        security=[{"bearer": []}, {}], tag="records")},
    "/record": _download("Play or download a record's MP3 (no token: the record id is the capability)", [
        _param("id", "query", "The record id.", _UUID, required=True),
        _param("user", "query", "The owner's user id.", _UUID, required=True)],
        _errors(404, 412, 416, 422, 503), _PUBLIC),
}
for _operation in ("get", "head"):
    _RECORDS["/record"][_operation]["tags"] = ["records"]

_TUS_HEADERS = {"Tus-Resumable": "`1.0.0`"}
# tus 1.0.0: comma-separated pairs of a key (no space or comma) and an optional base64 value.
_TUS_PAIR = "[^ ,]+( [A-Za-z0-9+/]*={0,2})?"
_TUS_METADATA: Schema = {"type": "string", "pattern": f"^{_TUS_PAIR}(,{_TUS_PAIR})*$",
                         "examples": ["filename cmVwb3J0LnBkZg==,path L2RvY3Mv"]}
_FILE_HEADER_LINKS = _file_links("$response.header.Mediad-File-Id")  # the File a finished upload made
_UPLOADS: dict[str, Schema] = {
    "/uploads": {
        "options": _op("tus discovery", {"204": _ok("What this server supports.", headers={
            "Tus-Version": "`1.0.0`",
            "Tus-Extension": "`creation,creation-with-upload,termination,checksum,expiration`",
            "Tus-Max-Size": "MEDIAD_MAX_UPLOAD_BYTES.",
            "Tus-Checksum-Algorithm": "`sha1,sha256,md5`"})}, security=_PUBLIC, tag="uploads"),
        "post": _op(
            "Create a resumable upload (tus creation, creation-with-upload)",
            {"201": _ok("Created.", headers={
                "Location": "`/uploads/{id}`", "Upload-Expires": "HTTP date.",
                "Upload-Offset": "When a first chunk came with the request.",
                "Mediad-File-Id": "When that chunk completed the upload.", **_TUS_HEADERS},
                links=_FILE_HEADER_LINKS),
             **_errors(400, 401, 412, 413, 422, 460, 503, 507)},
            params=[_TUS_RESUMABLE,
                    _param("Upload-Length", "header", "Total bytes.", _COUNT, required=True),
                    _param("Upload-Metadata", "header", "`filename <base64>` (required), `path <base64>` "
                           "(optional); `filetype` is ignored.", _TUS_METADATA, required=True),
                    _param("Upload-Checksum", "header", _CHECKSUM)],
            body=_body(_OFFSET_STREAM, "An optional first chunk.", required=False), tag="uploads"),
    },
    "/uploads/{upload_id}": {
        "parameters": [_UPLOAD_ID],
        "head": _op("Where an upload stands", {"200": _ok("Offset and length.", headers={
            "Upload-Offset": "Bytes acknowledged (durable).", "Upload-Length": "Total bytes.",
            "Upload-Expires": "HTTP date.", "Cache-Control": "`no-store`", **_TUS_HEADERS}),
            **_errors(401, 404, 412, 503)}, params=[_TUS_RESUMABLE], tag="uploads"),
        "get": _op("An upload, as JSON", {"200": _ok("The upload.", _ref("schemas", "Upload")),
                                          **_errors(401, 404, 503)}, tag="uploads"),
        "patch": _op(
            "Append a chunk",
            {"204": _ok("Appended.", headers={"Upload-Offset": "The new offset.",
                                              "Mediad-File-Id": "When this chunk completed the upload.",
                                              **_TUS_HEADERS}, links=_FILE_HEADER_LINKS),
             **_errors(400, 401, 404, 409, 412, 413, 415, 423, 460, 503, 507)},
            description="`Upload-Offset` must equal the current offset (else 409). The PATCH that "
                        "completes the upload turns it into a File exactly as POST /files would.",
            params=[_TUS_RESUMABLE,
                    _param("Upload-Offset", "header", "The current offset.", _COUNT, required=True),
                    _param("Upload-Checksum", "header", _CHECKSUM)],
            body=_body(_OFFSET_STREAM), tag="uploads"),
        "delete": _op("Cancel an upload (tus termination)", {
            "204": _ok("Removed, partial bytes included."), **_errors(401, 404, 412, 423, 503)},
            params=[_TUS_RESUMABLE], tag="uploads"),
    },
}

_TEXT_CONTENT = {"schema": _TEXT}
_SERVICE: dict[str, Schema] = {
    "/health": {"get": _op("Whether the database answers", {
        "200": _ok("Healthy.", _ref("schemas", "Health")), **_errors(503)}, security=_PUBLIC, tag="service")},
    "/ping/all": {"get": _op("Round-trip times of the services behind mediad", {
        "200": _ok("Milliseconds per service.", _ref("schemas", "Ping")), **_errors(503)},
        security=_PUBLIC, tag="service")},
    "/metrics": {"get": _op("Prometheus metrics", {"200": {
        "description": "The Prometheus text format (OpenMetrics when the scraper asks for it).",
        "content": {"text/plain": _TEXT_CONTENT, "application/openmetrics-text": _TEXT_CONTENT}}},
        security=_PUBLIC, tag="service")},
    "/openapi.json": {"get": _op("This document", {
        "200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})}},
        security=_PUBLIC, tag="service")},
    "/": {"get": _op("The web app", {
        "200": {"description": "An HTML page (assets under /web/).", "content": {"text/html": _TEXT_CONTENT}}},
        security=_PUBLIC, tag="service")},
    "/docs": {"get": _op("The API docs for people (Swagger UI, served by mediad itself)", {
        "200": {"description": "An HTML page.", "content": {"text/html": _TEXT_CONTENT}}},
        security=_PUBLIC, tag="service")},
}

_PATHS: dict[str, Schema] = {**_USERS, **_ACCOUNTS, **_FILES, **_MEDIA, **_RECORDS, **_UPLOADS, **_SERVICE}

# ---- webhooks -----------------------------------------------------------------------------------

_WEBHOOK_EVENTS: Schema = {"enum": ["file.created", "file.replaced", "file.moved", "file.deleted", "file.stored",
                                    "file.evicted", "file.media_ready", "record.created", "upload.expired"]}
_EVENT_LIST: Schema = {"type": "array", "items": _WEBHOOK_EVENTS, "minItems": 1, "uniqueItems": True}
_WEBHOOK_URL: Schema = {"type": "string", "format": "uri", "pattern": "^https?://", "maxLength": 2048,
                        "examples": ["https://receiver.example/hooks/mediad"],
                        "description": "Refused (422) when its host resolves to a loopback, private, link-local, "
                                       "CGNAT, multicast or cloud-metadata address, unless "
                                       "MEDIAD_WEBHOOK_ALLOW_PRIVATE=true."}
_WEBHOOK_FIELDS: Schema = {
    "id": _UUID, "url": _WEBHOOK_URL,
    "events": _described(_EVENT_LIST, "The event types it receives (all of them when created without `events`)."),
    "created_at": _TIME,
}
_SCHEMAS.update({
    "NewWebhook": _object({"url": _WEBHOOK_URL,
                           "events": _described(_EVENT_LIST, "Omit for every event type.")}, required=["url"]),
    "Webhook": _object(_WEBHOOK_FIELDS),
    "WebhookCreated": _object({**_WEBHOOK_FIELDS, "secret": {
        "type": "string", "pattern": "^whsec_", "description": "The Standard Webhooks signing secret, shown "
        "this once: verify `webhook-signature` with it."}}),
    "WebhookList": _object({"webhooks": {"type": "array", "items": _ref("schemas", "Webhook")}}),
    "Delivery": _object({
        "id": _UUID,
        "event_id": _described(_UUID, "The `webhook-id` header: the same on every attempt."),
        "event": _WEBHOOK_EVENTS,
        "status": {"enum": ["delivered", "retrying", "failed"],
                   "description": "`retrying` also before the first attempt."},
        "attempts": _COUNT,
        "last_status_code": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "created_at": _TIME,
        "delivered_at": {**_TIME, "type": ["string", "null"]},
        "next_attempt_at": {**_TIME, "type": ["string", "null"], "description": "While `retrying`."},
    }),
    "DeliveryList": _object({"deliveries": {"type": "array", "items": _ref("schemas", "Delivery")}}),
})
_WEBHOOK_ID = _param("webhook_id", "path", "The webhook's id.", _UUID)
_WEBHOOKS: dict[str, Schema] = {
    "/webhooks": {
        "post": _op("Register a webhook endpoint", {
            "201": _ok("Created; the secret is shown this once.", _ref("schemas", "WebhookCreated"),
                       {"Location": "`/webhooks/{id}`"}, {
                           "ListDeliveries": _link("/webhooks/{webhook_id}/deliveries", "get", "Its deliveries.",
                                                   webhook_id="$response.body#/id"),
                           "DeleteWebhook": _link("/webhooks/{webhook_id}", "delete", "Remove it.",
                                                  webhook_id="$response.body#/id")}),
            **_errors(400, 401, 409, 422, 503)},
            description="Events are POSTed as `{\"type\", \"timestamp\", \"data\"}` with the Standard Webhooks "
                        "headers `webhook-id`, `webhook-timestamp` and `webhook-signature`; any 2xx within 10 s "
                        "is success, anything else is retried with backoff for MEDIAD_WEBHOOK_RETRY_S (24 h). "
                        "409: the caller has 20 webhooks already.",
            body=_body(_json(_ref("schemas", "NewWebhook"))), tag="webhooks"),
        "get": _op("The caller's webhook endpoints (no secrets)", {
            "200": _ok("Oldest first.", _ref("schemas", "WebhookList")), **_errors(401, 503)}, tag="webhooks"),
    },
    "/webhooks/{webhook_id}": {
        "parameters": [_WEBHOOK_ID],
        "delete": _op("Remove a webhook endpoint (and its queued deliveries)", {
            "204": _ok("Removed."), **_errors(401, 404, 503)}, tag="webhooks"),
    },
    "/webhooks/{webhook_id}/deliveries": {
        "parameters": [_WEBHOOK_ID],
        "get": _op("The latest 100 deliveries to an endpoint, newest first", {
            "200": _ok("Deliveries.", _ref("schemas", "DeliveryList")), **_errors(401, 404, 503)}, tag="webhooks"),
    },
}
_PATHS.update(_WEBHOOKS)


@functools.cache
def document(signup_open: bool = True) -> Schema:
    responses = {f"Problem{s}": _problem_response(s) for s in _PROBLEMS}
    responses["ProblemDefault"] = {
        "description": "Any other error, such as 500 for an unexpected one (logged, never a stack trace).",
        "content": {"application/problem+json": {"schema": _ref("schemas", "Problem")}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mediad", "version": __version__,
                 "summary": "Media file service: streaming uploads, range downloads, cloud replication.",
                 "description": "Errors are RFC 9457 problem+json. Besides each operation's own, any request "
                                "may get 400 (not valid HTTP/1.1), 408 (its head did not arrive within "
                                "MEDIAD_HEADER_TIMEOUT_S, or its body fell silent for MEDIAD_BODY_TIMEOUT_S) "
                                "or 431 (request line and headers over MEDIAD_MAX_HEADER_BYTES); the server "
                                "closes the connection after these.",
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "tags": [{"name": "users"}, {"name": "files"}, {"name": "uploads", "description": "tus 1.0.0"},
                 {"name": "records"}, {"name": "service"}],
        "security": [{"bearer": []}],
        "paths": _PATHS if signup_open else {**_PATHS, "/users": {"post": _SIGNUP_CLOSED}},
        "components": {
            "schemas": _SCHEMAS,
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The token from POST /users or POST /auth/login."}},
        },
    }


@functools.cache
def _document_bytes(signup_open: bool = True) -> bytes:
    return json.dumps(document(signup_open), ensure_ascii=False, separators=(",", ":")).encode()


async def openapi_json(request: Request) -> Response:
    return Response(_document_bytes(request.app.state.settings.signup_open), media_type="application/json")


async def docs_page(request: Request) -> Response:
    if request.scope.get("mediad.trailing_slash"):  # its relative links would resolve under /docs/
        return RedirectResponse("../docs", status_code=301)
    return FileResponse(_DOCS_DIR / "index.html", media_type="text/html; charset=utf-8")


def routes() -> list[BaseRoute]:
    """/openapi.json, /docs, and /docs/assets: our page's script, then Swagger UI's files."""
    assets = StaticFiles(packages=[("mediad", "docs"), ("swagger_ui", "static")])
    return [Route("/openapi.json", openapi_json), Route("/docs", docs_page),
            Mount("/docs/assets", app=assets, name="docs-assets")]
