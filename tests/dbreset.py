"""Empty every table between tests (fast on SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import text

from corral import models
from corral.db.base import Base
from corral.db.engine import make_engine
from corral.metering.models import PG_ONLY_TABLES

models.load()


async def truncate_all(url: str) -> None:
    engine = make_engine(url)
    names = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with engine.begin() as conn:
        if url.startswith("sqlite"):
            await conn.execute(text("PRAGMA foreign_keys=OFF"))
            for name in names:
                await conn.execute(text(f'DELETE FROM "{name}"'))
            await conn.execute(text("PRAGMA foreign_keys=ON"))
        else:
            joined = ", ".join(f'"{n}"' for n in [*names, *sorted(PG_ONLY_TABLES)])
            await conn.execute(text(f"TRUNCATE {joined} RESTART IDENTITY CASCADE"))
    await engine.dispose()
