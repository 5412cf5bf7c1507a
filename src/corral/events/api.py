"""/v1 event routes: SSE streams in Particle's wire format, cloud publish, stored history.

Streams subscribe on the bus (``corral.sessions.contract``) with a pattern built from the
caller's rights, so tenancy is decided once, before the stream opens; a stream holds no
database session. Publishing goes through the event writer: ``{"ok": true}`` means the
event row is committed, and the writer's after-commit hook fans it out to streams and
subscribed devices. History (``event_log``) is a corral extension; Particle has none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from corral.auth.deps import AuthCtx, Ctx
from corral.auth.policy import api_users_not_allowed
from corral.auth.subject import Subject
from corral.bus.base import Bus, BusClosed, Message
from corral.db.session import TransactionRoute, release
from corral.devices.access import DeviceCtx, DeviceGuard, is_device_id, product_device
from corral.devices.models import Device
from corral.events import service
from corral.events.schemas import EventLogAnswer, EventLogQuery, EventPublish
from corral.events.writer import NewEvent, WriterStopped
from corral.kit import clock
from corral.kit.body import body, query
from corral.kit.errors import BadRequest, CorralError, NotFound
from corral.kit.responses import OkAnswer, answers, ok
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard
from corral.products.models import Product
from corral.sessions import contract
from corral.sessions.link import Refused, check_event_name

log = logging.getLogger("corral.events")
router = APIRouter(tags=["events"], route_class=TransactionRoute)

STREAMS = Gauge("corral_sse_streams", "Open SSE event streams")
DROPPED = Counter("corral_sse_dropped_events_total",
                  "Events dropped because an SSE client fell too far behind")

PREFIX_MAX = 64  # event names are at most 64 characters; a longer prefix matches nothing
SSE_DOC: dict[int | str, dict[str, Any]] = {200: {"description": "A `text/event-stream` of events (Particle's SSE format)",
                 "content": {"text/event-stream": {}}}}


class Unavailable(CorralError):
    """The server is shutting down."""

    status = 503
    code = "unavailable"


# --- the stream ------------------------------------------------------------------------------

def frame(payload: dict[str, Any]) -> bytes:
    """One SSE event in Particle's format: ``event: <name>\\ndata: <json>\\n\\n``."""
    data = json.dumps(contract.stream_json(payload), separators=(",", ":"), ensure_ascii=False)
    return f"event: {payload['name']}\ndata: {data}\n\n".encode()


@functools.lru_cache(maxsize=256)
def framed_event(data: bytes, framer: Callable[[dict[str, Any]], bytes] = frame
                 ) -> tuple[str, bytes] | None:
    """A fan-out payload's event name and its frame by ``framer``, or None if it is
    malformed. Every stream of a node receives the same payload: it is decoded and framed
    once per framer, not once per stream (1,000 streams on a product are 1,000 deliveries
    of each event)."""
    try:
        payload = json.loads(data)
        name = payload["name"]
        return (name, framer(payload)) if isinstance(name, str) else None
    except (ValueError, KeyError, TypeError):
        return None


