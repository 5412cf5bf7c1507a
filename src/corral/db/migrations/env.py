"""Alembic environment: runs on the async engine (aiosqlite / asyncpg) via run_sync."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from corral.db.engine import make_engine

config = context.config
# Upgrades and downgrades need no metadata (the revisions are explicit). Comparing with the
# models (autogenerate) does: the caller passes the registry's metadata
# (``alembic_config(url, target_metadata=corral.models.load())``), so db/ imports no domain.
target_metadata = config.attributes.get("target_metadata")


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
else:
    asyncio.run(_online())
