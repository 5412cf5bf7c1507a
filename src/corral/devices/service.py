"""Device inventory rules (import, listing, groups, quarantine, presence facts).

Bulk import lives in :mod:`corral.devices.importer`, group rules in
:mod:`corral.devices.groups`. The device-session core calls :func:`admit`,
:func:`mark_online`, :func:`mark_offline` and :func:`touch`.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sqlalchemy import (
    Select,
    and_,
    bindparam,
    false,
    func,
    literal,
    or_,
    select,
    union,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.audit import service as audit
from corral.auth.models import Customer, Membership, User
from corral.auth.policy import Role, api_users_not_allowed, role_allows
from corral.auth.subject import Subject
from corral.billing import locks as billing_locks
from corral.db.lean import LeanRead
from corral.devices import dynquery, estimates, search, signals
from corral.devices import groups as group_rules
from corral.devices import tags as tag_rules
from corral.devices.access import is_device_id
from corral.devices.cohorts import cohort_names_for, in_cohort
from corral.devices.estimates import product_device_count
from corral.devices.json import device_json
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.devices.schemas import (
    DEFAULT_PER_PAGE,
    BatchChange,
    DeviceChange,
    DeviceListQuery,
    ProductDeviceChange,
)
from corral.kit import clock
from corral.kit.body import multi_dict, validate
from corral.kit.errors import BadRequest, Forbidden
from corral.kit.responses import paging
from corral.products import service as products
from corral.products.models import Product

DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FEW_MATCHES = 20_000  # filtered listings this small are sorted after filtering
# a device list's total is exact up to this many matches; beyond it, the exact count (a scan
# of every match: ~50 ms at 1,000,000) is taken at most once per ESTIMATE_TTL_S per product
# and filter and reused meanwhile, and the answer says so (meta.total_is_estimate)
EXACT_COUNT_UP_TO = 10_000
# a search box matching more devices than this pages by walking the sort index, testing
# each device against the search (see :func:`_walked_search`), for the first WALK_OFFSET
# rows of the listing; fewer matches (or deeper pages) are collected and sorted instead
# (at 11,111 matches of 1M devices, walking to row 475 read ~43,000 rows: 270 ms, collecting
# ~100 ms; the two cross near row 300)
SEARCH_WALK = 4_000
WALK_OFFSET = 300
# a filtered page first walks at most this many devices of the sort order, testing each
# (see :func:`_bounded_walk`); only when they hold too few matches is it planned otherwise
WALK_BOUND = 2_000
# ... or 40 devices per row of a deeper page (a filter matching 2.5 % of them finds it),
# down to this row (page 40 of 25, page 10 of 100); deeper pages are planned by match count
WALK_DEPTH = 1_001
CHUNK = 5_000


async def refuse_delete_with_devices(db: AsyncSession, product: Product) -> str | None:
    """A product is deleted only once it has no devices (remove or move them first)."""
    n = await product_device_count(db, product.id)
    if n:
        return f"The product still has {n} device(s); remove them before deleting the product"
    return None


products.DELETE_CHECKS.append(refuse_delete_with_devices)


# --- shaping helpers ---------------------------------------------------------------------------

async def owner_names(db: AsyncSession, devices: Sequence[Device]) -> dict[str, str]:
    """Device id -> its owner's username (or the e-mail of the customer it is claimed to),
    with one query per kind of owner."""
    user_ids = sorted({d.owner_user_id for d in devices if d.owner_user_id is not None})
    customer_ids = sorted({d.customer_id for d in devices
                           if d.owner_user_id is None and d.customer_id is not None})
    users: dict[int, str] = {}
    if user_ids:
        users = {uid: name for uid, name in await db.execute(
            select(User.id, User.username).where(User.id.in_(user_ids)))}
    customers: dict[int, str] = {}
    if customer_ids:
        customers = {cid: email for cid, email in await db.execute(
            select(Customer.id, Customer.email).where(Customer.id.in_(customer_ids)))}
    out: dict[str, str] = {}
    for d in devices:
        if d.owner_user_id is not None and d.owner_user_id in users:
            out[d.id] = users[d.owner_user_id]
        elif d.customer_id is not None and d.customer_id in customers:
            out[d.id] = customers[d.customer_id]
    return out


async def device_view(db: AsyncSession, device: Device) -> dict[str, Any]:
    """The device object; devices in a product get the product fields and their groups."""
    owner = (await owner_names(db, [device])).get(device.id)
    if device.product_id is None:
        return device_json(device, owner=owner)
    groups, cohorts, targets = await _memberships(db, device.product_id, [device])
    return device_json(device, groups=groups.get(device.id, []), owner=owner, product=True,
                       targeted=targets.get(device.id), cohort=cohorts.get(device.id))


async def _memberships(db: AsyncSession, product_id: int, devices: Sequence[Device]
                       ) -> tuple[dict[str, list[str]], dict[str, str], dict[str, int | None]]:
    """Of the product's ``devices``: device id -> its groups' names (static, and the dynamic
    groups it matches now: tested once for them all), its cohort's name and its
    ``targeted_firmware_release_version`` (the firmware precedence rules, resolved from the
    rows, memberships and matches read here: the resolver reads only the releases)."""
    from corral.firmware.resolver import DeviceFacts, targets_for

    ids = [d.id for d in devices]
    if not ids:
        return {}, {}, {}
    matched = await group_rules.dynamic_matches(db, product_id, ids)
    static: dict[str, set[int]] = {}
    groups = await group_rules.group_names_for(db, ids, product_id, matched, static)
    cohort_ids: dict[str, int] = {}
    cohorts = await cohort_names_for(db, ids, cohort_ids)
    known = [DeviceFacts(id=d.id, development=bool(d.development),
                         desired_version=d.desired_firmware_version,
                         group_ids=frozenset(static.get(d.id, ())),
                         firmware_version=d.firmware_version, cohort_id=cohort_ids.get(d.id))
             for d in devices]
    targets = {i: t.version for i, t in (await targets_for(
        db, product_id, ids, matched=[(d, g.id) for d, g in matched], known=known)).items()}
    return groups, cohorts, targets


# --- the product inventory ---------------------------------------------------------------------

SORT_ATTRS: dict[str, Any] = {
    "deviceId": Device.id, "deviceName": Device.name,
    "firmwareVersion": Device.firmware_version, "lastConnection": Device.last_heard,
}
HEX_PREFIX_RE = re.compile(r"^[0-9a-f]{1,24}$")


@dataclass
class DeviceQuery:
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE
    device_id: str | None = None
    device_name: str | None = None
    serial_number: str | None = None
    groups: list[str] | None = None
    tags: list[str] | None = None  # every one of them (all-of)
    cohort: str | None = None
    quarantined: bool | None = None
    online: bool | None = None
    development: bool | None = None
    firmware_version: int | None = None
    # one search box (the console): an ID, name or serial number starting with this
    search: str | None = None
    sort_attr: str = "lastConnection"
    sort_dir: str = "desc"
    # False: no exact total (a page of a huge product stays fast); ``has_more`` says whether
    # another page follows
    count: bool = True
    # one more condition on Device (a dynamic group's query) and what identifies it (the
    # cached totals' key)
    where: ColumnElement[bool] | None = None
    where_key: str | None = None
    # the ids of the static groups ``groups`` names, once read (None: not read yet)
    group_ids: list[int] | None = None
    # the same condition with memberships probed per device (for walking a sort index)
    where_walked: ColumnElement[bool] | None = None
    # where the last_heard of a heard device meeting ``where`` lies (dynquery.heard_span),
    # None when unbounded: the listing adds it to the sort index's range
    heard: dynquery.Span | None = None


def parse_device_query(params: Mapping[str, str] | DeviceListQuery) -> DeviceQuery:
    """Particle's query parameters (``per_page`` and ``perPage`` both work); 400 on bad ones."""
    req = params if isinstance(params, DeviceListQuery) else validate(
        DeviceListQuery, multi_dict(params.multi_items() if hasattr(params, "multi_items")
                                    else params.items()))
    return DeviceQuery(page=req.page, per_page=req.per_page, device_id=req.device_id,
                       device_name=req.device_name, serial_number=req.serial_number,
                       groups=req.groups or None,
                       tags=tag_rules.clean_tags(req.tags, limit=None) or None,
                       cohort=req.cohort or None,
                       quarantined=req.quarantined,
                       online=req.online, development=req.development,
                       firmware_version=req.firmware_version, search=req.search,
                       sort_attr=req.sort_attr, sort_dir=req.sort_dir)


