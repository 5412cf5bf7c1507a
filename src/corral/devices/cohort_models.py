"""Cohorts and their members (a device is in at most one cohort: the member's primary key)."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps


class Cohort(Timestamps, Base):
    """A named segment of a product's devices, optionally with its own firmware release."""

    __tablename__ = "cohorts"
    __table_args__ = (UniqueConstraint("product_id", "name", name="uq_cohorts_product_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(500))
    # the cohort's release: its devices target this firmware (see corral.firmware.resolver)
    firmware_id: Mapped[int | None] = mapped_column(
        ForeignKey("product_firmware.id", ondelete="SET NULL"), index=True)


class CohortMember(Base):
    __tablename__ = "cohort_members"
    __table_args__ = (Index("ix_cohort_members_cohort_device", "cohort_id", "device_id"),)

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"))
