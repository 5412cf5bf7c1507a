"""/v1 integration routes (Particle §1.13): the same set in a user's sandbox
(``/v1/integrations``), a product (``/v1/products/:product/integrations``) and an
organization (``/v1/orgs/:org/integrations``), the legacy ``/v1/webhooks`` routes, and the
product's integration traffic metrics.

Beyond Particle: the delivery log (``/log``), the deliveries (``/deliveries``),
redelivery (``/redeliver``) and signing-secret rotation (``/signing_secret``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.deps import AuthCtx, Ctx
from corral.auth.policy import api_users_not_allowed
from corral.db.session import TransactionRoute
from corral.integrations import schemas, service
from corral.integrations.guard import Policy
from corral.integrations.models import Integration
from corral.integrations.schemas import IntegrationRequest
from corral.integrations.service import Scope
from corral.kit import clock
from corral.kit.body import body, query
from corral.kit.errors import BadRequest
from corral.kit.responses import NO_STORE, OkAnswer, answers, ok
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["integrations"], route_class=TransactionRoute)


@dataclass
class ScopeCtx:
    ctx: Ctx
    scope: Scope

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


Scoper = Callable[[str], Callable[..., Awaitable[ScopeCtx]]]


def sandbox(permission: str) -> Callable[..., Awaitable[ScopeCtx]]:
    """The caller's own sandbox: people only (API users and customers have none)."""

    async def dep(ctx: AuthCtx) -> ScopeCtx:
        me = ctx.me
        if me.kind != "user" or me.user_id is None:
            raise api_users_not_allowed()
        return ScopeCtx(ctx, Scope(owner_user_id=me.user_id))

    return dep


def product(permission: str) -> Callable[..., Awaitable[ScopeCtx]]:
    async def dep(pc: ProductCtx = Depends(ProductGuard(permission))) -> ScopeCtx:
        return ScopeCtx(pc.ctx, Scope(product_id=pc.product.id))

    return dep


def org(permission: str) -> Callable[..., Awaitable[ScopeCtx]]:
    async def dep(oc: OrgCtx = Depends(OrgGuard(permission))) -> ScopeCtx:
        return ScopeCtx(oc.ctx, Scope(org_id=oc.org.id))

    return dep


def _runtime(sc: ScopeCtx) -> Any:
    return sc.ctx.runtime


def _policy(sc: ScopeCtx) -> Policy:
    worker = getattr(_runtime(sc), "integrations", None)
    return worker.policy if worker is not None else Policy(
        sc.ctx.settings.integrations_allow_hosts)


def _public(sc: ScopeCtx) -> str:
    return str(sc.ctx.settings.resolved_public_url())


def _full(sc: ScopeCtx, row: Integration) -> dict[str, Any]:
    return service.to_json(row, public_url=_public(sc),
                           throttle_after=sc.ctx.settings.integrations_throttle_after)


