"""Device groups of a product: create, rename, recolor, delete, and device membership.

A device may be in many groups of its product. Setting a device's groups takes an absolute
list and creates unknown names; batch add/remove works on up to ``MAX_BATCH`` devices.
Group names are lowercase letters, digits, ``-`` and ``_`` (Particle's rule).

A **dynamic** group has a ``query`` (:mod:`corral.devices.dynquery`) instead of members:
its devices are those of the product matching the query *now*. Membership is evaluated
when it is read (compiled to one SQL condition; nothing is stored per device), so it is
always live; static membership operations on it are refused (``dynamic_group``).
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import case, delete, func, insert, literal, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.audit import service as audit
from corral.auth.subject import Subject
from corral.devices import dynquery, estimates
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.devices.schemas import GroupChange, GroupCreate
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, CorralError, NotFound
from corral.products.models import Product

GROUP_NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
CHUNK = 5000
# a dynamic group's device_count: exact up to this many (see :func:`dynamic_count`)
EXACT_UP_TO = 10_000
# a stable default color per name (Particle gives every group one)
PALETTE = ("#0ea5e9", "#22c55e", "#eab308", "#f97316", "#ef4444", "#a855f7", "#ec4899",
           "#14b8a6", "#64748b", "#84cc16")


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def clean_group_name(value: Any, *, field: str = "name") -> str:
    if not isinstance(value, str) or not GROUP_NAME_RE.match(value):
        raise BadRequest(f"{field} must be 1-64 lowercase letters, digits, '-' or '_'",
                         code="invalid_request")
    return value


def clean_group_names(names: list[str] | None, *, field: str = "groups") -> list[str]:
    """An absolute list of group names (read by the request model: a JSON list, repeated
    form fields or a comma string), each checked, without repeats."""
    return list(dict.fromkeys(clean_group_name(n, field=field) for n in names or ()))


def _clean_color(value: Any) -> str:
    if not isinstance(value, str) or not COLOR_RE.match(value):
        raise BadRequest("color must be a hex color like #1a2b3c", code="invalid_request")
    return value.lower()


def _default_color(name: str) -> str:
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def group_json(g: DeviceGroup, count: Count | int = 0) -> dict[str, Any]:
    count = count if isinstance(count, Count) else Count(count)
    return {"id": g.id, "name": g.name, "description": g.description, "color": g.color,
            "fw_version": None, "device_count": count.n,
            **({"device_count_is_estimate": True} if count.estimate else {}),
            "dynamic": g.query is not None, "query": g.query,
            "created_at": clock.iso(g.created_at), "updated_at": clock.iso(g.updated_at)}


class DynamicGroupRefused(CorralError):
    """A static membership operation on a dynamic group."""

    status = 400
    code = "dynamic_group"


async def dynamic_condition(db: AsyncSession, product_id: int,
                            g: DeviceGroup | str, *,
                            per_device: bool = False) -> ColumnElement[bool]:
    """The condition on ``Device`` (without the product) that a dynamic group's members
    meet now; ``g`` is the group or its query text. ``per_device``: memberships probed
    device by device (see :class:`dynquery.Scope`), for walking a sort index."""
    text = g if isinstance(g, str) else g.query
    assert text is not None, "a static group has members, not a condition"
    query = dynquery.parse(text)
    scope = await dynquery.load_scope(db, product_id, query, strict=False)
    scope.per_device = per_device
    return dynquery.compile_query(query, scope)


async def count_matching(db: AsyncSession, product_id: int, cond: ColumnElement[bool],
                         cap: int | None = None) -> int:
    """The product's devices meeting ``cond`` (at most ``cap + 1`` are counted)."""
    inner = select(Device.id).where(Device.product_id == product_id, cond)
    if cap is not None:
        inner = inner.limit(cap + 1)
    return int((await db.execute(select(func.count()).select_from(inner.subquery())))
               .scalar_one())


