"""Settings: one frozen object read from MEDIAD_* variables and an optional .env file.

No other module reads ``os.environ``. Invalid values fail at start with the variable's name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

GiB = 1024**3


class ConfigError(ValueError):
    """A configuration variable has a value mediad cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None  # None: embedded PostgreSQL under data_dir/pg
    data_dir: Path = Path("./var")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None  # None: http://host:port
    max_upload_bytes: int = 10 * GiB
    cloud_url: str | None = None  # None: the bundled mock cloud, started by `mediad serve`
    cloud_token: str | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    cloud_concurrency: int = 4
    cloud_max_attempts: int = 10
    cloud_poll_s: float = 5.0  # how often due rows are re-enqueued (restarts, other processes)
    cloud_lease_s: float = 60.0  # a push's claim; renewed while it runs, taken over once lapsed
    cloud_retry_base_s: float = 1.0
    cloud_retry_cap_s: float = 300.0
    cleanup_interval_s: float = 300.0
    local_ttl_s: float = 7 * 86400.0
    cleanup_grace_s: float = 3600.0  # temp files and orphan blobs younger than this are left alone
    disk_high_water: float = 0.90
    min_free_bytes: int = 0
    default_quota_bytes: int | None = None  # quota of new users; None: unlimited (mediad/quotas.py)
    upload_expire_s: int = 86400
    secret_key: str | None = None
    fsync: bool = True  # off only for throw-away deployments: a 2xx then no longer means durable
    # One core is left to the event loop and PostgreSQL: with every core converting, /health p99
    # went from ~90 ms to 270–420 ms on the 2-core machine (ops/bench.py, audio section).
    audio_workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1) - 1))
    ffmpeg: str | None = None  # None: the binary shipped in the imageio-ffmpeg wheel
    audio_queue_timeout_s: float = 30.0  # how long a conversion may wait for a free worker (then 503)
    audio_timeout_s: float = 600.0
    # Slow and oversized clients (mediad/server.py): a request's head must arrive within
    # header_timeout_s, a body may pause at most body_timeout_s, and a head is capped at 431.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    db_pool_size: int = 20
    db_pool_timeout_s: float = 5.0
    log_level: str = "INFO"
    log_file: Path | None = None

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _parse_size(text: str) -> int:
    """Byte counts accept plain integers or binary suffixes: 512, 64MiB, 10G."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("expected a byte count such as 1048576, 64MiB or 10GiB")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


parse_size = _parse_size  # byte counts given on the command line read the same way


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of true/false, 1/0, yes/no, on/off")


def _convert(name: str, kind: Any, text: str) -> Any:
    if name.endswith("_bytes"):
        value = _parse_size(text)
    elif kind in ("int", int):
        value = int(text)
    elif kind in ("float", float):
        value = float(text)
    elif kind in ("bool", bool):
        value = _parse_bool(text)
    elif "Path" in str(kind):
        value = Path(text).expanduser()
    else:
        value = text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError("must not be negative")
    return value


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> Settings:
    """Build Settings from a .env file overlaid by the environment (the environment wins)."""
    source: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        source.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    source.update(os.environ if environ is None else environ)

    values: dict[str, Any] = {}
    for f in fields(Settings):
        variable = f"MEDIAD_{f.name.upper()}"
        text = source.get(variable)
        if text is None or text == "":
            continue
        try:
            values[f.name] = _convert(f.name, f.type, text)
        except ValueError as exc:
            raise ConfigError(f"{variable}={text!r} is invalid: {exc}") from None

    settings = Settings(**values)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    if not 0 < settings.port < 65536:
        raise ConfigError(f"MEDIAD_PORT={settings.port} is invalid: must be between 1 and 65535")
    if not 0.0 < settings.disk_high_water <= 1.0:
        raise ConfigError("MEDIAD_DISK_HIGH_WATER is invalid: must be a fraction in (0, 1]")
    if settings.database_url and not settings.database_url.startswith(("postgresql", "postgres")):
        raise ConfigError("MEDIAD_DATABASE_URL is invalid: expected postgresql://user@host:port/db")
    for name in ("cloud_concurrency", "cloud_max_attempts", "audio_workers", "db_pool_size"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"MEDIAD_{name.upper()} is invalid: must be at least 1")
    for name in ("header_timeout_s", "body_timeout_s", "max_header_bytes"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"MEDIAD_{name.upper()} is invalid: must be greater than 0")
    if settings.cloud_url and not settings.cloud_url.startswith(("http://", "https://")):
        raise ConfigError("MEDIAD_CLOUD_URL is invalid: expected an http:// or https:// URL")
    if settings.s3_bucket:
        for name in ("s3_endpoint_url", "s3_access_key", "s3_secret_key"):
            if not getattr(settings, name):
                raise ConfigError(f"MEDIAD_{name.upper()} is required when MEDIAD_S3_BUCKET is set")
