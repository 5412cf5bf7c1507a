"""Logs: a product's, an organization's and a device's events, live and stored.

The live part is the ``/v1`` event stream (:func:`corral.events.api.open_stream`: the same
bus subscription, tenancy pattern, prefix rule, queue and keep-alives) framed for the
browser's ``EventSource``: one ``message`` per event with the event's id, because
``EventSource`` cannot listen to arbitrary event names. The stored history behind it is
``events.service.query_events``, newest first, paged back with ``before_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from corral.console.render import ENV, page
from corral.console.session import ConsoleDeviceGuard, ConsoleOrgGuard, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.devices.access import DeviceCtx, is_device_id, product_device
from corral.devices.lookup import device_names
from corral.events import service as events
from corral.events.api import device_scope, open_stream, org_device
from corral.kit.errors import BadRequest
from corral.kit.ids import INT64_MAX, path_id
from corral.orgs.access import OrgCtx
from corral.products.access import ProductCtx
from corral.sessions import contract

router = APIRouter(route_class=TransactionRoute)

PAGE = 50
PREFIX_MAX = 64


def console_frame(payload: dict[str, Any]) -> bytes:
    """One event for ``EventSource``: ``id`` and a ``message`` with the event's fields."""
    body = {**contract.stream_json(payload), "name": payload["name"], "id": payload.get("id")}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"id: {payload.get('id') or ''}\ndata: {data}\n\n".encode()


def log_filters(params: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The log's filters (``name`` prefix, ``device`` id) and a problem with them, if any."""
    out: dict[str, str] = {}
    name = (params.get("name") or "").strip()
    if name:
        if len(name) > PREFIX_MAX or not name.isprintable():
            return {}, f"The event name prefix is at most {PREFIX_MAX} printable characters"
        out["name"] = name
    device = (params.get("device") or "").strip().lower()
    if device:
        if not is_device_id(device):
            return out, "The device filter takes a device ID (24 hexadecimal characters)"
        out["device"] = device
    return out, None


def _before(params: Mapping[str, str]) -> int | None:
    return path_id(params.get("before_id"), hi=INT64_MAX - 1)


async def _names(db: AsyncSession, ids: set[str]) -> dict[str, str]:
    return await device_names(db, sorted(ids))


async def history(db: AsyncSession, filters: Mapping[str, str], before_id: int | None,
                  **tenancy: Any) -> tuple[list[Any], int | None, dict[str, str]]:
    """A page of stored events, the id to continue from, and the devices' names."""
    rows = await events.query_events(db, name_prefix=filters.get("name"),
                                     device_id=filters.get("device"), limit=PAGE,
                                     before_id=before_id, **tenancy)
    more = rows[-1].id if len(rows) == PAGE else None
    names = await _names(db, {e.device_id for e in rows if e.device_id})
    return rows, more, names


async def _log_page(request: Request, *, base: str, stream: str, tenancy: dict[str, Any],
                    device_base: str | None, title: str, section: str,
                    **layout: Any) -> Response:
    db = request.state.console.db
    filters, problem = log_filters(request.query_params)
    rows, more, names = await history(db, filters, _before(request.query_params), **tenancy)
    query = urlencode(filters)
    if request.query_params.get("fragment") == "1":  # "Load older": rows only
        html = ENV.get_template("logs/_rows.html").render(
            rows=rows, names=names, device_base=device_base, more=more,
            older=_older_link(base, filters, more))
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})
    return await page(request, "logs/log.html", title=title, section=section,
                      rows=rows, names=names, filters=filters, problem=problem,
                      stream=f"{stream}?{query}" if query else stream, base=base,
                      device_base=device_base, more=more,
                      older=_older_link(base, filters, more),
                      live=_before(request.query_params) is None, **layout)


def _older_link(base: str, filters: Mapping[str, str], more: int | None) -> str | None:
    if more is None:
        return None
    return f"{base}?{urlencode({**filters, 'before_id': more})}"


def _stream_filters(request: Request) -> dict[str, str]:
    filters, problem = log_filters(request.query_params)
    if problem:
        raise BadRequest(problem)
    return filters


# --- a product's log -------------------------------------------------------------------------

@router.get("/console/products/{product}/logs", summary="Product logs")
async def product_logs(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("events:get"))) -> Response:
    """The product's events: live, with the stored history behind them."""
    base = f"/console/products/{pc.product.slug}"
    return await _log_page(request, base=f"{base}/logs", stream=f"{base}/logs/stream",
                           tenancy={"product_id": pc.product.id},
                           device_base=f"{base}/devices/", title=f"Logs · {pc.product.name}",
                           section="logs", product=pc.product, role=pc.role)


@router.get("/console/products/{product}/logs/stream", summary="Product event stream")
async def product_stream(request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("events:get"))
                         ) -> Response:
    """``EventSource`` stream of the product's events (the /v1 product stream)."""
    filters = _stream_filters(request)
    device_id = None
    if "device" in filters:
        device_id = (await product_device(pc, filters["device"])).id
    return open_stream(pc.ctx, filters.get("name"), framer=console_frame,
                       product_id=pc.product.id, device_id=device_id)


# --- an organization's log ------------------------------------------------------------------

@router.get("/console/orgs/{org}/logs", summary="Organization logs")
async def org_logs(request: Request,
                   oc: OrgCtx = Depends(ConsoleOrgGuard("events:get"))) -> Response:
    """Events of every product of the organization, and its own publishes."""
    base = f"/console/orgs/{oc.org.slug}"
    return await _log_page(request, base=f"{base}/logs", stream=f"{base}/logs/stream",
                           tenancy={"org_id": oc.org.id}, device_base="/console/devices/",
                           title=f"Logs · {oc.org.name}", section="logs", org=oc.org,
                           role=oc.role)


@router.get("/console/orgs/{org}/logs/stream", summary="Organization event stream")
async def org_stream(request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("events:get"))) -> Response:
    """``EventSource`` stream of the organization's events (the /v1 org stream)."""
    filters = _stream_filters(request)
    device_id = None
    if "device" in filters:
        device_id = (await org_device(oc, filters["device"])).id
    return open_stream(oc.ctx, filters.get("name"), framer=console_frame, org_id=oc.org.id,
                       device_id=device_id)


# --- one device's live events (its page) -------------------------------------------------------

@router.get("/console/products/{product}/devices/{device_id}/events/stream",
            summary="A product device's event stream")
async def product_device_stream(device_id: str, request: Request,
                                pc: ProductCtx = Depends(ConsoleProductGuard("events:get"))
                                ) -> Response:
    """``EventSource`` stream of one device of the product."""
    device = await product_device(pc, device_id)
    filters = _stream_filters(request)
    return open_stream(pc.ctx, filters.get("name"), framer=console_frame,
                       product_id=pc.product.id, device_id=device.id)


@router.get("/console/devices/{device_id}/events/stream", summary="My device's event stream")
async def own_device_stream(request: Request,
                            dc: DeviceCtx = Depends(ConsoleDeviceGuard("events:get"))
                            ) -> Response:
    """``EventSource`` stream of a device I own or that is claimed to me."""
    filters = _stream_filters(request)
    return open_stream(dc.ctx, filters.get("name"), framer=console_frame, **device_scope(dc))
