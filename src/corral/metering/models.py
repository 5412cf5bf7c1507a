"""Usage counters: one row per device per calendar month (UTC), and the append-only usage
not folded into them yet.

The event writer's group commit (:mod:`corral.events.writer`) appends the usage of a batch
in the same transaction as the work it counts (an event row) or before the work is
acknowledged (a function call's reply, a variable's value, a delivered event):

* ``usage_deltas``: one row per device and month for calls, reads, deliveries, location
  points and cellular bytes, and, on SQLite, one row per counted publish;
* ``usage_publish_batches`` (PostgreSQL only, created by migration 0011, no model): one row
  per batch holding its counted publishes as parallel arrays.

The view ``usage_pending`` (:data:`PENDING`) shows both as one row per increment. The
metering tick folds it into ``usage_counters`` (:func:`corral.metering.ledger.fold_pending`);
readers (:mod:`corral.metering.usage`) add what is not folded yet, so what they see is exact
at any moment. Nothing else writes these tables.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps

Count = BigInteger().with_variant(Integer(), "sqlite")
# the counters of a device's month, as columns of usage_counters, usage_deltas and the view
COUNTERS = ("events_published", "events_delivered", "function_calls", "variable_reads",
            "events_discarded", "data_operations", "data_operations_kb", "payload_bytes",
            "location_points", "cellular_bytes")


class UsageCounter(Base):
    """How much one device used in one month.

    ``data_operations`` counts one per publish, subscribe delivery, function call and
    variable read; ``data_operations_kb`` counts the same operations at one per started
    1024 bytes of payload (Particle's per-KB rule; which one a plan bills is a plan
    setting). ``events_discarded`` are publishes the rate limit dropped (not billed).

    No foreign keys, like events: usage is history and outlives a device's product move;
    tenancy is copied when the work happens."""

    __tablename__ = "usage_counters"
    __table_args__ = (
        Index("ix_usage_product_period", "product_id", "period"),
        Index("ix_usage_org_period", "org_id", "period"),
        Index("ix_usage_owner_period", "owner_user_id", "period"),
    )

    device_id: Mapped[str] = mapped_column(String(24), primary_key=True)
    period: Mapped[dt.date] = mapped_column(Date, primary_key=True)  # first day of the month
    product_id: Mapped[int | None] = mapped_column(Integer)
    org_id: Mapped[int | None] = mapped_column(Integer)
    owner_user_id: Mapped[int | None] = mapped_column(Integer)
    events_published: Mapped[int] = mapped_column(Count, default=0)
    events_delivered: Mapped[int] = mapped_column(Count, default=0)
    function_calls: Mapped[int] = mapped_column(Count, default=0)
    variable_reads: Mapped[int] = mapped_column(Count, default=0)
    events_discarded: Mapped[int] = mapped_column(Count, default=0)
    data_operations: Mapped[int] = mapped_column(Count, default=0)
    data_operations_kb: Mapped[int] = mapped_column(Count, default=0)
    payload_bytes: Mapped[int] = mapped_column(Count, default=0)
    # stored location points (one data operation each) and a cellular device's session
    # traffic in bytes, both sides (counted towards the pooled cellular allowance)
    location_points: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    cellular_bytes: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    updated_at: Mapped[dt.datetime]


DeltaId = BigInteger().with_variant(Integer(), "sqlite")


class UsageDelta(Base):
    """What one writer batch added to one device's usage in one month, not yet folded into
    its :class:`UsageCounter` row.

    Append-only, with nothing indexed but the key (on PostgreSQL the writer appends them
    with ``COPY``); the metering tick moves them into ``usage_counters`` and deletes them in
    one transaction. ``id`` orders a device's deltas: the latest one's tenancy is the one
    its counter row gets."""

    __tablename__ = "usage_deltas"

    id: Mapped[int] = mapped_column(DeltaId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(24))
    period: Mapped[dt.date] = mapped_column(Date)
    product_id: Mapped[int | None] = mapped_column(Integer)
    org_id: Mapped[int | None] = mapped_column(Integer)
    owner_user_id: Mapped[int | None] = mapped_column(Integer)
    events_published: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    events_delivered: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    function_calls: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    variable_reads: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    events_discarded: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    data_operations: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    data_operations_kb: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    payload_bytes: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    location_points: Mapped[int] = mapped_column(Count, default=0, server_default="0")
    cellular_bytes: Mapped[int] = mapped_column(Count, default=0, server_default="0")


class Plan(Base):
    """A plan's terms, as data (seeded by migration 0006; an operator may edit the rows).

    An allowance is ``base + blocks * per-block``; a ``None`` base means "from the
    organization's contract" (Enterprise: :class:`OrgPlan` carries the maximums)."""

    __tablename__ = "plans"

    code: Mapped[str] = mapped_column(String(20), primary_key=True)  # free | basic | enterprise
    name: Mapped[str] = mapped_column(String(60))
    period: Mapped[str] = mapped_column(String(8))  # month | year (pooling period)
    max_devices: Mapped[int | None] = mapped_column(Integer)
    max_data_ops: Mapped[int | None] = mapped_column(Count)
    max_cellular_mb: Mapped[int | None] = mapped_column(Integer)
    max_storage_mb: Mapped[int | None] = mapped_column(Integer)
    block_devices: Mapped[int] = mapped_column(Integer, default=0)
    block_data_ops: Mapped[int] = mapped_column(Count, default=0)
    block_cellular_mb: Mapped[int] = mapped_column(Integer, default=0)
    block_price_cents: Mapped[int] = mapped_column(Integer, default=0)
    min_blocks: Mapped[int] = mapped_column(Integer, default=0)
    pause_at_limit: Mapped[bool] = mapped_column(default=False)
    per_kb: Mapped[bool] = mapped_column(default=False)  # data operations per started KiB
    self_service: Mapped[bool] = mapped_column(default=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class OrgPlan(Timestamps, Base):
    """The plan an organization is on (no row: Free). Enterprise rows carry the contracted
    maximums and the contract start (annual pooling runs from its month); ``per_kb`` and
    ``pause_at_limit`` override the plan's when set."""

    __tablename__ = "org_plans"

    org_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    plan_code: Mapped[str] = mapped_column(ForeignKey("plans.code", ondelete="RESTRICT"))
    blocks: Mapped[int] = mapped_column(Integer, default=0)
    max_devices: Mapped[int | None] = mapped_column(Integer)
    max_data_ops: Mapped[int | None] = mapped_column(Count)
    max_cellular_mb: Mapped[int | None] = mapped_column(Integer)
    max_storage_mb: Mapped[int | None] = mapped_column(Integer)
    contract_start: Mapped[dt.date | None] = mapped_column(Date)
    per_kb: Mapped[bool | None]
    pause_at_limit: Mapped[bool | None]


class UsageAlert(Base):
    """A usage threshold that fired: at most one row per (organization, allowance period,
    metric, threshold), which is what makes each warning fire exactly once."""

    __tablename__ = "usage_alerts"
    __table_args__ = (UniqueConstraint("org_id", "period", "metric", "threshold"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    period: Mapped[dt.date] = mapped_column(Date)  # first day of the allowance period
    metric: Mapped[str] = mapped_column(String(20))  # data_operations | cellular_data
    threshold: Mapped[int] = mapped_column(Integer)  # 70 | 90 | 100
    used: Mapped[int] = mapped_column(Count)
    allowance: Mapped[int] = mapped_column(Count)
    created_at: Mapped[dt.datetime]


class UsageDay(Base):
    """An organization's usage this calendar month as of the end of one day (UTC): the
    metering tick's latest reading of the month's totals on that day (its personal user's
    own devices included). A day's own usage is the difference to the previous recorded
    day of the month (:mod:`corral.metering.daily`); days the tick did not run (a server
    stopped) have no row and their usage counts on the next day that has one."""

    __tablename__ = "usage_days"

    org_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    data_operations: Mapped[int] = mapped_column(Count, default=0)
    data_operations_kb: Mapped[int] = mapped_column(Count, default=0)
    cellular_bytes: Mapped[int] = mapped_column(Count, default=0)


# tables only one dialect has, and views: made by the migrations, not part of Base.metadata
# (so the schema comparison with the models leaves them out)
PG_ONLY_TABLES = frozenset({"usage_publish_batches"})
VIEWS = MetaData()
PENDING = Table(
    "usage_pending", VIEWS,
    # an order key unique across the view: the latest row of a device's month carries the
    # tenancy its counter row gets
    Column("pos", BigInteger),
    Column("device_id", String(24)), Column("period", Date), Column("product_id", Integer),
    Column("org_id", Integer), Column("owner_user_id", Integer),
    *(Column(c, BigInteger) for c in COUNTERS))


class Notification(Base):
    """A console/API notification for an organization's administrators."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_org_id", "org_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(60))  # e.g. usage.threshold
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime]
    read_at: Mapped[dt.datetime | None]


class SimDeactivation(Base):
    """One interval during which a SIM (by ICCID) was deactivated; ``reactivated_at`` is
    None while it still is. A cellular device whose SIM was deactivated for a whole month
    is not billable that month."""

    __tablename__ = "sim_deactivations"
    __table_args__ = (Index("ix_sim_deactivations_iccid", "iccid", "deactivated_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    iccid: Mapped[str] = mapped_column(String(32))
    deactivated_at: Mapped[dt.datetime]
    reactivated_at: Mapped[dt.datetime | None]


class Sim(Base):
    """A SIM card (by ICCID) and who holds it: a product (imported, or reported by one of
    its devices) or a user (reported by one of the user's own devices). ``last_device_id``
    is the device that last reported it. Its activation state is the open interval of
    :class:`SimDeactivation` (``deactivated_at`` mirrors it, so a device's connection reads
    it in the same row read as the device). Releasing a SIM deletes the row; its
    deactivation history stays (billing reads it)."""

    __tablename__ = "sims"
    __table_args__ = (Index("ix_sims_product_id", "product_id", "iccid"),
                      Index("ix_sims_owner_user_id", "owner_user_id", "iccid"))

    iccid: Mapped[str] = mapped_column(String(32), primary_key=True)
    product_id: Mapped[int | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"))
    owner_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"))
    last_device_id: Mapped[str | None] = mapped_column(String(24))
    activations_count: Mapped[int] = mapped_column(Integer, default=1)
    deactivated_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class SimUsageDay(Base):
    """A SIM's cellular bytes this calendar month as of the end of one day (UTC): the
    metering tick's latest reading of its device's month-to-date ``cellular_bytes`` (as
    :class:`UsageDay` is for an organization). A day's use is the difference to the
    previous recorded day of the month."""

    __tablename__ = "sim_usage_days"

    iccid: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    cellular_bytes: Mapped[int] = mapped_column(Count, default=0)


class UsageReport(Base):
    """An asynchronous usage report (Particle's ``usage_reports``) of one service agreement
    (an organization's: see :mod:`corral.metering.agreements`): requested ``pending``, built
    by the background worker (``available`` with its CSV, or ``failed``), kept until
    ``expires_at``."""

    __tablename__ = "usage_reports"
    __table_args__ = (Index("ix_usage_reports_state", "state", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"),
                                        index=True)
    requested_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"))
    report_type: Mapped[str] = mapped_column(String(16))  # devices | products
    date_period_start: Mapped[dt.date] = mapped_column(Date)
    date_period_end: Mapped[dt.date] = mapped_column(Date)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    csv: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
