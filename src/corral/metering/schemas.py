"""Request and answer models of usage, plans, usage notifications and SIMs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field

from corral.kit.body import Flag, Int, RequestModel, StrList
from corral.kit.responses import Answer, Paging

MAX_SIMS_PER_PAGE = 100


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class UsageQuery(RequestModel):
    ERROR_CODES = {"period": "invalid_period"}

    period: str | None = Field(None, max_length=7, description="A month, YYYY-MM (default: "
                               "this month)")


class UsageExport(UsageQuery):
    ERROR_CODES = {"period": "invalid_period", "format": "invalid_format"}

    format: Annotated[Literal["json", "csv"], BeforeValidator(_lower)] = "json"
    product: str | None = Field(None, max_length=100,
                                description="Only this product (id or slug)")


class NotificationsQuery(RequestModel):
    unread: Flag | None = Field(None, description="true: only unread notifications")


class SimAction(RequestModel):
    ERROR_CODES = {"action": "invalid_action"}

    action: Literal["activate", "deactivate", "reactivate"]


class Plan(Answer):
    code: str
    name: str
    period: str
    self_service: bool


class PlansAnswer(Answer):
    ok: bool
    plans: list[Plan]


class UsageAnswer(Answer):
    ok: bool
    org: dict[str, Any]
    period: dict[str, Any]
    plan: dict[str, Any]
    usage: dict[str, Any]
    allowance: dict[str, Any]
    percent: dict[str, Any]
    products: list[dict[str, Any]]
    paused: bool


class UsageRowsAnswer(Answer):
    ok: bool
    period: str


class Notification(Answer):
    id: int
    kind: str
    title: str
    state: Literal["read", "unread"]
    created_at: str | None


class NotificationsAnswer(Answer):
    ok: bool
    notifications: list[Notification]


class NotificationAnswer(Answer):
    ok: bool
    notification: Notification


class UpdatedAnswer(Answer):
    ok: bool
    updated: int


class SimsQuery(RequestModel):
    ERROR_CODES = {"page": "invalid_page", "per_page": "invalid_page"}

    iccid: str | None = Field(None, max_length=32, description="ICCIDs starting with this")
    device_id: str | None = Field(None, max_length=24, description="Its last device's ID",
                                  validation_alias=AliasChoices("device_id", "deviceId"))
    device_name: str | None = Field(None, max_length=64,
                                    description="Its last device's name",
                                    validation_alias=AliasChoices("device_name", "deviceName"))
    page: Int = Field(1, ge=1, le=1_000_000)
    per_page: Int = Field(25, ge=1, le=MAX_SIMS_PER_PAGE,
                          validation_alias=AliasChoices("per_page", "perPage"))


class SimImport(RequestModel):
    """``sims``: ICCIDs (a list, or one string separated by commas or spaces), or a
    multipart ``file`` with one ICCID per line."""

    sims: list[str] | str | None = Field(None, description="The ICCIDs to import")
    file: str | None = Field(None, description="A text file of ICCIDs, one per line",
                             json_schema_extra={"format": "binary"})


class Sim(Answer):
    iccid: str
    status: str
    activations_count: int
    last_device_id: str | None
    last_device_name: str | None
    product_id: int | None
    deactivated_at: str | None


class SimAnswer(Answer):
    ok: bool
    sim: Sim


class SimsAnswer(Answer):
    ok: bool
    sims: list[Sim]
    meta: Paging


class SimImportAnswer(Answer):
    ok: bool
    imported: list[str]
    existing: list[str]
    taken: list[str]
    invalid: list[str]


class DayUsage(Answer):
    date: str
    mbs_used: float
    mbs_used_cumulative: float


class SimDataUsage(Answer):
    iccid: str
    total_mbs_used: float
    usage_by_day: list[DayUsage]


class FleetDataUsage(Answer):
    total_mbs_used: float
    total_active_sim_cards: int
    usage_by_day: list[DayUsage]


# --- Particle's billing surface (service agreements, usage reports, notifications) ---------

class UsageReportCreate(RequestModel):
    ERROR_CODES = {"report_type": "invalid_report_type", "date_period_start": "invalid_date",
                   "date_period_end": "invalid_date", "devices": "invalid_device_id",
                   "products": "invalid_product"}

    report_type: Annotated[Literal["devices", "products"], BeforeValidator(_lower)]
    date_period_start: str = Field(max_length=40, description="First day, YYYY-MM-DD")
    date_period_end: str = Field(max_length=40, description="Last day, YYYY-MM-DD")
    devices: StrList | None = Field(None, description="Only these device IDs")
    products: StrList | None = Field(None, description="Only these products (ids or slugs)")


class Resource(Answer):
    id: int
    type: str
    attributes: dict[str, Any]


class ResourcesAnswer(Answer):
    data: list[Resource]


class ResourceAnswer(Answer):
    data: Resource