async def device_counts(db: AsyncSession, group_ids: list[int]) -> dict[int, int]:
    """Members of static groups (a dynamic group has none: see :func:`group_counts`)."""
    out: dict[int, int] = {}
    for chunk in chunks(group_ids):
        rows = await db.execute(
            select(DeviceGroupMember.group_id, func.count())
            .where(DeviceGroupMember.group_id.in_(chunk)).group_by(DeviceGroupMember.group_id))
        out.update({gid: int(n) for gid, n in rows.all()})
    return out


class Count(NamedTuple):
    """A group's device count, and whether it is an estimate (a dynamic group matching
    most of a large product: see :func:`dynamic_count`)."""

    n: int
    estimate: bool = False


async def group_counts(db: AsyncSession, groups: Sequence[DeviceGroup]) -> dict[int, Count]:
    """Device counts of static (members) and dynamic (devices matching now) groups."""
    out = {gid: Count(n) for gid, n in
           (await device_counts(db, [g.id for g in groups if g.query is None])).items()}
    for g in groups:
        if g.query is not None:
            out[g.id] = await dynamic_count(db, g.product_id, g.query)
    return out


async def dynamic_count(db: AsyncSession, product_id: int, query: str) -> Count:
    """The devices matching a dynamic group's query. In a product of ``SAMPLE_FROM``
    devices or more, a query a sample says matches more than ``SAMPLED_ABOVE`` is not
    counted: the sample's estimate is the count (:mod:`corral.devices.estimates`; counting
    most of a million devices costs more than a request should). Otherwise exact up to
    ``EXACT_UP_TO``; beyond, counted exactly at most once per ``ESTIMATE_TTL_S`` per query
    and process (an estimate meanwhile, as the device list's totals)."""
    cond = await dynamic_condition(db, product_id, query)
    n, estimate = await estimates.count_or_estimate(
        db, (product_id, "group", query), product_id, [cond],
        lambda cap: count_matching(db, product_id, cond, cap), EXACT_UP_TO,
        fresh_is_estimate=False)
    return Count(n, estimate)


async def list_groups(db: AsyncSession, product: Product,
                      name: str | None = None) -> list[tuple[DeviceGroup, Count]]:
    """The product's groups by name (``name``: case-insensitive partial match)."""
    q = select(DeviceGroup).where(DeviceGroup.product_id == product.id)
    if name:
        q = q.where(DeviceGroup.name.icontains(name, autoescape=True))
    groups = list((await db.execute(q.order_by(DeviceGroup.name))).scalars())
    counts = await group_counts(db, groups)
    return [(g, counts.get(g.id, Count(0))) for g in groups]


async def group_colors(db: AsyncSession, product: Product) -> dict[str, str]:
    """The product's groups by name with their colors (no counts: cheap at any fleet size)."""
    rows = await db.execute(select(DeviceGroup.name, DeviceGroup.color).where(
        DeviceGroup.product_id == product.id).order_by(DeviceGroup.name))
    return {name: color or _default_color(name) for name, color in rows.all()}


async def dynamic_group_names(db: AsyncSession, product: Product) -> set[str]:
    """Names of the product's dynamic groups (no counts)."""
    return set((await db.execute(select(DeviceGroup.name).where(
        DeviceGroup.product_id == product.id, DeviceGroup.query.is_not(None)))).scalars())


async def get_group(db: AsyncSession, product: Product, name: str) -> DeviceGroup:
    row = (await db.execute(select(DeviceGroup).where(
        DeviceGroup.product_id == product.id, DeviceGroup.name == name))).scalar_one_or_none()
    if row is None:
        raise NotFound("Group not found", code="group_not_found")
    return row


async def group_with_count(db: AsyncSession, product: Product,
                           name: str) -> tuple[DeviceGroup, Count]:
    g = await get_group(db, product, name)
    return g, (await group_counts(db, [g])).get(g.id, Count(0))


async def _flush_or_conflict(db: AsyncSession, name: str) -> None:
    """Flush; a name taken by a concurrent request becomes 409 (the boundary rolls back)."""
    try:
        await db.flush()
    except IntegrityError as exc:
        raise Conflict(f"A group named {name!r} already exists", code="group_exists") from exc


