"""Settings from the environment and .env; invalid values name their variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediad.config import ConfigError, load_settings


def test_defaults_without_environment() -> None:
    settings = load_settings({}, env_file=None)
    assert settings.database_url is None
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_upload_bytes == 10 * 1024**3
    assert settings.fsync is True
    assert settings.base_url == "http://127.0.0.1:8000"


def test_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MEDIAD_PORT=9000\nMEDIAD_MAX_UPLOAD_BYTES=64MiB\nMEDIAD_FSYNC=off\n")
    settings = load_settings({"MEDIAD_PORT": "9001"}, env_file=env_file)
    assert settings.port == 9001
    assert settings.max_upload_bytes == 64 * 1024**2
    assert settings.fsync is False


@pytest.mark.parametrize(("variable", "value"), [
    ("MEDIAD_PORT", "eighty"), ("MEDIAD_PORT", "70000"), ("MEDIAD_MAX_UPLOAD_BYTES", "lots"),
    ("MEDIAD_DISK_HIGH_WATER", "1.5"), ("MEDIAD_FSYNC", "maybe"), ("MEDIAD_DATABASE_URL", "mysql://x"),
    ("MEDIAD_CLOUD_CONCURRENCY", "0"), ("MEDIAD_CLEANUP_INTERVAL_S", "-1"), ("MEDIAD_BODY_TIMEOUT_S", "0"),
    ("MEDIAD_MAX_HEADER_BYTES", "0"), ("MEDIAD_ACCEL_REDIRECT", "_mediad"), ("MEDIAD_ACCEL_REDIRECT", "/_mediad"),
    ("MEDIAD_SECRET_KEY", "short"),
])
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: value}, env_file=None)


def test_settings_are_frozen() -> None:
    settings = load_settings({}, env_file=None)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_an_s3_bucket_needs_its_endpoint_and_keys() -> None:
    complete = {"MEDIAD_S3_BUCKET": "media", "MEDIAD_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                "MEDIAD_S3_ACCESS_KEY": "key", "MEDIAD_S3_SECRET_KEY": "secret"}
    assert load_settings(complete, env_file=None).s3_bucket == "media"
    for missing in ("MEDIAD_S3_ENDPOINT_URL", "MEDIAD_S3_ACCESS_KEY", "MEDIAD_S3_SECRET_KEY"):
        with pytest.raises(ConfigError, match=missing):
            load_settings({k: v for k, v in complete.items() if k != missing}, env_file=None)


def test_workers_default_to_the_usable_cpus_and_must_be_at_least_one() -> None:
    import os

    assert load_settings({}, env_file=None).workers == len(os.sched_getaffinity(0))
    assert load_settings({"MEDIAD_WORKERS": "3"}, env_file=None).workers == 3
    for value in ("0", "-2", "many"):
        with pytest.raises(ConfigError, match="MEDIAD_WORKERS"):
            load_settings({"MEDIAD_WORKERS": value}, env_file=None)