def _group_members(product: Product, groups: list[str],
                   ids: Sequence[int] | None = None) -> Any:
    """The members of the product's static groups ``groups``; ``ids``: those groups' ids
    when known (see :func:`_with_dynamic_groups`), so no join to the groups is needed
    (each probe of a walk along a sort index is then one primary-key lookup)."""
    if ids is not None:
        return select(DeviceGroupMember.device_id).where(
            DeviceGroupMember.group_id.in_(list(ids)))
    return (select(DeviceGroupMember.device_id)
            .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
            .where(DeviceGroup.product_id == product.id, DeviceGroup.name.in_(groups)))


async def _large_groups(db: AsyncSession, product: Product, q: DeviceQuery) -> bool:
    """Whether the groups of ``q`` hold more than FEW_MATCHES devices (counted on the
    membership index, stopping there)."""
    if not q.groups:
        return False
    inner = _group_members(product, q.groups, q.group_ids).limit(FEW_MATCHES + 1).subquery()
    n = (await db.execute(select(func.count()).select_from(inner))).scalar_one()
    return int(n) > FEW_MATCHES


async def _with_dynamic_groups(db: AsyncSession, product: Product,
                               q: DeviceQuery) -> DeviceQuery:
    """``q`` with its dynamic groups (if it names any) turned into a condition: a device is
    in one of ``q.groups`` when it is a member of a static one or matches a dynamic one."""
    if not q.groups:
        return q
    named = list((await db.execute(select(DeviceGroup).where(
        DeviceGroup.product_id == product.id, DeviceGroup.name.in_(q.groups)))).scalars())
    dynamic = [g for g in named if g.query is not None]
    if not dynamic:  # static groups only: their members by group id
        return replace(q, group_ids=sorted(g.id for g in named))
    names = {g.name for g in dynamic}
    static = [n for n in q.groups if n not in names]
    static_ids = [g.id for g in named if g.query is None]

    async def condition(per_device: bool) -> ColumnElement[bool]:
        parts = [await group_rules.dynamic_condition(db, product.id, g, per_device=per_device)
                 for g in dynamic]
        if static:
            members = _group_members(product, static, static_ids)
            parts.append(members.where(DeviceGroupMember.device_id == Device.id).exists()
                         if per_device else Device.id.in_(members))
        cond = parts[0] if len(parts) == 1 else or_(*parts)
        if q.where is not None:
            cond = and_(q.where_walked if per_device and q.where_walked is not None
                        else q.where, cond)
        return cond

    key = "groups:" + ",".join(f"{g.name}={g.query}" for g in dynamic) + ";" + ",".join(static)
    if q.where is not None:
        key = f"{q.where_key};{key}"
    now = clock.now()
    spans = [dynquery.heard_span(dynquery.parse(g.query), now) for g in dynamic]
    heard = None if static or None in spans else dynquery.span_or(
        [s for s in spans if s is not None])
    if q.where is not None and q.heard is not None:  # both conditions hold
        heard = q.heard if heard is None else dynquery.span_and([q.heard, heard])
    return replace(q, groups=None, where=await condition(False), where_key=key,
                   where_walked=await condition(True), heard=heard)


async def _conditions(db: AsyncSession, product: Product,
                      q: DeviceQuery) -> tuple[list[ColumnElement[bool]], Any]:
    """The filters of ``q`` (its dynamic groups already turned into its condition by
    :func:`_with_dynamic_groups`) and, when they are only large groups of the product,
    those groups' membership (counted instead of walking the devices: see :func:`_count`)."""
    large = await _large_groups(db, product, q)
    many_tagged = bool(q.tags) and await tag_rules.carried_by_many(db, q.tags or [],
                                                                   FEW_MATCHES)
    conds = _filters(product, q, db.get_bind().dialect.name, large_groups=large,
                     large_tags=many_tagged)
    only_groups = large and len(conds) == 2  # the product and its groups
    if not only_groups:
        return conds, None
    members = _group_members(product, q.groups or [], q.group_ids)
    if q.group_ids is None or len(q.group_ids) > 1:  # a device may be in several
        members = members.distinct()
    return conds, members.subquery()


@functools.lru_cache(maxsize=4096)
def _of_product(product_id: int) -> ColumnElement[bool]:
    """``devices.product_id = <product_id>``, built once per product (an expression is
    immutable): building the comparison cost ~a quarter of an empty product's listing
    (SQLAlchemy coerces it on each build; bench/README B1)."""
    return Device.product_id == product_id