class EventStream(Response):
    """An endless ``text/event-stream`` of the bus events matching ``pattern`` whose names
    start with ``prefix``.

    The bus subscription is made when the response starts (before ``:ok`` is sent, so an
    event published after the client read ``:ok`` is never missed) and removed when the
    client goes away or the server cancels the response. Events wait in a queue of at most
    ``queue_max`` frames; a client that falls further behind loses the oldest ones (counted
    in ``dropped``). After ``keepalive_s`` without a byte sent, a ``\\n`` keeps the
    connection alive (particle-api-js drops a stream after 15 s of silence)."""

    def __init__(self, bus: Bus, pattern: str, prefix: str | None, *, keepalive_s: float,
                 queue_max: int, framer: Callable[[dict[str, Any]], bytes] | None = None
                 ) -> None:
        self.status_code = 200
        self.background = None
        self.bus, self.pattern, self.prefix = bus, pattern, prefix or None
        self.framer = framer or frame  # the web console frames events for EventSource
        self.keepalive_s = keepalive_s
        self.queue: collections.deque[bytes] = collections.deque(maxlen=queue_max)
        self.dropped = 0
        self._wake = asyncio.Event()
        self.init_headers({"content-type": "text/event-stream", "cache-control": "no-cache",
                           "connection": "keep-alive", "x-accel-buffering": "no"})

    async def _on_event(self, msg: Message) -> None:
        framed = framed_event(msg.data, self.framer)
        if framed is None or not contract.name_matches(self.prefix, framed[0]):
            return
        chunk = framed[1]
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
            DROPPED.inc()
        self.queue.append(chunk)
        self._wake.set()

    async def _send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b":ok\n\n", "more_body": True})
        while True:
            if not self.queue:
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        await self._wake.wait()
                except TimeoutError:
                    await send({"type": "http.response.body", "body": b"\n", "more_body": True})
                    continue
            chunk = b"".join(self.queue)
            self.queue.clear()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    @staticmethod
    async def _until_disconnect(receive: Receive) -> None:
        while True:
            message: AsgiMessage = await receive()
            if message["type"] == "http.disconnect":
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            sub = await self.bus.subscribe(self.pattern, self._on_event)
        except BusClosed:  # nothing sent yet: the error handlers answer with JSON
            raise Unavailable("The server is shutting down") from None
        STREAMS.inc()
        tasks = [asyncio.ensure_future(self._send(send)),
                 asyncio.ensure_future(self._until_disconnect(receive))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                    await t
            await sub.unsubscribe()
            STREAMS.dec()
            if self.dropped:
                log.info("SSE stream %s lost %d events to a slow client", self.pattern,
                         self.dropped)


def check_prefix(prefix: str | None) -> str | None:
    """A stream's name prefix from the path (already percent-decoded); ``None`` for all."""
    if not prefix:
        return None
    if len(prefix) > PREFIX_MAX or not prefix.isprintable():
        raise BadRequest(f"The event prefix is at most {PREFIX_MAX} printable characters",
                         code="invalid_request")
    return prefix


def open_stream(ctx: Ctx, prefix: str | None, *,
                framer: Callable[[dict[str, Any]], bytes] | None = None,
                **tenancy: Any) -> EventStream:
    """The stream of events with these tenancy facts (``contract.stream_pattern``)."""
    cfg = ctx.settings
    return EventStream(ctx.runtime.bus, contract.stream_pattern(**tenancy), check_prefix(prefix),
                       keepalive_s=cfg.sse_keepalive_s, queue_max=cfg.sse_queue_max,
                       framer=framer)


def mine(subject: Subject) -> dict[str, Any]:
    """The tenancy of "my devices": a user's own devices, a customer's claimed devices.
    API users and client tokens belong to one product: they use the product routes."""
    if subject.kind == "user":
        return {"owner_user_id": subject.user_id}
    if subject.kind == "customer":
        return {"customer_id": subject.customer_id}
    raise api_users_not_allowed()


def device_scope(dc: DeviceCtx) -> dict[str, Any]:
    """A device stream narrowed to the tenancy that allowed the caller in (a device that
    changes hands while the stream is open stops showing up)."""
    d, me = dc.device, dc.ctx.me
    if dc.via == "owner":
        return {"device_id": d.id, "owner_user_id": me.user_id}
    if dc.via == "customer":
        return {"device_id": d.id, "customer_id": me.customer_id}
    return {"device_id": d.id, "product_id": d.product_id}


async def org_device(oc: OrgCtx, device_id: str) -> Device:
    """The device ``device_id`` of one of the guarded organization's products, or 404."""
    device = await oc.db.get(Device, device_id.lower()) if is_device_id(device_id) else None
    product = await oc.db.get(Product, device.product_id) if device and device.product_id else None
    if device is None or product is None or product.org_id != oc.org.id:
        raise NotFound("Device not found")
    return device


# --- stream routes ---------------------------------------------------------------------------

@router.get("/v1/events", summary="Event stream (needs a prefix)", responses=SSE_DOC)
async def stream_without_prefix(ctx: AuthCtx) -> Response:
    """Particle requires a prefix here: 400 `event prefix filter is required`."""
    raise BadRequest("event prefix filter is required", code="event prefix filter is required")


@router.get("/v1/events/{prefix:path}", summary="Stream my events by prefix", responses=SSE_DOC)
async def stream_events(prefix: str, ctx: AuthCtx) -> Response:
    """SSE: events of the caller's devices (and their own API publishes) whose name starts with `prefix`."""
    if not prefix:
        raise BadRequest("event prefix filter is required", code="event prefix filter is required")
    return open_stream(ctx, prefix, **mine(ctx.me))


@router.get("/v1/devices/events", summary="Stream my devices' events", responses=SSE_DOC)
async def stream_my_events(ctx: AuthCtx) -> Response:
    """SSE: every event of the caller's devices (a customer: the devices claimed to them)."""
    return open_stream(ctx, None, **mine(ctx.me))


@router.get("/v1/devices/events/{prefix:path}", summary="Stream my devices' events by prefix",
            responses=SSE_DOC)
async def stream_my_events_prefix(prefix: str, ctx: AuthCtx) -> Response:
    """SSE: events of the caller's devices whose name starts with `prefix`."""
    return open_stream(ctx, prefix, **mine(ctx.me))


@router.get("/v1/devices/{device_id}/events", summary="Stream a device's events",
            responses=SSE_DOC)
async def stream_device(dc: DeviceCtx = Depends(DeviceGuard("events:get"))) -> Response:
    """SSE: every event of one device."""
    return open_stream(dc.ctx, None, **device_scope(dc))


@router.get("/v1/devices/{device_id}/events/{prefix:path}",
            summary="Stream a device's events by prefix", responses=SSE_DOC)
async def stream_device_prefix(
    prefix: str, dc: DeviceCtx = Depends(DeviceGuard("events:get")),
) -> Response:
    """SSE: events of one device whose name starts with `prefix`."""
    return open_stream(dc.ctx, prefix, **device_scope(dc))


@router.get("/v1/products/{product}/events", summary="Stream a product's events",
            responses=SSE_DOC)
async def stream_product(pc: ProductCtx = Depends(ProductGuard("events:get"))) -> Response:
    """SSE: every event of the product's devices and of API publishes to the product."""
    return open_stream(pc.ctx, None, product_id=pc.product.id)


@router.get("/v1/products/{product}/events/{prefix:path}",
            summary="Stream a product's events by prefix", responses=SSE_DOC)
async def stream_product_prefix(
    prefix: str, pc: ProductCtx = Depends(ProductGuard("events:get")),
) -> Response:
    """SSE: the product's events whose name starts with `prefix`."""
    return open_stream(pc.ctx, prefix, product_id=pc.product.id)


@router.get("/v1/products/{product}/devices/{device_id}/events",
            summary="Stream a product device's events", responses=SSE_DOC)
async def stream_product_device(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("events:get")),
) -> Response:
    """SSE: every event of one device of the product."""
    device = await product_device(pc, device_id)
    return open_stream(pc.ctx, None, product_id=pc.product.id, device_id=device.id)


