"""Ledger tables: definitions (per organization), instances (one JSON document per scope
value) and every version of every instance.

An instance row is never deleted while its ledger exists: deleting the instance clears its
data and writes a version, so ``version`` keeps rising by one per write whatever happens
(a device compares versions; one it has acknowledged is never offered again).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps


class LedgerDefinition(Timestamps, Base):
    __tablename__ = "ledger_definitions"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_ledger_definitions_org_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    scope: Mapped[str] = mapped_column(String(8))  # Owner | Product | Device
    direction: Mapped[str] = mapped_column(String(16))  # CloudOnly | CloudToDevice | DeviceToCloud
    json_schema: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    archived_at: Mapped[dt.datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(254))
    updated_by: Mapped[str | None] = mapped_column(String(254))


class LedgerInstance(Timestamps, Base):
    """The current document of one ledger at one scope value. ``level`` is the ledger's
    scope or a coarser one (defaults a Device ledger inherits: ``Product``, ``Owner``);
    ``scope_key`` is the organization id, product id or device id as text."""

    __tablename__ = "ledger_instances"
    __table_args__ = (
        UniqueConstraint("ledger_id", "level", "scope_key",
                         name="uq_ledger_instances_ledger_level_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    ledger_id: Mapped[int] = mapped_column(ForeignKey("ledger_definitions.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(8))
    scope_key: Mapped[str] = mapped_column(String(64))
    # None is SQL NULL (not JSON null), so "deleted" is a plain IS NULL test
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    size_bytes: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=0)
    updated_by: Mapped[str | None] = mapped_column(String(254))


class LedgerVersion(Base):
    """One write of an instance: what the document was after it."""

    __tablename__ = "ledger_versions"
    __table_args__ = (
        UniqueConstraint("instance_id", "version", name="uq_ledger_versions_instance_version"),
        Index("ix_ledger_versions_instance_created", "instance_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_instances.id", ondelete="CASCADE"))
    version: Mapped[int]
    op: Mapped[str] = mapped_column(String(12))  # set | merge | delete | rollback
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    size_bytes: Mapped[int] = mapped_column(default=0)
    restored_from: Mapped[int | None]  # rollback: the version restored
    created_at: Mapped[dt.datetime]
    created_by: Mapped[str | None] = mapped_column(String(254))
