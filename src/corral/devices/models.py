"""Devices, device groups, product CA certificates and claim codes."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps


class Device(Timestamps, Base):
    """One physical device, by its 24-hex id. Belongs to at most one product."""

    __tablename__ = "devices"
    __table_args__ = (
        # listing and sorting a product's devices stay indexed at 1M rows; the trailing id
        # is the tie-breaker, so deep pages are read from the index without a sort
        Index("ix_devices_product_id_id", "product_id", "id"),
        Index("ix_devices_product_last_heard", "product_id", "last_heard", "id"),
        Index("ix_devices_product_fw", "product_id", "firmware_version", "id"),
        # filtered by firmware version, in the default order (last heard)
        Index("ix_devices_product_fw_heard", "product_id", "firmware_version", "last_heard",
              "id"),
        Index("ix_devices_product_name", "product_id", "name", "id"),
        # fleet health filtered by Device OS version (and firmware version)
        Index("ix_devices_product_os", "product_id", "system_firmware_version",
              "firmware_version", "id"),
        Index("ix_devices_product_quarantined", "product_id", "quarantined"),
        # dynamic groups by platform (``platform = boron``), in the default order
        Index("ix_devices_product_platform", "product_id", "platform_id", "last_heard", "id"),
        Index("ix_devices_owner_name", "owner_user_id", "name"),
        Index("ix_devices_serial", "serial_number"),
        # a serial-number prefix within one product (the console's search box)
        Index("ix_devices_product_serial", "product_id", "serial_number"),
        # Partial indexes of online devices. A query uses them only when it states their
        # WHERE term: test the bare column (``.where(Device.online)``), which renders
        # ``online = 1`` on SQLite and ``online`` on PostgreSQL; never ``.is_(True)``.
        # the devices a node holds (scaled out): found at once when the node dies
        Index("ix_devices_node_online", "node_id", sqlite_where=text("online = 1"),
              postgresql_where=text("online")),
        # fleet health, the console: a product's online devices counted without the others
        Index("ix_devices_product_online", "product_id", sqlite_where=text("online = 1"),
              postgresql_where=text("online")),
    )

    id: Mapped[str] = mapped_column(String(24), primary_key=True)  # lowercase hex
    product_id: Mapped[int | None] = mapped_column(ForeignKey("products.id", ondelete="RESTRICT"))
    owner_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True)
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="SET NULL"), index=True)
    name: Mapped[str | None] = mapped_column(String(64))
    notes: Mapped[str | None] = mapped_column(Text)
    serial_number: Mapped[str | None] = mapped_column(String(64))
    iccid: Mapped[str | None] = mapped_column(String(32), index=True)
    imei: Mapped[str | None] = mapped_column(String(32), index=True)
    platform_id: Mapped[int] = mapped_column(default=0)
    cellular: Mapped[bool] = mapped_column(default=False)
    tags: Mapped[list[str]] = mapped_column(default=list)

    development: Mapped[bool] = mapped_column(default=False)
    quarantined: Mapped[bool] = mapped_column(default=False)
    denied: Mapped[bool] = mapped_column(default=False)

    # presence and billing facts (kept exact by the device-session core)
    online: Mapped[bool] = mapped_column(default=False)
    last_heard: Mapped[dt.datetime | None]
    last_handshake_at: Mapped[dt.datetime | None]
    first_online_at: Mapped[dt.datetime | None]  # set once; billing counts from here
    last_ip_address: Mapped[str | None] = mapped_column(String(64))
    last_disconnect_at: Mapped[dt.datetime | None]
    last_disconnect_reason: Mapped[str | None] = mapped_column(String(200))
    transport: Mapped[str | None] = mapped_column(String(16))  # mqtt | particle, last session
    node_id: Mapped[str | None] = mapped_column(String(40))  # the node that holds its session

    # what the device last described (the device-session core keeps these)
    functions: Mapped[list[str]] = mapped_column(default=list, server_default=text("'[]'"))
    variables: Mapped[dict[str, Any]] = mapped_column(  # name -> type
        default=dict, server_default=text("'{}'"))

    # firmware facts (the firmware issue drives these)
    firmware_version: Mapped[int | None]
    system_firmware_version: Mapped[str | None] = mapped_column(String(32))
    desired_firmware_version: Mapped[int | None]
    firmware_updates_enabled: Mapped[bool] = mapped_column(default=True)
    firmware_updates_forced: Mapped[bool] = mapped_column(default=False)

    # credentials for the two transports; a forced product switch clears both
    public_key_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    public_key_algorithm: Mapped[str | None] = mapped_column(String(16))
    mqtt_secret_hash: Mapped[str | None] = mapped_column(String(64))
    mqtt_secret_rotated_at: Mapped[dt.datetime | None]
    certificate_fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    credentials_version: Mapped[int] = mapped_column(default=0)

    imported_at: Mapped[dt.datetime | None]
    claimed_at: Mapped[dt.datetime | None]


class DeviceGroup(Timestamps, Base):
    __tablename__ = "device_groups"
    __table_args__ = (UniqueConstraint("product_id", "name", name="uq_device_groups_product_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(500))
    color: Mapped[str | None] = mapped_column(String(7))
    # a dynamic group's filter (corral.devices.dynquery); None: a static group (members)
    query: Mapped[str | None] = mapped_column(Text)


class DeviceGroupMember(Base):
    """One device in one static group. The ``device_*`` columns are copies of the device's
    sort keys, kept by the database's triggers (migration 0041: set when the membership is
    added, rewritten whenever the device's value changes, in the same statement), so a
    group's devices are read in any list order from its own indexes: a page of a large
    group does not walk the whole product's sort index probing memberships (bench B3)."""

    __tablename__ = "device_group_members"
    __table_args__ = (
        Index("ix_device_group_members_group_device", "group_id", "device_id"),
        Index("ix_device_group_members_heard", "group_id", "device_last_heard", "device_id"),
        Index("ix_device_group_members_fw", "group_id", "device_firmware_version", "device_id"),
        Index("ix_device_group_members_name", "group_id", "device_name", "device_id"),
    )

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    group_id: Mapped[int] = mapped_column(
        ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True)
    # written by the triggers only (never by the application)
    device_last_heard: Mapped[dt.datetime | None]
    device_firmware_version: Mapped[int | None]
    device_name: Mapped[str | None] = mapped_column(String(64))


