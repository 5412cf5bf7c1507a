"""DeviceGuard: resolve ``{device_id}`` (24-hex id, or a name the caller owns) and authorize.

Who may act on a device reached outside a product path (``/v1/devices/{device_id}``):

* its **owner** (the user who claimed it) — every device permission;
* a **customer** it is claimed to — the permissions in ``CUSTOMER_DEVICE_PERMISSIONS``;
* a member of its **product** — whatever the product policy grants;
* anyone else — 404, as if it did not exist.

Inside a product path (``/v1/products/{product}/devices/{device_id}``) the product guard has
already decided; :func:`product_device` only checks the device belongs to that product.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.deps import Ctx
from corral.auth.guards import Guard, tenant_facts
from corral.auth.policy import Role
from corral.auth.subject import Subject
from corral.devices.models import Device
from corral.kit.errors import Forbidden, NotFound
from corral.products.access import (
    ROLE_USER,
    ProductCtx,
    authorize_loaded,
    is_person,
    load_product,
    prebuilt,
    role_columns,
    strongest,
)
from corral.products.models import Product

DEVICE_ID_RE = re.compile(r"^[0-9a-fA-F]{24}$")

CUSTOMER_DEVICE_PERMISSIONS = frozenset({
    "devices:get", "devices:list", "devices:update", "devices.function:call",
    "devices.variable:get", "events:get", "events:send",
})


def is_device_id(value: str) -> bool:
    return bool(DEVICE_ID_RE.match(value))


@dataclass
class DeviceCtx:
    ctx: Ctx
    device: Device
    product: Product | None
    role: Role | None  # the caller's role on the product, when that is what allowed it
    via: str  # owner | customer | product

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


async def find_device(db: AsyncSession, key: str, subject: Subject | None) -> Device | None:
    """By id (any case); else by name among the caller's own devices."""
    if is_device_id(key):
        return await db.get(Device, key.lower())
    if subject is None:
        return None
    q = select(Device).where(Device.name == key)
    if subject.kind == "customer":
        q = q.where(Device.customer_id == subject.customer_id)
    elif subject.user_id is not None:
        q = q.where(Device.owner_user_id == subject.user_id)
    else:
        return None
    return (await db.execute(q.limit(1))).scalar_one_or_none()


Loaded = tuple[Product, Role | None, list[Any]]  # what load_product reads


async def load_device(db: AsyncSession, device_id: str, subject: Subject
                      ) -> tuple[Device, Loaded | None] | None:
    """The device ``device_id`` (24 hex digits, any case) and, in the same query, its
    product, the caller's strongest role on it and the tenant facts (what
    :func:`authorize_device` needs; None for a device in no product); None if there is no
    such device."""
    people = is_person(subject)
    q, nfacts = prebuilt(("device", people), lambda: _device_statement(people))
    params: dict[str, Any] = {"device_id": device_id.lower()}
    if people:
        params[ROLE_USER] = subject.user_id
    rows = (await db.execute(q, params)).all()
    if not rows:
        return None
    device, product = rows[0][0], rows[0][1]
    if product is None:
        return device, None
    return device, (product, strongest(rows, people), list(rows[0][2:2 + nfacts]))


def _device_statement(people: bool) -> tuple[Select[Any], int]:
    facts = tenant_facts(Product.org_id)
    q = (select(Device, Product, *facts)
         .outerjoin(Product, Product.id == Device.product_id)
         .where(Device.id == bindparam("device_id")))
    return (role_columns(q) if people else q), len(facts)


async def authorize_device(db: AsyncSession, subject: Subject, device: Device,
                           permission: str, loaded: Loaded | None = None
                           ) -> tuple[Product | None, Role | None, str]:
    """How the caller may do ``permission`` on ``device`` (see the module doc), or 404/403;
    ``loaded``: its product as :func:`load_device` read it (else read here)."""
    if subject.kind == "user" and device.owner_user_id == subject.user_id:
        product = await db.get(Product, device.product_id) if device.product_id else None
        return product, None, "owner"
    if subject.kind == "customer" and device.customer_id == subject.customer_id:
        if permission not in CUSTOMER_DEVICE_PERMISSIONS:
            raise Forbidden("Customers may not do this", code="forbidden", required=permission)
        return None, None, "customer"
    if subject.kind == "customer":  # another customer's device does not exist for them
        raise NotFound("Device not found")
    if device.product_id is None:
        raise NotFound("Device not found")
    # the product, the caller's role on it and the tenant facts in one query
    found = loaded or await load_product(db, str(device.product_id), subject)
    assert found is not None
    product, role, facts = found
    try:
        role = await authorize_loaded(db, subject, product, role, facts, permission)
    except NotFound:
        raise NotFound("Device not found") from None
    return product, role, "product"


class DeviceGuard(Guard):
    """Depend on ``DeviceGuard("devices:get")`` in a route with a ``{device_id}`` path part."""

    scope = "device"
    path_param = "device_id"

    async def __call__(self, device_id: str, request: Request) -> DeviceCtx:
        return await self.resolve(await self.context(request), device_id)

    async def resolve(self, ctx: Ctx, device_id: str) -> DeviceCtx:
        """The device ``device_id`` if the caller may do ``permission`` on it."""
        loaded: Loaded | None = None
        if is_device_id(device_id):  # the device and its product in one query
            found = await load_device(ctx.db, device_id, ctx.me)
            device, loaded = found if found is not None else (None, None)
        else:
            device = await find_device(ctx.db, device_id, ctx.me)
        if device is None:
            raise NotFound("Device not found")
        product, role, via = await authorize_device(ctx.db, ctx.me, device, self.permission,
                                                    loaded)
        return DeviceCtx(ctx=ctx, device=device, product=product, role=role, via=via)


async def product_device(pc: ProductCtx, device_id: str) -> Device:
    """The device ``device_id`` of the guarded product, or 404."""
    if not is_device_id(device_id):
        raise NotFound("Device not found")
    device = await pc.db.get(Device, device_id.lower())
    if device is None or device.product_id != pc.product.id:
        raise NotFound("Device not found")
    return device

