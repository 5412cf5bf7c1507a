"""Request and answer models of cohorts."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, StringConstraints

from corral.kit.body import Int, RequestModel
from corral.kit.responses import Answer

MAX_DESCRIPTION = 500
MAX_MOVE = 10_000

DeviceIds = Annotated[list[Annotated[str, StringConstraints(max_length=64)]],
                      BeforeValidator(lambda v: _comma(v)), Field(max_length=MAX_MOVE)]


def _comma(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _null_text(value: Any) -> Any:
    return None if value == "null" else value


Version = Annotated[Annotated[Int, Field(ge=1, le=65_535)] | None, BeforeValidator(_null_text)]


class CohortCreate(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 lowercase letters, digits, '-' or '_'")
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    firmware_version: Version = Field(
        None, description="Release this uploaded firmware version to the cohort")


class CohortChange(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    firmware_version: Version = Field(
        None, description="The cohort's release (`null` ends it: its devices fall back to "
        "group and product releases)")


class CohortDevices(RequestModel):
    """``add`` moves devices into the cohort (out of any other); ``remove`` takes devices out
    of it (devices not in it are ignored). All must be in the product, else nothing moves."""

    model_config = ConfigDict(extra="forbid")

    add: DeviceIds | None = None
    remove: DeviceIds | None = None


class CohortObject(Answer):
    id: int
    name: str
    description: str | None
    firmware_version: int | None
    device_count: int
    created_at: str
    updated_at: str


class CohortAnswer(Answer):
    cohort: CohortObject


class CohortsAnswer(Answer):
    cohorts: list[CohortObject]


class CohortMoved(Answer):
    ok: bool
    added: int
    removed: int
    device_count: int