async def _name_free(db: AsyncSession, product: Product, name: str) -> None:
    taken = (await db.execute(select(DeviceGroup.id).where(
        DeviceGroup.product_id == product.id, DeviceGroup.name == name))).first()
    if taken:
        raise Conflict(f"A group named {name!r} already exists", code="group_exists")


async def check_query(db: AsyncSession, product: Product, text: Any,
                      own_name: str | None = None) -> dynquery.Query:
    """A group query parsed and checked against the product (the groups it names exist,
    no cycle through ``own_name``); 400 ``invalid_query`` with a position otherwise."""
    query = dynquery.parse(text)
    await dynquery.load_scope(db, product.id, query, strict=True, own_name=own_name)
    return query


async def create_group(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                       req: GroupCreate) -> DeviceGroup:
    """Create a group from ``name`` (required), ``color``, ``description`` and ``query``
    (a dynamic group); 409 if taken."""
    name = clean_group_name(req.name)
    color = _clean_color(req.color) if req.color is not None else None
    description = req.description
    query = (await check_query(db, product, req.query, name)).text \
        if req.query is not None else None
    await _name_free(db, product, name)
    g = DeviceGroup(product_id=product.id, name=name, description=description,
                    color=color or _default_color(name), query=query)
    db.add(g)
    await _flush_or_conflict(db, name)
    audit.record(db, actor=actor, ip=ip, action="group.created", org_id=product.org_id,
                 product_id=product.id, target_type="group", target_id=name,
                 details={"color": g.color, **({"query": query} if query else {})})
    return g


async def update_group(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                       name: str, req: GroupChange) -> tuple[DeviceGroup, Count]:
    """Change ``name``, ``color``, ``description`` and/or ``query`` (at least one). A
    ``query`` makes the group dynamic (refused while it has members); ``null`` makes it
    static again (with no members)."""
    g = await get_group(db, product, name)
    changed: dict[str, Any] = {}
    if req.sent("query"):
        if req.query is None:
            if g.query is not None:
                changed["query"] = None
            g.query = None
        else:
            query = await check_query(db, product, req.query, g.name)
            if g.query is None and (await device_counts(db, [g.id])).get(g.id, 0):
                raise Conflict(f"Group {g.name!r} has devices: take them out before giving "
                               "it a query", code="group_has_devices")
            g.query = query.text
            changed["query"] = query.text
    if req.sent("name"):
        new = clean_group_name(req.name)
        if new != g.name:
            await _name_free(db, product, new)
            changed["name"] = {"from": g.name, "to": new}
            g.name = new
    if req.sent("color"):
        g.color = _clean_color(req.color)
        changed["color"] = g.color
    if req.sent("description"):
        g.description = req.description
        changed["description"] = True
    if not req.model_fields_set:
        raise BadRequest("Nothing to update: send name, color, description or query",
                         code="invalid_request")
    await _flush_or_conflict(db, g.name)
    audit.record(db, actor=actor, ip=ip, action="group.updated", org_id=product.org_id,
                 product_id=product.id, target_type="group", target_id=g.name, details=changed)
    return g, (await group_counts(db, [g])).get(g.id, Count(0))


async def delete_group(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                       name: str) -> None:
    """Delete the group; its devices simply leave it."""
    g = await get_group(db, product, name)
    n = (await device_counts(db, [g.id])).get(g.id, 0)
    await db.execute(delete(DeviceGroupMember).where(DeviceGroupMember.group_id == g.id)
                     .execution_options(synchronize_session=False))
    audit.record(db, actor=actor, ip=ip, action="group.deleted", org_id=product.org_id,
                 product_id=product.id, target_type="group", target_id=g.name,
                 details={"devices": n})
    await db.delete(g)
    await db.flush()