def _filters(product: Product, q: DeviceQuery, dialect: str, *,
             large_groups: bool = False,
             large_tags: bool = False) -> list[ColumnElement[bool]]:
    """``large_groups``: the groups hold many devices, so membership is tested per device
    (``EXISTS`` on the membership's primary key) while a sort index is walked: a page needs
    a few probes. A small group is collected first (``IN``) and its few devices sorted:
    walking a million devices to find a hundred members would cost a scan."""
    conds: list[ColumnElement[bool]] = [_of_product(product.id)]
    if q.device_id:
        prefix = q.device_id.strip().lower()
        if HEX_PREFIX_RE.match(prefix):
            # a range on (product_id, id) instead of LIKE: indexed under any collation
            conds += [Device.id >= prefix, Device.id < prefix + "g"]
        else:
            conds.append(false())
    if q.device_name:
        conds.append(search.contains(dialect, Device.name, "name", q.device_name))
    if q.serial_number:
        conds.append(search.contains(dialect, Device.serial_number, "serial_number",
                                     q.serial_number))
    if q.groups:
        members = _group_members(product, q.groups, q.group_ids)
        if large_groups:
            conds.append(members.where(DeviceGroupMember.device_id == Device.id).exists())
        else:
            conds.append(Device.id.in_(members))
    if q.tags:
        conds += tag_rules.all_of(q.tags, per_device=large_tags)
    if q.cohort:
        conds.append(in_cohort(Device.id, product.id, q.cohort))
    for name in ("quarantined", "online", "development"):
        value = getattr(q, name)
        if value is not None:
            col = getattr(Device, name)  # bare when true: the partial indexes match it
            conds.append(col if value else col.is_(False))
    if q.firmware_version is not None:
        conds.append(Device.firmware_version == q.firmware_version)
    if q.search and q.search.strip():
        conds.append(Device.id.in_(_search(product, q.search.strip())))
    if q.where is not None:
        conds.append(q.where)
    return conds


def _prefix(column: Any, text: str) -> ColumnElement[bool]:
    """``column`` starts with ``text``: an index range (the ``(product_id, column)`` index
    serves it) that also states the prefix, so it is right under any collation."""
    return and_(column >= text, column < text + "\U0010ffff",
                column.startswith(text, autoescape=True))


def _search_ranges(product: Product, text: str) -> list[Any]:
    """One indexed range per column a search box matches by prefix (ID, name, serial)."""
    parts = [select(Device.id).where(Device.product_id == product.id,
                                     _prefix(Device.name, text)),
             select(Device.id).where(Device.product_id == product.id,
                                     _prefix(Device.serial_number, text))]
    lowered = text.lower()
    if HEX_PREFIX_RE.match(lowered):
        parts.append(select(Device.id).where(Device.product_id == product.id,
                                             Device.id >= lowered, Device.id < lowered + "g"))
    return parts


def _search(product: Product, text: str) -> Any:
    """Ids of the product's devices whose ID, name or serial number starts with ``text``:
    one indexed range each, united. (An OR of the three ranges was tried: SQLite's planner
    then walked a whole product index when its statistics were missing or coarse.)"""
    return union(*_search_ranges(product, text))


async def _count_search(db: AsyncSession, product: Product, text: str,
                        cap: int | None) -> int:
    """The devices the search box matches (:func:`_search`), counting at most ``cap + 1``.
    Capped, each range stops after ``cap + 1`` entries before they are united: a union is
    otherwise collected whole before anything counts it (11,111 prefix matches of a million
    devices cost two such unions per page, bench B15). Exact up to ``cap``; beyond, the
    answer exceeds ``cap`` as it should (a range alone already does)."""
    ranges = _search_ranges(product, text)
    if cap is not None:
        ranges = [select(r.limit(cap + 1).subquery().c.id) for r in ranges]
    united = union(*ranges).subquery()
    return int((await db.execute(select(func.count()).select_from(united))).scalar_one())


def _only_search(q: DeviceQuery, conds: list[ColumnElement[bool]]) -> str | None:
    """The search box's text when it is the listing's only filter (``conds``: the product
    and the search), else None."""
    text = (q.search or "").strip()
    return text if text and len(conds) == 2 else None


def _search_per_row(text: str, dialect: str) -> ColumnElement[bool]:
    """The device's ID, name or serial number starts with ``text``: the same test as
    :func:`_search`, made to be checked row by row while a sort index is walked (on SQLite
    the columns are written as ``column || ''``, which no index serves, so the planner
    walks the sort index rather than uniting the prefix ranges and sorting the matches)."""
    def opaque(column: Any) -> Any:  # SQLite: an expression no index of the column serves
        return column.concat("") if dialect == "sqlite" else column

    terms = [_prefix(opaque(Device.name), text), _prefix(opaque(Device.serial_number), text)]
    lowered = text.lower()
    if HEX_PREFIX_RE.match(lowered):
        ident = opaque(Device.id)
        terms.append(and_(ident >= lowered, ident < lowered + "g"))
    return or_(*terms)


async def _walked_search(db: AsyncSession, product: Product, q: DeviceQuery,
                         conds: list[ColumnElement[bool]], offset: int
                         ) -> list[ColumnElement[bool]] | None:
    """The conditions of a page that walks the sort index when the search box is the only
    filter and matches many devices (more than SEARCH_WALK: one device in 250 of a million
    or more, so a page of 100 is found within ~25,000 index entries, while collecting and
    sorting every match costs a row read per match: bench B15); None otherwise."""
    if not (q.search and q.search.strip()) or len(conds) != 2 or offset >= WALK_OFFSET:
        return None
    if await _count_search(db, product, q.search.strip(), SEARCH_WALK) <= SEARCH_WALK:
        return None
    return [conds[0], _search_per_row(q.search.strip(), db.get_bind().dialect.name)]


async def _bounded_walk(db: AsyncSession, product: Product, q: DeviceQuery, col: Any,
                        tie: Any, desc: bool, offset: int, limit: int) -> list[str] | None:
    """The page's ids when they lie among the first WALK_BOUND devices of the sort order
    (40 per row of a deeper page; descending, or by ID), else None. The last such device's
    sort key is read from the sort index (index entries only), then the filters are tested
    along that stretch of the index, memberships probed per device (``EXISTS``): the page
    costs at most that many row tests (it stops once the page is full), however many
    devices the filters match and however costly they are to gather or
    count (a dynamic group such as ``platform = argon and firmware >= 18`` matches 5 % of a
    fleet through no single index: collecting and sorting its matches read a third of the
    fleet). A filter matching too few devices returns None and is planned by its match
    count as before, having cost those row tests (~13 ms for 2,000 at a million devices,
    up to 40,000 on page 40)."""
    nullable = col is not Device.id
    if (nullable and not desc) or offset + limit > WALK_DEPTH:
        return None  # ascending starts with the devices without a value; deep pages
    order = [col.desc(), tie.desc()] if desc else [col.asc(), tie.asc()]
    if not nullable:
        order = order[:1]
    base: list[ColumnElement[bool]] = [Device.product_id == product.id]
    if nullable:
        base.append(col.is_not(None))
    edge = (await db.execute(select(col).where(*base).order_by(*order)
                             .offset(max(WALK_BOUND, 40 * (offset + limit))).limit(1))).first()
    if edge is None:
        return None  # a smaller product: the plans below cost little
    walked = replace(q, where=q.where_walked if q.where_walked is not None else q.where)
    conds = _filters(product, walked, db.get_bind().dialect.name, large_groups=True,
                     large_tags=True)
    bound = col >= edge[0] if desc else col <= edge[0]
    ids = await _slice(db, [*conds, *base[1:], bound], order, offset, limit)
    return ids if len(ids) == limit else None