class DeviceTag(Base):
    """One tag of one device: the indexed copy of ``devices.tags`` (kept in step with it in the
    same transaction by :mod:`corral.devices.tags`), so a tag filter reads an index instead
    of every device's JSON. The column stays the copy shown with the device."""

    __tablename__ = "device_tags"
    __table_args__ = (Index("ix_device_tags_tag_device", "tag", "device_id"),)

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)


class ProductCA(Timestamps, Base):
    """An X.509 CA registered to a product for just-in-time provisioning (JITP)."""

    __tablename__ = "product_cas"

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the DER
    subject: Mapped[str] = mapped_column(String(500))
    pem: Mapped[str] = mapped_column(Text)
    not_after: Mapped[dt.datetime]
    active: Mapped[bool] = mapped_column(default=True)
    # what a device provisioned through this CA gets: {"groups": [...], "tags": [...], "development": bool}
    jitp: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ClaimCode(Base):
    """A code a device presents after connecting so the cloud claims it to its creator."""

    __tablename__ = "claim_codes"
    __table_args__ = (
        Index("ix_claim_codes_user", "user_id"), Index("ix_claim_codes_customer", "customer_id"),
        Index("ix_claim_codes_code_hash", "code_hash"),
        # an ICCID or IMEI code can be held by several claimants at once (one each), so
        # nobody can squat another tenant's device ICCID; the device decides on redemption
        Index("uq_claim_codes_user_code", "code_hash", "user_id", unique=True,
              sqlite_where=text("user_id IS NOT NULL"),
              postgresql_where=text("user_id IS NOT NULL")),
        Index("uq_claim_codes_customer_code", "code_hash", "customer_id", unique=True,
              sqlite_where=text("customer_id IS NOT NULL"),
              postgresql_where=text("customer_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    product_id: Mapped[int | None] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]
    device_id: Mapped[str | None] = mapped_column(String(24))
