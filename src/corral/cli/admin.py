"""``corral admin``: operator tasks on the local database; no server needed.

Every command upgrades the schema to head first, as ``corral serve`` does on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral import models
from corral.accounts import service as accounts
from corral.billing import enterprise as enterprise_terms
from corral.billing import subscriptions
from corral.cli.config import settings_from
from corral.cli.output import console, fail, print_json, table
from corral.db import migrate
from corral.db.engine import make_engine, make_sessionmaker
from corral.db.session import commit
from corral.kit import clock
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
    models.load()
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


@admin_app.command("enterprise")
def enterprise(
    org: Annotated[str, typer.Argument(help="The organization (id or slug).")],
    max_devices: Annotated[int, typer.Option(
        "--max-devices", min=0, help="Contracted billable devices.")],
    max_data_ops: Annotated[int, typer.Option(
        "--max-data-ops", min=0, help="Contracted data operations per contract year.")],
    max_cellular_mb: Annotated[int, typer.Option(
        "--max-cellular-mb", min=0, help="Contracted cellular MB per contract year.")],
    max_storage_mb: Annotated[int | None, typer.Option(
        "--max-storage-mb", min=0, help="Contracted storage (MB).")] = None,
    contract_start: Annotated[str | None, typer.Option(
        "--contract-start", help="First day of the contract, YYYY-MM-DD (default: today, or "
        "the current contract's).")] = None,
    per_kb: Annotated[bool | None, typer.Option(
        "--per-kb/--per-operation", help="Count data operations per started KiB.")] = None,
    pause_at_limit: Annotated[bool | None, typer.Option(
        "--pause-at-limit/--no-pause-at-limit",
        help="Pause devices at the data operations maximum.")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="End a self-service subscription (no refund) and replace it.")
    ] = False,
    data_dir: DataDir = None, database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Put an organization on the Enterprise plan with contracted maximums (again: update
    them). Its contract is invoiced outside corral; corral renews it yearly at zero and
    sends the monthly statements."""
    settings = settings_from(data_dir=data_dir, database_url=database_url)
    start = None
    if contract_start is not None:
        try:
            start = dt.date.fromisoformat(contract_start)
        except ValueError:
            fail("--contract-start must be a date as YYYY-MM-DD")

    async def work(db: AsyncSession) -> dict[str, Any]:
        sub = await enterprise_terms.put_on_enterprise(
            db, settings, org_key=org, max_devices=max_devices, max_data_ops=max_data_ops,
            max_cellular_mb=max_cellular_mb, max_storage_mb=max_storage_mb,
            contract_start=start, per_kb=per_kb, pause_at_limit=pause_at_limit,
            replace=replace, actor_label=ACTOR, now=clock.now())
        return subscriptions.subscription_json(sub)

    sub = run_in_db(settings, work)
    if as_json:
        print_json({"subscription": sub})
        return
    console.print(
        f"Organization [bold]{org}[/] is on Enterprise: {max_devices:,} devices, "
        f"{max_data_ops:,} data operations and {max_cellular_mb:,} MB per contract year "
        f"({sub['current_period_start'][:10]} to {sub['current_period_end'][:10]}).",
        highlight=False)
