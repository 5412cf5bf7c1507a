"""Usage increments and how a batch of them is folded into ``usage_counters``.

The device-session core creates a :class:`Usage` for each counted operation and hands it to
the event writer together with the work it counts, so the increment commits in the same
transaction as the event row (a publish) or before the operation is acknowledged (a function
call's reply, a variable's value, a delivered event). Nothing is counted twice and nothing
acknowledged goes uncounted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from corral.kit import clock
from corral.metering.models import UsageCounter

USAGE: Table = UsageCounter.__table__  # type: ignore[assignment]

Kind = Literal["publish", "delivery", "function", "variable", "discarded"]
_COLUMN: dict[str, str] = {
    "publish": "events_published", "delivery": "events_delivered",
    "function": "function_calls", "variable": "variable_reads",
    "discarded": "events_discarded",
}
_COUNTERS = ("events_published", "events_delivered", "function_calls", "variable_reads",
             "events_discarded", "data_operations", "data_operations_kb", "payload_bytes")
KB = 1024


def uncounted_name(name: str) -> bool:
    """Events whose names start with ``spark`` or ``particle`` are never data operations."""
    low = name.lower()
    return low.startswith(("spark", "particle"))


def ops_per_kb(payload_bytes: int) -> int:
    """Particle's per-1024-byte rule: 800 B is 1 operation, 1300 B is 2, 0 B is 1."""
    return max(1, -(-payload_bytes // KB))


def period_of(at: dt.datetime) -> dt.date:
    """The usage period (first day of the UTC month) that ``at`` falls in."""
    at = at.astimezone(dt.UTC)
    return dt.date(at.year, at.month, 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """One counted operation of one device."""

    device_id: str
    kind: Kind
    product_id: int | None = None
    org_id: int | None = None
    owner_user_id: int | None = None
    payload_bytes: int = 0
    at: dt.datetime = dataclasses.field(default_factory=clock.now)

    def __post_init__(self) -> None:
        if self.kind not in _COLUMN:
            raise ValueError(f"unknown usage kind {self.kind!r}")


def fold(items: Iterable[Usage]) -> list[dict[str, Any]]:
    """Aggregate increments into one row of deltas per (device, period)."""
    rows: dict[tuple[str, dt.date], dict[str, Any]] = {}
    now = clock.now()
    for u in items:
        key = (u.device_id, period_of(u.at))
        row = rows.get(key)
        if row is None:
            row = {"device_id": u.device_id, "period": key[1], "updated_at": now,
                   **{c: 0 for c in _COUNTERS}}
            rows[key] = row
        # the latest tenancy wins: a device that moved mid-month is billed where it is now
        row["product_id"], row["org_id"] = u.product_id, u.org_id
        row["owner_user_id"] = u.owner_user_id
        row[_COLUMN[u.kind]] += 1
        if u.kind != "discarded":
            row["data_operations"] += 1
            row["data_operations_kb"] += ops_per_kb(u.payload_bytes)
            row["payload_bytes"] += u.payload_bytes
    return list(rows.values())


def _upsert(dialect: str) -> Any:
    """One parametrized upsert, compiled once per dialect and run as an executemany."""
    stmt = _UPSERTS.get(dialect)
    if stmt is None:
        ins: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
        base = ins(USAGE)
        exc = base.excluded
        stmt = base.on_conflict_do_update(
            index_elements=[USAGE.c.device_id, USAGE.c.period],
            set_={**{c: USAGE.c[c] + exc[c] for c in _COUNTERS},
                  "product_id": exc.product_id, "org_id": exc.org_id,
                  "owner_user_id": exc.owner_user_id, "updated_at": exc.updated_at},
        )
        _UPSERTS[dialect] = stmt
    return stmt


_UPSERTS: dict[str, Any] = {}


async def apply(db: AsyncSession, items: Sequence[Usage]) -> int:
    """Add ``items`` to the counters in the session's transaction (one upsert per distinct
    (device, period), sent as one executemany). Returns the number of rows touched."""
    rows = fold(items)
    if not rows:
        return 0
    # sorted keys: concurrent writers (several nodes) lock rows in the same order
    rows.sort(key=lambda r: (r["device_id"], r["period"]))
    await db.execute(_upsert(db.get_bind().dialect.name), rows)
    return len(rows)


__all__ = ["Kind", "Usage", "apply", "fold", "ops_per_kb", "period_of", "uncounted_name"]