@dataclass
class DevicePage:
    devices: list[Device]
    groups: dict[str, list[str]]
    owners: dict[str, str]
    customers: list[dict[str, Any]]
    total: int | None  # None when the query asked for no count
    page: int
    per_page: int
    targets: dict[str, int | None] = field(default_factory=dict)
    has_more: bool = False  # another page follows
    estimated: bool = False  # total is an estimate (beyond EXACT_COUNT_UP_TO)
    cohorts: dict[str, str] = field(default_factory=dict)  # device id -> cohort name
    # how many devices match, when the listing counted them on its way (exact up to
    # FEW_MATCHES; beyond, more than FEW_MATCHES); None when it did not
    counted: int | None = None

    def json(self) -> dict[str, Any]:
        assert self.total is not None
        return {
            "devices": [device_json(d, groups=self.groups.get(d.id, []),
                                    owner=self.owners.get(d.id), product=True,
                                    targeted=self.targets.get(d.id),
                                    cohort=self.cohorts.get(d.id))
                        for d in self.devices],
            "customers": self.customers,
            "meta": {**paging(self.page, self.per_page, self.total),
                     **({"total_is_estimate": True} if self.estimated else {})},
        }


async def _slice(db: AsyncSession, conds: list[ColumnElement[bool]], order: list[Any],
                 offset: int, limit: int, ident: Any = Device.id) -> list[str]:
    """The ids of one slice. Only ids: the offset walks the index, not the rows.
    ``ident``: the device id column of the table the conditions read (the devices, or a
    group's memberships: :func:`_group_slice`)."""
    if limit <= 0:
        return []
    return list((await db.execute(_slice_statement(conds, order, offset, limit, ident)))
                .scalars())


def _slice_statement(conds: list[ColumnElement[bool]], order: list[Any], offset: int,
                     limit: int, ident: Any = Device.id) -> Any:
    return select(ident).where(*conds).order_by(*order).offset(offset).limit(limit)


async def _few_matches_slice(db: AsyncSession, conds: list[ColumnElement[bool]], col: Any,
                             tie: Any, desc: bool, offset: int, limit: int) -> list[str]:
    """A filter matched few devices: collect them once (by whatever plan suits the filter),
    then sort that small set, rather than walk the sort index of the whole product
    checking the filter row by row. Same order as the indexed path."""
    m = (select(Device.id.label("id"), col.label("k"), tie.label("t")).where(*conds)
         .cte("matches").prefix_with("MATERIALIZED"))
    if desc:
        order = [m.c.k.is_(None), m.c.k.desc(), m.c.t.desc()]
    else:
        order = [m.c.k.is_not(None), m.c.k.asc(), m.c.t.asc()]
    q = select(m.c.id).order_by(*order).offset(offset).limit(limit)
    return list((await db.execute(q)).scalars())


async def _count(db: AsyncSession, conds: list[ColumnElement[bool]],
                 cap: int | None = None, members: Any = None, ident: Any = Device.id,
                 all_of: int | None = None) -> int:
    """Rows matching ``conds`` (counting at most ``cap + 1`` of them when ``cap`` is set).
    ``members``: the filter is only the product's groups, whose members (each device once:
    see :func:`_conditions`) are counted on the membership index instead (a group holds only
    its product's devices: removing a device from a product takes it out of the groups).
    ``ident``: the device id column of the table ``conds`` read (see :func:`_slice`).
    ``all_of``: ``conds`` are only this product's condition, counted by a statement built
    once."""
    if all_of is not None:
        params: dict[str, Any] = {"product_id": all_of}
        if cap is not None:
            params["cap"] = cap + 1
        return int((await _COUNT_ALL[cap is not None].rows(db, **params))[0][0])
    source = (select(members.c.device_id) if members is not None
              else select(ident).where(*conds))
    if cap is not None:
        source = source.limit(cap + 1)
    inner = source.subquery()
    return int((await db.execute(select(func.count()).select_from(inner))).scalar_one())


async def _count_of(db: AsyncSession, product: Product, q: DeviceQuery,
                    conds: list[ColumnElement[bool]], cap: int | None = None,
                    members: Any = None) -> int:
    """:func:`_count` of ``q``'s matches; the search box alone is counted by its ranges."""
    text = _only_search(q, conds)
    if text is not None:
        return await _count_search(db, product, text, cap)
    unfiltered = len(conds) == 1 and members is None  # the product alone (see _filters)
    return await _count(db, conds, cap, members, all_of=product.id if unfiltered else None)


def _count_all_statement(capped: bool) -> Select[Any]:
    """A product's devices counted (at most the parameter ``cap`` of them when ``capped``):
    an unfiltered listing's total, built once (building it cost about what running it does
    on a small product: bench/README B1)."""
    ids = select(Device.id).where(Device.product_id == bindparam("product_id"))
    if capped:
        ids = ids.limit(bindparam("cap"))
    return select(func.count()).select_from(ids.subquery())


_COUNT_ALL = {capped: LeanRead(_count_all_statement(capped)) for capped in (True, False)}


def _filter_key(product: Product, q: DeviceQuery) -> tuple[Any, ...]:
    return (product.id, q.device_id, q.device_name, q.serial_number,
            tuple(q.groups or ()), tuple(q.tags or ()), q.cohort, q.quarantined, q.online, q.development,
            q.firmware_version, q.search, q.where_key)


def _samplable(q: DeviceQuery, conds: list[ColumnElement[bool]],
               members: Any) -> list[ColumnElement[bool]] | None:
    """The filters (besides the product) a sample may estimate the matches of: not for an
    unfiltered listing, large groups counted on their membership, or the search box alone
    (counted by its own index ranges)."""
    if len(conds) > 1 and members is None and _only_search(q, conds) is None:
        return conds[1:]
    return None


