"""Alembic migrations build exactly the schema of the models, on SQLite and PostgreSQL.

From an empty database: upgrade to head, compare with ``Base.metadata`` (no differences),
downgrade to base (nothing left), upgrade again (still no differences). The PostgreSQL run
uses its own throw-away schema, so it never touches the shared test database's tables.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from corral import models
from corral.db.base import Base
from corral.db.engine import make_engine
from corral.db.migrate import downgrade, upgrade
from corral.devices import search
from corral.metering.models import PG_ONLY_TABLES, VIEWS

models.load()
PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL", "")


def _modelled(name: str | None, type_: str, parent_names: Any) -> bool:
    """Leave out what the migrations make with no model (a PostgreSQL-only table, the
    device search index: corral.devices.search)."""
    return not ((type_ == "table" and name in PG_ONLY_TABLES | search.SQLITE_TABLES)
                or (type_ == "index" and name in search.PG_INDEXES))


async def _differences(engine: AsyncEngine) -> list[Any]:
    def diff(conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "include_name": _modelled})
        return compare_metadata(ctx, Base.metadata)

    async with engine.connect() as conn:
        return await conn.run_sync(diff)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _views(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_view_names()))


async def _round_trip(engine: AsyncEngine) -> None:
    assert await _tables(engine) == set()
    await upgrade(engine)
    assert await _differences(engine) == []
    only = PG_ONLY_TABLES if engine.dialect.name == "postgresql" else search.SQLITE_TABLES
    assert await _tables(engine) == {t.name for t in Base.metadata.sorted_tables} | {
        "alembic_version"} | only
    assert await _views(engine) == set(VIEWS.tables)

    await downgrade(engine, "base")
    assert await _tables(engine) <= {"alembic_version"}
    assert await _views(engine) == set()

    await upgrade(engine)
    assert await _differences(engine) == []


async def test_sqlite_upgrade_matches_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}")
    try:
        await _round_trip(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def pg_schema_engine() -> AsyncIterator[AsyncEngine]:
    """An engine whose connections only see a fresh schema ``mig_<random>``."""
    if not PG_URL.startswith("postgresql"):
        pytest.skip("CORRAL_TEST_DATABASE_URL is not a PostgreSQL URL")
    schema = f"mig_{secrets.token_hex(6)}"
    admin = make_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(PG_URL, connect_args={"server_settings": {"search_path": schema}})
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@pytest.mark.database_pass
async def test_postgresql_upgrade_matches_models(pg_schema_engine: AsyncEngine) -> None:
    async with pg_schema_engine.connect() as conn:
        schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
    assert schema.startswith("mig_")
    await _round_trip(pg_schema_engine)


@pytest.mark.database_pass
async def test_postgresql_downgrade_keeps_unfolded_publish_batches(
        pg_schema_engine: AsyncEngine) -> None:
    """Leaving 0011: each publish of a batch not folded yet becomes a delta again."""
    await upgrade(pg_schema_engine)
    async with pg_schema_engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO usage_publish_batches (device_ids, periods, product_ids, org_ids, "
            "owner_user_ids, payload_bytes) VALUES ('{a,b}', '{2026-01-01,2026-02-01}', "
            "'{7,NULL}', '{3,NULL}', '{NULL,42}', '{1025,0}')"))
    await downgrade(pg_schema_engine, "0010")
    async with pg_schema_engine.connect() as conn:
        got = (await conn.execute(text(
            "SELECT device_id, period::text, product_id, org_id, owner_user_id, "
            "events_published, data_operations, data_operations_kb, payload_bytes, "
            "function_calls FROM usage_deltas ORDER BY id"))).all()
    assert [tuple(r) for r in got] == [("a", "2026-01-01", 7, 3, None, 1, 1, 2, 1025, 0),
                                       ("b", "2026-02-01", None, None, 42, 1, 1, 1, 0, 0)]
    assert "usage_publish_batches" not in await _tables(pg_schema_engine)
    await upgrade(pg_schema_engine)
    assert await _differences(pg_schema_engine) == []


def test_one_line_of_revisions_in_file_order() -> None:
    """One head, and each revision's parent is the one before it in file order (several
    people land migrations in parallel: a second head would stop `corral serve`)."""
    from alembic.script import ScriptDirectory

    from corral.db.migrate import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(scripts.get_heads()) == 1, f"several heads: {scripts.get_heads()}"
    chain = [rev.revision for rev in reversed(list(scripts.walk_revisions()))]
    files = sorted(p.name.split("_")[0] for p in
                   (Path(scripts.dir) / "versions").glob("[0-9]*_*.py"))
    assert chain == files, (chain, files)
