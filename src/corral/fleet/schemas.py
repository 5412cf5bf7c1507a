"""Request and answer models of device vitals (``/v1/diagnostics``), fleet metrics, fleet
health, fleet locations and alert rules. Answers list the fields corral always sends;
Particle's objects may carry more (``Answer`` allows extra fields)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from corral.kit.body import Flag, Int, Number, RequestModel
from corral.kit.responses import Answer, OkAnswer
from corral.locations.schemas import Point

# --- query strings ------------------------------------------------------------------------

DATE = Field(None, max_length=64, description="ISO 8601 (`Z` or an offset; none: UTC)")


class DiagnosticsRange(RequestModel):
    """A vitals history range (at most 30 days; default the last 30 days)."""

    start_date: str | None = DATE
    end_date: str | None = DATE


class DiagnosticsSummaryQuery(DiagnosticsRange):
    ERROR_CODES = {"limit": "bad_request"}

    limit: Int | None = Field(None, ge=1, le=1000, description="Buckets (30)")


class OrgHealthQuery(RequestModel):
    """The range of an organization's fleet health (default the last day) and its filters."""

    ERROR_CODES = {"product_fw": "bad_request", "device_group": "bad_request",
                   "device_os_version": "bad_request", "start_date": "bad_request",
                   "end_date": "bad_request"}

    start_date: str | None = DATE
    end_date: str | None = DATE
    product_fw: Int | None = Field(None, ge=0, le=65_535,
                                   description="Only devices running this firmware version")
    device_group: str | None = Field(
        None, max_length=64,
        description="Only devices in this group of the product (by name; 404 if none)")
    device_os_version: str | None = Field(
        None, max_length=32,
        description="Only devices running this Device OS version (not with device_group)")


class FleetMetricsQuery(OrgHealthQuery):
    """The range of a metrics series or of fleet health (default the last day)."""

    ERROR_CODES = {**OrgHealthQuery.ERROR_CODES, "bucket_size": "bad_request"}

    bucket_size: Int | None = Field(None, ge=60, le=31 * 86_400,
                                    description="Seconds per bucket (900)")


# --- alert rules ---------------------------------------------------------------------------

Kind = Literal["online_below", "error_rate_above", "silent_longer"]
WINDOW = Field(None, ge=60, le=86_400, description="Seconds (error rate; 900)")
NAME = Field(None, max_length=64, description="1 to 64 characters (default: the kind)")


def threshold_problem(kind: str, t: float) -> str | None:
    """Why ``t`` is no threshold for ``kind`` (None: it is one)."""
    if kind == "error_rate_above" and not 0 <= t <= 100:
        return "threshold is a percentage from 0 to 100"
    if kind == "silent_longer" and not 60 <= t <= 90 * 86_400:
        return "threshold is 60 to 7776000 seconds"
    if kind == "online_below" and not 0 < t <= 10_000_000:
        return "threshold is a number of devices above 0"
    return None


class AlertRuleCreate(RequestModel):
    """`online_below` (devices), `error_rate_above` (percent of calls over `window_s`),
    `silent_longer` (seconds since a device was last heard). The threshold's range depends
    on the kind (`corral.fleet.alerts` checks it, naming the field)."""

    kind: Kind
    threshold: Number
    window_s: Int | None = WINDOW
    name: str | None = NAME


class AlertRuleChange(RequestModel):
    """Any of these (the kind of a rule stays; sending another one is refused)."""

    kind: Kind | None = None
    name: str | None = NAME
    threshold: Number | None = None
    window_s: Int | None = WINDOW
    enabled: Flag | None = None


# --- answers -------------------------------------------------------------------------------

class Diagnostics(Answer):
    updated_at: str
    deviceID: str
    payload: dict[str, Any]


class LastDiagnostics(Answer):
    diagnostics: Diagnostics


class DiagnosticsHistory(Answer):
    diagnostics: list[Diagnostics]


class DiagnosticMeaning(Answer):
    title: str
    type: str
    describes: str
    priority: int
    units: str | None = None
    ranges: dict[str, float] | None = None
    values: list[str] | None = None
    messages: dict[str, Any]


class DiagnosticsMetadata(Answer):
    diagnostics_metadata: dict[str, DiagnosticMeaning]


class SummarySample(Answer):
    time: str
    count: int
    signal: float | None = None
    rssi: float | None = None
    round_trip: float | None = None
    memory_used: float | None = None
    battery_charge: float | None = None
    disconnects: float | None = None


