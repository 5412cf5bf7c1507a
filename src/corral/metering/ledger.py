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

from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from corral.kit import clock
from corral.metering.models import UsageCounter

USAGE: Table = UsageCounter.__table__  # type: ignore[assignment]

Kind = Literal["publish", "delivery", "function", "variable", "discarded", "location",
               "cellular"]
_COLUMN: dict[str, str] = {
    "publish": "events_published", "delivery": "events_delivered",
    "function": "function_calls", "variable": "variable_reads",
    "discarded": "events_discarded", "location": "location_points",
}
# kinds that are not data operations: rate-limited publishes (discarded) and a cellular
# device's session traffic (``payload_bytes`` of a "cellular" item is its byte count)
_NOT_OPERATIONS = frozenset({"discarded", "cellular"})
_COUNTERS = ("events_published", "events_delivered", "function_calls", "variable_reads",
             "events_discarded", "data_operations", "data_operations_kb", "payload_bytes",
             "location_points", "cellular_bytes")
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
    """One counted operation of one device (``kind="cellular"``: ``payload_bytes`` bytes of
    a cellular device's session traffic, not an operation; ``"location"``: one stored
    location point, one operation)."""

    device_id: str
    kind: Kind
    product_id: int | None = None
    org_id: int | None = None
    owner_user_id: int | None = None
    payload_bytes: int = 0
    at: dt.datetime = dataclasses.field(default_factory=clock.now)

    def __post_init__(self) -> None:
        if self.kind not in _COLUMN and self.kind != "cellular":
            raise ValueError(f"unknown usage kind {self.kind!r}")


def fold(items: Iterable[Usage]) -> list[dict[str, Any]]:
    """Aggregate increments into one row of deltas per (device, period)."""
    rows: dict[tuple[str, dt.date], dict[str, Any]] = {}
    now = clock.now()
    periods: dict[tuple[int, int], dt.date] = {}  # (year, month) of a UTC time -> period
    zero = dict.fromkeys(_COUNTERS, 0)
    for u in items:
        at = u.at if u.at.tzinfo is dt.UTC else u.at.astimezone(dt.UTC)
        ym = (at.year, at.month)
        period = periods.get(ym)
        if period is None:
            period = periods[ym] = dt.date(at.year, at.month, 1)
        key = (u.device_id, period)
        row = rows.get(key)
        if row is None:
            row = {"device_id": u.device_id, "period": period, "updated_at": now, **zero}
            rows[key] = row
        # the latest tenancy wins: a device that moved mid-month is billed where it is now
        row["product_id"], row["org_id"] = u.product_id, u.org_id
        row["owner_user_id"] = u.owner_user_id
        if u.kind == "cellular":
            row["cellular_bytes"] += u.payload_bytes
            continue
        row[_COLUMN[u.kind]] += 1
        if u.kind not in _NOT_OPERATIONS:
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


_KEYS = ("device_id", "period", "product_id", "org_id", "owner_user_id", "updated_at")
_RAW_COLUMNS = (*_KEYS, *_COUNTERS)


def _raw_upsert(dialect: str, *, tenancy: bool) -> str:
    """The same upsert as driver SQL (the ingest hot path skips SQLAlchemy's per-row
    parameter processing, as the event writer's insert does). Without ``tenancy`` an
    existing row keeps its tenancy columns, which spares the updates of their three indexes
    (about a fifth of the upsert's cost)."""
    if dialect == "sqlite":
        source = f"VALUES ({', '.join('?' * len(_RAW_COLUMNS))})"
    else:  # one statement for the whole batch: a column of values per parameter
        types = ("varchar", "date", "int", "int", "int", "timestamptz") + ("bigint",) * len(
            _COUNTERS)
        source = "SELECT * FROM unnest({})".format(", ".join(
            f"${i}::{t}[]" for i, t in enumerate(types, 1)))
    sets = [f"{c} = usage_counters.{c} + excluded.{c}" for c in _COUNTERS]
    sets.append("updated_at = excluded.updated_at")
    if tenancy:
        sets += [f"{c} = excluded.{c}" for c in ("product_id", "org_id", "owner_user_id")]
    return (f"INSERT INTO usage_counters ({', '.join(_RAW_COLUMNS)}) {source} "
            f"ON CONFLICT (device_id, period) DO UPDATE SET {', '.join(sets)}")


