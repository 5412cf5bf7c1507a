"""Stored events. Written only through the batching writer (one transaction per batch)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base

# BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Event(Base):
    """One published event, as Particle's stream shows it (``name``, ``data``, ``ttl``,
    ``published_at``, ``coreid``), plus the tenancy needed to route and query it.

    No foreign keys: events are append-only history written at ingest rate, and they outlive
    a device leaving its product; tenancy columns are copied at publish time."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_product_time", "product_id", "published_at"),
        Index("ix_events_device_time", "device_id", "published_at"),
        Index("ix_events_owner_time", "owner_user_id", "published_at"),
        Index("ix_events_org_time", "org_id", "published_at"),
        Index("ix_events_customer_time", "customer_id", "published_at"),
        Index("ix_events_time", "published_at"),  # retention deletes
    )

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    published_at: Mapped[dt.datetime]
    name: Mapped[str] = mapped_column(String(64))
    data: Mapped[str | None] = mapped_column(Text)
    ttl: Mapped[int] = mapped_column(default=60)
    source: Mapped[str] = mapped_column(String(8))  # device | cloud
    device_id: Mapped[str | None] = mapped_column(String(24))  # the coreid; None from the cloud
    product_id: Mapped[int | None] = mapped_column(Integer)
    org_id: Mapped[int | None] = mapped_column(Integer)
    owner_user_id: Mapped[int | None] = mapped_column(Integer)  # sandbox streams
    customer_id: Mapped[int | None] = mapped_column(Integer)  # customer streams
    private: Mapped[bool] = mapped_column(default=True)
