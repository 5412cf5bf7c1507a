"""Product firmware, where it is released, signing keys, and per-device update state."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps

UPDATE_STATES = ("pending", "sending", "applied", "failed", "deferred", "cancelled")
OPEN_STATES = ("pending", "sending", "deferred")  # an update that has not ended


class ProductFirmware(Timestamps, Base):
    """One uploaded binary of a product, by its integer version (unique per product). The
    bytes live in the data directory, named by their SHA-256."""

    __tablename__ = "product_firmware"
    __table_args__ = (
        UniqueConstraint("product_id", "version", name="uq_product_firmware_product_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    version: Mapped[int]
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    # the Particle module header, when the binary is one (platform, product id/version, ...)
    module: Mapped[dict[str, Any] | None] = mapped_column()
    mandatory: Mapped[bool] = mapped_column(default=False)
    # Ed25519 signature (64 bytes) over the firmware's signing message, and the key's id
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    signing_key_id: Mapped[str | None] = mapped_column(String(16))
    uploaded_by_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True)
    uploaded_by: Mapped[str | None] = mapped_column(String(200))  # username at upload time
    # release state: product default (at most one per product) and intelligent delivery;
    # its groups are FirmwareGroupRelease rows
    product_default: Mapped[bool] = mapped_column(default=False)
    intelligent: Mapped[bool] = mapped_column(default=False)
    released_at: Mapped[dt.datetime | None]  # first release; released firmware is kept
    released_by: Mapped[str | None] = mapped_column(String(200))


class FirmwareGroupRelease(Base):
    """A device group's released firmware (a group has at most one)."""

    __tablename__ = "firmware_group_releases"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True)
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True)
    firmware_id: Mapped[int] = mapped_column(
        ForeignKey("product_firmware.id", ondelete="CASCADE"), index=True)
    released_at: Mapped[dt.datetime]


class SigningKey(Base):
    """An Ed25519 key of a product. ``private_key`` is set for keys corral made (it signs
    uploads with them); keys registered by their public half only check signatures that
    uploaders supply."""

    __tablename__ = "firmware_signing_keys"
    __table_args__ = (
        UniqueConstraint("product_id", "key_id", name="uq_firmware_signing_keys_product_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(100))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    private_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime]
    created_by: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[dt.datetime | None]


class DeviceBinary(Base):
    """A binary flashed to one device (``PUT /v1/devices/:id`` with a ``file``), stored once
    per content: the bytes live next to product firmware under their SHA-256, this row holds
    what its module header says. Rows no open update needs are dropped after
    ``firmware_binary_retention_days`` (:func:`corral.firmware.flash.prune_binaries`)."""

    __tablename__ = "device_binaries"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    filename: Mapped[str] = mapped_column(String(200))
    platform_id: Mapped[int | None]
    product_version: Mapped[int | None]  # the module's PRODUCT_VERSION, when it has one
    module: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[dt.datetime]
    last_flashed_at: Mapped[dt.datetime] = mapped_column(index=True)


class DeviceUpdate(Base):
    """One attempt to bring a device to a firmware version, and how it went.

    States: ``pending`` (decided, not started) -> ``sending`` -> ``applied`` | ``failed``;
    ``deferred`` (the device postponed it; it goes back to ``sending``); ``cancelled`` (the
    target changed before it finished). The delivery engine moves them through
    :mod:`corral.firmware.updates`.
    """

    __tablename__ = "device_updates"
    __table_args__ = (
        Index("ix_device_updates_device_created", "device_id", "created_at"),
        Index("ix_device_updates_firmware_state", "firmware_id", "state"),
        Index("ix_device_updates_rollout_state", "rollout_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    # null for a sandbox device (only a flashed binary reaches those)
    product_id: Mapped[int | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True)
    # what is delivered: product firmware, or a binary flashed to this one device
    firmware_id: Mapped[int | None] = mapped_column(
        ForeignKey("product_firmware.id", ondelete="CASCADE"))
    binary_id: Mapped[int | None] = mapped_column(
        ForeignKey("device_binaries.id", ondelete="SET NULL"), index=True)
    rollout_id: Mapped[int | None] = mapped_column(
        ForeignKey("rollouts.id", ondelete="SET NULL"))
    # product firmware: its version; a binary: its PRODUCT_VERSION, else the version the
    # device ran when it was flashed (a binary without one cannot be told apart by version)
    target_version: Mapped[int]
    from_version: Mapped[int | None]
    # release | intelligent | flash | lock | binary (PUT /v1/devices/:id with a file)
    trigger: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(String(500))
    attempts: Mapped[int] = mapped_column(default=0)
    bytes_sent: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"),
                                            default=0)
    transport: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