def register(base: str, scoper: Scoper, label: str) -> None:
    """The integration routes under ``base`` for one kind of scope."""

    @router.post(base, summary=f"Create an integration ({label})", status_code=201,
                 responses=answers(schemas.IntegrationCreated, 409, status=201))
    async def create(sc: ScopeCtx = Depends(scoper("integrations:create")),
                     req: IntegrationRequest = body(IntegrationRequest)) -> dict[str, Any]:
        """Create a webhook or MQTT integration; the answer holds its signing secret."""
        row = await service.create(sc.db, sc.scope, req.fields(), actor=sc.ctx.me,
                                   ip=sc.ctx.ip, policy=_policy(sc))
        return service.created_json(row, public_url=_public(sc))

    @router.get(base, summary=f"List integrations ({label})",
                responses=answers(list[schemas.IntegrationListItem]))
    async def list_all(sc: ScopeCtx = Depends(scoper("integrations:list"))
                       ) -> list[dict[str, Any]]:
        """Every integration of the scope (Particle's list shape)."""
        return [service.list_json(r) for r in await service.list_for(sc.db, sc.scope)]

    @router.get(base + "/{integration_id}", summary=f"Get an integration ({label})",
                responses=answers(schemas.IntegrationAnswer))
    async def get_one(integration_id: str,
                      sc: ScopeCtx = Depends(scoper("integrations:get"))) -> dict[str, Any]:
        """One integration (secrets masked) with its last 10 delivery-log entries."""
        row = await service.get(sc.db, sc.scope, integration_id)
        logs = await service.attempts(sc.db, row.id, limit=service.LOG_SHOWN)
        return {"integration": {**_full(sc, row),
                                "logs": [service.attempt_json(a) for a in logs]}}

    @router.put(base + "/{integration_id}", summary=f"Edit an integration ({label})",
                responses=answers(schemas.IntegrationAnswer, 409))
    async def edit(integration_id: str,
                   sc: ScopeCtx = Depends(scoper("integrations:update")),
                   req: IntegrationRequest = body(IntegrationRequest)) -> dict[str, Any]:
        """Replace an integration's configuration (``disabled: false`` re-enables it)."""
        row = await service.get(sc.db, sc.scope, integration_id)
        await service.update_config(sc.db, row, req.fields(), actor=sc.ctx.me, ip=sc.ctx.ip,
                                    policy=_policy(sc))
        return {"integration": _full(sc, row)}

    @router.delete(base + "/{integration_id}", summary=f"Delete an integration ({label})",
                   status_code=204)
    async def remove(integration_id: str,
                     sc: ScopeCtx = Depends(scoper("integrations:remove"))) -> Response:
        """Delete an integration; nothing more is sent for it."""
        row = await service.get(sc.db, sc.scope, integration_id)
        await service.remove(sc.db, row, actor=sc.ctx.me, ip=sc.ctx.ip)
        return Response(status_code=204)

    @router.post(base + "/{integration_id}/test", summary=f"Test an integration ({label})",
                 responses=answers(schemas.TestAnswer, 503))
    async def test(integration_id: str, sc: ScopeCtx = Depends(scoper("integrations:test")),
                   req: schemas.TestRequest = body(schemas.TestRequest)) -> dict[str, Any]:
        """Send a test event now: ``{pass, data, error}``."""
        row = await service.get(sc.db, sc.scope, integration_id)
        worker = _runtime(sc).integrations
        outcome, attempt = await worker.test(row, data=req.data, device_id=req.device_id)
        sc.db.add(attempt)
        return {"pass": outcome.ok, "data": outcome.body[:4096] if outcome.ok else None,
                "error": None if outcome.ok else outcome.error,
                "status_code": outcome.status_code}

    @router.get(base + "/{integration_id}/log", summary=f"An integration's delivery log ({label})",
                responses=answers(schemas.LogAnswer))
    async def delivery_log(integration_id: str,
                           sc: ScopeCtx = Depends(scoper("integrations:get")),
                           q: schemas.PageQuery = query(schemas.PageQuery)) -> dict[str, Any]:
        """Recent attempts, newest first: request, status, latency, response, error."""
        row = await service.get(sc.db, sc.scope, integration_id)
        rows = await service.attempts(sc.db, row.id, limit=q.limit, before=q.before)
        return {"log": [service.attempt_json(a) for a in rows]}

    @router.get(base + "/{integration_id}/deliveries",
                summary=f"An integration's deliveries ({label})",
                responses=answers(schemas.DeliveriesAnswer))
    async def deliveries(integration_id: str,
                         sc: ScopeCtx = Depends(scoper("integrations:get")),
                         q: schemas.DeliveryQuery = query(schemas.DeliveryQuery)
                         ) -> dict[str, Any]:
        """Deliveries newest first, optionally one ``status`` (pending, success, failed,
        skipped)."""
        row = await service.get(sc.db, sc.scope, integration_id)
        rows = await service.deliveries(sc.db, row.id, status=q.status, limit=q.limit,
                                        before=q.before)
        return {"deliveries": [service.delivery_json(d, row.id) for d in rows]}

    @router.post(base + "/{integration_id}/redeliver",
                 summary=f"Redeliver events to an integration ({label})",
                 responses=answers(schemas.RedeliverAnswer, 409))
    async def redeliver(integration_id: str,
                        sc: ScopeCtx = Depends(scoper("integrations:update")),
                        req: schemas.RedeliverRequest = body(schemas.RedeliverRequest)
                        ) -> dict[str, Any]:
        """``event_id``: send one stored event again; else every failed or skipped
        delivery created in [``since``, ``until``)."""
        row = await service.get(sc.db, sc.scope, integration_id)
        if req.event_id is not None:
            d = await service.redeliver_event(sc.db, row, req.event_id)
            return ok(redelivered=1, delivery=service.delivery_json(d, row.id))
        n = await service.redeliver_range(sc.db, row, since=req.since, until=req.until)
        return ok(redelivered=n)

    @router.post(base + "/{integration_id}/signing_secret",
                 summary=f"Rotate an integration's signing secret ({label})",
                 responses=answers(schemas.SigningSecretAnswer))
    async def rotate(integration_id: str, response: Response,
                     sc: ScopeCtx = Depends(scoper("integrations:update"))) -> dict[str, Any]:
        """A new signing secret, shown this once."""
        row = await service.get(sc.db, sc.scope, integration_id)
        secret = service.rotate_secret(sc.db, row, actor=sc.ctx.me, ip=sc.ctx.ip)
        response.headers.update(NO_STORE)
        return ok(signing_secret=secret)


