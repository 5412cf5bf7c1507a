"""Request and answer models of the audit logs."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from corral.kit.body import Int, RequestModel
from corral.kit.responses import Answer


class AuditQuery(RequestModel):
    page: Int = Field(1, ge=1, le=100_000)
    per_page: Int = Field(50, ge=1, le=500)
    action: str | None = Field(None, max_length=64,
                               description="An action prefix, e.g. team. or product.")


class AuditEntry(Answer):
    id: int
    at: str | None
    actor: str | None
    action: str
    org_id: int | None
    product_id: int | None
    target_type: str | None
    target_id: str | int | None
    details: Any


class AuditMeta(Answer):
    page: int
    per_page: int
    has_more: bool


class AuditAnswer(Answer):
    ok: bool
    entries: list[AuditEntry]
    meta: AuditMeta
