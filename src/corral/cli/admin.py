"""``corral admin``: operator tasks on the local database; no server needed.

Every command upgrades the schema to head first, as ``corral serve`` does on start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.accounts import service as accounts
from corral.cli.config import settings_from
from corral.cli.output import console, fail, print_json, table
from corral.db import migrate
from corral.db.engine import make_engine, make_sessionmaker
from corral.db.session import commit
from corral.kit.errors import CorralError
from corral.settings import Settings

T = TypeVar("T")
# not reachable, refused credentials, data dir not writable, ...: a message, not a traceback
DATABASE_ERRORS = (OSError, SQLAlchemyError)

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory for the SQLite database and keys. (env CORRAL_DATA_DIR)")]
DatabaseUrl = Annotated[str | None, typer.Option(
    "--database-url", help="SQLAlchemy async URL (default: SQLite in the data dir). "
    "(env CORRAL_DATABASE_URL)")]
Password = Annotated[str | None, typer.Option(
    "--password", help="The password (prompted, hidden, if missing).")]
ACTOR = "admin (corral CLI)"

admin_app = typer.Typer(help="Operator tasks on the local database (no server needed).",
                        no_args_is_help=True)


def database_label(settings: Settings) -> str:
    return make_url(settings.resolved_database_url()).render_as_string(hide_password=True)


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """An engine on the configured database, migrated to head, disposed on exit."""
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


def run_in_db(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run ``work`` in one committed transaction; a service error exits 1 with its text."""

    async def go() -> T:
        async with database(settings) as sessionmaker, sessionmaker() as db:
            result = await work(db)
            await commit(db)
            return result

    try:
        return asyncio.run(go())
    except CorralError as exc:
        fail(exc.description)
    except DATABASE_ERRORS as exc:
        fail(f"Database {database_label(settings)}: {exc}")


def _new_password(password: str | None) -> str:
    return password or typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@admin_app.command("migrate")
def migrate_cmd(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Upgrade the database schema to the newest revision."""
    settings = settings_from(data_dir=data_dir, database_url=database_url)

    async def nothing(_: AsyncSession) -> None:
        return None

    run_in_db(settings, nothing)
    console.print(f"Database {database_label(settings)} is at the newest schema.",
                  highlight=False)


@admin_app.command("create-user")
def create_user(username: str, password: Password = None, data_dir: DataDir = None,
                database_url: DatabaseUrl = None) -> None:
    """Create a user account (with its personal organization)."""
    settings = settings_from(data_dir=data_dir, database_url=database_url)
    secret = _new_password(password)

    async def work(db: AsyncSession) -> str:
        user = await accounts.create_user(db, settings, username=username, password=secret,
                                          ip=None)
        return user.username

    console.print(f"Created user [bold]{run_in_db(settings, work)}[/].", highlight=False)


@admin_app.command("set-password")
def set_password(
    username: str, password: Password = None, data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    revoke_tokens: Annotated[bool, typer.Option(
        "--revoke-tokens", help="Also revoke all of the user's access tokens.")] = False,
) -> None:
    """Set a user's password (e.g. when they forgot it)."""
    settings = settings_from(data_dir=data_dir, database_url=database_url)
    secret = _new_password(password)

    async def work(db: AsyncSession) -> int:
        return await accounts.set_password(db, settings, username, secret,
                                           revoke_tokens=revoke_tokens, actor_label=ACTOR)

    revoked = run_in_db(settings, work)
    extra = f"; {revoked} token(s) revoked" if revoke_tokens else ""
    console.print(f"Password of [bold]{username}[/] updated{extra}.", highlight=False)


@admin_app.command("list-users")
def list_users(
    data_dir: DataDir = None, database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List user accounts (people and API users)."""
    settings = settings_from(data_dir=data_dir, database_url=database_url)

    async def work(db: AsyncSession) -> list[dict[str, Any]]:
        rows = await accounts.list_users(db)
        return [{"id": u.id, "username": u.username, "kind": u.kind,
                 "created_at": u.created_at.isoformat(timespec="seconds")} for u in rows]

    users = run_in_db(settings, work)
    if as_json:
        print_json(users)
    else:
        table("Users", ["id", "username", "kind", "created"],
              [(u["id"], u["username"], u["kind"], u["created_at"]) for u in users])