def register_webhooks(base: str, scoper: Scoper, label: str) -> None:
    """Particle's legacy ``/v1/webhooks`` routes: integrations of type Webhook."""

    @router.post(base, summary=f"Create a webhook ({label}, legacy)", status_code=201,
                 responses=answers(schemas.IntegrationCreated, 409, status=201))
    async def create(sc: ScopeCtx = Depends(scoper("integrations:create")),
                     req: IntegrationRequest = body(IntegrationRequest)) -> dict[str, Any]:
        """Create a webhook (``integration_type`` is Webhook)."""
        fields = {**req.fields(), "integration_type": schemas.WEBHOOK}
        row = await service.create(sc.db, sc.scope, fields, actor=sc.ctx.me, ip=sc.ctx.ip,
                                   policy=_policy(sc))
        return service.created_json(row, public_url=_public(sc))

    @router.get(base, summary=f"List webhooks ({label}, legacy)",
                responses=answers(list[schemas.IntegrationListItem]))
    async def list_all(sc: ScopeCtx = Depends(scoper("integrations:list"))
                       ) -> list[dict[str, Any]]:
        """The scope's webhooks."""
        rows = await service.list_for(sc.db, sc.scope, kind=schemas.WEBHOOK)
        return [service.list_json(r) for r in rows]

    @router.get(base + "/{integration_id}", summary=f"Get a webhook ({label}, legacy)",
                responses=answers(schemas.WebhookAnswer))
    async def get_one(integration_id: str,
                      sc: ScopeCtx = Depends(scoper("integrations:get"))) -> dict[str, Any]:
        """One webhook (secrets masked)."""
        row = await service.get(sc.db, sc.scope, integration_id)
        return {"ok": True, **_full(sc, row)}

    @router.delete(base + "/{integration_id}", summary=f"Delete a webhook ({label}, legacy)",
                   responses=answers(OkAnswer))
    async def remove(integration_id: str,
                     sc: ScopeCtx = Depends(scoper("integrations:remove"))) -> dict[str, Any]:
        """Delete a webhook."""
        row = await service.get(sc.db, sc.scope, integration_id)
        await service.remove(sc.db, row, actor=sc.ctx.me, ip=sc.ctx.ip)
        return ok()


register("/v1/integrations", sandbox, "sandbox")
register("/v1/products/{product}/integrations", product, "product")
register("/v1/orgs/{org}/integrations", org, "organization")
register_webhooks("/v1/webhooks", sandbox, "sandbox")
register_webhooks("/v1/products/{product}/webhooks", product, "product")


@router.get("/v1/products/{product}/metrics/integration",
            summary="Integration traffic health metrics", responses=answers(schemas.MetricsAnswer))
async def integration_metrics(pc: ProductCtx = Depends(ProductGuard("metrics.integrations:get")),
                              q: schemas.MetricsQuery = query(schemas.MetricsQuery)
                              ) -> dict[str, Any]:
    """Per time bucket: ``success``, ``failure`` and ``sleep`` (skipped) deliveries of the
    product's events (Particle's shape; zero counts left out)."""
    end = q.end_date or clock.now()
    bucket = q.bucket_size
    start = q.start_date or end - dt.timedelta(days=1)
    if start > end:
        raise BadRequest("start_date is after end_date", code="invalid_request")
    if (end - start).total_seconds() / bucket > 10_000:
        raise BadRequest("too many buckets: widen bucket_size or narrow the dates",
                         code="invalid_request")
    rows = await service.metrics(pc.db, pc.product.id, start=start, end=end, bucket_size=bucket,
                                 product_fw=q.product_fw, device_os_version=q.device_os_version,
                                 device_group=q.device_group)
    return {"integrations": rows}
