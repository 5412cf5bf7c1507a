"""/v1 ledger routes (Particle's Ledger API): definitions, instances, their versions and
rollback, the same set in the caller's sandbox (``/v1/ledgers``, their personal
organization) and in an organization (``/v1/orgs/:org/ledgers``).

Beyond Particle: ``POST .../instances/:scopeValue/rollback``, the ``owner:`` /
``product:`` scope values of the defaults a finer ledger inherits, and
``/v1/products/:product/ledgers`` (the product's organization's ledgers, read; only the
product's own documents and its devices', read and written; API users of the product
too) (docs/ledgers.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.deps import AuthCtx, Ctx
from corral.auth.policy import api_users_not_allowed
from corral.db.session import TransactionRoute
from corral.kit.body import body, query
from corral.kit.errors import BadRequest
from corral.kit.ids import path_id
from corral.kit.responses import OkAnswer, answers, ok
from corral.ledgers import schemas as S
from corral.ledgers import service
from corral.orgs.access import OrgCtx, OrgGuard, authorize_org
from corral.orgs.models import Organization
from corral.orgs.service import personal_org
from corral.products.access import ProductCtx, ProductGuard
from corral.products.models import Product

router = APIRouter(tags=["ledgers"], route_class=TransactionRoute)


@dataclass
class Place:
    """Whose ledgers a route reaches: an organization's (the sandbox is the caller's
    personal one), and with ``product`` only that product's documents and its devices'."""

    ctx: Ctx
    org: Organization
    product: Product | None = None

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


Scoper = Callable[[str], Callable[..., Awaitable[Place]]]


def sandbox(permission: str) -> Callable[..., Awaitable[Place]]:
    """The caller's personal organization: people only (API users have no sandbox)."""

    async def dep(ctx: AuthCtx) -> Place:
        me = ctx.me
        if me.kind != "user" or me.user_id is None:
            raise api_users_not_allowed()
        org = await personal_org(ctx.db, me.user_id)
        await authorize_org(ctx.db, me, org, permission)
        return Place(ctx, org)

    return dep


def org(permission: str) -> Callable[..., Awaitable[Place]]:
    async def dep(oc: OrgCtx = Depends(OrgGuard(permission))) -> Place:
        return Place(oc.ctx, oc.org)

    return dep


def product(permission: str) -> Callable[..., Awaitable[Place]]:
    """A product's view of its organization's ledgers (API users included)."""

    async def dep(pc: ProductCtx = Depends(ProductGuard(permission))) -> Place:
        owner = await pc.db.get(Organization, pc.product.org_id)
        assert owner is not None  # a product's organization exists (RESTRICT)
        return Place(pc.ctx, owner, pc.product)

    return dep


