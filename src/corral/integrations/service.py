"""Integration rules: configuration, tenancy, the JSON the API shows, the delivery log,
redelivery, metrics, and the events a webhook's response becomes.

Services never commit: the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets as _secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Select, and_, delete, func, literal_column, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.models import Membership, User
from corral.auth.subject import Subject
from corral.db.session import after_commit
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.events.models import Event
from corral.events.outbox import may_trigger
from corral.integrations import schemas, signing, templates
from corral.integrations.guard import Blocked, Policy
from corral.integrations.models import Attempt, Delivery, Integration
from corral.integrations.secrets import masked_settings, restore
from corral.kit import clock
from corral.kit.errors import BadRequest, NotFound
from corral.mail import service as mail
from corral.orgs.models import Organization

CHUNK = 512  # bytes of a hook-response event's data (Particle)
MAX_CHUNKS = 100  # a response larger than this many chunks is cut
NAME_MAX = 64  # event names
LOG_SHOWN = 10  # the delivery-log entries GET .../integrations/:id includes (Particle: 10)


@dataclasses.dataclass(frozen=True, slots=True)
class Scope:
    """Whose integrations: a user's sandbox, a product's, or an organization's."""

    owner_user_id: int | None = None
    product_id: int | None = None
    org_id: int | None = None

    def where(self) -> list[Any]:
        return [Integration.owner_user_id == self.owner_user_id if self.owner_user_id
                else Integration.owner_user_id.is_(None),
                Integration.product_id == self.product_id if self.product_id
                else Integration.product_id.is_(None),
                Integration.org_id == self.org_id if self.org_id
                else Integration.org_id.is_(None)]

    def path(self) -> str:
        if self.product_id is not None:
            return f"/v1/products/{self.product_id}/integrations"
        if self.org_id is not None:
            return f"/v1/orgs/{self.org_id}/integrations"
        return "/v1/integrations"


def scope_of(row: Integration) -> Scope:
    return Scope(owner_user_id=row.owner_user_id, product_id=row.product_id, org_id=row.org_id)


# --- configuration --------------------------------------------------------------------------

def _check_target(config: schemas.Config, policy: Policy) -> None:
    host = urlsplit(config.url).hostname or ""
    try:
        policy.check_literal(host)
    except Blocked as exc:
        raise BadRequest(f"url: {exc}", code="invalid_request") from None


async def create(db: AsyncSession, scope: Scope, body: dict[str, Any], *, actor: Subject,
                 ip: str | None, policy: Policy, default_type: str | None = None
                 ) -> Integration:
    config = schemas.parse_config(body, default_type=default_type)
    _check_target(config, policy)
    now = clock.now()
    row = Integration(
        id=_secrets.token_hex(12), owner_user_id=scope.owner_user_id,
        product_id=scope.product_id, org_id=scope.org_id,
        integration_type=config.integration_type, name=config.name or _default_name(config),
        event=config.event, device_id=config.device_id, settings=config.settings(),
        signing_secret=signing.new_secret(), disabled=config.disabled,
        created_by=actor.user_id, consecutive_failures=0, created_at=now, updated_at=now)
    db.add(row)
    _audit(db, row, actor, ip, "integration.created")
    changed(db)
    return row


def _default_name(config: schemas.Config) -> str:
    """Particle's default: "{event} for {domain}"."""
    return f"{config.event} for {urlsplit(config.url).hostname}"[:200]


async def update_config(db: AsyncSession, row: Integration, body: dict[str, Any], *,
                        actor: Subject, ip: str | None, policy: Policy) -> Integration:
    """Particle's PUT: the configuration is replaced, not merged. ``event``, ``url``,
    ``name`` and the type default to the current ones when left out, and a secret sent back
    masked (as the API showed it) keeps its stored value."""
    merged = {"integration_type": row.integration_type, "event": row.event,
              "url": row.settings.get("url"), **{k: v for k, v in body.items()
                                                 if v is not None}}
    if "name" not in body:
        merged["name"] = row.name
    config = schemas.parse_config(merged)
    if config.integration_type != row.integration_type:
        raise BadRequest("integration_type cannot change; create a new integration",
                         code="invalid_request")
    _check_target(config, policy)
    settings = restore(config.settings(), row.settings)
    row.name, row.event, row.device_id = config.name, config.event, config.device_id
    row.settings = settings
    row.updated_at = clock.now()
    await set_disabled(db, row, config.disabled)
    _audit(db, row, actor, ip, "integration.updated")
    changed(db)
    return row


