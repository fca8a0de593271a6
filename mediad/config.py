"""Settings: one frozen object read from MEDIAD_* variables and an optional .env file.

No other module of the service reads ``os.environ`` for a setting: the CLI only hands its
environment on (to ``load_settings``, to the processes it starts, and to the mock cloud, a program
of its own with its MOCKCLOUD_* variables). Invalid values fail at start with the variable's name.
"""

from __future__ import annotations

import ipaddress
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
    # Media probing and thumbnails (mediad/media.py, mediad/thumbnails.py): worker processes, one
    # core left to the event loop as for audio; a job past the timeout has its worker killed.
    media_workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1) - 1))
    media_timeout_s: float = 30.0
    media_max_pixels: int = 100_000_000  # checked from the header, before anything is decoded
    # Slow and oversized clients (mediad/server.py): a request's head must arrive within
    # header_timeout_s, a body may pause at most body_timeout_s, and a head is capped at 431.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # An idle keep-alive connection is closed after this. Longer than what clients and proxies
    # keep one for (httpx 5 s, aiohttp 15 s, nginx's upstream keepalive 60 s): at uvicorn's 5 s a
    # client reusing a connection as the server closed it got a reset instead of an answer.
    keep_alive_s: float = 75.0
    max_header_bytes: int = 32 * 1024
    # Webhooks: endpoints resolving to private/loopback/link-local addresses are refused unless
    # allowed (tests, trusted networks); a delivery is retried for webhook_retry_s, then failed.
    webhook_allow_private: bool = False
    webhook_retry_s: float = 86400.0
    webhook_concurrency: int = 32  # attempts in flight per process, all endpoints together (8 per endpoint)
    webhook_poll_s: float = 2.0  # the fallback when no LISTEN/NOTIFY wake-up arrives
    # Worker processes answering on the one port (`mediad serve --workers`); 1 serves in-process.
    workers: int = field(default_factory=lambda: _usable_cpus())
    db_pool_size: int = 20
    # Download lookups answered from memory (mediad/cache.py) lapse after this long even without a
    # change notification; 0 turns the cache off.
    cache_max_age_s: float = 10.0
    db_pool_timeout_s: float = 5.0
    log_level: str = "INFO"
    log_file: Path | None = None
    # Comma-separated origins (https://app.example.com) or *; None: no CORS headers, same-origin only.
    cors_origins: str | None = None
    # Behind nginx: local-disk downloads are answered with X-Accel-Redirect to this internal
    # location (ops/nginx.conf), and nginx sends the bytes. None: mediad sends them itself.
    accel_redirect: str | None = None
    # Accounts on a network (mediad/auth.py, mediad/throttle.py). signup None: open only when
    # `host` is a loopback address, so a service reachable from a network is closed unless told.
    signup: str | None = None  # "open" | "closed"
    signin_window_s: float = 900.0
    signin_block_s: float = 60.0
    trusted_proxies: str | None = None  # comma-separated addresses or CIDR ranges; None: trust none
    token_ttl_s: float | None = None  # None: tokens never expire
    token_idle_s: float | None = None  # None: an unused token never expires

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in (self.cors_origins or "").split(",") if origin.strip()]

    @property
    def signup_open(self) -> bool:
        if self.signup is not None:
            return self.signup == "open"
        return _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) listens on loopback only; 0.0.0.0, :: and names
    other than localhost count as reachable from a network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def parse_networks(text: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """MEDIAD_TRUSTED_PROXIES: comma-separated addresses or CIDR ranges (a bare address is /32 or /128)."""
    if not text:
        return ()
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def _usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cpusets), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")
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
    if isinstance(kind, str):
        kind = kind.removesuffix(" | None")  # unset is None; a value set is of the base type
    value: Any
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
    for name in ("cloud_concurrency", "cloud_max_attempts", "audio_workers", "db_pool_size", "media_workers",
                 "media_max_pixels"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"MEDIAD_{name.upper()} is invalid: must be at least 1")
    if settings.workers < 1:
        raise ConfigError("MEDIAD_WORKERS is invalid: must be at least 1")
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_header_bytes", "media_timeout_s"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"MEDIAD_{name.upper()} is invalid: must be greater than 0")
    for origin in settings.cors_origin_list:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ConfigError(f"MEDIAD_CORS_ORIGINS is invalid: {origin!r} is not * or an origin "
                              "such as https://app.example.com (scheme, host, optional port; no path)")
    if settings.accel_redirect is not None and not (
            settings.accel_redirect.startswith("/") and settings.accel_redirect.endswith("/")):
        raise ConfigError("MEDIAD_ACCEL_REDIRECT is invalid: expected a location such as /_mediad/")
    _check_accounts(settings)
    if settings.cloud_url and not settings.cloud_url.startswith(("http://", "https://")):
        raise ConfigError("MEDIAD_CLOUD_URL is invalid: expected an http:// or https:// URL")
    if settings.s3_bucket:
        for name in ("s3_endpoint_url", "s3_access_key", "s3_secret_key"):
            if not getattr(settings, name):
                raise ConfigError(f"MEDIAD_{name.upper()} is required when MEDIAD_S3_BUCKET is set")
    if settings.webhook_concurrency < 1 or settings.webhook_poll_s <= 0 or settings.webhook_retry_s <= 0:
        raise ConfigError("MEDIAD_WEBHOOK_CONCURRENCY must be at least 1, MEDIAD_WEBHOOK_POLL_S and "
                          "MEDIAD_WEBHOOK_RETRY_S greater than 0")


MIN_SECRET_KEY_CHARS = 16


def _check_accounts(settings: Settings) -> None:
    if settings.secret_key is not None and len(settings.secret_key) < MIN_SECRET_KEY_CHARS:
        # Checked here, not when the key is first used: that is in every worker, after start-up.
        raise ConfigError(f"MEDIAD_SECRET_KEY is too short: use at least {MIN_SECRET_KEY_CHARS} random "
                          "characters (32 or more recommended)")
    if settings.signup not in (None, "open", "closed"):
        raise ConfigError(f"MEDIAD_SIGNUP={settings.signup!r} is invalid: expected open or closed")
    for name in ("signin_window_s", "signin_block_s", "token_ttl_s", "token_idle_s"):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise ConfigError(f"MEDIAD_{name.upper()} is invalid: must be greater than 0")
    try:
        parse_networks(settings.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"MEDIAD_TRUSTED_PROXIES={settings.trusted_proxies!r} is invalid: {exc}") from None
