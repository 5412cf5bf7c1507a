"""A phased rollout limits a release to a share of the devices it targets."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base

ROLLOUT_STATES = ("active", "paused", "aborted", "completed")
LIVE_STATES = ("active", "paused")  # at most one live rollout per firmware


class Rollout(Base):
    """The devices a release targets are admitted by a sticky hash of (device, firmware):
    with ``percent_bp`` (basis points, 0-10,000) those whose hash falls below the share;
    with ``count`` the ``count`` devices with the smallest hashes. Raising either only adds
    devices. Devices left out keep what the release replaced, if the rollout started with
    the release, else what the precedence rules give them without it.
    """

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_firmware_state", "firmware_id", "state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True)
    firmware_id: Mapped[int] = mapped_column(
        ForeignKey("product_firmware.id", ondelete="CASCADE"))
    version: Mapped[int]
    percent_bp: Mapped[int | None]  # one of percent_bp and count is set
    count: Mapped[int | None]
    state: Mapped[str] = mapped_column(String(16), default="active")
    state_reason: Mapped[str | None] = mapped_column(String(500))
    # pause automatically when more than this share failed, once this many have finished
    failure_threshold_bp: Mapped[int | None]
    failure_min_attempts: Mapped[int] = mapped_column(default=10)
    # what the release replaced when the rollout started with it, kept for the devices it
    # does not admit: the previous default version, and {group id: previous version}
    fallback_default: Mapped[int | None]
    fallback_groups: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
