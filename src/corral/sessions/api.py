"""/v1 function calls and variable reads: the REST side of a device session.

A route authorizes the caller, then asks whichever node holds the device's session over the
bus (``device.<id>.request``, see :mod:`corral.sessions.contract`) and maps the reply to
Particle's wire shapes. No node answering means the device is offline. The request's
database connection is released before waiting on the device (a call may take
``device_call_timeout_s``). These routes are mounted after every other
``/v1/devices/{id}/...`` route, so a function or variable cannot shadow one of them.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from corral.auth.deps import Ctx
from corral.bus.base import BusClosed, BusTimeout, NoResponders
from corral.db.session import TransactionRoute, release
from corral.devices.access import DeviceCtx, DeviceGuard, product_device
from corral.devices.models import Device
from corral.kit import clock
from corral.kit.body import body, query
from corral.kit.errors import CorralError, NotFound
from corral.kit.responses import answers
from corral.products.access import ProductCtx, ProductGuard
from corral.sessions import contract
from corral.sessions.schemas import FunctionAnswer, FunctionCall, ReadFormat, VariableAnswer

router = APIRouter(tags=["functions and variables"], route_class=TransactionRoute)

FUNCTION_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"model": FunctionAnswer, "description": "The function's return value (`format=raw`: "
          "as text)", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **answers(None, 408, 502, 503)}
VARIABLE_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"model": VariableAnswer, "description": "The variable's value (`format=raw`: as "
          "text)", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **answers(None, 408, 502, 503)}

NAME_MAX = 64


def check_name(name: str, kind: str) -> str:
    """A function or variable name from the path; one no device can have is not found."""
    if not 1 <= len(name) <= NAME_MAX or not name.isprintable():
        text = "Function not found" if kind == "function" else "Variable not found"
        raise NotFound(text, code=text)
    return name


def raw_text(value: Any) -> str:
    """A value for ``format=raw``: text as is, anything else as JSON (``true``, ``42``)."""
    return value if isinstance(value, str) else json.dumps(value)


def wants_raw(request: Request, req: FunctionCall | None = None) -> bool:
    fmt = request.query_params.get("format") or (req.format if req is not None else None)
    return fmt == "raw"


async def device_request(ctx: Ctx, device_id: str, payload: dict[str, Any], *,
                         product_id: int | None = None) -> dict[str, Any]:
    """Send a request to the device's session and return its successful reply.

    Raises 404 ``Device is not connected`` (no session anywhere), 408 ``Timed out.``, 503
    while shutting down, or the status and error the session replied with."""
    timeout = ctx.settings.device_call_timeout_s
    await release(ctx.db)  # nothing else to read, and the wait may be long
    try:
        msg = await ctx.runtime.bus.request(contract.request_subject(device_id),
                                            {**payload, "timeout": timeout},
                                            timeout=timeout + 1)
        reply = msg.json()
    except NoResponders:
        fleet = getattr(ctx.runtime, "fleet", None)  # the product's "offline" call count
        if fleet is not None:
            fleet.call(device_id, product_id, str(payload.get("kind")), "offline")
        raise NotFound("Device is not connected", code="Device is not connected") from None
    except BusTimeout:
        raise CorralError("Timed out.", code="Timed out.", status=408) from None
    except BusClosed:
        raise CorralError("The server is shutting down", code="unavailable",
                          status=503) from None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise CorralError("The device's session sent a malformed reply", code="device_error",
                          status=502)
    if reply.get("ok") is True:
        return reply
    status = reply.get("status")
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 502
    description = str(reply.get("error_description") or "The request to the device failed")
    code = str(reply.get("error") or "device_error")
    if status in (404, 408):  # Particle's bodies: {"ok":false,"error":"Variable not found"}
        code = description
    raise CorralError(description, code=code, status=status)


async def call_function(ctx: Ctx, device: Device, name: str, request: Request,
                        req: FunctionCall) -> Response:
    arg, raw = req.argument(), wants_raw(request, req)
    check_name(name, "function")
    device_id, device_name = device.id, device.name
    reply = await device_request(ctx, device_id,
                                 {"kind": "function", "name": name, "arg": arg},
                                 product_id=device.product_id)
    value = reply.get("return_value")
    if raw:
        return PlainTextResponse(raw_text(value))
    return JSONResponse({"id": device_id, "name": device_name, "connected": True,
                         "return_value": value})


async def read_variable(ctx: Ctx, device: Device, name: str, request: Request) -> Response:
    raw = wants_raw(request)
    check_name(name, "variable")
    info = {
        "name": device.name, "deviceID": device.id, "connected": True,
        "last_handshake_at": clock.iso(device.last_handshake_at),
        "product_id": device.product_id if device.product_id is not None else device.platform_id,
    }
    reply = await device_request(ctx, device.id, {"kind": "variable", "name": name},
                                 product_id=device.product_id)
    result = reply.get("result")
    if raw:
        return PlainTextResponse(raw_text(result))
    info["last_heard"] = clock.iso(clock.now())  # it just answered
    return JSONResponse({"cmd": "VarReturn", "name": name, "result": result, "coreInfo": info})


@router.post("/v1/products/{product}/devices/{device_id}/{function}",
             summary="Call a product device's function", responses=FUNCTION_ANSWERS)
async def call_product_device_function(
    device_id: str, function: str, request: Request,
    pc: ProductCtx = Depends(ProductGuard("devices.function:call")),
    req: FunctionCall = body(FunctionCall),
) -> Response:
    """Run `function` with `arg` (or `args`); `format=raw` answers the bare return value."""
    return await call_function(pc.ctx, await product_device(pc, device_id), function, request,
                               req)


@router.get("/v1/products/{product}/devices/{device_id}/{variable}",
            summary="Read a product device's variable", responses=VARIABLE_ANSWERS)
async def get_product_device_variable(
    device_id: str, variable: str, request: Request,
    pc: ProductCtx = Depends(ProductGuard("devices.variable:get")),
    _q: ReadFormat = query(ReadFormat),
) -> Response:
    """The variable's current value; `format=raw` answers the bare value as text."""
    return await read_variable(pc.ctx, await product_device(pc, device_id), variable, request)


@router.post("/v1/devices/{device_id}/{function}", summary="Call a device function",
             responses=FUNCTION_ANSWERS)
async def call_device_function(
    function: str, request: Request,
    dc: DeviceCtx = Depends(DeviceGuard("devices.function:call")),
    req: FunctionCall = body(FunctionCall),
) -> Response:
    """Run `function` with `arg` (or `args`); `format=raw` answers the bare return value."""
    return await call_function(dc.ctx, dc.device, function, request, req)


@router.get("/v1/devices/{device_id}/{variable}", summary="Read a device variable",
            responses=VARIABLE_ANSWERS)
async def get_device_variable(
    variable: str, request: Request,
    dc: DeviceCtx = Depends(DeviceGuard("devices.variable:get")),
    _q: ReadFormat = query(ReadFormat),
) -> Response:
    """The variable's current value; `format=raw` answers the bare value as text."""
    return await read_variable(dc.ctx, dc.device, variable, request)
