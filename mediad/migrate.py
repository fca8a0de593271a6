"""Bring a database's schema to Alembic head (used by `mediad migrate`, `serve` and the tests)."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config


def alembic_config(url: str) -> Config:
    # The scripts are found as package data (the checkout's migrations/ is installed as
    # mediad.migrations), never from the working directory, so a wheel migrates from anywhere.
    config = Config()
    config.set_main_option("script_location", str(files("mediad.migrations")))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Synchronous: Alembic's env runs its own event loop, so call this outside any running loop."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