def register(base: str, scoper: Scoper, label: str, *, definitions: bool = True) -> None:
    """The ledger routes under ``base`` for one kind of place (``definitions``: also
    create, update and archive definitions)."""
    one = base + "/{name}"
    inst = one + "/instances/{scope_value}"
    if definitions:
        register_definitions(base, scoper, label)

    # a person without a personal organization has no sandbox: 404 (the routes with a
    # path parameter document 404 anyway)
    missing = (404,) if scoper is sandbox else ()

    @router.get(base, summary=f"List ledgers ({label})",
                responses=answers(S.LedgersAnswer, *missing))
    async def list_ledgers(oc: Place = Depends(scoper("ledgers:list")),
                           q: S.LedgerListQuery = query(S.LedgerListQuery)) -> dict[str, Any]:
        """Ledger definitions by name; ``scope`` and ``archived`` filter, paged."""
        return await service.list_ledgers(oc.db, oc.org, q)

    @router.get(one, summary=f"Get a ledger ({label})", responses=answers(S.LedgerAnswer))
    async def get_ledger(name: str, oc: Place = Depends(scoper("ledgers:get"))
                         ) -> dict[str, Any]:
        """One ledger definition."""
        return {"ledger": service.ledger_json(await service.get_ledger(oc.db, oc.org, name))}

    @router.get(one + "/instances", summary=f"List ledger instances ({label})",
                responses=answers(S.InstancesAnswer))
    async def list_instances(name: str, oc: Place = Depends(scoper("ledgers.instances:get")),
                             q: S.InstancePage = query(S.InstancePage)) -> dict[str, Any]:
        """The ledger's documents (deleted ones left out), paged."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        return await service.list_instances(oc.db, ledger, q, oc.product)

    @router.get(inst, summary=f"Get a ledger instance ({label})",
                responses=answers(S.InstanceAnswer))
    async def get_instance(name: str, scope_value: str,
                           oc: Place = Depends(scoper("ledgers.instances:get"))
                           ) -> dict[str, Any]:
        """The document at one scope value (an owner, product or device)."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value, oc.product)
        row = await service.get_instance(oc.db, ledger, ref)
        return {"instance": service.instance_json(ledger, row, ref.name)}

    @router.put(inst, summary=f"Set a ledger instance ({label})",
                responses=answers(S.InstanceAnswer, 409, 413, 422))
    async def set_instance(name: str, scope_value: str,
                           oc: Place = Depends(scoper("ledgers.instances:set")),
                           mode: S.SetModeQuery = query(S.SetModeQuery),
                           req: S.InstanceSet = body(S.InstanceSet)) -> dict[str, Any]:
        """``{"instance": {"data": {...}}}``; ``?set_mode=Replace`` (default) or ``Merge``.
        16 KB when the ledger syncs to devices, 1 MB cloud-only; 422 ``Invalid Schema``."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value, oc.product)
        row = await service.set_instance(oc.db, oc.org, ledger, ref, req.data, mode.set_mode,
                                         actor=oc.ctx.me, ip=oc.ctx.ip)
        return {"instance": service.instance_json(ledger, row, ref.name)}

    @router.delete(inst, summary=f"Delete a ledger instance ({label})",
                   responses=answers(OkAnswer, 409))
    async def delete_instance(name: str, scope_value: str,
                              oc: Place = Depends(scoper("ledgers.instances:set"))
                              ) -> dict[str, Any]:
        """Delete the document (a new version without data; its history stays)."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value, oc.product)
        row = await service.delete_instance(oc.db, oc.org, ledger, ref, actor=oc.ctx.me,
                                            ip=oc.ctx.ip)
        return ok(version=row.version)

    @router.get(inst + "/versions", summary=f"List a ledger instance's versions ({label})",
                responses=answers(S.VersionsAnswer))
    async def list_versions(name: str, scope_value: str,
                            oc: Place = Depends(scoper("ledgers.instances:get")),
                            q: S.VersionsQuery = query(S.VersionsQuery)) -> dict[str, Any]:
        """Every write, newest first (``replaced_before`` / ``replaced_after``, ``limit``)."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value, oc.product)
        row, versions, more = await service.list_versions(oc.db, ledger, ref, q)
        return {"versions": [service.version_json(ledger, row, v, r, ref.name)
                             for v, r in versions], "meta": {"has_more": more}}

    @router.get(inst + "/versions/{version}", summary=f"Get a ledger instance version ({label})",
                responses=answers(S.VersionAnswer))
    async def get_version(name: str, scope_value: str, version: str,
                          oc: Place = Depends(scoper("ledgers.instances:get"))
                          ) -> dict[str, Any]:
        """One earlier (or the current) version of the document."""
        n = path_id(version)
        if n is None or n < 1:
            raise BadRequest("version must be a positive integer", code="invalid_request")
        ledger = await service.get_ledger(oc.db, oc.org, name)
        ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value, oc.product)
        row, v, replaced = await service.get_version(oc.db, ledger, ref, n)
        return {"instance": service.version_json(ledger, row, v, replaced, ref.name)}

    @router.post(inst + "/rollback", summary=f"Roll a ledger instance back ({label})",
                 responses=answers(S.InstanceAnswer, 409, 413, 422))
    async def rollback(name: str, scope_value: str,
                       oc: Place = Depends(scoper("ledgers.instances:set")),
                       req: S.Rollback = body(S.Rollback)) -> dict[str, Any]:
        """``{"version": n}``: restore version n's document as a new version."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value, oc.product)
        row = await service.rollback(oc.db, oc.org, ledger, ref, req.version, actor=oc.ctx.me,
                                     ip=oc.ctx.ip)
        return {"instance": service.instance_json(ledger, row, ref.name)}


def register_definitions(base: str, scoper: Scoper, label: str) -> None:
    """Creating, changing and archiving definitions: organizations and the sandbox."""
    one = base + "/{name}"

    missing = (404,) if scoper is sandbox else ()  # as in register

    @router.post(base, summary=f"Create a ledger ({label})", status_code=201,
                 responses=answers(S.LedgerAnswer, 409, *missing, status=201))
    async def create_ledger(oc: Place = Depends(scoper("ledgers:create")),
                            req: S.LedgerCreate = body(S.LedgerCreate)) -> dict[str, Any]:
        """``{"ledger": {name, description, scope, direction, schema}}``."""
        d = await service.create_ledger(oc.db, oc.org, req, actor=oc.ctx.me, ip=oc.ctx.ip)
        return {"ledger": service.ledger_json(d)}

    @router.put(one, summary=f"Update a ledger ({label})", responses=answers(S.LedgerAnswer, 409))
    async def update_ledger(name: str, oc: Place = Depends(scoper("ledgers:update")),
                            req: S.LedgerChange = body(S.LedgerChange)) -> dict[str, Any]:
        """Change ``description``, ``direction`` or ``schema`` (null removes it)."""
        d = await service.update_ledger(oc.db, oc.org, name, req, actor=oc.ctx.me, ip=oc.ctx.ip)
        return {"ledger": service.ledger_json(d)}

    @router.delete(one, summary=f"Archive a ledger ({label})", responses=answers(OkAnswer))
    async def archive_ledger(name: str, oc: Place = Depends(scoper("ledgers:remove"))
                             ) -> dict[str, Any]:
        """Archive the ledger: its documents stay readable, writes are refused."""
        await service.archive_ledger(oc.db, oc.org, name, actor=oc.ctx.me, ip=oc.ctx.ip)
        return ok()


register("/v1/ledgers", sandbox, "sandbox")
register("/v1/orgs/{org}/ledgers", org, "organization")
register("/v1/products/{product}/ledgers", product, "product", definitions=False)