async def _total(db: AsyncSession, product: Product, q: DeviceQuery,
                 conds: list[ColumnElement[bool]], members: Any = None) -> tuple[int, bool]:
    """The number of matches and whether it is an estimate: exact up to
    EXACT_COUNT_UP_TO (counting stops there), beyond it the last exact count of the same
    product and filters if younger than ESTIMATE_TTL_S. In a product of SAMPLE_FROM devices
    or more, filters a sample says match over SAMPLED_ABOVE devices are not counted on the
    request path at all: the sample's estimate is the total (the capped count alone reads
    rows until 10,001 matches are found: ~200,000 row tests for a dynamic group matching
    5 % of a million devices)."""
    return await estimates.count_or_estimate(
        db, _filter_key(product, q), product.id, _samplable(q, conds, members),
        lambda cap: _count_of(db, product, q, conds, cap, members), EXACT_COUNT_UP_TO,
        fresh_is_estimate=True)


async def count_product_devices(db: AsyncSession, product: Product, q: DeviceQuery,
                                cap: int | None = None) -> int:
    """How many of the product's devices match ``q`` (at most ``cap + 1`` are counted).
    With a ``cap`` under SAMPLED_ABOVE, a filter a sample puts above SAMPLED_ABOVE (see
    :func:`_total`) is answered ``cap + 1`` without counting."""
    q = await _with_dynamic_groups(db, product, q)
    conds, members = await _conditions(db, product, q)
    sample = _samplable(q, conds, members)
    if cap is not None and cap < estimates.SAMPLED_ABOVE and sample is not None:
        sampled = await estimates.sampled(db, _filter_key(product, q), product.id, sample)
        if sampled is not None and sampled > estimates.SAMPLED_ABOVE:
            return cap + 1
    return await _count_of(db, product, q, conds, cap, members)


async def _two_part_slice(db: AsyncSession, first: tuple[list[Any], list[Any]],
                          second: tuple[list[Any], list[Any]], offset: int,
                          limit: int, ident: Any = Device.id) -> list[str]:
    """A slice across two consecutive parts (``(conditions, order)`` each). The size of the
    first part is only counted when the slice starts beyond it."""
    ids = await _slice(db, first[0], first[1], offset, limit, ident)
    if len(ids) == limit:
        return ids
    # an empty first slice from the start: the first part is empty, nothing to count
    first_n = offset + len(ids) if ids or not offset else await _count(db, first[0],
                                                                       ident=ident)
    return ids + await _slice(db, second[0], second[1], max(0, offset - first_n),
                              limit - len(ids), ident)


# a static group's memberships carry copies of their device's sort keys (kept by the
# database's triggers, migration 0041), each indexed (group, key, device)
MEMBER_SORT_KEYS: dict[str, Any] = {
    "deviceId": DeviceGroupMember.device_id, "deviceName": DeviceGroupMember.device_name,
    "firmwareVersion": DeviceGroupMember.device_firmware_version,
    "lastConnection": DeviceGroupMember.device_last_heard,
}


def _sorted_parts(conds: list[ColumnElement[bool]], col: Any, tie: Any, desc: bool,
                  valued_only: Sequence[ColumnElement[bool]] = ()
                  ) -> tuple[tuple[list[Any], list[Any]], tuple[list[Any], list[Any]]]:
    """The two indexed parts of a sort by the nullable ``col`` (see
    :func:`list_product_devices`), in the order they are listed; ``valued_only``: more
    conditions of the part with a value."""
    valued = ([*conds, col.is_not(None), *valued_only],
              [col.desc(), tie.desc()] if desc else [col.asc(), tie.asc()])
    empty = ([*conds, col.is_(None)], [tie.desc() if desc else tie.asc()])
    return (valued, empty) if desc else (empty, valued)


async def _group_slice(db: AsyncSession, group_id: int, sort_attr: str, desc: bool,
                       offset: int, limit: int) -> list[str]:
    """A slice of one static group's devices, read from the group's membership index in the
    sort order (the copies of the devices' keys: :data:`MEMBER_SORT_KEYS`): the offset
    walks that group's index entries only. The order is the devices' (key, then device id;
    a missing key the smallest), so the page is the one the devices' own indexes give."""
    member = DeviceGroupMember
    col = MEMBER_SORT_KEYS[sort_attr]
    conds: list[ColumnElement[bool]] = [member.group_id == group_id]
    if col is member.device_id:
        return await _slice(db, conds, [col.desc() if desc else col.asc()], offset, limit,
                            member.device_id)
    first, second = _sorted_parts(conds, col, member.device_id, desc)
    return await _two_part_slice(db, first, second, offset, limit, member.device_id)


def _heard_range(q: DeviceQuery, col: Any) -> list[ColumnElement[bool]]:
    """When the listing is sorted by last heard: the range its filters imply on it
    (``q.heard``), as conditions the (product, last heard) index can start from."""
    if col is not Device.last_heard or q.heard is None:
        return []
    lo, hi = q.heard
    return [*([] if lo is None else [col >= lo]), *([] if hi is None else [col <= hi])]


