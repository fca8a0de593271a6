"""`mediad users …` and `mediad tokens …`: account commands for operators.

They run against the database of the server's own MEDIAD_* settings: an external one, or the
embedded PostgreSQL under the data dir (joined while a `mediad serve` runs it, else started for
the command and stopped after).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import db, quotas
from .auth import clean_password, clean_user_name, hash_password, register, security_event
from .config import Settings, parse_size
from .embedded import database
from .errors import MediaError
from .files import rfc3339


def add_cli(commands: Any) -> None:
    users = commands.add_parser("users", help="create, list, disable and enable accounts")
    actions = users.add_subparsers(dest="users_command", required=True)
    create = actions.add_parser("create", help="create an account and print its first token")
    create.add_argument("name")
    create.add_argument("--password-stdin", action="store_true",
                        help="read a password (at least 8 characters) from the first line of stdin")
    actions.add_parser("list", help="every account with its file count and bytes")
    for verb, text in (("disable", "every token of the account stops working and sign-in is refused; "
                        "files are kept"), ("enable", "undo disable")):
        action = actions.add_parser(verb, help=text)
        action.add_argument("name")
    quota = actions.add_parser("set-quota", help="set how many bytes a user's files may take")
    quota.add_argument("name", help="the user's name (case-insensitive)")
    quota.add_argument("bytes", help="a byte count (1073741824, 500MiB, 10GiB) or none for unlimited")
    tokens = commands.add_parser("tokens", help="revoke tokens")
    token_actions = tokens.add_subparsers(dest="tokens_command", required=True)
    revoke = token_actions.add_parser("revoke", help="revoke a token by its id (GET /auth/tokens shows ids)")
    revoke.add_argument("token_id")


def main_from_args(settings: Settings, args: argparse.Namespace) -> int:
    """Run one account command; 0 done, 1 no such account or token, 2 invalid input."""
    if args.command == "tokens":
        return _run(settings, lambda engine: _revoke(engine, args.token_id))
    command = args.users_command
    if command == "create":
        try:
            name, name_key = clean_user_name(args.name)
            password = clean_password(sys.stdin.readline().rstrip("\r\n")) if args.password_stdin else None
        except MediaError as exc:
            print(f"mediad: {exc.detail}", file=sys.stderr)
            return 2
        return _run(settings, lambda engine: _create(engine, name, name_key, password,
                                                     settings.default_quota_bytes))
    if command == "list":
        return _run(settings, _list)
    if command == "set-quota":
        return _set_quota(settings, args.name, args.bytes)
    return _run(settings, lambda engine: _set_disabled(engine, args.name, command == "disable"))


def _run(settings: Settings, job: Callable[[AsyncEngine], Awaitable[int]]) -> int:
    async def run(url: str) -> int:
        engine = db.create_engine(url, settings)
        try:
            return await job(engine)
        finally:
            await engine.dispose()

    with database(settings.database_url, settings.data_dir) as url:
        return asyncio.run(run(url))


async def _create(engine: AsyncEngine, name: str, name_key: str, password: str | None,
                  quota: int | None) -> int:
    password_hash = hash_password(password) if password is not None else None
    try:
        user_id, token = await register(engine, name, name_key, password_hash, "cli", quota=quota)
    except MediaError as exc:
        print(f"mediad: {exc.detail}", file=sys.stderr)
        return 1
    security_event("user.created", user_id=user_id, name=name, client="cli")
    print(token)
    return 0


async def _list(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        rows = await db.list_users(conn)
    print(f"{'name':<24} {'id':<36} {'created':<20} {'state':<8} {'files':>7} {'bytes':>14}")
    for row in rows:
        state = "disabled" if row.disabled_at is not None else "active"
        print(f"{row.name:<24} {row.id!s:<36} {rfc3339(row.created_at):<20} {state:<8} "
              f"{row.files:>7} {row.bytes:>14}")
    return 0


async def _set_disabled(engine: AsyncEngine, name: str, disabled: bool) -> int:
    try:
        _, name_key = clean_user_name(name)
    except MediaError:
        name_key = None
    async with engine.begin() as conn:
        found = name_key is not None and await db.set_disabled(conn, name_key, disabled)
    if not found:
        print(f"mediad: no user named {name!r}", file=sys.stderr)
        return 1
    security_event("account.disabled" if disabled else "account.enabled", name=name, client="cli")
    print(f"{name}: {'disabled' if disabled else 'enabled'}")
    return 0


async def _revoke(engine: AsyncEngine, text: str) -> int:
    try:
        token_id = uuid.UUID(text)
    except ValueError:
        print(f"mediad: {text!r} is not a token id", file=sys.stderr)
        return 2
    async with engine.begin() as conn:
        if not await db.delete_token(conn, token_id):
            print(f"mediad: no token with id {token_id}", file=sys.stderr)
            return 1
    security_event("token.revoked", token_id=str(token_id), client="cli")
    print(f"token {token_id} revoked")
    return 0


def _set_quota(settings: Settings, name: str, text: str) -> int:
    try:
        quota = None if text.strip().lower() == "none" else parse_size(text)
        _, name_key = clean_user_name(name)
    except (ValueError, MediaError) as exc:
        print(f"mediad: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 2

    async def update(engine: AsyncEngine) -> int:
        async with engine.begin() as conn:
            found = await quotas.set_quota(conn, name_key, quota)
        if not found:
            print(f"mediad: no user named {name!r}", file=sys.stderr)
            return 1
        print(f"quota of {name}: " + ("unlimited" if quota is None else f"{quota} bytes"))
        return 0

    return _run(settings, update)
