"""Event queries, the Particle JSON shape of an event, and retention.

Events are written only by :class:`corral.events.writer.EventWriter`; this module reads and
prunes them. Services never commit: the caller owns the transaction.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.events.models import Event
from corral.kit import clock

MAX_LIMIT = 1000


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def query_events(
    db: AsyncSession,
    *,
    product_id: int | None = None,
    device_id: str | None = None,
    org_id: int | None = None,
    owner_user_id: int | None = None,
    customer_id: int | None = None,
    name_prefix: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Event]:
    """Stored events, newest (highest id) first.

    At least one tenancy filter (``product_id``, ``device_id``, ``org_id``,
    ``owner_user_id``, ``customer_id``) is required; all given filters must hold.
    ``name_prefix`` is a case-sensitive literal prefix (``%`` and ``_`` match themselves).
    ``since`` is inclusive, ``until`` exclusive. Page with ``before_id`` = the last id of
    the previous page. ``limit`` is clamped to 1..1000."""
    if product_id is None and device_id is None and org_id is None and owner_user_id is None \
            and customer_id is None:
        raise ValueError("query_events needs product_id, device_id, org_id, owner_user_id "
                         "or customer_id")
    where: list[ColumnElement[bool]] = []
    if product_id is not None:
        where.append(Event.product_id == product_id)
    if device_id is not None:
        where.append(Event.device_id == device_id)
    if org_id is not None:
        where.append(Event.org_id == org_id)
    if owner_user_id is not None:
        where.append(Event.owner_user_id == owner_user_id)
    if customer_id is not None:
        where.append(Event.customer_id == customer_id)
    if name_prefix:
        where.append(Event.name.like(_like_prefix(name_prefix), escape="\\"))
        # SQLite's LIKE ignores ASCII case; this keeps the match case-sensitive everywhere
        where.append(func.substr(Event.name, 1, len(name_prefix)) == name_prefix)
    if since is not None:
        where.append(Event.published_at >= since)
    if until is not None:
        where.append(Event.published_at < until)
    if before_id is not None:
        where.append(Event.id < before_id)
    limit = max(1, min(limit, MAX_LIMIT))
    stmt = select(Event).where(*where).order_by(Event.id.desc()).limit(limit)
    return list((await db.execute(stmt)).scalars().all())


def coreid(e: Any) -> str:
    """The ``coreid`` Particle shows: the device id; ``particle-internal`` for events the
    cloud generates (webhook results); ``api`` for events published through the API."""
    if e.device_id:
        return str(e.device_id)
    if str(e.name).startswith(("hook-sent/", "hook-error/", "hook-response/")):
        return "particle-internal"
    return "api"


def event_json(e: Any) -> dict[str, Any]:
    """Particle's SSE ``data:`` object for a stored event (an ``Event`` or ``StoredEvent``)."""
    return {
        "data": e.data,
        "ttl": e.ttl,
        "published_at": clock.iso(e.published_at),
        "coreid": coreid(e),
        "name": e.name,
    }


async def delete_older_than(db: AsyncSession, cutoff: dt.datetime, *, batch: int = 10_000) -> int:
    """Retention: delete events published before ``cutoff``; returns how many.

    A maintenance job, not a request service: it COMMITS after each batch of ``batch`` rows
    (selected by id, oldest first) so it never holds locks on a large backlog for long and
    never blocks the event writer for more than one batch. Give it a session of its own."""
    total = 0
    batch = max(1, batch)
    while True:
        ids = list((await db.execute(
            select(Event.id).where(Event.published_at < cutoff).order_by(Event.id).limit(batch)
        )).scalars().all())
        if not ids:
            await db.commit()  # end the read transaction
            return total
        for i in range(0, len(ids), 5000):  # bound IN (...) (SQLite parameter limit)
            await db.execute(delete(Event).where(Event.id.in_(ids[i:i + 5000])))
        await db.commit()
        total += len(ids)