@router.get("/v1/products/{product}/devices/{device_id}/events/{prefix:path}",
            summary="Stream a product device's events by prefix", responses=SSE_DOC)
async def stream_product_device_prefix(
    device_id: str, prefix: str, pc: ProductCtx = Depends(ProductGuard("events:get")),
) -> Response:
    """SSE: events of one device of the product whose name starts with `prefix`."""
    device = await product_device(pc, device_id)
    return open_stream(pc.ctx, prefix, product_id=pc.product.id, device_id=device.id)


@router.get("/v1/orgs/{org}/events", summary="Stream an organization's events",
            responses=SSE_DOC)
async def stream_org(oc: OrgCtx = Depends(OrgGuard("events:get"))) -> Response:
    """SSE: every event of every product of the organization, and its own API publishes."""
    return open_stream(oc.ctx, None, org_id=oc.org.id)


@router.get("/v1/orgs/{org}/events/{prefix:path}",
            summary="Stream an organization's events by prefix", responses=SSE_DOC)
async def stream_org_prefix(
    prefix: str, oc: OrgCtx = Depends(OrgGuard("events:get")),
) -> Response:
    """SSE: the organization's events whose name starts with `prefix`."""
    return open_stream(oc.ctx, prefix, org_id=oc.org.id)


@router.get("/v1/orgs/{org}/devices/{device_id}/events",
            summary="Stream an organization device's events", responses=SSE_DOC)