class DiagnosticsSummary(Answer):
    deviceID: str
    memoryAvailable: float | None
    bucketSize: int
    startDate: str
    endDate: str
    hasBattery: bool
    samples: list[SummarySample]


class OnlinePoint(Answer):
    time: str
    count: int


class EventsPoint(Answer):
    time: str
    received: int


class CallsPoint(Answer):
    """Zero counts are left out (Particle's shape)."""

    time: str
    success: int | None = None
    failure: int | None = None
    offline: int | None = None


class DataOperationsSeries(Answer):
    data_operations: list[OnlinePoint]


class OnlineSeries(Answer):
    online: list[OnlinePoint]


class EventsSeries(Answer):
    events: list[EventsPoint]


class FunctionsSeries(Answer):
    functions: list[CallsPoint]


class VariablesSeries(Answer):
    variables: list[CallsPoint]


class HealthDevices(Answer):
    total: int
    online: int
    online_max: int
    # a product of 20,000 devices or more: the once-a-minute sample's time (total, online
    # and the firmware distribution are its counts); null: counted at this request
    as_of: str | None = None


class DisconnectReason(Answer):
    reason: str
    count: int


class HealthConnections(Answer):
    connects: int
    disconnects: int
    reasons: list[DisconnectReason]


class CallOutcomes(Answer):
    """``failure``: the device failed; ``timeout``: it did not answer in time."""

    success: int
    failure: int
    timeout: int
    offline: int


class FirmwareShare(Answer):
    version: int | None
    devices: int
    online: int


class ReleaseOutcomes(Answer):
    version: int
    applied: int
    failed: int
    open: int
    success_rate: float | None


class Spread(Answer):
    median: float
    worst: float


class VitalsAggregates(Answer):
    reports: int
    # true: a dynamic group's newest reports (it has no rollups), not every one in the range
    sampled: bool
    rssi: Spread | None
    round_trip: Spread | None
    memory_used: Spread | None


class TroubledDevice(Answer):
    device_id: str
    disconnects: int | None = None
    errors: int | None = None


class Troubled(Answer):
    disconnects: list[TroubledDevice]
    errors: list[TroubledDevice]
    # true: made from each day's 100 most troubled devices and not provably the exact
    # answer (the counts shown are at least the device's; one may be missing)
    approximate: bool = False


class EventsReceived(Answer):
    received: int


class HealthFilter(Answer):
    """The filters that applied; ``unfiltered``: the parts that stay product-wide."""

    product_fw: int | None
    device_group_id: int | None
    device_os_version: str | None
    unfiltered: list[str]


class FleetHealth(Answer):
    product_id: int
    start_date: str
    end_date: str
    filter: HealthFilter
    devices: HealthDevices
    connections: HealthConnections
    events: EventsReceived
    data_operations: int
    functions: CallOutcomes
    variables: CallOutcomes
    error_rate: float | None
    timeout_rate: float | None
    offline_rate: float | None
    firmware: list[FirmwareShare]
    updates: list[ReleaseOutcomes]
    vitals: VitalsAggregates
    top: Troubled


class OrgProductHealth(Answer):
    product_id: int
    slug: str
    name: str
    devices: int
    online: int
    as_of: str | None = None  # as HealthDevices.as_of
    online_max: int
    connects: int
    disconnects: int
    events: int
    data_operations: int
    calls: int
    failed_calls: int
    timed_out_calls: int
    error_rate: float | None
    timeout_rate: float | None


class OrgHealthTotal(Answer):
    error_rate: float | None
    timeout_rate: float | None


class OrgHealthFilter(Answer):
    product_fw: int | None
    device_group: str | None
    device_os_version: str | None


class OrgFleetHealth(Answer):
    org_id: int
    start_date: str
    end_date: str
    filter: OrgHealthFilter
    products: list[OrgProductHealth]
    total: OrgHealthTotal


class LocatedDevice(Point):
    device_name: str | None
    online: bool
    last_heard: str | None


class LocationsMeta(Answer):
    total: int


class FleetLocations(Answer):
    locations: list[LocatedDevice]
    meta: LocationsMeta


class AlertRule(Answer):
    id: int
    name: str
    kind: Kind
    threshold: float
    window_s: int
    enabled: bool
    active: bool
    active_since: str | None
    last_value: float | None
    devices: list[str] | None
    created_at: str


class AlertRules(Answer):
    alerts: list[AlertRule]


class AlertRuleAnswer(OkAnswer):
    alert: AlertRule
