"""Record and read audit entries. ``record`` joins the caller's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit.models import AuditEntry
from corral.auth.subject import Subject
from corral.kit import clock


def record(
    db: AsyncSession,
    *,
    actor: Subject | None,
    ip: str | None,
    action: str,
    org_id: int | None = None,
    product_id: int | None = None,
    target_type: str | None = None,
    target_id: str | int | None = None,
    details: dict[str, Any] | None = None,
    actor_label: str | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        at=clock.now(),
        actor_user_id=actor.user_id if actor else None,
        actor=actor_label or (actor.label if actor else "system"),
        ip=ip,
        action=action,
        org_id=org_id,
        product_id=product_id,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        details=details or {},
    )
    db.add(entry)
    return entry


async def list_entries(
    db: AsyncSession, *, org_id: int | None = None, product_id: int | None = None,
    page: int = 1, per_page: int = 50, action_prefix: str | None = None,
) -> tuple[list[AuditEntry], int]:
    q = select(AuditEntry)
    if org_id is not None:
        q = q.where(AuditEntry.org_id == org_id)
    if product_id is not None:
        q = q.where(AuditEntry.product_id == product_id)
    if action_prefix:
        q = q.where(AuditEntry.action.startswith(action_prefix))
    q = q.order_by(AuditEntry.id.desc()).offset((page - 1) * per_page).limit(per_page + 1)
    rows = list((await db.execute(q)).scalars())
    return rows[:per_page], len(rows) > per_page


def to_json(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id, "at": clock.iso(e.at), "actor": e.actor, "actor_user_id": e.actor_user_id,
        "ip": e.ip, "action": e.action, "org_id": e.org_id, "product_id": e.product_id,
        "target_type": e.target_type, "target_id": e.target_id, "details": e.details,
    }
