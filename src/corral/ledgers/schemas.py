"""Request and answer models of ledgers (Particle's Ledger API shapes)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, ConfigDict, Field

from corral.kit.body import Int, RequestModel
from corral.kit.responses import Answer

OWNER, PRODUCT, DEVICE = "Owner", "Product", "Device"
SCOPES = (OWNER, PRODUCT, DEVICE)  # coarse to fine
CLOUD_ONLY, CLOUD_TO_DEVICE, DEVICE_TO_CLOUD = "CloudOnly", "CloudToDevice", "DeviceToCloud"
DIRECTIONS = (CLOUD_ONLY, CLOUD_TO_DEVICE, DEVICE_TO_CLOUD)
# particle-api-js 12 types the direction as Upstream | Downstream
DIRECTION_ALIASES = {"upstream": DEVICE_TO_CLOUD, "downstream": CLOUD_TO_DEVICE}
REPLACE, MERGE = "Replace", "Merge"

MAX_DESCRIPTION = 1000
SYNCED_LIMIT = 16 * 1024  # a document that syncs to devices
CLOUD_ONLY_LIMIT = 1024 * 1024  # a cloud-only document
MAX_SCHEMA_BYTES = 64 * 1024


def _one_of(choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> Any:
    by_key = {c.lower(): c for c in choices} | (aliases or {})

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            found = by_key.get(value.strip().lower().replace("_", "").replace("-", ""))
            if found is None:
                raise ValueError(f"must be one of {', '.join(choices)}")
            return found
        return value

    return BeforeValidator(parse)


Scope = Annotated[str, _one_of(SCOPES)]
Direction = Annotated[str, _one_of(DIRECTIONS, DIRECTION_ALIASES)]
SetMode = Annotated[str, _one_of((REPLACE, MERGE))]
SchemaField = Field(None, validation_alias=AliasChoices("schema", "json_schema"),
                    description="A JSON Schema the ledger's documents must match "
                    "(null: none)")


class LedgerCreate(RequestModel):
    NEST = "ledger"
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-32 lowercase letters, digits or '-'")
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    scope: Scope = Field(description="Owner, Product or Device")
    direction: Direction = Field(
        CLOUD_ONLY, description="CloudOnly, CloudToDevice or DeviceToCloud (Upstream = "
        "DeviceToCloud, Downstream = CloudToDevice)")
    json_schema: dict[str, Any] | None = SchemaField


class LedgerChange(RequestModel):
    """Name and scope are fixed once created; the rest can change."""

    NEST = "ledger"
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    direction: Direction | None = None
    json_schema: dict[str, Any] | None = SchemaField


class LedgerListQuery(RequestModel):
    scope: Scope | None = None
    archived: bool | None = None
    page: Annotated[Int, Field(ge=1, le=100_000)] = 1
    per_page: Annotated[Int, Field(ge=1, le=100)] = Field(
        25, validation_alias=AliasChoices("per_page", "perPage"))


class InstancePage(RequestModel):
    page: Annotated[Int, Field(ge=1, le=1_000_000)] = 1
    per_page: Annotated[Int, Field(ge=1, le=100)] = Field(
        25, validation_alias=AliasChoices("per_page", "perPage"))


class InstanceSet(RequestModel):
    """``{"instance": {"data": {...}}}`` (or ``{"data": {...}}``)."""

    NEST = "instance"
    BLANK_IS_NULL = False

    data: dict[str, Any] = Field(description="The JSON document (an object)")


class SetModeQuery(RequestModel):
    set_mode: SetMode = Field(
        REPLACE, validation_alias=AliasChoices("set_mode", "setMode"),
        description="Replace (default) or Merge (see docs/ledgers.md for the merge rule)")


class VersionsQuery(RequestModel):
    replaced_before: dt.datetime | None = Field(
        None, validation_alias=AliasChoices("replaced_before", "replacedBefore"))
    replaced_after: dt.datetime | None = Field(
        None, validation_alias=AliasChoices("replaced_after", "replacedAfter"))
    limit: Annotated[Int, Field(ge=1, le=100)] = 50


class Rollback(RequestModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[Int, Field(ge=1)] = Field(description="The version to restore")


# --- answers ---------------------------------------------------------------------------------

class LedgerObject(Answer):
    name: str
    description: str
    scope: str
    direction: str
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    created_at: str
    updated_at: str
    archived_at: str | None
    archived: bool


class LedgerAnswer(Answer):
    ledger: LedgerObject


class LedgersAnswer(Answer):
    ledger_definitions: list[LedgerObject]
    meta: dict[str, Any]


class ScopeObject(Answer):
    type: str
    value: str
    name: str | None = None


class InstanceObject(Answer):
    name: str
    scope: ScopeObject
    data: dict[str, Any] | None
    size_bytes: int
    version: int
    created_at: str
    updated_at: str
    updated_by: str | None


class InstanceAnswer(Answer):
    instance: InstanceObject


class InstancesAnswer(Answer):
    instances: list[InstanceObject]
    meta: dict[str, Any]


class VersionObject(InstanceObject):
    replaced_at: str | None
    op: str
    restored_from: int | None


class VersionAnswer(Answer):
    instance: VersionObject


class VersionsAnswer(Answer):
    versions: list[VersionObject]
    meta: dict[str, Any]