async def set_disabled(db: AsyncSession, row: Integration, disabled: bool, *,
                       reason: str | None = None) -> None:
    """Disable (what is still pending is skipped: nothing is sent while disabled; the user
    can redeliver it later) or enable (a fresh start: the failure count is cleared)."""
    now = clock.now()
    if disabled and not row.disabled:
        row.disabled, row.disabled_at, row.disabled_reason = True, now, reason
        await db.execute(update(Delivery).where(
            Delivery.integration_id == row.id, Delivery.status == "pending").values(
            status="skipped", finished_at=now,
            last_error=(reason or "the integration was disabled")[:500]))
    elif not disabled and row.disabled:
        row.disabled, row.disabled_at, row.disabled_reason = False, None, None
        row.consecutive_failures, row.failing_since = 0, None
    row.updated_at = now


async def set_enabled(db: AsyncSession, row: Integration, enabled: bool, *, actor: Subject,
                      ip: str | None) -> None:
    """Enable (also after corral disabled it) or disable, audited."""
    await set_disabled(db, row, not enabled)
    _audit(db, row, actor, ip, "integration.enabled" if enabled else "integration.disabled")
    changed(db)


async def remove(db: AsyncSession, row: Integration, *, actor: Subject,
                 ip: str | None) -> None:
    _audit(db, row, actor, ip, "integration.deleted")
    await db.execute(delete(Attempt).where(Attempt.integration_id == row.id))
    await db.execute(delete(Delivery).where(Delivery.integration_id == row.id))
    await db.delete(row)
    changed(db)


def rotate_secret(db: AsyncSession, row: Integration, *, actor: Subject,
                  ip: str | None) -> str:
    row.signing_secret = signing.new_secret()
    row.updated_at = clock.now()
    _audit(db, row, actor, ip, "integration.secret_rotated")
    return row.signing_secret


def _audit(db: AsyncSession, row: Integration, actor: Subject | None, ip: str | None,
           action: str, details: dict[str, Any] | None = None) -> None:
    if row.product_id is None and row.org_id is None:
        return  # the audit log is per organization and product; a sandbox has none
    audit.record(db, actor=actor, ip=ip, action=action, org_id=row.org_id,
                 product_id=row.product_id, target_type="integration", target_id=row.id,
                 details={"event": row.event, "type": row.integration_type, **(details or {})})


def changed(db: AsyncSession) -> None:
    """Tell this node's delivery worker after commit (others notice on their next pass)."""
    wake = db.info.get("integrations_changed")
    if wake is not None:
        after_commit(db, wake)


# --- reading --------------------------------------------------------------------------------

async def get(db: AsyncSession, scope: Scope, integration_id: str) -> Integration:
    row = (await db.execute(select(Integration).where(
        Integration.id == integration_id, *scope.where()))).scalar_one_or_none()
    if row is None:
        raise NotFound("Integration not found", code="not_found")
    return row


async def list_for(db: AsyncSession, scope: Scope, *, kind: str | None = None
                   ) -> list[Integration]:
    q = select(Integration).where(*scope.where())
    if kind:
        q = q.where(Integration.integration_type == kind)
    return list((await db.execute(q.order_by(Integration.created_at, Integration.id))).scalars())


def status_of(row: Integration, throttle_after: int) -> str:
    if row.disabled:
        return "disabled"
    return "throttled" if row.consecutive_failures >= throttle_after else "active"


def to_json(row: Integration, *, public_url: str, throttle_after: int) -> dict[str, Any]:
    """An integration as the API shows it: Particle's fields, secrets masked."""
    out: dict[str, Any] = {
        "id": row.id, "integration_type": row.integration_type, "event": row.event,
        "name": row.name, "created_at": clock.iso(row.created_at),
        "updated_at": clock.iso(row.updated_at), "disabled": row.disabled,
    }
    if row.device_id:
        out["deviceID"] = row.device_id
    out.update(masked_settings(row.settings))
    if row.product_id is not None:
        out["product_id"] = row.product_id
    if row.org_id is not None:
        out["org_id"] = row.org_id
    out.update({
        "status": status_of(row, throttle_after), "disabled_reason": row.disabled_reason,
        "consecutive_failures": row.consecutive_failures,
        "last_success_at": clock.iso(row.last_success_at),
        "last_failure_at": clock.iso(row.last_failure_at),
        "signing_secret": signing.mask(row.signing_secret),
        "hookUrl": f"{public_url}{scope_of(row).path()}/{row.id}",
    })
    return out