async def ensure_groups(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                        product: Product, names: list[str]) -> dict[str, DeviceGroup]:
    """The product's groups named ``names``, creating the unknown ones (audited)."""
    if not names:
        return {}
    found = {g.name: g for g in (await db.execute(select(DeviceGroup).where(
        DeviceGroup.product_id == product.id, DeviceGroup.name.in_(names)))).scalars()}
    refuse_dynamic(found.values())
    for name in names:
        if name in found:
            continue
        g = DeviceGroup(product_id=product.id, name=name, color=_default_color(name))
        db.add(g)
        found[name] = g
        audit.record(db, actor=actor, ip=ip, action="group.created", org_id=product.org_id,
                     product_id=product.id, target_type="group", target_id=name,
                     details={"color": g.color, "implicit": True})
    await _flush_or_conflict(db, ", ".join(names))
    return found


def refuse_dynamic(groups: Iterable[DeviceGroup]) -> None:
    """400 ``dynamic_group`` when one of ``groups`` is dynamic (no static members)."""
    for g in groups:
        if g.query is not None:
            raise DynamicGroupRefused(
                f"Group {g.name!r} is dynamic: its devices are those matching its query "
                f"({g.query}); change the query instead of adding or removing devices")


async def group_names_for(db: AsyncSession, device_ids: Sequence[str],
                          product_id: int | None = None,
                          matched: Sequence[tuple[str, DeviceGroup]] | None = None,
                          static_ids: dict[str, set[int]] | None = None
                          ) -> dict[str, list[str]]:
    """Group names of each device, in one query per chunk (no per-device queries); with
    ``product_id`` (the devices' product) also the product's dynamic groups each device
    matches now (``matched``, or :func:`dynamic_matches`: two more statements).
    ``static_ids``: filled with each device's static groups' ids on the way."""
    out: dict[str, list[str]] = defaultdict(list)
    for chunk in chunks(list(device_ids)):
        rows = await db.execute(
            select(DeviceGroupMember.device_id, DeviceGroup.name, DeviceGroup.id)
            .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
            .where(DeviceGroupMember.device_id.in_(chunk)))
        for device_id, name, gid in rows.all():
            out[device_id].append(name)
            if static_ids is not None:
                static_ids.setdefault(device_id, set()).add(int(gid))
    if product_id is not None and device_ids:
        if matched is None:
            matched = await dynamic_matches(db, product_id, device_ids)
        for device_id, g in matched:
            out[device_id].append(g.name)
    return {k: sorted(v) for k, v in out.items()}


# dynamic groups tested in one statement (a UNION ALL of one SELECT each), and the bound
# values one statement may carry (SQLite allows 32,766)
GROUPS_PER_STATEMENT = 50
VALUES_PER_STATEMENT = 10_000


