"""Phased rollouts: start, grow, pause, resume, abort; progress; the automatic pause.

A rollout belongs to one released firmware and limits which of the devices the release
targets are admitted (see :mod:`corral.firmware.resolver` for the sticky hash). Growing a
rollout only adds devices; shrinking is refused (pause or abort instead). When more than
``failure_threshold`` of its finished updates failed, after at least
``failure_min_attempts`` finished, it pauses itself and says why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.subject import Subject
from corral.firmware.models import DeviceUpdate, ProductFirmware
from corral.firmware.resolver import (
    BUCKETS,
    Gate,
    device_facts,
    finish_count_gates,
    load_releases,
    resolve,
)
from corral.firmware.service import get_firmware
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.kit.ids import path_id
from corral.products.models import Product
from corral.rollouts.models import LIVE_STATES, Rollout
from corral.rollouts.schemas import RolloutShares, RolloutStart

DEFAULT_MIN_ATTEMPTS = 10


def _shares(req: RolloutShares, *, required: bool) -> tuple[int | None, int | None]:
    """``(percent_bp, count)``: exactly one of ``percent`` and ``count``."""
    has_pct, has_count = req.percent is not None, req.count is not None
    if has_pct and has_count:
        raise BadRequest("Send percent or count, not both", code="invalid_request")
    if not has_pct and not has_count:
        if required:
            raise BadRequest("A rollout needs percent (0-100) or count (devices)",
                             code="invalid_request")
        return None, None
    if req.percent is not None:
        return round(req.percent * 100), None
    return None, req.count


def _threshold(req: RolloutShares, current: int | None) -> int | None:
    if not req.sent("failure_threshold_percent"):
        return current
    pct = req.failure_threshold_percent
    return None if pct is None else round(pct * 100)


def trial_gate(fw: ProductFirmware, req: RolloutShares, *,
               fallback_default: int | None = None,
               fallback_groups: dict[int, int] | None = None) -> tuple[Gate, int | None]:
    """The gate rollout ``req`` would put on ``fw`` (for dry runs), and its count."""
    percent_bp, count = _shares(req, required=True)
    return Gate(rollout_id=0, firmware_id=fw.id, version=fw.version, state="active",
                percent_bp=percent_bp, fallback_default=fallback_default,
                fallback_groups=dict(fallback_groups or {})), count


def rollout_json(r: Rollout) -> dict[str, Any]:
    return {"id": r.id, "product_id": r.product_id, "version": r.version,
            "firmware_id": r.firmware_id,
            "percent": r.percent_bp / 100 if r.percent_bp is not None else None,
            "count": r.count, "state": r.state, "state_reason": r.state_reason,
            "failure_threshold_percent": (r.failure_threshold_bp / 100
                                          if r.failure_threshold_bp is not None else None),
            "failure_min_attempts": r.failure_min_attempts, "created_by": r.created_by,
            "created_at": clock.iso(r.created_at), "updated_at": clock.iso(r.updated_at),
            "finished_at": clock.iso(r.finished_at)}


async def live_rollout(db: AsyncSession, firmware_id: int) -> Rollout | None:
    return (await db.execute(select(Rollout).where(
        Rollout.firmware_id == firmware_id, Rollout.state.in_(LIVE_STATES)))).scalar_one_or_none()


async def start_rollout(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                        fw: ProductFirmware, req: RolloutShares,
                        fallback_default: int | None = None,
                        fallback_groups: dict[int, int] | None = None) -> Rollout:
    """A new rollout of ``fw`` (which must have no live one). The fallbacks are what the
    release replaced; devices the rollout does not admit keep them."""
    percent_bp, count = _shares(req, required=True)
    min_attempts = req.failure_min_attempts or DEFAULT_MIN_ATTEMPTS
    if await live_rollout(db, fw.id) is not None:
        raise Conflict(f"Version {fw.version} already has a live rollout; change it instead",
                       code="rollout_exists")
    now = clock.now()
    r = Rollout(product_id=product.id, firmware_id=fw.id, version=fw.version,
                percent_bp=percent_bp, count=count, state="active",
                failure_threshold_bp=_threshold(req, None),
                failure_min_attempts=min_attempts or DEFAULT_MIN_ATTEMPTS,
                fallback_default=fallback_default,
                fallback_groups={str(g): v for g, v in (fallback_groups or {}).items()},
                created_by=actor.username or actor.client, created_at=now, updated_at=now)
    db.add(r)
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="rollout.started", org_id=product.org_id,
                 product_id=product.id, target_type="rollout", target_id=r.id,
                 details={"version": fw.version,
                          **req.model_dump(exclude_unset=True, exclude={"version"})})
    return r


async def create(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                 req: RolloutStart) -> Rollout:
    """``POST /rollouts``: ``version`` (released) plus the rollout fields."""
    fw = await get_firmware(db, product, req.version)
    if fw.released_at is None:
        raise BadRequest(f"Version {fw.version} is not released; release it (with a "
                         "rollout) first", code="firmware_not_released")
    return await start_rollout(db, actor=actor, ip=ip, product=product, fw=fw, req=req)


async def get_rollout(db: AsyncSession, product: Product, rollout_id: str) -> Rollout:
    rid = path_id(rollout_id)
    r = await db.get(Rollout, rid) if rid is not None else None
    if r is None or r.product_id != product.id:
        raise NotFound("Rollout not found", code="rollout_not_found")
    return r


async def list_rollouts(db: AsyncSession, product: Product) -> list[Rollout]:
    return list((await db.execute(select(Rollout).where(Rollout.product_id == product.id)
                                  .order_by(Rollout.id.desc()))).scalars())


async def change(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                 rollout: Rollout, req: RolloutShares) -> Rollout:
    """Grow the share (``percent`` or ``count``, never down) or change the thresholds."""
    if not req.model_fields_set:
        raise BadRequest("Nothing to change: send percent, count, failure_threshold_percent "
                         "or failure_min_attempts", code="invalid_request")
    if rollout.state not in LIVE_STATES:
        raise Conflict(f"The rollout is {rollout.state}", code="rollout_finished")
    percent_bp, count = _shares(req, required=False)
    if percent_bp is not None:
        if rollout.count is not None:
            raise BadRequest("This rollout counts devices; send count", code="invalid_request")
        if percent_bp < (rollout.percent_bp or 0):
            raise BadRequest("A rollout only grows: pause or abort it instead of lowering "
                             "its share", code="rollout_shrink")
        rollout.percent_bp = percent_bp
    if count is not None:
        if rollout.count is None:
            raise BadRequest("This rollout is a percentage; send percent",
                             code="invalid_request")
        if count < rollout.count:
            raise BadRequest("A rollout only grows: pause or abort it instead of lowering "
                             "its count", code="rollout_shrink")
        rollout.count = count
    rollout.failure_threshold_bp = _threshold(req, rollout.failure_threshold_bp)
    if req.sent("failure_min_attempts"):
        if req.failure_min_attempts is None:
            raise BadRequest("failure_min_attempts is required", code="invalid_request")
        rollout.failure_min_attempts = req.failure_min_attempts
    rollout.updated_at = clock.now()
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="rollout.changed", org_id=product.org_id,
                 product_id=product.id, target_type="rollout", target_id=rollout.id,
                 details=req.model_dump(exclude_unset=True))
    return rollout


TRANSITIONS = {"pause": ("active", "paused"), "resume": ("paused", "active"),
               "abort": (None, "aborted")}


async def act(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
              rollout: Rollout, action: str, reason: str | None = None) -> Rollout:
    """``pause`` (active -> paused), ``resume`` (paused -> active), ``abort`` (a live one
    -> aborted: no device that does not run the version yet gets it)."""
    source, target = TRANSITIONS[action]
    if rollout.state not in LIVE_STATES or (source is not None and rollout.state != source):
        raise Conflict(f"The rollout is {rollout.state}; it cannot {action}",
                       code="invalid_transition")
    now = clock.now()
    rollout.state = target
    who = actor.username or actor.client
    rollout.state_reason = (reason or {"pause": f"Paused by {who}",
                                       "abort": f"Aborted by {who}"}.get(action))
    rollout.updated_at = now
    if target == "aborted":
        rollout.finished_at = now
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action=f"rollout.{target}", org_id=product.org_id,
                 product_id=product.id, target_type="rollout", target_id=rollout.id)
    return rollout


async def update_counts(db: AsyncSession, rollout_id: int) -> dict[str, int]:
    return {s: int(n) for s, n in (await db.execute(
        select(DeviceUpdate.state, func.count()).where(DeviceUpdate.rollout_id == rollout_id)
        .group_by(DeviceUpdate.state))).all()}


async def check_failure_threshold(db: AsyncSession, rollout_id: int) -> bool:
    """Pause an active rollout whose failure share went over its threshold (with enough
    finished updates to judge). True when it paused it now."""
    r = await db.get(Rollout, rollout_id)
    if r is None or r.state != "active" or r.failure_threshold_bp is None:
        return False
    counts = await update_counts(db, r.id)
    failed, applied = counts.get("failed", 0), counts.get("applied", 0)
    finished = failed + applied
    if finished < r.failure_min_attempts or failed * BUCKETS <= r.failure_threshold_bp * finished:
        return False
    now = clock.now()
    r.state = "paused"
    r.state_reason = (f"Paused automatically: {failed} of {finished} finished updates failed "
                      f"({failed * 100 / finished:.1f} % > "
                      f"{r.failure_threshold_bp / 100:g} % threshold)")
    r.updated_at = now
    await db.flush()
    product = await db.get(Product, r.product_id)
    audit.record(db, actor=None, ip=None, action="rollout.paused", product_id=r.product_id,
                 org_id=product.org_id if product is not None else None,
                 target_type="rollout", target_id=r.id, details={"reason": r.state_reason},
                 actor_label="corral")
    return True


async def progress(db: AsyncSession, product: Product, r: Rollout) -> dict[str, Any]:
    """Targeted (admitted now), eligible (would be at 100 %), updated, failed and pending
    devices, the pending ones by the version they run, and the rollout's updates by state."""
    pt = await load_releases(db, product.id)
    devices = await device_facts(db, product.id)
    releases = finish_count_gates(pt, devices) if pt.counts else pt.releases
    targets = {d.id: resolve(d, releases) for d in devices}
    admitted = [d for d in devices if targets[d.id].rollout_id == r.id]
    # eligible: what the same release would target with the gate wide open
    gate = releases.gates.get(r.version)
    eligible = len(admitted)
    if gate is not None and r.state != "aborted":
        opened = replace(releases, gates={**releases.gates, r.version: replace(
            gate, state="active", percent_bp=BUCKETS, admitted_ids=None)})
        eligible = sum(1 for d in devices if resolve(d, opened).rollout_id == r.id)
    latest: dict[str, str] = {}
    ids = [d.id for d in admitted]
    for i in range(0, len(ids), 5000):
        for did, state in (await db.execute(
                select(DeviceUpdate.device_id, DeviceUpdate.state).where(
                    DeviceUpdate.firmware_id == r.firmware_id,
                    DeviceUpdate.device_id.in_(ids[i:i + 5000]))
                .order_by(DeviceUpdate.id))).all():
            latest[did] = state
    updated = [d for d in admitted if d.firmware_version == r.version]
    failed = [d for d in admitted if d.firmware_version != r.version
              and latest.get(d.id) == "failed"]
    pending = [d for d in admitted if d.firmware_version != r.version
               and latest.get(d.id) != "failed"]
    by_version: Counter[int | None] = Counter(d.firmware_version for d in pending)
    counts = await update_counts(db, r.id)
    finished = counts.get("applied", 0) + counts.get("failed", 0)
    return {
        "targeted": len(admitted), "eligible": eligible, "updated": len(updated),
        "failed": len(failed), "pending": len(pending),
        "pending_by_version": [{"version": v, "total": n} for v, n in sorted(
            by_version.items(), key=lambda kv: (kv[0] is None, -(kv[0] or 0)))],
        "updates": {s: counts.get(s, 0) for s in
                    ("pending", "sending", "deferred", "applied", "failed", "cancelled")},
        "failure_rate": round(counts.get("failed", 0) / finished, 4) if finished else None,
    }
