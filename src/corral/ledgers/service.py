"""Ledger rules: definitions, instances, versions, the effective document of a device.

A ledger belongs to an organization (the sandbox routes use the caller's personal one). Its
``scope`` says which scope values hold its instances: ``Owner`` (the organization),
``Product`` (a product of it) or ``Device`` (a device in one of its products, or, in a
personal organization, one of its owner's own devices). A finer ledger may also hold
defaults at the coarser levels: a scope value ``product:<id|slug>`` or ``owner`` addresses
them (``owner:<id|slug>`` too). A plain scope value is always at the ledger's own level.

Every write (set, merge, delete, rollback) bumps the instance's ``version`` by one and adds
a :class:`LedgerVersion` row, in the caller's transaction with its audit entry.

Merging (``set_mode=Merge`` and the effective document alike) is :func:`deep_merge`: keys of
the newer object win; where both sides hold an object under a key, the two objects merge the
same way, key by key, at any depth; anything else (arrays, strings, numbers, booleans,
``null``) replaces the older value whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonschema import exceptions as js_exceptions
from jsonschema import validators
from referencing import exceptions as ref_exceptions
from sqlalchemy import func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.subject import Subject
from corral.devices.models import Device
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, CorralError, NotFound, PayloadTooLarge
from corral.kit.ids import path_id
from corral.kit.responses import paging
from corral.ledgers import schemas as S
from corral.ledgers import signals
from corral.ledgers.models import LedgerDefinition, LedgerInstance, LedgerVersion
from corral.orgs.models import Organization
from corral.products.models import Product

Document = dict[str, Any]
Compute = Callable[[Document | None], Document | None]  # current document -> new one
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
MAX_VIOLATIONS = 50


class SchemaViolation(CorralError):
    """The document does not match the ledger's schema (Particle's 422 shape)."""

    status = 422
    code = "invalid_schema"

    def __init__(self, violations: list[dict[str, Any]]) -> None:
        super().__init__("The document does not match the ledger's JSON Schema")
        self.violations = violations

    def body(self) -> dict[str, Any]:
        return {**super().body(), "message": "Invalid Schema",
                "description": self.description, "violations": self.violations}


# --- documents ---------------------------------------------------------------------------

def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: objects merge key by key at any depth, anything else replaces."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        out[key] = (deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict)
                    else value)
    return out


def size_of(data: dict[str, Any]) -> int:
    """Bytes of the document as compact UTF-8 JSON (what the limits count)."""
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def limit_for(direction: str) -> int:
    return S.CLOUD_ONLY_LIMIT if direction == S.CLOUD_ONLY else S.SYNCED_LIMIT


def check_size(data: dict[str, Any], direction: str) -> int:
    size = size_of(data)
    limit = limit_for(direction)
    if size > limit:
        raise PayloadTooLarge(
            f"The document is {size} bytes; a {direction} ledger holds at most {limit}",
            code="ledger_too_large", size_bytes=size, limit_bytes=limit)
    return size


def check_schema(schema: dict[str, Any]) -> None:
    """400 unless ``schema`` is a valid JSON Schema (of the draft it names; 2020-12 else)."""
    if size_of(schema) > S.MAX_SCHEMA_BYTES:
        raise BadRequest(f"schema: at most {S.MAX_SCHEMA_BYTES} bytes", code="invalid_schema")
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except js_exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise BadRequest(f"schema is not a valid JSON Schema: {exc.message}"
                         + (f" (at /{where})" if where else ""),
                         code="invalid_schema") from None


def violations(schema: dict[str, Any], data: dict[str, Any]) -> list[dict[str, Any]]:
    """What in ``data`` breaks ``schema``: ``[{path, message, keyword}]`` (JSON pointers)."""
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        errors = sorted(cls(schema).iter_errors(data), key=lambda e: list(map(str, e.path)))
        return [{"path": "/" + "/".join(str(p) for p in e.path), "message": e.message,
                 "keyword": str(e.validator)} for e in errors[:MAX_VIOLATIONS]]
    except (ref_exceptions.Unresolvable, js_exceptions.SchemaError) as exc:
        raise BadRequest(f"The ledger's schema cannot be applied: {exc}",
                         code="invalid_schema") from None


def check_document(ledger: LedgerDefinition, data: dict[str, Any]) -> int:
    """The document's size after checking it against the ledger's limit and schema."""
    size = check_size(data, ledger.direction)
    if ledger.json_schema is not None:
        found = violations(ledger.json_schema, data)
        if found:
            raise SchemaViolation(found)
    return size


# --- definitions --------------------------------------------------------------------------

def ledger_json(d: LedgerDefinition) -> dict[str, Any]:
    return {"name": d.name, "description": d.description, "scope": d.scope,
            "direction": d.direction, "schema": d.json_schema,
            "created_at": clock.iso(d.created_at), "updated_at": clock.iso(d.updated_at),
            "archived_at": clock.iso(d.archived_at), "archived": d.archived_at is not None,
            "created_by": d.created_by, "updated_by": d.updated_by}


def clean_name(raw: str) -> str:
    name = raw.strip()
    if not 1 <= len(name) <= 32 or not set(name) <= NAME_CHARS:
        raise BadRequest("name: 1-32 lowercase letters, digits or '-'", code="invalid_request")
    return name


async def list_ledgers(db: AsyncSession, org: Organization, q: S.LedgerListQuery
                       ) -> dict[str, Any]:
    where = [LedgerDefinition.org_id == org.id]
    if q.scope is not None:
        where.append(LedgerDefinition.scope == q.scope)
    if q.archived is not None:
        where.append(LedgerDefinition.archived_at.isnot(None) if q.archived
                     else LedgerDefinition.archived_at.is_(None))
    total = int((await db.execute(select(func.count()).select_from(LedgerDefinition)
                                  .where(*where))).scalar() or 0)
    rows = (await db.execute(select(LedgerDefinition).where(*where)
                             .order_by(LedgerDefinition.name)
                             .offset((q.page - 1) * q.per_page).limit(q.per_page))).scalars()
    return {"ledger_definitions": [ledger_json(d) for d in rows],
            "meta": paging(q.page, q.per_page, total)}


async def get_ledger(db: AsyncSession, org: Organization, name: str) -> LedgerDefinition:
    row = (await db.execute(select(LedgerDefinition).where(
        LedgerDefinition.org_id == org.id, LedgerDefinition.name == name.lower())
    )).scalar_one_or_none()
    if row is None:
        raise NotFound(f"Ledger {name!r} not found", code="ledger_not_found")
    return row


async def create_ledger(db: AsyncSession, org: Organization, req: S.LedgerCreate, *,
                        actor: Subject, ip: str) -> LedgerDefinition:
    name = clean_name(req.name)
    if req.json_schema is not None:
        check_schema(req.json_schema)
    if (await db.execute(select(LedgerDefinition.id).where(
            LedgerDefinition.org_id == org.id, LedgerDefinition.name == name))).first():
        raise Conflict(f"A ledger named {name!r} already exists", code="ledger_exists")
    d = LedgerDefinition(org_id=org.id, name=name, description=req.description or "",
                         scope=req.scope, direction=req.direction, json_schema=req.json_schema,
                         created_by=actor.label, updated_by=actor.label)
    db.add(d)
    try:
        await db.flush()
    except IntegrityError as exc:  # a concurrent create took the name
        raise Conflict(f"A ledger named {name!r} already exists", code="ledger_exists") from exc
    audit.record(db, actor=actor, ip=ip, action="ledger.created", org_id=org.id,
                 target_type="ledger", target_id=name,
                 details={"scope": d.scope, "direction": d.direction,
                          "schema": d.json_schema is not None})
    return d


async def update_ledger(db: AsyncSession, org: Organization, name: str, req: S.LedgerChange,
                        *, actor: Subject, ip: str) -> LedgerDefinition:
    """Description, direction and schema. A direction that syncs to devices needs every
    current document within 16 KB; a new schema applies to later writes only."""
    d = await get_ledger(db, org, name)
    if not req.model_fields_set:
        raise BadRequest("Nothing to update: send description, direction or schema",
                         code="invalid_request")
    changed: dict[str, Any] = {}
    if req.sent("description"):
        d.description = req.description or ""
        changed["description"] = True
    if req.sent("direction") and req.direction is not None and req.direction != d.direction:
        limit = limit_for(req.direction)
        too_big = (await db.execute(select(func.count()).select_from(LedgerInstance).where(
            LedgerInstance.ledger_id == d.id, LedgerInstance.size_bytes > limit))).scalar()
        if too_big:
            raise Conflict(f"{too_big} documents of this ledger exceed {limit} bytes, the "
                           f"limit of a {req.direction} ledger", code="ledger_too_large")
        changed["direction"] = {"from": d.direction, "to": req.direction}
        d.direction = req.direction
    if req.sent("json_schema"):
        if req.json_schema is not None:
            check_schema(req.json_schema)
        d.json_schema = req.json_schema
        changed["schema"] = req.json_schema is not None
    d.updated_by = actor.label
    d.updated_at = clock.now()
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="ledger.updated", org_id=org.id,
                 target_type="ledger", target_id=d.name, details=changed)
    return d


async def archive_ledger(db: AsyncSession, org: Organization, name: str, *, actor: Subject,
                         ip: str) -> None:
    """Archive (Particle's DELETE): its documents stay readable, writes are refused."""
    d = await get_ledger(db, org, name)
    if d.archived_at is None:
        d.archived_at = clock.now()
        d.updated_by = actor.label
        await db.flush()
        audit.record(db, actor=actor, ip=ip, action="ledger.archived", org_id=org.id,
                     target_type="ledger", target_id=d.name)


# --- scope values --------------------------------------------------------------------------

@dataclass(frozen=True)
class ScopeRef:
    level: str  # Owner | Product | Device
    key: str  # organization id, product id or device id
    value: str  # as shown: the ledger-level value plain, coarser ones prefixed
    name: str | None
    product_id: int | None = None


def _not_found(raw: str) -> NotFound:
    return NotFound(f"Scope value {raw!r} not found", code="scope_value_not_found")


async def resolve_scope(db: AsyncSession, org: Organization, ledger: LedgerDefinition,
                        raw: str, within: Product | None = None) -> ScopeRef:
    """The instance a scope value names, within ``org`` (404 for anything outside it), and
    with ``within`` only the product's own instance and its devices'."""
    ref = await _resolve(db, org, ledger, raw)
    if within is not None and (ref.level == S.OWNER or ref.product_id != within.id):
        raise _not_found(raw)
    return ref


async def _resolve(db: AsyncSession, org: Organization, ledger: LedgerDefinition,
                   raw: str) -> ScopeRef:
    if raw.lower() == "owner":  # the owner, whatever the ledger's scope
        raw = "owner:"
    level, _, value = raw.partition(":") if ":" in raw else (ledger.scope, "", raw)
    level = {s.lower(): s for s in S.SCOPES}.get(level.lower(), "")
    if level == "":
        raise BadRequest(f"Scope value {raw!r}: prefix with owner:, product: or device:",
                         code="invalid_scope_value")
    if S.SCOPES.index(level) > S.SCOPES.index(ledger.scope):
        raise BadRequest(f"A {ledger.scope} ledger has no {level} instances",
                         code="invalid_scope_value")
    plain = level == ledger.scope
    shown = (lambda v: v if plain else f"{level.lower()}:{v}")  # noqa: E731
    if level == S.OWNER:
        if value not in ("", str(org.id), org.slug):
            raise _not_found(raw)
        return ScopeRef(S.OWNER, str(org.id), shown(str(org.id)), org.name)
    if level == S.PRODUCT:
        row = await product_in(db, org, value)
        if row is None:
            raise _not_found(raw)
        return ScopeRef(S.PRODUCT, str(row.id), shown(str(row.id)), row.name, row.id)
    device = await _device_in(db, org, value.lower())
    if device is None:
        raise _not_found(raw)
    return ScopeRef(S.DEVICE, device.id, shown(device.id), device.name, device.product_id)


async def product_in(db: AsyncSession, org: Organization, raw: str) -> Product | None:
    """``org``'s product with id or slug ``raw``, else None."""
    pid = path_id(raw)
    return (await db.execute(select(Product).where(
        Product.org_id == org.id,
        Product.id == pid if pid is not None else Product.slug == raw.lower())
    )).scalar_one_or_none()


async def _device_in(db: AsyncSession, org: Organization, device_id: str) -> Device | None:
    if len(device_id) != 24 or any(c not in "0123456789abcdef" for c in device_id):
        return None
    device = await db.get(Device, device_id)
    if device is None:
        return None
    if device.product_id is not None:
        owner_org = (await db.execute(select(Product.org_id).where(
            Product.id == device.product_id))).scalar()
        return device if owner_org == org.id else None
    return device if org.personal and device.owner_user_id == org.owner_user_id else None


# --- instances ----------------------------------------------------------------------------

def _scope_value(ledger: LedgerDefinition, inst: LedgerInstance) -> str:
    return inst.scope_key if inst.level == ledger.scope else f"{inst.level.lower()}:{inst.scope_key}"


def instance_json(ledger: LedgerDefinition, inst: LedgerInstance,
                  name: str | None = None) -> dict[str, Any]:
    return {"name": ledger.name,
            "scope": {"type": inst.level, "value": _scope_value(ledger, inst), "name": name},
            "data": inst.data, "size_bytes": inst.size_bytes, "version": inst.version,
            "created_at": clock.iso(inst.created_at), "updated_at": clock.iso(inst.updated_at),
            "updated_by": inst.updated_by}


def version_json(ledger: LedgerDefinition, inst: LedgerInstance, v: LedgerVersion,
                 replaced_at: Any, name: str | None = None) -> dict[str, Any]:
    return {"name": ledger.name,
            "scope": {"type": inst.level, "value": _scope_value(ledger, inst), "name": name},
            "data": v.data, "size_bytes": v.size_bytes, "version": v.version,
            "created_at": clock.iso(v.created_at), "updated_at": clock.iso(v.created_at),
            "updated_by": v.created_by, "replaced_at": clock.iso(replaced_at), "op": v.op,
            "restored_from": v.restored_from}


async def find_instance(db: AsyncSession, ledger: LedgerDefinition, ref: ScopeRef, *,
                        lock: bool = False) -> LedgerInstance | None:
    stmt = select(LedgerInstance).where(LedgerInstance.ledger_id == ledger.id,
                                        LedgerInstance.level == ref.level,
                                        LedgerInstance.scope_key == ref.key)
    if lock:
        stmt = stmt.with_for_update()
    return (await db.execute(stmt)).scalar_one_or_none()


async def get_instance(db: AsyncSession, ledger: LedgerDefinition, ref: ScopeRef
                       ) -> LedgerInstance:
    inst = await find_instance(db, ledger, ref)
    if inst is None or inst.data is None:
        raise NotFound(f"Ledger {ledger.name!r} has no instance for {ref.value!r}",
                       code="ledger_instance_not_found")
    return inst


async def list_instances(db: AsyncSession, ledger: LedgerDefinition, q: S.InstancePage,
                         within: Product | None = None) -> dict[str, Any]:
    """The ledger's documents; with ``within``, the product's own and its devices'."""
    where = [LedgerInstance.ledger_id == ledger.id, LedgerInstance.data.isnot(None)]
    if within is not None:
        where.append(or_(
            (LedgerInstance.level == S.PRODUCT) & (LedgerInstance.scope_key == str(within.id)),
            (LedgerInstance.level == S.DEVICE) & LedgerInstance.scope_key.in_(
                select(Device.id).where(Device.product_id == within.id))))
    total = int((await db.execute(select(func.count()).select_from(LedgerInstance)
                                  .where(*where))).scalar() or 0)
    rows = (await db.execute(select(LedgerInstance).where(*where)
                             .order_by(LedgerInstance.level, LedgerInstance.scope_key)
                             .offset((q.page - 1) * q.per_page).limit(q.per_page))).scalars()
    return {"instances": [instance_json(ledger, i) for i in rows],
            "meta": paging(q.page, q.per_page, total)}


async def _write(db: AsyncSession, org: Organization, ledger: LedgerDefinition, ref: ScopeRef,
                 op: str, compute: Compute, *, actor: Subject, ip: str,
                 restored_from: int | None = None) -> LedgerInstance:
    """One write: ``compute(current data or None) -> new data or None``; checks, bumps the
    version, records the version row and the audit entry."""
    if ledger.archived_at is not None:
        raise Conflict(f"Ledger {ledger.name!r} is archived", code="ledger_archived")
    inst = await find_instance(db, ledger, ref, lock=True)
    if inst is None:
        inst = LedgerInstance(ledger_id=ledger.id, level=ref.level, scope_key=ref.key,
                              data=None, size_bytes=0, version=0)
        db.add(inst)
    data = compute(inst.data)
    size = check_document(ledger, data) if data is not None else 0
    now = clock.now()
    inst.data, inst.size_bytes, inst.version = data, size, inst.version + 1
    inst.updated_at, inst.updated_by = now, actor.label
    try:  # the instance first (a new one needs its id), then its version
        await db.flush()
        db.add(LedgerVersion(instance_id=inst.id, version=inst.version, op=op, data=data,
                             size_bytes=size, restored_from=restored_from, created_at=now,
                             created_by=actor.label))
        await db.flush()
    except IntegrityError as exc:
        raise Conflict("Another write to this instance happened at the same time; retry",
                       code="ledger_write_conflict") from exc
    if ledger.direction == S.CLOUD_TO_DEVICE:  # the devices it reaches, after commit
        signals.changed(db, ledger.id, ref.level, ref.key)
    audit.record(db, actor=actor, ip=ip, action=f"ledger.instance.{op}", org_id=org.id,
                 product_id=ref.product_id, target_type="ledger",
                 target_id=f"{ledger.name}/{ref.value}",
                 details={"version": inst.version, "size_bytes": size,
                          **({"restored_from": restored_from} if restored_from else {})})
    return inst


async def set_instance(db: AsyncSession, org: Organization, ledger: LedgerDefinition,
                       ref: ScopeRef, data: dict[str, Any], mode: str, *, actor: Subject,
                       ip: str) -> LedgerInstance:
    """Replace the document, or merge ``data`` into it (:func:`deep_merge`)."""
    if mode == S.MERGE:
        return await _write(db, org, ledger, ref, "merge",
                            lambda old: deep_merge(old or {}, data), actor=actor, ip=ip)
    return await _write(db, org, ledger, ref, "set", lambda old: data, actor=actor, ip=ip)


async def delete_instance(db: AsyncSession, org: Organization, ledger: LedgerDefinition,
                          ref: ScopeRef, *, actor: Subject, ip: str) -> LedgerInstance:
    await get_instance(db, ledger, ref)
    return await _write(db, org, ledger, ref, "delete", lambda old: None, actor=actor, ip=ip)


async def list_versions(db: AsyncSession, ledger: LedgerDefinition, ref: ScopeRef,
                        q: S.VersionsQuery) -> tuple[LedgerInstance, list[tuple[LedgerVersion,
                                                                                 Any]], bool]:
    """Versions newest first, each with when the next one replaced it; ``replaced_before``
    / ``replaced_after`` filter on that time (the current version has none)."""
    inst = await find_instance(db, ledger, ref)
    if inst is None:
        raise NotFound(f"Ledger {ledger.name!r} has no instance for {ref.value!r}",
                       code="ledger_instance_not_found")
    later = LedgerVersion.__table__.alias("later")
    replaced = (select(later.c.created_at).where(later.c.instance_id == inst.id,
                                                 later.c.version == LedgerVersion.version + 1)
                .scalar_subquery())
    stmt = select(LedgerVersion, replaced.label("replaced_at")).where(
        LedgerVersion.instance_id == inst.id)
    if q.replaced_before is not None:
        stmt = stmt.where(replaced < q.replaced_before)
    if q.replaced_after is not None:
        stmt = stmt.where(replaced > q.replaced_after)
    rows = [(v, r) for v, r in await db.execute(
        stmt.order_by(LedgerVersion.version.desc()).limit(q.limit + 1))]
    return inst, rows[:q.limit], len(rows) > q.limit


async def get_version(db: AsyncSession, ledger: LedgerDefinition, ref: ScopeRef,
                      version: int) -> tuple[LedgerInstance, LedgerVersion, Any]:
    inst = await find_instance(db, ledger, ref)
    v = None if inst is None else (await db.execute(select(LedgerVersion).where(
        LedgerVersion.instance_id == inst.id, LedgerVersion.version == version)
    )).scalar_one_or_none()
    if inst is None or v is None:
        raise NotFound(f"Version {version} of {ledger.name!r} for {ref.value!r} not found",
                       code="ledger_version_not_found")
    replaced = (await db.execute(select(LedgerVersion.created_at).where(
        LedgerVersion.instance_id == inst.id, LedgerVersion.version == version + 1))).scalar()
    return inst, v, replaced


async def rollback(db: AsyncSession, org: Organization, ledger: LedgerDefinition,
                   ref: ScopeRef, version: int, *, actor: Subject, ip: str) -> LedgerInstance:
    """Restore ``version``'s document as a new version (checked against today's limit and
    schema; restoring a delete deletes)."""
    _, old, _ = await get_version(db, ledger, ref, version)
    restored = old.data
    return await _write(db, org, ledger, ref, "rollback", lambda _cur: restored, actor=actor,
                        ip=ip, restored_from=version)


# --- what devices get ------------------------------------------------------------------------

async def orgs_of_devices(db: AsyncSession, devices: list[Device]) -> dict[str, int]:
    """Device id -> the organization whose ledgers reach it: its product's, or, for a
    device in no product, its owner's personal organization (two queries for any number)."""
    pids = {d.product_id for d in devices if d.product_id is not None}
    owners = {d.owner_user_id for d in devices
              if d.product_id is None and d.owner_user_id is not None}
    by_product: dict[int, int] = {}
    by_owner: dict[int, int] = {}
    if pids:
        by_product = {p: o for p, o in (await db.execute(
            select(Product.id, Product.org_id).where(Product.id.in_(pids)))).all()}
    if owners:
        by_owner = {u: o for u, o in (await db.execute(
            select(Organization.owner_user_id, Organization.id).where(
                Organization.personal.is_(True),
                Organization.owner_user_id.in_(owners)))).all() if u is not None}
    out: dict[str, int] = {}
    for d in devices:
        org = (by_product.get(d.product_id) if d.product_id is not None
               else by_owner.get(d.owner_user_id) if d.owner_user_id is not None else None)
        if org is not None:
            out[d.id] = org
    return out


async def definitions_for_device(db: AsyncSession, device: Device,
                                 direction: str | None = None) -> list[LedgerDefinition]:
    """The live (not archived) ledgers that reach ``device`` (:func:`orgs_of_devices`)."""
    org_id = (await orgs_of_devices(db, [device])).get(device.id)
    if org_id is None:
        return []
    stmt = select(LedgerDefinition).where(LedgerDefinition.org_id == org_id,
                                          LedgerDefinition.archived_at.is_(None))
    if direction is not None:
        stmt = stmt.where(LedgerDefinition.direction == direction)
    return list((await db.execute(stmt.order_by(LedgerDefinition.name))).scalars())


def levels_for(ledger: LedgerDefinition, device: Device) -> list[tuple[str, str]]:
    """The ``(level, scope key)`` instances ``device``'s document of ``ledger`` is merged
    from, coarse to fine (only the levels the ledger's scope allows)."""
    wanted = [(S.OWNER, str(ledger.org_id))]
    if ledger.scope in (S.PRODUCT, S.DEVICE) and device.product_id is not None:
        wanted.append((S.PRODUCT, str(device.product_id)))
    if ledger.scope == S.DEVICE:
        wanted.append((S.DEVICE, device.id))
    return wanted


def merge_levels(wanted: list[tuple[str, str]], rows: dict[tuple[str, str], LedgerInstance]
                 ) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The document made of the ``wanted`` instances found in ``rows`` (keyed by ``(level,
    scope key)``), and the versions ``(owner, product, device)`` it is made of."""
    data: dict[str, Any] = {}
    versions = {S.OWNER: 0, S.PRODUCT: 0, S.DEVICE: 0}
    for key in wanted:
        inst = rows.get(key)
        if inst is None:
            continue
        versions[inst.level] = inst.version
        if inst.data is not None:
            data = deep_merge(data, inst.data)
    return data, (versions[S.OWNER], versions[S.PRODUCT], versions[S.DEVICE])


async def effective_for_device(db: AsyncSession, device: Device, ledger: LedgerDefinition
                               ) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The document ``device`` sees of ``ledger``: the owner-level instance, overridden by
    its product's, overridden by its own (only the levels the ledger's scope allows), merged
    with :func:`deep_merge`. Also the versions ``(owner, product, device)`` it is made of
    (0 where no instance was ever written); any write to any of them raises one of them,
    so a device compares tuples (element-wise, none may go down) to know it is behind."""
    wanted = levels_for(ledger, device)
    rows = {(i.level, i.scope_key): i for i in (await db.execute(select(LedgerInstance).where(
        LedgerInstance.ledger_id == ledger.id,
        tuple_(LedgerInstance.level, LedgerInstance.scope_key).in_(wanted)))).scalars()}
    return merge_levels(wanted, rows)
