"""Which devices hold the latest version of a cloud-to-device ledger (the API's
``GET .../ledgers/:name/devices`` and the console's ledger page).

A device is *in sync* when it acknowledged the version it was last sent and the instances
that version was made of (owner, product, device) have not changed since; otherwise it is
*behind*: offline since the change, not taking ledgers, or not yet acknowledging. Computed
in one query per page: the current instance versions come from correlated subqueries.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, and_, cast, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.devices.models import Device
from corral.kit import clock
from corral.kit.errors import BadRequest
from corral.kit.responses import paging
from corral.ledgers import schemas as S
from corral.ledgers.models import LedgerDefinition, LedgerInstance
from corral.ledgers.sync_models import LedgerDeviceState
from corral.orgs.models import Organization
from corral.products.models import Product


@dataclass(frozen=True)
class DeviceSync:
    device_id: str
    name: str | None
    product_id: int | None
    sent_version: int  # the last version it was sent (0: none)
    applied_version: int | None
    latest_version: int  # what it should hold now (0: the ledger has no document for it)
    sent_at: dt.datetime | None
    applied_at: dt.datetime | None

    @property
    def in_sync(self) -> bool:
        return self.latest_version == 0 or self.applied_version == self.latest_version

    def json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "name": self.name, "product_id": self.product_id,
                "latest_version": self.latest_version, "sent_version": self.sent_version,
                "applied_version": self.applied_version, "in_sync": self.in_sync,
                "sent_at": clock.iso(self.sent_at), "applied_at": clock.iso(self.applied_at)}


def _level_version(ledger: LedgerDefinition, level: str, key: Any) -> ColumnElement[Any]:
    return func.coalesce(select(LedgerInstance.version).where(
        LedgerInstance.ledger_id == ledger.id, LedgerInstance.level == level,
        LedgerInstance.scope_key == key).scalar_subquery(), 0)


def current_source(ledger: LedgerDefinition) -> ColumnElement[str]:
    """``"o.p.d"`` for each device row: the instance versions its document is made of now
    (as :func:`corral.ledgers.service.effective_for_device` reads them)."""
    owner = _level_version(ledger, S.OWNER, str(ledger.org_id))
    product: ColumnElement[Any] = literal(0)
    device: ColumnElement[Any] = literal(0)
    if ledger.scope in (S.PRODUCT, S.DEVICE):
        # a device in no product matches no product instance: 0
        product = _level_version(ledger, S.PRODUCT, cast(Device.product_id, String))
    if ledger.scope == S.DEVICE:
        device = _level_version(ledger, S.DEVICE, Device.id)
    return (cast(owner, String) + "." + cast(product, String) + "." + cast(device, String))


def _reach(org: Organization) -> ColumnElement[bool]:
    """The devices an organization's ledgers reach: its products' devices, and for a
    personal organization its owner's developer devices."""
    in_products = Device.product_id.in_(select(Product.id).where(Product.org_id == org.id))
    if org.personal:
        return or_(in_products, and_(Device.product_id.is_(None),
                                     Device.owner_user_id == org.owner_user_id))
    return in_products


async def device_syncs(db: AsyncSession, org: Organization, ledger: LedgerDefinition, *,
                       product_id: int | None = None, behind: bool = False, page: int = 1,
                       per_page: int = 25) -> tuple[list[DeviceSync], dict[str, Any]]:
    if ledger.direction != S.CLOUD_TO_DEVICE:
        raise BadRequest(f"Ledger {ledger.name!r} is not synced to devices (its direction "
                         f"is {ledger.direction})", code="ledger_not_synced")
    source = current_source(ledger).label("source_now")
    st = LedgerDeviceState
    joined = and_(st.device_id == Device.id, st.ledger_id == ledger.id)
    cond: list[ColumnElement[bool]] = [_reach(org)]
    if product_id is not None:
        cond.append(Device.product_id == product_id)
    if behind:
        unwritten = "0.0.0"
        cond.append(and_(source != unwritten, or_(
            st.device_id.is_(None), st.applied_version.is_(None),
            st.applied_version != st.version, st.source != source)))
    base = select(Device.id).outerjoin(st, joined).where(*cond)
    total = (await db.execute(select(func.count()).select_from(base.subquery()))).scalar_one()
    rows = (await db.execute(
        select(Device.id, Device.name, Device.product_id, st.version, st.source,
               st.applied_version, st.sent_at, st.applied_at, source)
        .outerjoin(st, joined).where(*cond).order_by(Device.id)
        .offset((page - 1) * per_page).limit(per_page))).all()
    out = []
    for did, name, pid, sent, src, applied, sent_at, applied_at, now in rows:
        sent = sent or 0
        latest = 0 if now == "0.0.0" else (sent if src == now else sent + 1)
        out.append(DeviceSync(did, name, pid, sent, applied, latest, clock.aware(sent_at),
                              clock.aware(applied_at)))
    return out, paging(page, per_page, total)


__all__ = ["DeviceSync", "current_source", "device_syncs"]