async def stream_org_device(
    device_id: str, oc: OrgCtx = Depends(OrgGuard("events:get")),
) -> Response:
    """SSE: every event of one device of the organization's products."""
    device = await org_device(oc, device_id)
    return open_stream(oc.ctx, None, org_id=oc.org.id, device_id=device.id)


@router.get("/v1/orgs/{org}/devices/{device_id}/events/{prefix:path}",
            summary="Stream an organization device's events by prefix", responses=SSE_DOC)
async def stream_org_device_prefix(
    device_id: str, prefix: str, oc: OrgCtx = Depends(OrgGuard("events:get")),
) -> Response:
    """SSE: events of one device of the organization whose name starts with `prefix`."""
    device = await org_device(oc, device_id)
    return open_stream(oc.ctx, prefix, org_id=oc.org.id, device_id=device.id)


# --- cloud publish ---------------------------------------------------------------------------

def event_data(value: Any, limit: int) -> str | None:
    """``data`` as stored: text (numbers, booleans and JSON objects are serialized)."""
    if value is None:
        return None
    if isinstance(value, str):
        data = value
    elif isinstance(value, bool | int | float | dict | list):
        try:
            data = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except ValueError as exc:
            raise BadRequest("data must be text", code="invalid_request") from exc
    else:
        raise BadRequest("data must be text", code="invalid_request")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes
        raise BadRequest("data must be valid Unicode text", code="invalid_request") from exc
    if size > limit:
        raise BadRequest(f"data is {size} bytes; the limit is {limit}", code="invalid_request")
    return data or None


def read_event(req: EventPublish, limit: int) -> dict[str, Any]:
    """``name``, ``data``, ``ttl`` and ``private`` of a publish request, checked."""
    try:
        name = check_event_name(req.name)
    except Refused as exc:
        if req.name is None:
            raise BadRequest("name is required", code="invalid_request") from None
        raise BadRequest(exc.reason, code="invalid_request") from None
    return {"name": name, "data": event_data(req.data, limit), "ttl": req.ttl,
            "private": True if req.private is None else req.private}


async def store(ctx: Ctx, event: NewEvent) -> None:
    """Commit ``event`` through the writer (not metered); fan-out follows the commit."""
    writer = ctx.runtime.writer
    if writer is None:
        raise Unavailable("Events cannot be stored right now")
    await release(ctx.db)
    try:
        await writer.write(event)
    except WriterStopped:
        raise Unavailable("The server is shutting down") from None


def product_data_limit(ctx: Ctx, product: Product) -> int:
    value = (product.settings or {}).get("event_data_max_bytes")
    return int(value) if isinstance(value, int) and value > 0 else ctx.settings.event_data_max_bytes


@router.post("/v1/devices/events", summary="Publish an event",
             responses=answers(OkAnswer, 429, 503))
async def publish_event(ctx: AuthCtx, req: EventPublish = body(EventPublish)) -> dict[str, Any]:
    """Publish `name` (+ `data`, `ttl`, `private`) to the caller's own event stream and devices."""
    me = ctx.me
    scope = mine(me)
    limit = ctx.settings.event_data_max_bytes
    product: Product | None = None
    if me.kind == "customer" and me.product_id is not None:
        product = await ctx.db.get(Product, me.product_id)
        if product is not None:
            limit = product_data_limit(ctx, product)
    ev = read_event(req, limit)
    await store(ctx, NewEvent(**ev, source="cloud", product_id=product.id if product else None,
                              org_id=product.org_id if product else None,
                              published_at=clock.now(), **scope))
    return ok()


