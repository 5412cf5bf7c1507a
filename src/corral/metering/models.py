"""Usage counters: one row per device per calendar month (UTC).

Written only through the event writer's group commit (:mod:`corral.events.writer`), in the
same transaction as the work they count (an event row) or before the work is acknowledged
(a function call's reply, a variable's value, a delivered event). The billing domain reads
them; nothing else writes them.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Date, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base

Count = BigInteger().with_variant(Integer(), "sqlite")


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
    updated_at: Mapped[dt.datetime]
