"""``GET /v1/ledgers/:name/devices``, ``/v1/orgs/:org/ledgers/:name/devices`` and
``/v1/products/:product/ledgers/:name/devices`` (corral's own, beyond Particle): each device's sent and applied version of a cloud-to-device ledger,
and which devices are behind (:mod:`corral.ledgers.sync_status`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import AliasChoices, Field

from corral.db.session import TransactionRoute
from corral.kit.body import Flag, Int, RequestModel, query
from corral.kit.errors import NotFound
from corral.kit.responses import Answer, answers
from corral.ledgers import service
from corral.ledgers.api import Place, Scoper, org, product, sandbox
from corral.ledgers.sync_status import device_syncs

router = APIRouter(tags=["ledgers"], route_class=TransactionRoute)


class DevicesQuery(RequestModel):
    product: str | None = None  # id or slug: one product's devices
    behind: Flag = False  # only the devices that do not hold the latest version
    page: Annotated[Int, Field(ge=1, le=1_000_000)] = 1
    per_page: Annotated[Int, Field(ge=1, le=100)] = Field(
        25, validation_alias=AliasChoices("per_page", "perPage"))


class DeviceSyncObject(Answer):
    device_id: str
    name: str | None
    product_id: int | None
    latest_version: int
    sent_version: int
    applied_version: int | None
    in_sync: bool
    sent_at: str | None
    applied_at: str | None


class DeviceSyncsAnswer(Answer):
    devices: list[DeviceSyncObject]
    meta: dict[str, Any]


def register(base: str, scoper: Scoper, label: str) -> None:
    @router.get(base + "/{name}/devices", summary=f"Devices' versions of a ledger ({label})",
                responses=answers(DeviceSyncsAnswer))
    async def ledger_devices(name: str, oc: Place = Depends(scoper("ledgers.instances:get")),
                             q: DevicesQuery = query(DevicesQuery)) -> dict[str, Any]:
        """A cloud-to-device ledger's version on each device it reaches: the latest (what
        the device should hold), the last sent, the acknowledged one, ``in_sync``;
        ``?behind=true`` lists only the devices that do not hold the latest (a product's
        route: only its devices)."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        product_id = oc.product.id if oc.product is not None else None
        if q.product is not None and oc.product is None:
            found = await service.product_in(oc.db, oc.org, q.product)
            if found is None:
                raise NotFound("Product not found", code="not_found")
            product_id = found.id
        rows, meta = await device_syncs(oc.db, oc.org, ledger, product_id=product_id,
                                        behind=q.behind, page=q.page, per_page=q.per_page)
        return {"devices": [r.json() for r in rows], "meta": meta}


register("/v1/ledgers", sandbox, "sandbox")
register("/v1/orgs/{org}/ledgers", org, "organization")
register("/v1/products/{product}/ledgers", product, "product")