def created_json(row: Integration, *, public_url: str) -> dict[str, Any]:
    """Particle's create answer (``ok``, ``id``, ``url``, ``event``, ``name``,
    ``created_at``, ``hookUrl``) plus the signing secret, shown in full this once."""
    url = f"{public_url}{scope_of(row).path()}/{row.id}"
    return {"ok": True, "id": row.id, "url": masked_settings(row.settings).get("url"),
            "event": row.event, "name": row.name, "created_at": clock.iso(row.created_at),
            "integration_type": row.integration_type, "hookUrl": url, "integrationUrl": url,
            "signing_secret": row.signing_secret}


def list_json(row: Integration) -> dict[str, Any]:
    """A list item (Particle: id, event, created_at, integration_type, url, requestType)."""
    out: dict[str, Any] = {"id": row.id, "event": row.event, "name": row.name,
                           "created_at": clock.iso(row.created_at),
                           "integration_type": row.integration_type,
                           "url": masked_settings(row.settings).get("url"),
                           "disabled": row.disabled}
    if row.integration_type == schemas.WEBHOOK:
        out["requestType"] = row.settings.get("requestType", "POST")
    if row.device_id:
        out["deviceID"] = row.device_id
    return out


async def attempts(db: AsyncSession, integration_id: str, *, limit: int = 50,
                   before: int | None = None) -> list[Attempt]:
    q = select(Attempt).where(Attempt.integration_id == integration_id)
    if before is not None:
        q = q.where(Attempt.id < before)
    q = q.order_by(Attempt.id.desc()).limit(max(1, min(limit, 500)))
    return list((await db.execute(q)).scalars())


def attempt_json(a: Attempt) -> dict[str, Any]:
    return {"id": a.id, "at": clock.iso(a.at), "delivery_id": a.delivery_id,
            "event_id": a.event_id, "outcome": a.outcome, "status_code": a.status_code,
            "latency_ms": a.latency_ms, "request": a.request, "response": a.response,
            "error": a.error}


async def deliveries(db: AsyncSession, integration_id: str, *, status: str | None = None,
                     limit: int = 50, before: int | None = None) -> list[Delivery]:
    q = select(Delivery).where(Delivery.integration_id == integration_id)
    if status:
        q = q.where(Delivery.status == status)
    if before is not None:
        q = q.where(Delivery.id < before)
    q = q.order_by(Delivery.id.desc()).limit(max(1, min(limit, 500)))
    return list((await db.execute(q)).scalars())


def delivery_json(d: Delivery, integration_id: str) -> dict[str, Any]:
    return {"id": d.id, "event_id": d.event_id, "device_id": d.device_id,
            "status": d.status, "attempts": d.attempts,
            "idempotency_id": signing.delivery_id(integration_id, d.event_id),
            "created_at": clock.iso(d.created_at), "finished_at": clock.iso(d.finished_at),
            "next_attempt_at": clock.iso(d.next_attempt_at) if d.status == "pending" else None,
            "last_status_code": d.last_status_code, "last_error": d.last_error}


# --- redelivery -----------------------------------------------------------------------------

def event_in_scope(row: Integration) -> Any:
    """The SQL condition "this event belongs to the integration's scope"."""
    if row.product_id is not None:
        cond = Event.product_id == row.product_id
    elif row.org_id is not None:
        cond = Event.org_id == row.org_id
    else:
        cond = Event.owner_user_id == row.owner_user_id
    if row.device_id:
        cond = and_(cond, Event.device_id == row.device_id)
    return cond


async def redeliver_event(db: AsyncSession, row: Integration, event_id: int) -> Delivery:
    """Send one stored event again (or for the first time: an event from before the
    integration existed, or that it did not match then). Same idempotency id as before."""
    now = clock.now()
    found = (await db.execute(select(Delivery).where(
        Delivery.integration_id == row.id, Delivery.event_id == event_id))).scalar_one_or_none()
    if found is not None:
        found.status, found.attempts, found.next_attempt_at = "pending", 0, now
        found.finished_at = None
        changed(db)
        return found
    event = (await db.execute(select(Event.id, Event.product_id, Event.device_id, Event.name)
                              .where(Event.id == event_id, event_in_scope(row)))).one_or_none()
    if event is None:
        raise NotFound("Event not found", code="not_found")
    if not may_trigger(event.name):
        raise BadRequest("System and hook-* events are not delivered to integrations",
                         code="invalid_request")
    d = Delivery(integration_id=row.id, event_id=event.id, product_id=event.product_id,
                 device_id=event.device_id, status="pending", attempts=0,
                 next_attempt_at=now, created_at=now)
    db.add(d)
    await db.flush()
    changed(db)
    return d


