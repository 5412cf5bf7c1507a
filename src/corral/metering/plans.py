"""Plans and the plan each organization is on.

Plan terms are rows of ``plans`` (seeded by migration 0006: Free, Basic, Enterprise), not
code: an allowance is the plan's base plus ``blocks`` times its per-block amounts, and
Enterprise takes its maximums from the organization's contract (``org_plans``). An
organization without an ``org_plans`` row is on Free; a user's own devices (in no product)
count towards the Free plan of that user's personal organization (Particle's sandbox).

:func:`effective_plan` and :func:`set_org_plan` are the interface the billing domain uses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.db.session import after_commit
from corral.kit import clock
from corral.kit.errors import BadRequest, NotFound
from corral.metering.models import OrgPlan, Plan

FREE = "free"
MB = 1_000_000  # cellular allowances are decimal megabytes (Particle: 45 MB = 45,000,000 B)
ENTERPRISE_TERMS = ("max_devices", "max_data_ops", "max_cellular_mb", "max_storage_mb",
                    "contract_start", "per_kb", "pause_at_limit")

# What migration 0006 seeds. Used only to fill an empty ``plans`` table (a fresh database
# whose seed rows were removed, such as the test suite's truncated one); rows that exist are
# never overwritten, so an operator's edits to the terms stay.
DEFAULT_PLANS: tuple[dict[str, Any], ...] = (
    {"code": "free", "name": "Free", "period": "month", "max_devices": 100,
     "max_data_ops": 100_000, "max_cellular_mb": 100, "max_storage_mb": None,
     "block_devices": 0, "block_data_ops": 0, "block_cellular_mb": 0,
     "block_price_cents": 0, "min_blocks": 0, "pause_at_limit": True, "per_kb": False,
     "self_service": True, "position": 1},
    {"code": "basic", "name": "Basic", "period": "month", "max_devices": 0,
     "max_data_ops": 0, "max_cellular_mb": 0, "max_storage_mb": None,
     "block_devices": 100, "block_data_ops": 720_000, "block_cellular_mb": 540,
     "block_price_cents": 29_900, "min_blocks": 1, "pause_at_limit": False, "per_kb": False,
     "self_service": True, "position": 2},
    {"code": "enterprise", "name": "Enterprise", "period": "year", "max_devices": None,
     "max_data_ops": None, "max_cellular_mb": None, "max_storage_mb": None,
     "block_devices": 0, "block_data_ops": 0, "block_cellular_mb": 0,
     "block_price_cents": 0, "min_blocks": 0, "pause_at_limit": False, "per_kb": False,
     "self_service": False, "position": 3},
)


@dataclasses.dataclass(frozen=True, slots=True)
class EffectivePlan:
    """An organization's allowances right now. ``period`` is how usage is pooled:
    ``month`` (calendar months, UTC) or ``year`` (contract years from ``contract_start``'s
    month). ``max_data_ops`` is counted per operation, or per started 1024 bytes with
    ``per_kb``."""

    plan_code: str
    period: str
    max_devices: int
    max_data_ops: int
    max_cellular_mb: int
    max_storage_mb: int | None
    blocks: int
    pause_at_limit: bool
    per_kb: bool
    block_price_cents: int
    contract_start: dt.date | None = None

    @property
    def max_cellular_bytes(self) -> int:
        return self.max_cellular_mb * MB

    def period_bounds(self, at: dt.datetime | dt.date) -> tuple[dt.date, dt.date]:
        """The allowance period containing ``at``: ``[start, end)`` as first days of months."""
        day = at.astimezone(dt.UTC).date() if isinstance(at, dt.datetime) else at
        if self.period != "year":
            return month_start(day), add_months(month_start(day), 1)
        anchor = month_start(self.contract_start or dt.date(day.year, 1, 1))
        months = (day.year - anchor.year) * 12 + day.month - anchor.month
        start = add_months(anchor, (months // 12) * 12)
        return start, add_months(start, 12)


def month_start(day: dt.date) -> dt.date:
    return dt.date(day.year, day.month, 1)


def add_months(day: dt.date, n: int) -> dt.date:
    index = day.year * 12 + day.month - 1 + n
    return dt.date(index // 12, index % 12 + 1, 1)


def months_between(start: dt.date, end: dt.date) -> list[dt.date]:
    """First days of the months in ``[start, end)``."""
    out, day = [], month_start(start)
    while day < end:
        out.append(day)
        day = add_months(day, 1)
    return out


async def ensure_seeded(db: AsyncSession) -> int:
    """Insert the default plans that are missing (never changes existing rows). Returns how
    many were added. No commit."""
    have = set((await db.execute(select(Plan.code))).scalars())
    missing = [p for p in DEFAULT_PLANS if p["code"] not in have]
    for p in missing:
        db.add(Plan(**p))
    if missing:
        await db.flush()
    return len(missing)


async def list_plans(db: AsyncSession) -> list[Plan]:
    return list((await db.execute(select(Plan).order_by(Plan.position, Plan.code))).scalars())


async def get_plan(db: AsyncSession, code: str) -> Plan:
    plan = await db.get(Plan, code)
    if plan is None:
        raise NotFound(f"There is no plan {code!r}", code="unknown_plan")
    return plan


def combine(plan: Plan, row: OrgPlan | None) -> EffectivePlan:
    """The allowances of ``plan`` for an organization whose plan row is ``row``."""
    blocks = row.blocks if row is not None else 0

    def amount(base: int | None, per_block: int, contracted: int | None) -> int:
        if contracted is not None:
            return contracted
        return (base or 0) + blocks * per_block

    def flag(own: bool | None, default: bool) -> bool:
        return default if own is None else own

    return EffectivePlan(
        plan_code=plan.code, period=plan.period,
        max_devices=amount(plan.max_devices, plan.block_devices,
                           row.max_devices if row else None),
        max_data_ops=amount(plan.max_data_ops, plan.block_data_ops,
                            row.max_data_ops if row else None),
        max_cellular_mb=amount(plan.max_cellular_mb, plan.block_cellular_mb,
                               row.max_cellular_mb if row else None),
        max_storage_mb=(row.max_storage_mb if row and row.max_storage_mb is not None
                        else plan.max_storage_mb),
        blocks=blocks,
        pause_at_limit=flag(row.pause_at_limit if row else None, plan.pause_at_limit),
        per_kb=flag(row.per_kb if row else None, plan.per_kb),
        block_price_cents=plan.block_price_cents,
        contract_start=row.contract_start if row else None,
    )


async def effective_plan(db: AsyncSession, org_id: int) -> EffectivePlan:
    """The plan ``org_id`` is on and its allowances (Free without an ``org_plans`` row)."""
    row = await db.get(OrgPlan, org_id)
    plan = await db.get(Plan, row.plan_code if row is not None else FREE)
    if plan is None:
        raise NotFound("The plan terms are missing (run the migrations)", code="unknown_plan")
    return combine(plan, row)


async def effective_plans(db: AsyncSession, org_ids: set[int] | None = None
                          ) -> dict[int, EffectivePlan]:
    """:func:`effective_plan` for many organizations at once: every organization with an
    ``org_plans`` row (restricted to ``org_ids`` when given); callers default the others
    to :func:`free_plan`."""
    plans = {p.code: p for p in await list_plans(db)}
    q = select(OrgPlan)
    if org_ids is not None:
        if not org_ids:
            return {}
        q = q.where(OrgPlan.org_id.in_(org_ids))
    out = {}
    for row in (await db.execute(q)).scalars():
        plan = plans.get(row.plan_code)
        if plan is not None:
            out[row.org_id] = combine(plan, row)
    return out


async def free_plan(db: AsyncSession) -> EffectivePlan:
    plan = await db.get(Plan, FREE)
    if plan is None:
        raise NotFound("The plan terms are missing (run the migrations)", code="unknown_plan")
    return combine(plan, None)


async def set_org_plan(db: AsyncSession, org_id: int, plan_code: str, *, blocks: int = 0,
                       **enterprise_terms: Any) -> None:
    """Put ``org_id`` on ``plan_code`` with ``blocks`` (Basic) or contracted terms
    (Enterprise: ``max_devices``, ``max_data_ops``, ``max_cellular_mb``, ``max_storage_mb``,
    ``contract_start``; any plan: ``per_kb``, ``pause_at_limit``). In the caller's
    transaction (no commit); once it commits, the usage gate recomputes at once, so an
    upgrade that adds blocks resumes paused devices without waiting for the next refresh."""
    plan = await get_plan(db, plan_code)
    unknown = set(enterprise_terms) - set(ENTERPRISE_TERMS)
    if unknown:
        raise BadRequest(f"Unknown plan terms: {', '.join(sorted(unknown))}",
                         code="invalid_plan")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise BadRequest("blocks must be a whole number >= 0", code="invalid_plan")
    if blocks < plan.min_blocks:
        raise BadRequest(f"The {plan.name} plan needs at least {plan.min_blocks} block(s)",
                         code="invalid_plan")
    if plan.block_devices == 0 and plan.block_data_ops == 0 and blocks:
        raise BadRequest(f"The {plan.name} plan has no blocks", code="invalid_plan")
    for key in ("max_devices", "max_data_ops", "max_cellular_mb", "max_storage_mb"):
        value = enterprise_terms.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise BadRequest(f"{key} must be a whole number >= 0", code="invalid_plan")
    contract_start = enterprise_terms.get("contract_start")
    if contract_start is not None and not isinstance(contract_start, dt.date):
        raise BadRequest("contract_start must be a date", code="invalid_plan")
    if plan.period == "year" and plan.max_data_ops is None:
        missing = [k for k in ("max_devices", "max_data_ops", "max_cellular_mb")
                   if enterprise_terms.get(k) is None]
        if missing:
            raise BadRequest(f"The {plan.name} plan needs contracted {', '.join(missing)}",
                             code="invalid_plan")
    row = await db.get(OrgPlan, org_id)
    if row is None:
        row = OrgPlan(org_id=org_id, plan_code=plan.code)
        db.add(row)
    row.plan_code = plan.code
    row.blocks = blocks
    for key in ENTERPRISE_TERMS:
        setattr(row, key, enterprise_terms.get(key))
    if plan.period == "year" and row.contract_start is None:
        row.contract_start = clock.now().date()
    row.updated_at = clock.now()
    await db.flush()
    wake = db.info.get("metering_wake")
    if wake is not None:
        after_commit(db, wake)


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"code": plan.code, "name": plan.name, "period": plan.period,
            "max_devices": plan.max_devices, "max_data_operations": plan.max_data_ops,
            "max_cellular_mb": plan.max_cellular_mb, "max_storage_mb": plan.max_storage_mb,
            "block": {"devices": plan.block_devices, "data_operations": plan.block_data_ops,
                      "cellular_mb": plan.block_cellular_mb,
                      "price_cents": plan.block_price_cents},
            "min_blocks": plan.min_blocks, "pause_at_limit": plan.pause_at_limit,
            "per_kb": plan.per_kb, "self_service": plan.self_service}


def effective_json(p: EffectivePlan) -> dict[str, Any]:
    return {"code": p.plan_code, "period": p.period, "blocks": p.blocks,
            "max_devices": p.max_devices, "max_data_operations": p.max_data_ops,
            "max_cellular_mb": p.max_cellular_mb, "max_storage_mb": p.max_storage_mb,
            "pause_at_limit": p.pause_at_limit, "per_kb": p.per_kb,
            "block_price_cents": p.block_price_cents,
            "contract_start": p.contract_start.isoformat() if p.contract_start else None}


__all__ = ["DEFAULT_PLANS", "EffectivePlan", "add_months", "effective_plan", "effective_plans",
           "ensure_seeded", "free_plan", "month_start", "set_org_plan"]
