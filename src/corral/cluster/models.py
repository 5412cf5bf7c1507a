"""The node registry and the leases of singleton work (PostgreSQL when scaled out)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base


class Node(Base):
    """One running corral process. ``heartbeat_at`` is the database's time of its last
    heartbeat; a node that misses them for ``node_dead_after_s`` is declared dead
    (``stopped_at`` set) and the devices it held are marked offline by another node."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[dt.datetime]
    heartbeat_at: Mapped[dt.datetime]
    sessions: Mapped[int] = mapped_column(default=0)  # device sessions it held at its heartbeat
    stopped_at: Mapped[dt.datetime | None]
    stop_reason: Mapped[str | None] = mapped_column(String(200))


class Lease(Base):
    """A named lease on singleton work: ``holder`` runs it until ``expires_at`` (database
    time) unless it renews; anyone may take an expired lease."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(40))
    acquired_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