async def redeliver_range(db: AsyncSession, row: Integration, *, since: dt.datetime | None,
                          until: dt.datetime | None,
                          statuses: Sequence[str] = ("failed", "skipped")) -> int:
    """Queue again every delivery in ``statuses`` created in [since, until); how many."""
    cond = [Delivery.integration_id == row.id, Delivery.status.in_(list(statuses))]
    if since is not None:
        cond.append(Delivery.created_at >= since)
    if until is not None:
        cond.append(Delivery.created_at < until)
    result = await db.execute(update(Delivery).where(*cond).values(
        status="pending", attempts=0, next_attempt_at=clock.now(), finished_at=None)
        .execution_options(synchronize_session=False))
    changed(db)
    return int(getattr(result, "rowcount", 0) or 0)


# --- metrics (GET /v1/products/:product/metrics/integration) -------------------------------

def _bucket_expr(db: AsyncSession, size: int) -> Any:
    """Seconds since the epoch of the start of a delivery's bucket, in SQL."""
    if db.bind is not None and db.bind.dialect.name == "postgresql":
        return literal_column(
            f"(floor(extract(epoch from integration_deliveries.finished_at) / {size}) * {size})")
    return literal_column(
        f"(CAST(strftime('%s', integration_deliveries.finished_at) AS INTEGER) / {size} * {size})")


