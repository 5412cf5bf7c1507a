"""Organizations and invitations (memberships live in auth.models)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps


class Organization(Timestamps, Base):
    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    # every user has one personal organization (sandbox) holding their own products
    personal: Mapped[bool] = mapped_column(default=False)
    # no FK: users -> products -> organizations -> users would be a cycle
    owner_user_id: Mapped[int | None] = mapped_column(index=True)


class Invitation(Timestamps, Base):
    __tablename__ = "invitations"
    __table_args__ = (
        Index("ix_invitations_email_status", "email", "status"),
        # one pending invitation per address and scope (re-inviting updates it in place)
        Index("uq_invitations_pending_org", "org_id", "email", unique=True,
              sqlite_where=text("product_id IS NULL AND status = 'pending'"),
              postgresql_where=text("product_id IS NULL AND status = 'pending'")),
        Index("uq_invitations_pending_product", "product_id", "email", unique=True,
              sqlite_where=text("product_id IS NOT NULL AND status = 'pending'"),
              postgresql_where=text("product_id IS NOT NULL AND status = 'pending'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    product_id: Mapped[int | None] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(20))
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    invited_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending|accepted|declined|revoked
    expires_at: Mapped[dt.datetime]
    responded_at: Mapped[dt.datetime | None]
