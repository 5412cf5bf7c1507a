"""Fleet alerts: a product's threshold rules, checked once a minute (a singleton across
nodes), raised and cleared by themselves.

Kinds (``threshold`` means):

* ``online_below``: fewer than ``threshold`` devices online;
* ``error_rate_above``: more than ``threshold`` percent of the function calls and variable
  reads of the last ``window_s`` seconds failed or timed out (from the rollups; at least
  one call);
* ``silent_longer``: a device last heard more than ``threshold`` seconds ago (devices
  never heard do not count).

When a rule's condition starts to hold, the rule becomes active and corral stores the
product event ``corral/alert/raised`` (JSON: ``rule``, ``name``, ``kind``, ``threshold``,
``value`` and for silent devices ``devices``), which streams and integrations see like any
product event, and e-mails the product's team and the organization's Administrators and
Owners. When it stops holding, ``corral/alert/cleared`` and an e-mail say so. The event is
stored after the rule's transaction commits. Names under ``corral/`` are corral's own
(never ``spark/`` or ``particle/``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.auth.policy import Role
from corral.devices.models import Device
from corral.events.writer import EventWriter, NewEvent
from corral.fleet.models import FleetAlertRule, FleetMinute
from corral.fleet.schemas import AlertRuleChange, AlertRuleCreate, threshold_problem
from corral.kit import clock
from corral.kit.errors import BadRequest, NotFound
from corral.kit.ids import path_id
from corral.mail.service import enqueue
from corral.orgs import service as orgs
from corral.products.models import Product

log = logging.getLogger("corral.fleet")

KINDS = ("online_below", "error_rate_above", "silent_longer")
RAISED = "corral/alert/raised"
CLEARED = "corral/alert/cleared"
MAX_RULES = 50  # per product
SILENT_LIST = 20  # device IDs named in a silent-device alert


@dataclasses.dataclass(frozen=True)
class Change:
    rule_id: int
    product_id: int
    org_id: int
    raised: bool
    body: dict[str, Any]


def rule_json(r: FleetAlertRule) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "kind": r.kind, "threshold": r.threshold,
            "window_s": r.window_s, "enabled": r.enabled, "active": r.active,
            "active_since": clock.iso(clock.aware(r.active_since)),
            "last_value": r.last_value, "devices": (r.subject or {}).get("devices"),
            "created_at": clock.iso(clock.aware(r.created_at))}


def _rule_problem(kind: str, threshold: float, name: str) -> BadRequest | None:
    problem = threshold_problem(kind, threshold)
    if problem:
        return BadRequest(problem, code="invalid_request", field="threshold",
                          errors=[{"loc": ["threshold"], "msg": problem}])
    if not 1 <= len(name) <= 64:
        msg = "name is 1 to 64 characters"
        return BadRequest(msg, code="invalid_request", field="name",
                          errors=[{"loc": ["name"], "msg": msg}])
    return None


async def get_rule(db: AsyncSession, product_id: int, alert_id: Any) -> FleetAlertRule:
    """A rule of the product (404 otherwise; ids follow ``kit.ids``)."""
    n = path_id(alert_id)  # a huge id is not found, not a 500
    rule = await db.get(FleetAlertRule, n) if n is not None else None
    if rule is None or rule.product_id != product_id:
        raise NotFound("Alert rule not found")
    return rule


async def create_rule(db: AsyncSession, product_id: int, req: AlertRuleCreate
                      ) -> FleetAlertRule:
    """A new enabled rule (at most :data:`MAX_RULES` per product)."""
    name = (req.name or req.kind.replace("_", " ")).strip()
    bad = _rule_problem(req.kind, req.threshold, name)
    if bad:
        raise bad
    count = (await db.execute(select(func.count()).select_from(FleetAlertRule).where(
        FleetAlertRule.product_id == product_id))).scalar_one()
    if count >= MAX_RULES:
        raise BadRequest(f"A product has at most {MAX_RULES} alert rules",
                         code="limit_reached")
    rule = FleetAlertRule(product_id=product_id, name=name, kind=req.kind,
                          threshold=float(req.threshold), window_s=req.window_s or 900,
                          enabled=True, active=False, created_at=clock.now())
    db.add(rule)
    await db.flush()
    return rule


def update_rule(rule: FleetAlertRule, req: AlertRuleChange) -> FleetAlertRule:
    """Change what ``req`` sent (validated against the rule's kind)."""
    if req.kind is not None and req.kind != rule.kind:
        msg = "The kind of a rule cannot change; create another rule"
        raise BadRequest(msg, code="invalid_request", field="kind",
                         errors=[{"loc": ["kind"], "msg": msg}])
    threshold = float(req.threshold) if req.threshold is not None else rule.threshold
    name = req.name.strip() if req.name is not None else rule.name
    bad = _rule_problem(rule.kind, threshold, name)
    if bad:
        raise bad
    rule.threshold, rule.name = threshold, name
    if req.window_s is not None:
        rule.window_s = req.window_s
    if req.enabled is not None:
        rule.enabled = req.enabled
    return rule


async def _value(db: AsyncSession, rule: FleetAlertRule, now: dt.datetime
                 ) -> tuple[float, bool, dict[str, Any] | None]:
    """The rule's current value, whether its condition holds, and what it concerns."""
    if rule.kind == "online_below":
        n = (await db.execute(select(func.count()).select_from(Device).where(
            Device.product_id == rule.product_id, Device.online))).scalar_one()
        return float(n), n < rule.threshold, None
    if rule.kind == "error_rate_above":
        m = FleetMinute
        failed = func.sum(m.fn_failure + m.var_failure + m.fn_timeout + m.var_timeout)
        total = func.sum(m.fn_success + m.fn_failure + m.fn_timeout + m.fn_offline
                         + m.var_success + m.var_failure + m.var_timeout + m.var_offline)
        f, t = (await db.execute(select(failed, total).where(
            m.product_id == rule.product_id,
            m.bucket >= now - dt.timedelta(seconds=rule.window_s)))).one()
        rate = 100.0 * int(f or 0) / int(t) if t else 0.0
        return round(rate, 2), bool(t) and rate > rule.threshold, None
    cutoff = now - dt.timedelta(seconds=rule.threshold)
    q = select(Device.id).where(Device.product_id == rule.product_id,
                                Device.last_heard.is_not(None), Device.last_heard < cutoff)
    n = (await db.execute(select(func.count()).select_from(q.subquery()))).scalar_one()
    ids = list((await db.execute(q.order_by(Device.last_heard).limit(SILENT_LIST))).scalars())
    return float(n), n > 0, {"devices": ids}


async def evaluate(db: AsyncSession, *, public_url: str = "") -> list[Change]:
    """Check every enabled rule; raise or clear those whose condition changed (with their
    e-mails, in the caller's transaction). The caller commits, then stores the changes'
    events (:func:`store_events`)."""
    now = clock.now()
    rules = list((await db.execute(select(FleetAlertRule).where(
        FleetAlertRule.enabled.is_(True)).order_by(FleetAlertRule.id))).scalars())
    changes: list[Change] = []
    products: dict[int, Product | None] = {}
    for rule in rules:
        value, holds, subject = await _value(db, rule, now)
        rule.last_value = value
        if holds == rule.active:
            if holds and subject is not None:
                rule.subject = subject
            continue
        if rule.product_id not in products:
            products[rule.product_id] = await db.get(Product, rule.product_id)
        product = products[rule.product_id]
        if product is None:
            continue
        rule.active, rule.subject = holds, subject
        rule.active_since = now if holds else None
        body = {"rule": rule.id, "name": rule.name, "kind": rule.kind,
                "threshold": rule.threshold, "value": value, "at": clock.iso(now)}
        if subject:
            body.update(subject)
        changes.append(Change(rule.id, product.id, product.org_id, holds, body))
        await _mail(db, product, rule, holds, value, subject, public_url)
    return changes


async def _mail(db: AsyncSession, product: Product, rule: FleetAlertRule, raised: bool,
                value: float, subject: dict[str, Any] | None, public_url: str) -> None:
    state = "raised" if raised else "cleared"
    title = f"[{product.name}] alert {state}: {rule.name}"
    what = {"online_below": f"devices online: {value:g} (alert below {rule.threshold:g})",
            "error_rate_above": f"failed calls: {value:g} % over {rule.window_s} s "
                                f"(alert above {rule.threshold:g} %)",
            "silent_longer": f"devices silent longer than {rule.threshold:g} s: {value:g}"}
    lines = [f"The alert \"{rule.name}\" of product {product.name} was {state}.",
             what[rule.kind]]
    if subject and subject.get("devices"):
        lines.append("Devices: " + ", ".join(subject["devices"]))
    if public_url:
        lines.append(f"{public_url.rstrip('/')}/console/products/{product.slug}/fleet")
    seen: set[str] = set()
    for scope in (None, product.id):
        for user, member in await orgs.list_team(db, org_id=product.org_id, product_id=scope):
            if user.kind != "user" or user.username in seen:
                continue
            if scope is None and Role.parse(member.role) < Role.ADMINISTRATOR:
                continue
            seen.add(user.username)
            enqueue(db, to=user.username, subject=title, body="\n".join(lines),
                    kind=f"fleet.alert.{state}")


async def store_events(writer: EventWriter, changes: list[Change]) -> None:
    """The committed changes' events, in the product's stream."""
    for c in changes:
        await writer.write(NewEvent(
            name=RAISED if c.raised else CLEARED, data=json.dumps(c.body), source="cloud",
            product_id=c.product_id, org_id=c.org_id, private=True))


async def run_pass(sessionmaker: async_sessionmaker[AsyncSession], writer: EventWriter, *,
                   public_url: str = "") -> list[Change]:
    """One evaluation (the singleton's tick)."""
    async with sessionmaker() as db:
        changes = await evaluate(db, public_url=public_url)
        await db.commit()
    if changes:
        log.info("fleet alerts: %s", [(c.rule_id, "raised" if c.raised else "cleared")
                                      for c in changes])
        await store_events(writer, changes)
    return changes
