"""/v1 device credentials: RSA public keys, MQTT secrets and product CA certificates (JITP)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import UploadFile

from corral.devices import credentials as service
from corral.devices.access import DeviceCtx, DeviceGuard, is_device_id, product_device
from corral.kit.body import read_body
from corral.kit.errors import BadRequest, PayloadTooLarge
from corral.kit.responses import NO_STORE, ok
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["device credentials"])


async def _upload(value: Any, limit: int) -> bytes | str | None:
    """The content of a multipart ``file`` field (or a plain form field of that name)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, UploadFile):
        data = await value.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"The file is larger than {limit:,} bytes")
        return data
    raise BadRequest("file must be an uploaded file", code="invalid_request")


# --- RSA public keys -------------------------------------------------------------------------

@router.post("/v1/provisioning/{device_id}", summary="Set a device's RSA public key")
async def provision_key(
    request: Request, dc: DeviceCtx = Depends(DeviceGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Store the device's public key from `publicKey`/`public_key` (PEM) or a multipart `file` (PEM/DER)."""
    body = await read_body(request)
    given_id = body.get("deviceID", body.get("deviceId"))
    if isinstance(given_id, str) and is_device_id(given_id) and given_id.lower() != dc.device.id:
        raise BadRequest("deviceID does not match the device in the path", code="invalid_request")
    key = body.get("publicKey", body.get("public_key"))
    if key in (None, ""):
        key = await _upload(body.get("file"), service.MAX_KEY_TEXT)
    if key in (None, "", b""):
        raise BadRequest("publicKey is required", code="invalid_request")
    if not isinstance(key, str | bytes):
        raise BadRequest("publicKey must be a PEM string", code="invalid_request")
    info = await service.set_public_key(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip, device=dc.device,
                                        key_data=key, algorithm=body.get("algorithm"))
    return ok(device_id=dc.device.id, public_key=info)


@router.post("/v1/products/{product}/device_keys", summary="Upload many device public keys")
async def bulk_keys(
    request: Request, pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
) -> dict[str, Any]:
    """`{"keys": [{device_id, public_key}]}` as JSON or a multipart `file`; all or nothing, at most 10,000."""
    body = await read_body(request)
    source: Any = body
    if "file" in body and "keys" not in body:
        source = await _upload(body["file"], request.app.state.settings.max_import_bytes)
        if not source:
            raise BadRequest("file is empty", code="invalid_request")
    keys = service.parse_bulk_keys(source)
    n = await service.bulk_set_keys(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                    keys=keys)
    return ok(updated=n)


@router.get("/v1/products/{product}/devices/{device_id}/credentials",
            summary="Show which credentials a device has")
async def get_credentials(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:get")),
) -> dict[str, Any]:
    """Public key facts, whether an MQTT secret is set and the certificate fingerprint (never secrets)."""
    return service.credentials_json(await product_device(pc, device_id))


@router.delete("/v1/products/{product}/devices/{device_id}/public_key",
               summary="Remove a device's public key")
async def delete_key(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Clear the device's RSA public key (it can no longer use the Particle protocol)."""
    device = await product_device(pc, device_id)
    cleared = await service.clear_public_key(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device)
    return ok(device_id=device.id, cleared=cleared)


# --- MQTT secrets ----------------------------------------------------------------------------

@router.post("/v1/products/{product}/devices/{device_id}/mqtt_secret",
             summary="Generate (rotate) a device's MQTT secret")
async def rotate_product_secret(
    device_id: str, response: Response,
    pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
) -> dict[str, Any]:
    """A new MQTT secret, shown only in this answer; the previous one stops working."""
    device = await product_device(pc, device_id)
    secret = await service.rotate_mqtt_secret(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device)
    response.headers.update(NO_STORE)
    return ok(device_id=device.id, mqtt_secret=secret)


@router.delete("/v1/products/{product}/devices/{device_id}/mqtt_secret",
               summary="Remove a device's MQTT secret")
async def clear_product_secret(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Clear the device's MQTT secret (it can no longer log in over MQTT with one)."""
    device = await product_device(pc, device_id)
    cleared = await service.clear_mqtt_secret(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device)
    return ok(device_id=device.id, cleared=cleared)


@router.post("/v1/devices/{device_id}/mqtt_secret", summary="Generate (rotate) my device's MQTT secret")
async def rotate_device_secret(
    response: Response, dc: DeviceCtx = Depends(DeviceGuard("devices.keys:update")),
) -> dict[str, Any]:
    """A new MQTT secret for a device the caller owns (or may manage), shown only once."""
    secret = await service.rotate_mqtt_secret(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip,
                                              device=dc.device)
    response.headers.update(NO_STORE)
    return ok(device_id=dc.device.id, mqtt_secret=secret)


@router.delete("/v1/devices/{device_id}/mqtt_secret", summary="Remove my device's MQTT secret")
async def clear_device_secret(
    dc: DeviceCtx = Depends(DeviceGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Clear the MQTT secret of a device the caller owns (or may manage)."""
    cleared = await service.clear_mqtt_secret(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip,
                                              device=dc.device)
    return ok(device_id=dc.device.id, cleared=cleared)


# --- product CA certificates (JITP) ----------------------------------------------------------

@router.get("/v1/products/{product}/certificate_authorities",
            summary="List the product's CA certificates")
async def list_cas(pc: ProductCtx = Depends(ProductGuard("products:get"))) -> dict[str, Any]:
    """The CA certificates registered for just-in-time provisioning, oldest first."""
    return {"certificate_authorities": [service.ca_json(ca)
                                        for ca in await service.list_cas(pc.db, pc.product)]}


@router.post("/v1/products/{product}/certificate_authorities", status_code=201,
             summary="Register a CA certificate")
async def create_ca(
    request: Request, pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
) -> dict[str, Any]:
    """`{certificate (PEM), jitp?: {groups, tags, development}, active?}` or a multipart `file`."""
    body = await read_body(request)
    cert = body.get("certificate")
    if cert in (None, ""):
        cert = await _upload(body.get("file"), service.MAX_CERT_TEXT)
    if cert is not None and not isinstance(cert, str | bytes):
        raise BadRequest("certificate must be a PEM string", code="invalid_request")
    ca = await service.create_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                 certificate=cert, jitp=body.get("jitp"),
                                 active=body.get("active"))
    return ok(certificate_authority=service.ca_json(ca, full=True))


@router.get("/v1/products/{product}/certificate_authorities/{ca_id}",
            summary="Get a CA certificate")
async def get_ca(
    ca_id: str, pc: ProductCtx = Depends(ProductGuard("products:get")),
) -> dict[str, Any]:
    """One registered CA with its PEM certificate."""
    ca = await service.get_ca(pc.db, pc.product, ca_id)
    return {"certificate_authority": service.ca_json(ca, full=True)}


@router.put("/v1/products/{product}/certificate_authorities/{ca_id}",
            summary="Change a CA's active flag or JITP settings")
async def update_ca(
    ca_id: str, request: Request,
    pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
) -> dict[str, Any]:
    """`{active?, jitp?}`; the jitp keys given replace those settings."""
    ca = await service.get_ca(pc.db, pc.product, ca_id)
    ca = await service.update_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                 ca=ca, body=await read_body(request))
    return ok(certificate_authority=service.ca_json(ca, full=True))


@router.delete("/v1/products/{product}/certificate_authorities/{ca_id}", status_code=204,
               summary="Unregister a CA certificate")
async def delete_ca(
    ca_id: str, pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
) -> Response:
    """Devices it provisioned stay in the product; new devices can no longer use it."""
    ca = await service.get_ca(pc.db, pc.product, ca_id)
    await service.delete_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, ca=ca)
    return Response(status_code=204)
