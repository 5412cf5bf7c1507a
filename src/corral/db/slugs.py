"""Unique slugs for any table with a unique slug column."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.kit.text import slugify


async def unique_slug(db: AsyncSession, column: Any, name: str, *, max_len: int = 60) -> str:
    """The slug of ``name``, or ``<slug>-<n>`` with the smallest free n, in one query.

    ``slugify`` yields only ``[a-z0-9-]``, so the LIKE pattern needs no escaping. A
    concurrent request can still take the same slug; the unique constraint then turns it
    into a 409 at commit."""
    base = slugify(name, max_len=max_len)
    taken = set((await db.execute(select(column).where(
        or_(column == base, column.like(f"{base}-%"))))).scalars())
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"
