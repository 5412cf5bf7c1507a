"""Counting the devices of a large product without reading them all.

A product's size is counted at most once per ``ESTIMATE_TTL_S`` per process (an index-only
count, ~30 ms at a million devices). In a product of ``SAMPLE_FROM`` devices or more, how
many devices a filter matches can be estimated from a sample: those among the product's
first ``SAMPLE`` devices in ID order that match, scaled to the product's size. Device IDs
are random (Particle's and corral's), so the first IDs are an unbiased sample; a fleet
whose IDs were issued in sequential ranges would bias it, and an estimate is always
flagged as one. The device list's totals (:mod:`corral.devices.service`) and a dynamic
group's device count (:mod:`corral.devices.groups`) use it for filters matching more than
``SAMPLED_ABOVE`` devices, so no request counts most of a million devices.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.devices.models import Device

ESTIMATE_TTL_S = 30.0
SAMPLE = 5_000
SAMPLE_FROM = 100_000
SAMPLED_ABOVE = 30_000

# engine -> {key: (counted at, count)}: per database, per process
ESTIMATES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[float, Any]]] = \
    weakref.WeakKeyDictionary()


def known_counts(db: AsyncSession) -> dict[tuple[Any, ...], tuple[float, Any]]:
    """This database's remembered counts (bounded: forgotten all at once past 10,000)."""
    known = ESTIMATES.setdefault(db.get_bind(), {})
    if len(known) >= 10_000:
        known.clear()
    return known


async def product_device_count(db: AsyncSession, product_id: int) -> int:
    return int((await db.execute(
        select(func.count()).select_from(Device).where(Device.product_id == product_id)
    )).scalar_one())


async def product_size(db: AsyncSession, product_id: int) -> int:
    """The product's devices, counted at most once per ESTIMATE_TTL_S."""
    known = known_counts(db)
    key, now = (product_id, "size"), time.monotonic()
    hit = known.get(key)
    if hit is not None and now - hit[0] < ESTIMATE_TTL_S:
        return int(hit[1])
    n = await product_device_count(db, product_id)
    known[key] = (now, n)
    return n


async def _sample_edge(db: AsyncSession, product_id: int) -> str | None:
    """The ID ending the product's sample (the ``SAMPLE``-th in ID order), None for a product
    that small; read at most once per ESTIMATE_TTL_S (a sample a few devices off the size
    after a change is as good a sample: it only ever gives an estimate)."""
    known = known_counts(db)
    key, now = (product_id, "edge"), time.monotonic()
    hit = known.get(key)
    if hit is not None and now - hit[0] < ESTIMATE_TTL_S:
        return hit[1] or None
    edge = (await db.execute(select(Device.id).where(Device.product_id == product_id)
                             .order_by(Device.id).offset(SAMPLE).limit(1))).scalar()
    known[key] = (now, edge or "")
    return edge


async def sampled_total(db: AsyncSession, product_id: int,
                        conds: Sequence[ColumnElement[bool]]) -> int | None:
    """The product's devices meeting every one of ``conds`` (conditions on ``Device``
    besides its product), estimated from the sample (each sampled device's row tested once:
    inside a CASE no other index serves the filters). None for a product smaller than
    SAMPLE_FROM (its counts are cheap enough)."""
    edge = await _sample_edge(db, product_id)
    if edge is None:
        return None
    size = await product_size(db, product_id)
    if size < SAMPLE_FROM:
        return None
    inner = select(Device.id).where(Device.product_id == product_id, Device.id < edge,
                                    case((and_(*conds), 1), else_=0) == 1)
    hits = int((await db.execute(select(func.count()).select_from(inner.subquery())))
               .scalar_one())
    return round(hits * size / SAMPLE)


async def sampled(db: AsyncSession, key: tuple[Any, ...], product_id: int,
                  conds: Sequence[ColumnElement[bool]]) -> int | None:
    """:func:`sampled_total` of the filter ``key`` names, taken at most once per
    ESTIMATE_TTL_S (testing 5,000 rows costs ~10 ms at a million devices: bench B3). It
    only ever answers as an estimate or chooses how to count or list exactly, so a
    remembered one serves no changed device."""
    known = known_counts(db)
    now = time.monotonic()
    hit = known.get((*key, "sampled"))
    if hit is not None and now - hit[0] < ESTIMATE_TTL_S:
        return None if hit[1] < 0 else hit[1]
    n = await sampled_total(db, product_id, conds)
    known[(*key, "sampled")] = (now, -1 if n is None else n)
    return n


async def count_or_estimate(db: AsyncSession, key: tuple[Any, ...], product_id: int,
                            sample: Sequence[ColumnElement[bool]] | None,
                            count: Callable[[int | None], Awaitable[int]], exact_up_to: int,
                            *, fresh_is_estimate: bool) -> tuple[int, bool]:
    """How many devices match, and whether that is an estimate; ``key`` names the filter
    (per product) for the remembered counts, ``count(cap)`` counts them (at most
    ``cap + 1``). With ``sample`` (the filter's conditions besides the product), a large
    product's match a sample puts above SAMPLED_ABOVE is the sample's estimate, not
    counted. Otherwise exact up to ``exact_up_to``; beyond, counted exactly at most once per
    ESTIMATE_TTL_S and that count reused meanwhile (an estimate; a fresh one too when
    ``fresh_is_estimate``: a listing's total says so whenever it is beyond the cap). A count
    remembered above ``exact_up_to`` is answered without even the capped count, flagged as
    an estimate (for up to ESTIMATE_TTL_S it may be a count from before devices went)."""
    known = known_counts(db)
    now = time.monotonic()
    if sample is not None:
        estimate = await sampled(db, key, product_id, sample)
        if estimate is not None and estimate > SAMPLED_ABOVE:
            return estimate, True
    hit = known.get(key)
    fresh = hit is not None and now - hit[0] < ESTIMATE_TTL_S
    if fresh and hit is not None and hit[1] > exact_up_to:
        # counted over the cap within ESTIMATE_TTL_S: that count, flagged, rather than the
        # capped count again (10,001 index entries ~2 ms; 10,001 name-substring matches
        # from the search index ~15 ms at a million devices)
        return hit[1], True
    n = await count(exact_up_to)
    if n <= exact_up_to:
        return n, False
    if fresh and hit is not None:
        return hit[1], True
    exact = await count(None)
    known[key] = (now, exact)
    return exact, fresh_is_estimate