async def list_product_devices(db: AsyncSession, product: Product,
                               q: DeviceQuery) -> DevicePage:
    """One page of the product's devices, filtered and sorted.

    Sorting by a nullable column runs as two indexed queries (rows with a value, ordered by
    ``(column, tiebreak)``; rows without, by the tiebreak alone) instead of one
    ``NULLS LAST`` sort, so a million never-connected devices do not turn every page into a
    full sort. A missing value sorts as the smallest (last in ``desc``) on SQLite and
    PostgreSQL alike. The page's ids are found first (one more than the page, to know
    whether another follows), then its rows are loaded by id. ``q.count`` False skips the
    exact total, the costly part of a page of a huge product.
    """
    q = await _with_dynamic_groups(db, product, q)
    conds, members = await _conditions(db, product, q)
    col = SORT_ATTRS[q.sort_attr]
    desc = q.sort_dir == "desc"
    offset, limit = (q.page - 1) * q.per_page, q.per_page + 1
    # equal sort keys are ordered by device id, on every database: every sort index is
    # (product_id, column, id), so it gives the full order without a sort (SQLite's rowid,
    # used before, sorted each firmware version's 50,000 devices of a million: bench B3)
    tie = Device.id
    total, estimated = await _total(db, product, q, conds, members) if q.count else (None, False)
    # past the last match (an empty product's only page, say): nothing more to read
    beyond = total is not None and not estimated and offset >= total
    walked = None if beyond else await _walked_search(db, product, q, conds, offset)
    page_ids: list[str] | None = [] if beyond else None
    few = False
    # the matches when this listing learns their number on its way (exact up to
    # FEW_MATCHES, beyond it more than FEW_MATCHES): a caller's bounded count needs no count
    counted = total if total is not None and not estimated else None
    if walked is not None:  # a search matching many devices: walk the sort index
        conds = walked
    elif members is not None:  # only large groups: more than FEW_MATCHES memberships
        if counted is None and q.group_ids is not None and len(q.group_ids) == 1:
            counted = FEW_MATCHES + 1  # one group's memberships are as many devices
    else:
        # not for the search box (walked its own way), name or serial substrings (their
        # search index gathers the matches anyway), quarantined or online devices (few by
        # nature, each has its own index): a walk that fails costs WALK_BOUND row reads
        if page_ids is None and len(conds) > 1 and not (q.search and q.search.strip()) \
                and not q.quarantined and not q.online and not q.device_name \
                and not q.serial_number:
            page_ids = await _bounded_walk(db, product, q, col, tie, desc, offset, limit)
        if page_ids is None and len(conds) > 1:
            n = total if total is not None else await _count_of(db, product, q, conds,
                                                                  FEW_MATCHES)
            counted = n if total is None else counted
            few = n <= FEW_MATCHES
    if page_ids is not None:
        pass  # found along the sort index
    elif few:
        page_ids = await _few_matches_slice(db, conds, col, tie, desc, offset, limit)
    elif members is not None and q.group_ids is not None and len(q.group_ids) == 1:
        # one large static group alone: read in order from its memberships (walking the
        # product's sort index probed ~10 devices per member of a 10 % group: bench B3)
        page_ids = await _group_slice(db, q.group_ids[0], q.sort_attr, desc, offset, limit)
    elif col is Device.id:
        page_ids = await _slice(db, conds, [Device.id.desc() if desc else Device.id.asc()],
                                offset, limit)
    else:
        first, second = _sorted_parts(conds, col, tie, desc, _heard_range(q, col))
        page_ids = await _two_part_slice(db, first, second, offset, limit)
    has_more = len(page_ids) > q.per_page
    if not has_more and (page_ids or not offset):  # the last page: the matches end here
        counted = offset + len(page_ids)
    page_ids = page_ids[:q.per_page]
    rows = {d.id: d for d in (await db.execute(
        select(Device).where(Device.id.in_(page_ids)))).scalars()} if page_ids else {}
    devices = [rows[i] for i in page_ids if i in rows]
    groups, cohorts, targets = await _memberships(db, product.id, devices)
    owners = await owner_names(db, devices)
    customer_ids = sorted({d.customer_id for d in devices if d.customer_id is not None})
    customers: list[dict[str, Any]] = []
    if customer_ids:
        customers = [{"id": cid, "username": email} for cid, email in (await db.execute(
            select(Customer.id, Customer.email).where(Customer.id.in_(customer_ids))
            .order_by(Customer.id))).all()]
    return DevicePage(devices, groups, owners, customers, total, q.page, q.per_page,
                      targets, has_more=has_more, estimated=estimated, cohorts=cohorts,
                      counted=counted)


# --- updating a device -------------------------------------------------------------------------

