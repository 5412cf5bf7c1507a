"""PostgreSQL's pool: a connection the server closed while it idled in the pool is replaced
at checkout (corral.db.engine._closed_by_server, in place of SQLAlchemy's three-round-trip
pre-ping), so the next request after a restart or a terminated backend succeeds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from corral.db.engine import make_engine


@pytest.fixture
async def pg(database_url: str) -> Any:
    if database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's pool (the suite's PostgreSQL pass)")
    engine = make_engine(database_url, pool_size=2)
    yield engine
    await engine.dispose()


async def _backend(engine: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def test_a_connection_the_server_closed_is_replaced(pg: Any) -> None:
    assert pg.sync_engine.pool._pre_ping is False  # no round trips at checkout
    victim = await _backend(pg)  # now idle in the pool
    killer = make_engine(str(pg.url.render_as_string(hide_password=False)),
                         pool_pre_ping=True)
    try:
        async with killer.connect() as conn:
            assert (await conn.execute(text("SELECT pg_terminate_backend(:p)"),
                                       {"p": victim})).scalar_one() is True
    finally:
        await killer.dispose()
    await asyncio.sleep(0.3)  # the server's goodbye reaches the pooled connection
    fresh = await _backend(pg)  # no error: the closed connection was replaced
    assert fresh != victim