async def metrics(db: AsyncSession, product_id: int | None, *, start: dt.datetime,
                  end: dt.datetime,
                  bucket_size: int, product_fw: int | None = None,
                  device_os_version: str | None = None, device_group: str | None = None,
                  integration_id: str | None = None) -> list[dict[str, Any]]:
    """Particle's integration traffic metrics: per bucket, ``success`` (2xx), ``failure``
    (given up on: attempts used up or refused) and ``sleep`` (skipped: not attempted
    because the integration was disabled), keys with 0 left out. Counted from the
    deliveries of the product's events, by when they finished. ``product_id`` None: one
    sandbox or organization integration's (``integration_id`` required)."""
    if product_id is None and integration_id is None:
        raise ValueError("metrics of no product need an integration_id")
    bucket = _bucket_expr(db, bucket_size).label("bucket")
    q: Select[Any] = (select(bucket, Delivery.status, func.count())
                      .where(Delivery.status.in_(["success", "failed", "skipped"]),
                             Delivery.finished_at >= start, Delivery.finished_at <= end)
                      .group_by(bucket, Delivery.status))
    if product_id is not None:
        q = q.where(Delivery.product_id == product_id)
    if integration_id is not None:  # one integration's (the console's chart)
        q = q.where(Delivery.integration_id == integration_id)
    if product_fw is not None or device_os_version is not None:
        q = q.join(Device, Device.id == Delivery.device_id)
        if product_fw is not None:
            q = q.where(Device.firmware_version == product_fw)
        if device_os_version is not None:
            q = q.where(Device.system_firmware_version == device_os_version)
    if device_group is not None:
        q = q.where(Delivery.device_id.in_(
            select(DeviceGroupMember.device_id).join(
                DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
            .where(DeviceGroup.product_id == product_id, DeviceGroup.name == device_group)))
    names = {"success": "success", "failed": "failure", "skipped": "sleep"}
    counts: dict[int, dict[str, int]] = {}
    for b, status, n in (await db.execute(q)).all():
        counts.setdefault(int(b), {})[names[status]] = int(n)
    first = int(start.timestamp()) // bucket_size * bucket_size
    last = int(end.timestamp()) // bucket_size * bucket_size
    out = []
    for b in range(first, last + 1, bucket_size):
        when = dt.datetime.fromtimestamp(b, dt.UTC)
        out.append({"time": clock.iso(when), **counts.get(b, {})})
    return out


# --- the worker's side ----------------------------------------------------------------------

def matches(row: Any, ev: Any) -> bool:
    """Does event ``ev`` (a row with name, device_id, product_id, org_id, owner_user_id)
    trigger integration ``row``? Its scope, its device filter, its name prefix."""
    if row.product_id is not None:
        if ev.product_id != row.product_id:
            return False
    elif row.org_id is not None:
        if ev.org_id != row.org_id:
            return False
    elif ev.owner_user_id != row.owner_user_id or ev.owner_user_id is None:
        return False
    if row.device_id and ev.device_id != row.device_id:
        return False
    return bool(ev.name.startswith(row.event)) and may_trigger(ev.name)


def _topic(template: str | None, default: str, ctx: dict[str, Any]) -> str:
    try:
        return templates.render(template or default, ctx).strip()
    except templates.TemplateError:
        return templates.render(default, ctx)


def response_topics(row: Any, facts: templates.EventFacts) -> tuple[str, str]:
    """(response topic, error topic) of a webhook for an event. Particle's defaults:
    ``<device>/hook-response/<event>`` for product webhooks and ``hook-response/<event>``
    otherwise; ``hook-error/<event>`` for errors."""
    ctx = facts.context()
    settings = row.settings
    product = row.product_id is not None or row.org_id is not None
    default = ("{{{PARTICLE_DEVICE_ID}}}/hook-response/{{{PARTICLE_EVENT_NAME}}}" if product
               else "hook-response/{{{PARTICLE_EVENT_NAME}}}")
    return (_topic(settings.get("responseTopic"), default, ctx),
            _topic(settings.get("errorResponseTopic"), "hook-error/{{{PARTICLE_EVENT_NAME}}}",
                   ctx))


def chunks(topic: str, text: str) -> list[tuple[str, str]]:
    """``(topic/n, part)`` events of at most 512 bytes of UTF-8 each (split between
    characters), at most :data:`MAX_CHUNKS`. A name longer than 64 characters loses the
    end of its topic, never its index."""
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for ch in text:
        n = len(ch.encode("utf-8"))
        if size + n > CHUNK:
            parts.append("".join(current))
            current, size = [], 0
            if len(parts) >= MAX_CHUNKS:
                break
        current.append(ch)
        size += n
    if current and len(parts) < MAX_CHUNKS:
        parts.append("".join(current))
    out = []
    for i, part in enumerate(parts):
        suffix = f"/{i}"
        out.append((topic[: NAME_MAX - len(suffix)] + suffix, part))
    return out


def response_text(row: Any, facts: templates.EventFacts, body: str) -> str:
    template = row.settings.get("responseTemplate")
    if not template:
        return body
    try:
        return templates.render(template, templates.response_context(body, facts))
    except templates.TemplateError as exc:
        return f"responseTemplate error: {exc}"


async def disable_for_failures(db: AsyncSession, row: Integration, reason: str, *,
                               public_url: str) -> None:
    """A target that kept failing: disable the integration, tell its people, audit it."""
    await set_disabled(db, row, True, reason=reason)
    _audit(db, row, None, None, "integration.disabled", {"reason": reason})
    for to in await _people_to_tell(db, row):
        mail.enqueue(db, to=to, kind="integration.disabled",
                     subject=f"corral disabled the integration {row.name or row.id}",
                     body=(f"The {row.integration_type} integration \"{row.name}\" "
                           f"(id {row.id}, event prefix \"{row.event}\") was disabled:\n\n"
                           f"  {reason}\n\nEvents it would have sent are kept as skipped "
                           "deliveries. Fix the target, then enable the integration again "
                           "(PUT with disabled=false, or in the console) and redeliver what "
                           f"was skipped (POST {public_url}{scope_of(row).path()}/{row.id}"
                           "/redeliver).\n"))


async def _people_to_tell(db: AsyncSession, row: Integration) -> list[str]:
    ids: set[int] = set()
    if row.created_by is not None:
        ids.add(row.created_by)
    if row.owner_user_id is not None:
        ids.add(row.owner_user_id)
    org_id = row.org_id
    if org_id is None and row.product_id is not None:
        from corral.products.models import Product

        org_id = (await db.execute(select(Product.org_id).where(
            Product.id == row.product_id))).scalar_one_or_none()
    if org_id is not None:
        owners = await db.execute(select(Membership.user_id).where(
            Membership.org_id == org_id, Membership.product_id.is_(None),
            Membership.role == "Owner"))
        ids.update(owners.scalars())
        owner = (await db.execute(select(Organization.owner_user_id).where(
            Organization.id == org_id))).scalar_one_or_none()
        if owner is not None:
            ids.add(owner)
    if not ids:
        return []
    names = await db.execute(select(User.username).where(
        User.id.in_(ids), User.kind == "user", or_(User.username.contains("@"))))
    return sorted(set(names.scalars()))