_RAW = {(d, t): _raw_upsert(d, tenancy=t) for d in ("sqlite", "postgresql") for t in (True, False)}

# (device, period) -> the tenancy this process has committed for that counter row. A row
# whose tenancy is known to be current is upserted without rewriting it; the cache learns
# only from committed transactions (a rolled-back batch teaches it nothing). Known gap with
# several writer nodes: a device that moves A -> B on one node and back to A on another
# within a month may keep B on its row until the first node sees another change.
Tenancy = tuple[int | None, int | None, int | None]
_WRITTEN: dict[tuple[str, dt.date], Tenancy] = {}
_WRITTEN_MAX = 500_000
_PENDING = "usage_tenancy"


@event.listens_for(Session, "after_commit")
def _tenancy_committed(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending:
        if len(_WRITTEN) + len(pending) > _WRITTEN_MAX:
            _WRITTEN.clear()
        _WRITTEN.update(pending)


@event.listens_for(Session, "after_rollback")
def _tenancy_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def forget_tenancy() -> None:
    """Drop what this process knows about stored tenancy (tests that rewrite the table)."""
    _WRITTEN.clear()


async def apply(db: AsyncSession, items: Sequence[Usage]) -> int:
    """Add ``items`` to the counters in the session's transaction (one upsert per distinct
    (device, period), sent as one executemany). Returns the number of rows touched."""
    rows = fold(items)
    if not rows:
        return 0
    # sorted keys: concurrent writers (several nodes) lock rows in the same order
    rows.sort(key=lambda r: (r["device_id"], r["period"]))
    conn = await db.connection()
    dialect = conn.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        await db.execute(_upsert(dialect), rows)
        return len(rows)
    known, changed = [], []
    pending: dict[tuple[str, dt.date], Tenancy] = {}
    for r in rows:
        key, tenancy = (r["device_id"], r["period"]), (r["product_id"], r["org_id"],
                                                       r["owner_user_id"])
        if _WRITTEN.get(key) == tenancy:
            known.append(r)
        else:
            changed.append(r)
            pending[key] = tenancy
    for group, with_tenancy in ((known, False), (changed, True)):
        if not group:
            continue
        sql = _RAW[(dialect, with_tenancy)]
        if dialect == "sqlite":
            # stored as SQLAlchemy's SQLite Date/DATETIME text (UTC, microseconds); fold
            # stamps every row with the same time and a batch spans one or two months
            stamp = _sqlite_time(group[0]["updated_at"])
            days: dict[dt.date, str] = {}
            await conn.exec_driver_sql(sql, [
                (r["device_id"], days.get(r["period"]) or days.setdefault(
                    r["period"], r["period"].isoformat()), r["product_id"], r["org_id"],
                 r["owner_user_id"], stamp, r["events_published"], r["events_delivered"],
                 r["function_calls"], r["variable_reads"], r["events_discarded"],
                 r["data_operations"], r["data_operations_kb"], r["payload_bytes"],
                 r["location_points"], r["cellular_bytes"]) for r in group])
        else:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            await raw.execute(sql, *([r[c] for r in group] for c in _RAW_COLUMNS))
    if pending:
        db.sync_session.info.setdefault(_PENDING, {}).update(pending)
    return len(rows)


def _sqlite_time(at: dt.datetime) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(dt.UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


__all__ = ["Kind", "Usage", "apply", "fold", "ops_per_kb", "period_of", "uncounted_name"]
