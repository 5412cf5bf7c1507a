"""Reads of cohort membership (the device list, firmware targeting, views): no rules here;
the rules live in :mod:`corral.cohorts`, above the devices and the firmware that read this."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.devices.cohort_models import Cohort, CohortMember

CHUNK = 5000


async def cohort_names_for(db: AsyncSession, device_ids: Sequence[str],
                           cohort_ids: dict[str, int] | None = None) -> dict[str, str]:
    """Device id -> the name of its cohort (devices in none are absent); ``cohort_ids``:
    filled with device id -> its cohort's id on the way."""
    out: dict[str, str] = {}
    ids = list(device_ids)
    for i in range(0, len(ids), CHUNK):
        for d, n, cid in await db.execute(
                select(CohortMember.device_id, Cohort.name, Cohort.id)
                .join(Cohort, Cohort.id == CohortMember.cohort_id)
                .where(CohortMember.device_id.in_(ids[i:i + CHUNK]))):
            out[d] = n
            if cohort_ids is not None:
                cohort_ids[d] = int(cid)
    return out


def in_cohort(device_id: Any, product_id: int, name: str) -> ColumnElement[bool]:
    """``device_id`` is a member of the product's cohort ``name`` (indexed lookups)."""
    member: ColumnElement[bool] = device_id.in_(
        select(CohortMember.device_id).join(Cohort, Cohort.id == CohortMember.cohort_id)
        .where(Cohort.product_id == product_id, Cohort.name == name))
    return member
