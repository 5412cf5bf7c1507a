"""Counts for console pages that stay cheap on a product of a million devices.

A page shows *bounded* counts ("10,000+"): counting stops at ``CAP`` rows, so it costs at
most ``CAP`` index entries however large the fleet. The exact figures follow from a
separate request the page's script makes (``/console/products/{p}/stats``), so the page
itself renders fast and the number is still exact a moment later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.devices.models import Device

CAP = 10_000


@dataclass
class Count:
    """``value`` exact when ``exact``; else at least ``value`` (shown as "10,000+")."""

    value: int
    exact: bool = True

    def __str__(self) -> str:
        return f"{self.value:,}" if self.exact else f"{self.value:,}+"


async def bounded(db: AsyncSession, *conds: ColumnElement[bool], cap: int = CAP) -> Count:
    """How many devices match ``conds``, counting at most ``cap`` of them."""
    inner = select(Device.id).where(*conds).limit(cap + 1).subquery()
    n = int((await db.execute(select(func.count()).select_from(inner))).scalar_one())
    return Count(min(n, cap), exact=n <= cap)


async def exact(db: AsyncSession, *conds: ColumnElement[bool]) -> int:
    return int((await db.execute(select(func.count()).select_from(Device).where(*conds)
                                 )).scalar_one())


PRODUCT_FACTS: dict[str, Any] = {
    "devices": lambda pid: (Device.product_id == pid,),
    "online": lambda pid: (Device.product_id == pid, Device.online),
    "quarantined": lambda pid: (Device.product_id == pid, Device.quarantined.is_(True)),
}


async def product_summary(db: AsyncSession, product_id: int) -> dict[str, Count]:
    """Devices, online now and waiting in quarantine, bounded."""
    return {name: await bounded(db, *conds(product_id)) for name, conds in PRODUCT_FACTS.items()}


async def product_stats(db: AsyncSession, product_id: int) -> dict[str, int]:
    """The same facts, exact (the page's script asks for these after it has shown)."""
    return {name: await exact(db, *conds(product_id)) for name, conds in PRODUCT_FACTS.items()}