def clean_device_name(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_NAME_RE.match(value):
        raise BadRequest("name must be 1-64 letters, digits, '-' or '_'",
                         code="invalid_request")
    if is_device_id(value):
        raise BadRequest("name must not look like a device ID", code="invalid_request")
    return value


async def _check_name_free(db: AsyncSession, device: Device, name: str) -> None:
    """Names are unique among one owner's devices (the CLI addresses devices by name)."""
    if device.owner_user_id is not None:
        scope = Device.owner_user_id == device.owner_user_id
    elif device.customer_id is not None:
        scope = Device.customer_id == device.customer_id
    else:
        return
    taken = (await db.execute(select(Device.id).where(
        scope, Device.name == name, Device.id != device.id).limit(1))).first()
    if taken:
        raise BadRequest(f"You already have a device named {name!r}", code="name_taken")


def may_mark_development(subject: Subject, role: Role | None) -> bool:
    """Development devices are exempt from releases: whoever may release firmware decides."""
    if role is not None:
        return role_allows(role, "firmware:release")
    return "firmware:release" in subject.scopes


async def update_device(db: AsyncSession, *, actor: Subject, ip: str, device: Device,
                        req: DeviceChange, product: Product | None = None,
                        role: Role | None = None) -> dict[str, Any]:
    """Apply a device PUT: ``req`` is a :class:`ProductDeviceChange` on the product route
    (with the device's ``product`` and the caller's ``role``). Everything is validated
    before anything changes. Returns ``{"id", <changed fields>, "updated_at"}``."""
    sent = req.model_fields_set
    if not sent:
        fields = set(type(req).model_fields) - DeviceChange.FLASH_FIELDS
        raise BadRequest(f"Nothing to update: send {', '.join(sorted(fields))}",
                         code="invalid_request")
    changes: dict[str, Any] = {}
    if "name" in sent:
        changes["name"] = clean_device_name(req.name)
        await _check_name_free(db, device, changes["name"])
    if "notes" in sent:
        changes["notes"] = req.notes
    if "firmware_updates_forced" in sent:
        changes["firmware_updates_forced"] = bool(req.firmware_updates_forced)
    on_product = isinstance(req, ProductDeviceChange)
    if isinstance(req, ProductDeviceChange) and "development" in sent:
        changes["development"] = bool(req.development)
        if not may_mark_development(actor, role):
            raise Forbidden("Marking development devices needs the firmware:release "
                            "permission", code="forbidden", required="firmware:release")
    if isinstance(req, ProductDeviceChange) and "quarantined" in sent:
        if req.quarantined:
            raise BadRequest("A device cannot be put in quarantine by hand; deny it with "
                             "DELETE and deny=true", code="invalid_request")
        changes["quarantined"] = False
    group_names = None
    tag_names = None
    lock = None
    if on_product:
        assert isinstance(req, ProductDeviceChange)
        if "groups" in sent:
            group_names = group_rules.clean_group_names(req.groups)
        if "tags" in sent:
            tag_names = tag_rules.clean_tags(req.tags)
        if sent & {"desired_firmware_version", "flash"}:
            from corral.firmware import releases as firmware

            assert product is not None, "firmware locks are set on the product route"
            lock = await firmware.parse_lock(db, actor=actor, role=role, product=product,
                                             device=device, req=req)

    out: dict[str, Any] = {"id": device.id}
    for key, value in changes.items():
        setattr(device, key, value)
        out[key] = value
    if changes.get("quarantined") is False:
        device.denied = False
    if group_names is not None:
        assert product is not None, "groups are set on the product route"
        out["groups"] = await group_rules.set_device_groups(
            db, actor=actor, ip=ip, product=product, device_id=device.id, names=group_names)
    if tag_names is not None:
        out["tags"] = await tag_rules.set_device_tags(db, device, tag_names)
    if lock is not None:
        assert product is not None
        out.update(await firmware.apply_lock(db, actor=actor, ip=ip, product=product,
                                             device=device, req=lock))
    device.updated_at = clock.now()
    await db.flush()
    out["updated_at"] = clock.iso(device.updated_at)
    audit.record(db, actor=actor, ip=ip, action="device.updated",
                 org_id=product.org_id if product else None,
                 product_id=device.product_id, target_type="device", target_id=device.id,
                 details={"fields": sorted(k for k in out if k not in ("id", "updated_at"))})
    return out


async def remove_product_device(db: AsyncSession, *, actor: Subject, ip: str,
                                product: Product, device: Device, deny: bool) -> None:
    """``deny``: the device stays, denied, so it is refused when it connects. Otherwise it
    leaves the product: an owned device stays as its owner's developer device; an unowned
    one is forgotten."""
    if deny:
        device.denied, device.quarantined = True, False
        device.updated_at = clock.now()
        signals.disconnect(db, device.id, "The device was denied by its product")
        await db.flush()
        audit.record(db, actor=actor, ip=ip, action="device.denied", org_id=product.org_id,
                     product_id=product.id, target_type="device", target_id=device.id)
        return
    await group_rules.clear_device_groups(db, [device.id])
    kept = device.owner_user_id is not None
    signals.disconnect(db, device.id, "The device was removed from its product")
    audit.record(db, actor=actor, ip=ip, action="device.removed", org_id=product.org_id,
                 product_id=product.id, target_type="device", target_id=device.id,
                 details={"kept_by_owner": kept})
    if kept:
        device.product_id = None
        device.customer_id = None
        device.development = device.quarantined = device.denied = False
        device.desired_firmware_version = None
        device.updated_at = clock.now()
    else:
        await db.delete(device)
    await db.flush()


async def require_in_product(db: AsyncSession, product: Product, ids: list[str]) -> None:
    """400 listing the devices of ``ids`` (lowercase) that are not in ``product``."""
    present: set[str] = set()
    for i in range(0, len(ids), CHUNK):
        present.update((await db.execute(select(Device.id).where(
            Device.product_id == product.id, Device.id.in_(ids[i:i + CHUNK])))).scalars())
    missing = [d for d in ids if d not in present]
    if missing:
        raise BadRequest(f"{len(missing)} device(s) are not in this product",
                         code="invalid_request", deviceIds=missing[:1000])


async def batch_update(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                       req: BatchChange) -> None:
    """``{"action":"groups"|"tags","devices":[ids],"metadata":{"add":[...],"remove":[...]}}``:
    every device must be in the product, else nothing is written."""
    raw = req.devices
    if not raw:
        raise BadRequest("devices must list at least one device ID", code="invalid_request")
    bad = [d for d in raw if not is_device_id(d)]
    if bad:
        raise BadRequest("devices must be device IDs (24 hex characters)",
                         code="invalid_request", invalidDeviceIds=bad[:100])
    ids = list(dict.fromkeys(d.lower() for d in raw))
    what = req.action  # groups | tags
    clean = group_rules.clean_group_names if what == "groups" else tag_rules.clean_tags
    add = clean(req.metadata.add, field="metadata.add")
    remove = clean(req.metadata.remove, field="metadata.remove")
    if not add and not remove:
        raise BadRequest(f"metadata must name {what} to add or remove", code="invalid_request")
    both = sorted(set(add) & set(remove))
    if both:
        raise BadRequest(f"{what.capitalize()} both added and removed: {', '.join(both)}",
                         code="invalid_request")
    await require_in_product(db, product, ids)
    apply = group_rules.batch_groups if what == "groups" else tag_rules.batch_tags
    await apply(db, actor=actor, ip=ip, product=product, device_ids=ids, add=add,
                remove=remove)


# --- a user's or customer's own devices --------------------------------------------------------

async def my_devices(db: AsyncSession, subject: Subject) -> list[dict[str, Any]]:
    """The caller's own devices (a customer: those claimed to them), by last handshake."""
    if subject.kind == "user":
        cond = Device.owner_user_id == subject.user_id
    elif subject.kind == "customer":
        cond = Device.customer_id == subject.customer_id
    else:
        raise api_users_not_allowed()
    rows = list((await db.execute(select(Device).where(cond).order_by(
        Device.last_handshake_at.desc().nulls_last(), Device.id))).scalars())
    # a device in a product of a locked or inactive organization stays the caller's (its
    # owner still reaches it) but is marked: its product's routes answer 402
    in_products = {d.product_id for d in rows if d.product_id is not None}
    org_of: dict[int, int] = {}
    if in_products:
        org_of = {int(pid): int(oid) for pid, oid in (await db.execute(
            select(Product.id, Product.org_id).where(Product.id.in_(in_products)))).all()}
    shut = await billing_locks.shut_statuses(db, org_of.values())
    return [billing_locks.mark(device_json(d, owner=subject.username),
                               shut.get(org_of.get(d.product_id or 0, 0)))
            for d in rows]


# --- admission (called by the device-session core) ---------------------------------------------

Decision = Literal["accepted", "quarantined", "denied", "unknown_device", "unknown_product",
                  "wrong_product"]


@dataclass
class Admission:
    decision: Decision
    device: Device | None
    reason: str

    @property
    def accepted(self) -> bool:
        return self.decision == "accepted"


def _insert_ignoring_existing(db: AsyncSession, values: dict[str, Any]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for a device row (SQLite and PostgreSQL)."""
    if db.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(Device).values(**values).on_conflict_do_nothing(index_elements=["id"])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(Device).values(**values).on_conflict_do_nothing(index_elements=["id"])


def _state(device: Device) -> Admission:
    decision, reason = known_state(denied=device.denied, quarantined=device.quarantined)
    return Admission(decision, device, reason)


def known_state(*, denied: bool, quarantined: bool) -> tuple[Decision, str]:
    """The decision for a device its product already knows."""
    if denied:
        return "denied", "The device was denied by its product"
    if quarantined:
        return "quarantined", "The device waits for approval in quarantine"
    return "accepted", "The device is known"


def admission_without_writes(row_product_id: int | None, *, denied: bool, quarantined: bool,
                             claimed_product_id: int | None) -> tuple[Decision, str] | None:
    """:func:`admit`'s answer for a device row already read, when it needs no write: the
    device is in the product its firmware claims (or a developer device that claims none).
    ``None`` means "ask :func:`admit`" (an unknown device, a device moving product, a
    product ID to check). The connection path reads the row once and decides here."""
    if claimed_product_id is None:
        if row_product_id is None:
            return "accepted", "A developer device"
        return known_state(denied=denied, quarantined=quarantined)
    if row_product_id == claimed_product_id:
        return known_state(denied=denied, quarantined=quarantined)
    return None


async def _owner_on_team(db: AsyncSession, user_id: int, product: Product) -> bool:
    return (await db.execute(select(Membership.id).where(
        Membership.user_id == user_id,
        or_(and_(Membership.org_id == product.org_id, Membership.product_id.is_(None)),
            Membership.product_id == product.id)).limit(1))).first() is not None


async def admit(db: AsyncSession, *, device_id: str, product_id: int | None,
                platform_id: int | None = None) -> Admission:
    """May this device connect, claiming ``product_id`` (from its firmware)?

    A device unknown to the product is quarantined or auto-approved as the product's
    ``quarantine`` setting says (created either way). A device of another product, or the
    developer device of someone outside the product team, is ``wrong_product``.
    """
    if not is_device_id(device_id):
        return Admission("unknown_device", None, "Not a device ID")
    did = device_id.lower()
    device = await db.get(Device, did)
    if product_id is None:
        if device is None:
            return Admission("unknown_device", None, "The device is not known")
        return _state(device) if device.product_id is not None else Admission(
            "accepted", device, "A developer device")
    product = await db.get(Product, product_id)
    if product is None:
        return Admission("unknown_product", device, f"There is no product {product_id}")
    if device is not None:
        if device.product_id == product.id:
            return _state(device)
        if device.product_id is not None:
            return Admission("wrong_product", device,
                             f"The device belongs to another product ({device.product_id})")
        if device.owner_user_id is not None and not await _owner_on_team(
                db, device.owner_user_id, product):
            return Admission("wrong_product", device,
                             "The device belongs to someone outside this product's team")
    quarantine = bool((product.settings or {}).get("quarantine", True))
    now = clock.now()
    if device is None:
        values = {"id": did, "product_id": product.id, "quarantined": quarantine,
                  "platform_id": platform_id if platform_id is not None else product.platform_id,
                  "tags": [], "created_at": now, "updated_at": now}
        res = await db.execute(_insert_ignoring_existing(db, values))
        if not res.rowcount:  # type: ignore[attr-defined]
            # another connection created it meanwhile: decide on that row
            return await admit(db, device_id=did, product_id=product_id,
                               platform_id=platform_id)
        device = await db.get(Device, did)
        assert device is not None
    else:
        device.product_id, device.quarantined, device.denied = product.id, quarantine, False
        if platform_id is not None and not device.platform_id:
            device.platform_id = platform_id
        device.updated_at = now
        await db.flush()
    action = "device.quarantined" if quarantine else "device.auto_approved"
    audit.record(db, actor=None, ip=None, action=action, org_id=product.org_id,
                 product_id=product.id, target_type="device", target_id=did,
                 details={"platform_id": device.platform_id})
    if quarantine:
        return Admission("quarantined", device,
                         "Unknown to the product; quarantined until approved")
    return Admission("accepted", device, "Unknown to the product; approved automatically")


# --- presence and billing facts ----------------------------------------------------------------

async def _refresh_if_loaded(db: AsyncSession, device_id: str) -> None:
    """Keep a copy of the row this session already holds current (no lazy loads in async)."""
    loaded = db.identity_map.get(db.identity_key(Device, device_id))
    if loaded is not None:
        await db.refresh(loaded)


async def mark_online(db: AsyncSession, device_id: str, *, at: dt.datetime,
                      ip: str | None = None) -> bool:
    """The device connected. ``first_online_at`` is set only the first time (billing counts a
    device from then). False when there is no such device."""
    values: dict[str, Any] = {
        "online": True, "last_heard": at, "last_handshake_at": at,
        "first_online_at": func.coalesce(Device.first_online_at,
                                         literal(at, Device.first_online_at.type)),
    }
    if ip is not None:
        values["last_ip_address"] = ip[:64]
    did = device_id.lower()
    res = await db.execute(update(Device).where(Device.id == did).values(**values)
                           .execution_options(synchronize_session=False))
    await _refresh_if_loaded(db, did)
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def mark_offline(db: AsyncSession, device_id: str, *, at: dt.datetime) -> bool:
    """The device disconnected (it was last heard at ``at``)."""
    did = device_id.lower()
    res = await db.execute(update(Device).where(Device.id == did)
                           .values(online=False, last_heard=at)
                           .execution_options(synchronize_session=False))
    await _refresh_if_loaded(db, did)
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def touch(db: AsyncSession, device_ids: Sequence[str], *, at: dt.datetime) -> None:
    """Many devices were heard from (bulk ``last_heard``; cheap, no session sync)."""
    ids = sorted({d.lower() for d in device_ids})
    for i in range(0, len(ids), CHUNK):
        await db.execute(update(Device).where(Device.id.in_(ids[i:i + CHUNK]))
                         .values(last_heard=at)
                         .execution_options(synchronize_session=False))


async def touch_each(db: AsyncSession, heard: Mapping[str, dt.datetime]) -> None:
    """Each device was last heard at its own time (one executemany; only online devices,
    so a late flush never moves ``last_heard`` past a disconnect)."""
    if not heard:
        return
    stmt = (update(Device.__table__)  # type: ignore[arg-type]
            .where(and_(Device.__table__.c.id == bindparam("did"),
                        Device.__table__.c.online))
            .values(last_heard=bindparam("at")))
    rows = [{"did": d.lower(), "at": at} for d, at in sorted(heard.items())]
    for i in range(0, len(rows), CHUNK):
        await db.execute(stmt.execution_options(synchronize_session=False), rows[i:i + CHUNK])


__all__ = ["Admission", "DeviceQuery", "admit", "batch_update", "device_view",
           "list_product_devices", "mark_offline", "mark_online", "my_devices",
           "parse_device_query", "remove_product_device", "touch", "touch_each", "update_device"]


async def preview_query(db: AsyncSession, product: Product, text: Any,
                        per_page: int = 25) -> dict[str, Any]:
    """How many of the product's devices a group query matches now, and the first page of
    them (most recently heard first), without saving anything."""
    query = await group_rules.check_query(db, product, text)
    scope = await dynquery.load_scope(db, product.id, query, strict=True)
    cond = dynquery.compile_query(query, scope)
    page = await list_product_devices(db, product, DeviceQuery(
        per_page=per_page, where=cond, where_key=f"preview:{query.text}",
        heard=dynquery.heard_span(query, scope.now)))
    out = page.json()
    return {"query": query.text, "device_count": page.total,
            "device_count_is_estimate": page.estimated, "devices": out["devices"],
            "meta": out["meta"]}
