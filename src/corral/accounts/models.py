"""Login lockout state per source IP (shared by every API node through the database)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base


class LoginFailure(Base):
    __tablename__ = "login_failures"

    ip: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime]
