"""Fleet tables: device vitals and the rollups fleet health reads.

No foreign keys, like events: history outlives a device's product move; tenancy is copied
when the row is written. Retention (``CORRAL_VITALS_RETENTION_DAYS``,
``CORRAL_FLEET_MINUTE_RETENTION_DAYS``, ``CORRAL_FLEET_HOUR_RETENTION_DAYS``) is enforced by
the hourly housekeeping singleton.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, PrimaryKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base

Id = BigInteger().with_variant(Integer(), "sqlite")


class DeviceVitals(Base):
    """One vitals report (``spark/device/diagnostics/update``) of a device."""

    __tablename__ = "device_vitals"
    __table_args__ = (Index("ix_device_vitals_device_at", "device_id", "at"),
                      Index("ix_device_vitals_product_at", "product_id", "at"),
                      Index("ix_device_vitals_at", "at"))

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(24))
    product_id: Mapped[int | None] = mapped_column(Integer)
    org_id: Mapped[int | None] = mapped_column(Integer)
    event_id: Mapped[int] = mapped_column(Id, unique=True)  # the event it came from
    at: Mapped[dt.datetime]
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class _Counters:
    """The counters of a rollup row."""

    online: Mapped[int] = mapped_column(Integer, default=0)  # most devices online at once
    events: Mapped[int] = mapped_column(Integer, default=0)  # device events stored
    connects: Mapped[int] = mapped_column(Integer, default=0)
    disconnects: Mapped[int] = mapped_column(Integer, default=0)
    fn_success: Mapped[int] = mapped_column(Integer, default=0)
    fn_failure: Mapped[int] = mapped_column(Integer, default=0)
    fn_offline: Mapped[int] = mapped_column(Integer, default=0)
    var_success: Mapped[int] = mapped_column(Integer, default=0)
    var_failure: Mapped[int] = mapped_column(Integer, default=0)
    var_offline: Mapped[int] = mapped_column(Integer, default=0)
    # the device did not answer in time (migration 0036; before it, counted as failure)
    fn_timeout: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    var_timeout: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # data operations (seed 004): counted publishes, deliveries to the device, function
    # calls and variable reads that metering counted (migration 0036)
    data_ops: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class _Rollup(_Counters):
    """Counters of one product, one time bucket and one firmware version (0: not known)."""

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[dt.datetime] = mapped_column(primary_key=True)
    firmware_version: Mapped[int] = mapped_column(Integer, primary_key=True)


class FleetMinute(_Rollup, Base):
    __tablename__ = "fleet_minutes"
    __table_args__ = (Index("ix_fleet_minutes_bucket", "bucket"),)


class FleetHour(_Rollup, Base):
    __tablename__ = "fleet_hours"
    __table_args__ = (Index("ix_fleet_hours_bucket", "bucket"),)


class _SegmentRollup(_Counters):
    """The same counters for one segment of a product's devices: ``g:<group id>`` (a device
    group) or ``os:<Device OS version>``. A device's counts go to each segment it is in when
    its counts are flushed (see :mod:`corral.fleet.rollups`), so a filtered request reads
    these rows exactly as an unfiltered one reads ``fleet_minutes``/``fleet_hours``."""

    product_id: Mapped[int] = mapped_column(Integer)
    segment: Mapped[str] = mapped_column(String(40))
    bucket: Mapped[dt.datetime]
    firmware_version: Mapped[int] = mapped_column(Integer)


class FleetSegmentMinute(_SegmentRollup, Base):
    __tablename__ = "fleet_segment_minutes"
    # a filtered request is one range of the primary key: product, segment, bucket
    __table_args__ = (PrimaryKeyConstraint("product_id", "segment", "bucket",
                                           "firmware_version"),
                      Index("ix_fleet_segment_minutes_bucket", "bucket"))


class FleetSegmentHour(_SegmentRollup, Base):
    __tablename__ = "fleet_segment_hours"
    __table_args__ = (PrimaryKeyConstraint("product_id", "segment", "bucket",
                                           "firmware_version"),
                      Index("ix_fleet_segment_hours_bucket", "bucket"))


class _VitalsRollup:
    """The vitals reports of one product (``segment`` ``""``) or one of its segments (as
    the segment rollups), one time bucket and one firmware version (``ALL_VERSIONS``: every
    version, what an unfiltered request reads), for one vital (``rssi``, ``round_trip``,
    ``memory_used``; ``reports`` counts every report) and one bin of its fixed histogram
    (:mod:`corral.fleet.vitals_rollups`): how many values fell in the bin, and the lowest
    and highest of them."""

    product_id: Mapped[int] = mapped_column(Integer)
    segment: Mapped[str] = mapped_column(String(40))
    bucket: Mapped[dt.datetime]
    firmware_version: Mapped[int] = mapped_column(Integer)
    vital: Mapped[str] = mapped_column(String(16))
    bin: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer, default=0)
    low: Mapped[float] = mapped_column(Float)
    high: Mapped[float] = mapped_column(Float)


ALL_VERSIONS = -1  # the vitals rollups' firmware version of every version's reports
# a request is one range of the primary key: product, segment, version, vital, bucket
_VITALS_KEY = ("product_id", "segment", "firmware_version", "vital", "bucket", "bin")


class FleetVitalsHour(_VitalsRollup, Base):
    __tablename__ = "fleet_vitals_hours"
    __table_args__ = (PrimaryKeyConstraint(*_VITALS_KEY),
                      Index("ix_fleet_vitals_hours_bucket", "bucket"))


class FleetVitalsDay(_VitalsRollup, Base):
    """The same per UTC day (what ranges longer than two days read)."""

    __tablename__ = "fleet_vitals_days"
    __table_args__ = (PrimaryKeyConstraint(*_VITALS_KEY),
                      Index("ix_fleet_vitals_days_bucket", "bucket"))


MINUTE_TABLES = (FleetMinute, FleetSegmentMinute)  # kept fleet_minute_retention_days
# kept fleet_hour_retention_days
HOUR_TABLES = (FleetHour, FleetSegmentHour, FleetVitalsHour, FleetVitalsDay)


def rollup_table(*, minute: bool, segment: bool) -> Any:
    """The rollup table of a read: per minute or per hour, of products or of segments."""
    return (MINUTE_TABLES if minute else HOUR_TABLES)[1 if segment else 0]


class FleetDeviceDay(Base):
    """Per device and UTC day: disconnects and failed calls (the "most troubled" lists)."""

    __tablename__ = "fleet_device_days"
    # covering: the troubled-devices lists are one index-only pass (migration 0026)
    __table_args__ = (Index("ix_fleet_device_days_product_day", "product_id", "day",
                            "device_id", "disconnects", "errors"),
                      Index("ix_fleet_device_days_day", "day"))

    device_id: Mapped[str] = mapped_column(String(24), primary_key=True)
    day: Mapped[dt.datetime] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(Integer)
    disconnects: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)


class FleetDeviceCount(Base):
    """How many devices a product has per firmware version (0: never reported), and how
    many of them were online, at the once-a-minute sample (:func:`corral.fleet.rollups.
    sample_online`): what fleet health reads for a large product instead of counting its
    devices per request. Every sample replaces every row."""

    __tablename__ = "fleet_device_counts"

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    firmware_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    devices: Mapped[int] = mapped_column(Integer, default=0)
    online: Mapped[int] = mapped_column(Integer, default=0)
    sampled_at: Mapped[dt.datetime]


class FleetSegmentDeviceCount(Base):
    """As :class:`FleetDeviceCount`, per segment: a static device group's devices
    (``g:<id>``) or a Device OS version's (``os:<version>``), per firmware version, at the
    once-a-minute sample; what a group- or Device-OS-filtered fleet health reads for a large
    product. Every sample replaces every row."""

    __tablename__ = "fleet_segment_device_counts"

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    segment: Mapped[str] = mapped_column(String(40), primary_key=True)
    firmware_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    devices: Mapped[int] = mapped_column(Integer, default=0)
    online: Mapped[int] = mapped_column(Integer, default=0)
    sampled_at: Mapped[dt.datetime]


class FleetTroubledDay(Base):
    """A product's UTC day of per-device rows (:class:`FleetDeviceDay`) and whether its
    "most troubled" lists (:class:`FleetDayTop`) are up to date: every flush that adds to
    the day's rows raises ``version``; the lists were made at ``computed_version`` (they are
    read only while it equals ``version``). ``rest_*``: the most any device left out of a
    list has that day (0: the list holds every device with a count)."""

    __tablename__ = "fleet_troubled_days"
    __table_args__ = (Index("ix_fleet_troubled_days_day", "day"),)

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[dt.datetime] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    computed_version: Mapped[int] = mapped_column(Integer, default=0)
    rest_disconnects: Mapped[int] = mapped_column(Integer, default=0)
    rest_errors: Mapped[int] = mapped_column(Integer, default=0)


class FleetDayTop(Base):
    """One of a product's day's devices with the most disconnects (``kind``
    ``disconnects``) or failed calls (``errors``): at most ``TOPS_PER_DAY`` per kind."""

    __tablename__ = "fleet_day_tops"
    __table_args__ = (Index("ix_fleet_day_tops_day", "day"),)

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[dt.datetime] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(12), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(24), primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


class FleetAlertRule(Base):
    """A product's threshold rule (``kind``: ``online_below`` devices, ``error_rate_above``
    percent of calls over ``window_s``, ``silent_longer`` than ``threshold`` seconds). While
    its condition holds the rule is ``active``; raising and clearing it are events under
    ``corral/alert/`` and e-mails."""

    __tablename__ = "fleet_alert_rules"
    __table_args__ = (Index("ix_fleet_alert_rules_product", "product_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    product_id: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    threshold: Mapped[float] = mapped_column(Float)
    window_s: Mapped[int] = mapped_column(Integer, default=900)
    enabled: Mapped[bool] = mapped_column(default=True)
    active: Mapped[bool] = mapped_column(default=False)
    active_since: Mapped[dt.datetime | None]
    last_value: Mapped[float | None] = mapped_column(Float)
    subject: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # e.g. the silent devices
    created_at: Mapped[dt.datetime]


class FleetSegmentDisconnect(Base):
    """Disconnects per product, segment (as the segment rollups), hour and reason."""

    __tablename__ = "fleet_segment_disconnects"
    __table_args__ = (Index("ix_fleet_segment_disconnects_bucket", "bucket"),)

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    segment: Mapped[str] = mapped_column(String(40), primary_key=True)
    bucket: Mapped[dt.datetime] = mapped_column(primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class FleetDisconnect(Base):
    """Disconnects per product, hour and reason (the session's close reason, at most 64
    characters)."""

    __tablename__ = "fleet_disconnects"
    __table_args__ = (Index("ix_fleet_disconnects_bucket", "bucket"),)

    product_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[dt.datetime] = mapped_column(primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
