"""Location points: one row per stored position of a device."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base

Id = BigInteger().with_variant(Integer(), "sqlite")


class LocationPoint(Base):
    """A position a device reported in a ``loc`` event of a product that stores locations
    (product setting ``location.opt_in``). No foreign keys, like events: history outlives a
    device's product move; tenancy is copied when the point is stored."""

    __tablename__ = "location_points"
    __table_args__ = (
        Index("ix_location_points_device_at", "device_id", "at"),
        Index("ix_location_points_product_at", "product_id", "at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(24))
    product_id: Mapped[int] = mapped_column(Integer)
    org_id: Mapped[int | None] = mapped_column(Integer)
    event_id: Mapped[int] = mapped_column(Id, unique=True)  # the `loc` event it came from
    at: Mapped[dt.datetime]  # the device's fix time, else the publish time
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    alt: Mapped[float | None] = mapped_column(Float)
    accuracy_m: Mapped[float | None] = mapped_column(Float)  # horizontal accuracy
    heading: Mapped[float | None] = mapped_column(Float)
    speed: Mapped[float | None] = mapped_column(Float)
    gps_lock: Mapped[bool] = mapped_column(default=True)
    stored_at: Mapped[dt.datetime]
