"""What clients name things: file names, virtual paths, media types and formats (pure rules).

The client's file name is metadata only, never a disk path: storage paths derive from our ids.
"""

from __future__ import annotations

import mimetypes
import os
import re
import unicodedata
from email.message import Message
from email.utils import collapse_rfc2231_value

import filetype

from .errors import Unprocessable

MAX_NAME_CHARS = 1024
MAX_PATH_CHARS = 4096
_SEPARATORS = re.compile(r"[/\\]")


def media_type(header: str | None) -> str:
    """The `type/subtype` of a Content-Type header, lower-cased, parameters dropped: media types
    are case-insensitive (RFC 9110 §8.3.1), so `Multipart/Form-Data; boundary=x` is multipart."""
    return (header or "").split(";", 1)[0].strip().lower()


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def clean_name(raw: str) -> str:
    """The client's file name as metadata: last path component, NFC; never a disk path."""
    if _has_control(raw):
        raise Unprocessable("the file name contains NUL or control characters")
    name = unicodedata.normalize("NFC", _SEPARATORS.split(raw)[-1])
    if name in ("", ".", ".."):
        raise Unprocessable(f"{raw!r} is not a usable file name")
    if len(name) > MAX_NAME_CHARS:
        raise Unprocessable(f"the file name is longer than {MAX_NAME_CHARS} characters")
    return name


def clean_path(raw: str) -> str:
    """An absolute virtual path, `//` collapsed; a trailing `/` marks a folder."""
    if _has_control(raw):
        raise Unprocessable("the path contains NUL or control characters")
    if not raw.startswith("/"):
        raise Unprocessable("the path must be absolute (start with /)")
    if "\\" in raw:
        raise Unprocessable("the path must not contain backslashes")
    path = re.sub(r"/{2,}", "/", unicodedata.normalize("NFC", raw))
    if any(segment in (".", "..") for segment in path.split("/")):
        raise Unprocessable("the path must not contain . or .. segments")
    if len(path) > MAX_PATH_CHARS:
        raise Unprocessable(f"the path is longer than {MAX_PATH_CHARS} characters")
    return path


def place(path: str | None, name: str | None) -> tuple[str, str | None]:
    """(name, path) of the File: a folder path keeps the file's own name inside it; a full path
    names the file itself."""
    if path is not None and not path.endswith("/"):
        return clean_name(path.rsplit("/", 1)[-1]), path
    if name is None:
        raise Unprocessable("a file name is required: a filename in the upload, ?name= or a path")
    name = clean_name(name)
    return name, (path + name if path is not None else None)


def extension_of(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def detect_format(head: bytes, name: str) -> str:
    """MIME type from the leading bytes, then the name's extension; the client's type is ignored."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def filename_from_disposition(header: str | None) -> str | None:
    """The filename (or RFC 6266 filename*) of a Content-Disposition header."""
    if not header:
        return None
    try:  # Starlette decodes headers as latin-1; clients that send raw UTF-8 mean UTF-8
        header = header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    message = Message()
    message["content-disposition"] = header
    # RFC 6266 §4.3: filename* wins over the plain fallback wherever it appears; the email
    # package decodes both to "filename", telling the extended one apart only as a tuple.
    params = message.get_params(header="content-disposition") or []
    for key, value in params:
        if key.lower() == "filename" and isinstance(value, tuple):
            return str(collapse_rfc2231_value(value))
    filename = message.get_filename()
    return str(filename) if filename is not None else None