async def dynamic_matches(db: AsyncSession, product_id: int,
                          device_ids: Sequence[str] | None,
                          only: Callable[[DeviceGroup], bool] | None = None
                          ) -> list[tuple[str, DeviceGroup]]:
    """(device id, group) for each of ``device_ids`` (None: every device of the product)
    and each dynamic group of the product (those ``only`` accepts) whose query it matches
    now. One statement for the product's groups, then one per 50 dynamic groups (and
    chunk of ids): each group's condition is tested on the given devices alone, memberships
    probed per device (``Scope.per_device``), so the cost is bounded by the ids times the
    groups, whatever the size of the product or of the groups."""
    every = list((await db.execute(select(DeviceGroup).where(
        DeviceGroup.product_id == product_id).order_by(DeviceGroup.id))).scalars())
    dynamic = [g for g in every if g.query is not None and (only is None or only(g))]
    if not dynamic or (device_ids is not None and not device_ids):
        return []
    scope = dynquery.Scope(
        product_id=product_id, now=clock.now(), per_device=device_ids is not None,
        groups={g.name: dynquery.GroupRef(g.id, dynquery.parse(g.query) if g.query else None)
                for g in every})
    by_id = {g.id: g for g in dynamic}
    out: list[tuple[str, DeviceGroup]] = []
    for part in chunks(dynamic, GROUPS_PER_STATEMENT):
        conds = [(g.id, dynquery.compile_query(dynquery.parse(g.query), scope)) for g in part]
        id_chunks: Iterable[Sequence[str] | None] = [None] if device_ids is None else chunks(
            list(device_ids), max(1, VALUES_PER_STATEMENT // len(part)))
        for ids in id_chunks:
            # given ids: the condition is only tested on their rows (inside a CASE no
            # index serves it), else a planner may walk a range the condition offers
            # (``platform = boron and last_heard < 7d``: every recent boron of the product)
            selects = [select(Device.id, literal(gid).label("gid")).where(
                Device.product_id == product_id,
                *([cond] if ids is None else [Device.id.in_(ids),
                                              case((cond, 1), else_=0) == 1]))
                for gid, cond in conds]
            stmt = selects[0] if len(selects) == 1 else union_all(*selects)
            out += [(did, by_id[int(gid)]) for did, gid in (await db.execute(stmt)).all()]
    return out


async def set_device_groups(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                            device_id: str, names: list[str]) -> list[str]:
    """Make the device's static groups exactly ``names`` (unknown names are created). A
    dynamic group the device matches now may be named (a client sends back the ``groups``
    it read): it is left as it is, its query decides; naming any other dynamic group is
    refused (``dynamic_group``), and leaving out one the device matches changes nothing."""
    matched = {g.name for _d, g in await dynamic_matches(db, product.id, [device_id])}
    groups = await ensure_groups(db, actor=actor, ip=ip, product=product,
                                 names=[n for n in names if n not in matched])
    wanted = {g.id for g in groups.values()}
    current = set((await db.execute(select(DeviceGroupMember.group_id).where(
        DeviceGroupMember.device_id == device_id))).scalars())
    gone = current - wanted
    if gone:
        await db.execute(delete(DeviceGroupMember).where(
            DeviceGroupMember.device_id == device_id, DeviceGroupMember.group_id.in_(gone))
            .execution_options(synchronize_session=False))
    new = wanted - current
    if new:
        await db.execute(insert(DeviceGroupMember),
                         [{"device_id": device_id, "group_id": gid} for gid in sorted(new)])
    return sorted(names)


async def batch_groups(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                       device_ids: list[str], add: list[str], remove: list[str]) -> None:
    """Add ``device_ids`` (all in ``product``, checked by the caller) to the groups ``add``
    (created when unknown) and take them out of ``remove`` (unknown names are ignored)."""
    add_groups = await ensure_groups(db, actor=actor, ip=ip, product=product, names=add)
    remove_ids = []
    if remove:
        removed = list((await db.execute(select(DeviceGroup).where(
            DeviceGroup.product_id == product.id, DeviceGroup.name.in_(remove)))).scalars())
        refuse_dynamic(removed)
        remove_ids = [g.id for g in removed]
    add_ids = [g.id for g in add_groups.values() if g.name not in set(remove)]
    for chunk in chunks(device_ids):
        if remove_ids:
            await db.execute(delete(DeviceGroupMember).where(
                DeviceGroupMember.device_id.in_(chunk), DeviceGroupMember.group_id.in_(remove_ids))
                .execution_options(synchronize_session=False))
        if add_ids:
            have = {(d, g) for d, g in await db.execute(
                select(DeviceGroupMember.device_id, DeviceGroupMember.group_id).where(
                    DeviceGroupMember.device_id.in_(chunk),
                    DeviceGroupMember.group_id.in_(add_ids)))}
            rows = [{"device_id": d, "group_id": g} for d in chunk for g in add_ids
                    if (d, g) not in have]
            if rows:
                await db.execute(insert(DeviceGroupMember), rows)
    audit.record(db, actor=actor, ip=ip, action="devices.groups_updated", org_id=product.org_id,
                 product_id=product.id, target_type="product", target_id=product.id,
                 details={"devices": len(device_ids), "add": add, "remove": remove})


async def clear_device_groups(db: AsyncSession, device_ids: Sequence[str]) -> None:
    """Take devices out of every group (they are leaving their product)."""
    for chunk in chunks(list(device_ids)):
        await db.execute(delete(DeviceGroupMember).where(DeviceGroupMember.device_id.in_(chunk))
                         .execution_options(synchronize_session=False))

