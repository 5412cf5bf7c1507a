"""What each device was sent and has applied of each cloud-to-device ledger."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base


class LedgerDeviceState(Base):
    """One device and one cloud-to-device ledger.

    ``version`` is the device's own sequence for the ledger: it rises by one whenever the
    document the device should hold changes, i.e. whenever ``source`` (the versions of the
    owner, product and device instances it is merged from, ``"o.p.d"``) changes. It never
    goes down, also when the device moves to another product. ``applied_version`` is the
    latest the device acknowledged."""

    __tablename__ = "ledger_device_states"
    __table_args__ = (Index("ix_ledger_device_states_ledger", "ledger_id", "applied_version"),)

    device_id: Mapped[str] = mapped_column(
        String(24), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    ledger_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_definitions.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(default=0)
    source: Mapped[str] = mapped_column(String(64), default="")
    sent_at: Mapped[dt.datetime | None]
    applied_version: Mapped[int | None]
    applied_at: Mapped[dt.datetime | None]