@router.post("/v1/products/{product}/events", summary="Publish a product event",
             responses=answers(OkAnswer, 429, 503))
async def publish_product_event(
    pc: ProductCtx = Depends(ProductGuard("events:send")),
    req: EventPublish = body(EventPublish),
) -> dict[str, Any]:
    """Publish `name` (+ `data`, `ttl`, `private`) to the product's stream and devices."""
    product = pc.product
    ev = read_event(req, product_data_limit(pc.ctx, product))
    await store(pc.ctx, NewEvent(**ev, source="cloud", product_id=product.id,
                                 org_id=product.org_id, published_at=clock.now()))
    return ok()


@router.post("/v1/orgs/{org}/events", summary="Publish an organization event",
             responses=answers(OkAnswer, 429, 503))
async def publish_org_event(
    oc: OrgCtx = Depends(OrgGuard("events:send")),
    req: EventPublish = body(EventPublish),
) -> dict[str, Any]:
    """Publish `name` (+ `data`, `ttl`, `private`) to the organization's event stream."""
    ev = read_event(req, oc.ctx.settings.event_data_max_bytes)
    await store(oc.ctx, NewEvent(**ev, source="cloud", org_id=oc.org.id,
                                 published_at=clock.now()))
    return ok()


# --- history (corral extension) --------------------------------------------------------------

def history_query(q: EventLogQuery) -> dict[str, Any]:
    """The filters of an ``event_log`` request; 400 for a bad one."""
    if q.since is not None and q.until is not None and q.since > q.until:
        raise BadRequest("since must not be after until", code="invalid_request")
    return q.filters()


async def history(db: AsyncSession, query: dict[str, Any], **tenancy: Any) -> dict[str, Any]:
    """``{"events": [...], "next_before_id": id | null}``, newest first."""
    rows = await service.query_events(db, **{**query, **tenancy})
    events = [{"id": e.id, **service.event_json(e)} for e in rows]
    more = len(rows) == query["limit"] and rows
    return {"events": events, "next_before_id": rows[-1].id if more else None}


@router.get("/v1/products/{product}/event_log", summary="A product's stored events",
            responses=answers(EventLogAnswer))
async def product_event_log(
    pc: ProductCtx = Depends(ProductGuard("events:get")),
    q: EventLogQuery = query(EventLogQuery),
) -> dict[str, Any]:
    """Stored events, newest first: `name` (prefix), `device_id`, `since`/`until` (ISO 8601), `before_id`, `limit`."""
    return await history(pc.db, history_query(q), product_id=pc.product.id)


@router.get("/v1/orgs/{org}/event_log", summary="An organization's stored events",
            responses=answers(EventLogAnswer))
async def org_event_log(
    oc: OrgCtx = Depends(OrgGuard("events:get")),
    q: EventLogQuery = query(EventLogQuery),
) -> dict[str, Any]:
    """Stored events of the organization's products and its own publishes, newest first (filters as for products)."""
    return await history(oc.db, history_query(q), org_id=oc.org.id)


@router.get("/v1/devices/{device_id}/event_log", summary="A device's stored events",
            responses=answers(EventLogAnswer))
async def device_event_log(
    dc: DeviceCtx = Depends(DeviceGuard("events:get")),
    q: EventLogQuery = query(EventLogQuery),
) -> dict[str, Any]:
    """The device's stored events from while the caller had it, newest first (`name`, `since`, `until`, `before_id`, `limit`)."""
    filters = history_query(q)
    if filters["device_id"] not in (None, dc.device.id):
        raise BadRequest("device_id does not match the device in the path", code="invalid_request")
    return await history(dc.db, filters, **device_scope(dc))
