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

from corral.db.base import Base, all_models
from corral.db.engine import make_engine
from corral.db.migrate import downgrade, upgrade

all_models()
PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL", "")


async def _differences(engine: AsyncEngine) -> list[Any]:
    def diff(conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)

    async with engine.connect() as conn:
        return await conn.run_sync(diff)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _round_trip(engine: AsyncEngine) -> None:
    assert await _tables(engine) == set()
    await upgrade(engine)
    assert await _differences(engine) == []
    assert await _tables(engine) == {t.name for t in Base.metadata.sorted_tables} | {
        "alembic_version"}

    await downgrade(engine, "base")
    assert await _tables(engine) <= {"alembic_version"}

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


async def test_postgresql_upgrade_matches_models(pg_schema_engine: AsyncEngine) -> None:
    async with pg_schema_engine.connect() as conn:
        schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
    assert schema.startswith("mig_")
    await _round_trip(pg_schema_engine)
