"""Run Alembic migrations programmatically (``corral serve`` upgrades on start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str, target_metadata: MetaData | None = None) -> Config:
    """Alembic's configuration for ``url``; ``target_metadata`` (``corral.models.load()``)
    only where revisions are compared with the models (autogenerate)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    if target_metadata is not None:
        cfg.attributes["target_metadata"] = target_metadata
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision``."""
    cfg = alembic_config(str(engine.url))

    def _go(connection) -> None:  # type: ignore[no-untyped-def]
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_go)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    cfg = alembic_config(str(engine.url))

    def _go(connection) -> None:  # type: ignore[no-untyped-def]
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_go)
