"""/v1 device credentials: RSA public keys, MQTT secrets and product CA certificates (JITP)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from corral.auth.deps import Ctx, auth_ctx
from corral.db.session import TransactionRoute
from corral.devices import credentials as service
from corral.devices.access import DeviceCtx, DeviceGuard, is_device_id, product_device
from corral.devices.importer import ImportInput, import_devices
from corral.devices.models import Device
from corral.devices.schemas import (
    BulkKeys,
    CaAnswer,
    CaChange,
    CaCreate,
    CasAnswer,
    ClearedAnswer,
    CountAnswer,
    CredentialsAnswer,
    PublicKeyAnswer,
    PublicKeyUpload,
    SecretAnswer,
)
from corral.kit.body import body, raw_body, uploaded_file
from corral.kit.errors import BadRequest
from corral.kit.responses import NO_STORE, answers, ok
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["device credentials"], route_class=TransactionRoute)


# --- RSA public keys -------------------------------------------------------------------------

class ProvisioningGuard(DeviceGuard):
    """``DeviceGuard("devices.keys:update")``; with a ``product_id`` (``particle keys send
    <new id> key.pem --product_id P``) a device no one has yet is first imported into that
    product, when the caller may import the product's devices (the product's 404/403
    otherwise). The key is then set as for any device of the product."""

    async def __call__(self, device_id: str, ctx: Ctx = Depends(auth_ctx)) -> DeviceCtx:
        product_key = (await raw_body(ctx.request)).get("product_id")
        if product_key is None:
            product_key = ctx.request.query_params.get("product_id")
        if product_key not in (None, "") and is_device_id(device_id):
            if not isinstance(product_key, str | int) or isinstance(product_key, bool):
                raise BadRequest("product_id must be a product id or slug",
                                 code="invalid_request")
            if await ctx.db.get(Device, device_id.lower()) is None:
                pc = await ProductGuard("devices:import").resolve(ctx, str(product_key))
                await import_devices(ctx.db, actor=ctx.me, ip=ctx.ip, product=pc.product,
                                     request=ImportInput(entries=[device_id.lower()]))
        return await self.resolve(ctx, device_id)


@router.post("/v1/provisioning/{device_id}", summary="Set a device's public key (RSA or ECC P-256)",
             responses=answers(PublicKeyAnswer))
async def provision_key(
    request: Request, dc: DeviceCtx = Depends(ProvisioningGuard("devices.keys:update")),
    req: PublicKeyUpload = body(PublicKeyUpload, files=True),
) -> dict[str, Any]:
    """Store the device's public key from `publicKey`/`public_key` (PEM) or a multipart `file` (PEM/DER); with `product_id`, a device that does not exist yet is first imported into that product (needs `devices:import` there)."""
    given_id = req.deviceID
    if given_id is not None and is_device_id(given_id) and given_id.lower() != dc.device.id:
        raise BadRequest("deviceID does not match the device in the path", code="invalid_request")
    key: str | bytes | None = req.publicKey
    if key is None:
        key = await uploaded_file(request, req.file, service.MAX_KEY_TEXT)
    if key in (None, "", b""):
        raise BadRequest("publicKey is required", code="invalid_request")
    assert key is not None
    info = await service.set_public_key(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip, device=dc.device,
                                        key_data=key, algorithm=req.algorithm)
    return ok(device_id=dc.device.id, public_key=info)


@router.post("/v1/products/{product}/device_keys", summary="Upload many device public keys",
             responses=answers(CountAnswer))
async def bulk_keys(
    request: Request, pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
    req: BulkKeys = body(BulkKeys, files=True),
) -> dict[str, Any]:
    """`{"keys": [{device_id, public_key}]}` as JSON or a multipart `file`; all or nothing, at most 10,000."""
    source: Any = {"keys": req.keys}
    if req.keys is None:
        upload = await uploaded_file(request, req.file, request.app.state.settings.max_import_bytes)
        if upload is not None:
            if not upload:
                raise BadRequest("file is empty", code="invalid_request")
            source = upload
    keys = service.parse_bulk_keys(source)
    n = await service.bulk_set_keys(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                    keys=keys)
    return ok(updated=n)


@router.get("/v1/products/{product}/devices/{device_id}/credentials",
            summary="Show which credentials a device has", responses=answers(CredentialsAnswer))
async def get_credentials(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:get")),
) -> dict[str, Any]:
    """Public key facts, whether an MQTT secret is set and the certificate fingerprint (never secrets)."""
    return service.credentials_json(await product_device(pc, device_id))


@router.delete("/v1/products/{product}/devices/{device_id}/public_key",
               summary="Remove a device's public key", responses=answers(ClearedAnswer))
async def delete_key(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Clear the device's RSA public key (it can no longer use the Particle protocol)."""
    device = await product_device(pc, device_id)
    cleared = await service.clear_public_key(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device)
    return ok(device_id=device.id, cleared=cleared)


# --- MQTT secrets ----------------------------------------------------------------------------

@router.post("/v1/products/{product}/devices/{device_id}/mqtt_secret",
             summary="Generate (rotate) a device's MQTT secret", responses=answers(SecretAnswer))
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
               summary="Remove a device's MQTT secret", responses=answers(ClearedAnswer))
async def clear_product_secret(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Clear the device's MQTT secret (it can no longer log in over MQTT with one)."""
    device = await product_device(pc, device_id)
    cleared = await service.clear_mqtt_secret(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device)
    return ok(device_id=device.id, cleared=cleared)


@router.post("/v1/devices/{device_id}/mqtt_secret", summary="Generate (rotate) my device's MQTT secret",
             responses=answers(SecretAnswer))
async def rotate_device_secret(
    response: Response, dc: DeviceCtx = Depends(DeviceGuard("devices.keys:update")),
) -> dict[str, Any]:
    """A new MQTT secret for a device the caller owns (or may manage), shown only once."""
    secret = await service.rotate_mqtt_secret(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip,
                                              device=dc.device)
    response.headers.update(NO_STORE)
    return ok(device_id=dc.device.id, mqtt_secret=secret)


@router.delete("/v1/devices/{device_id}/mqtt_secret", summary="Remove my device's MQTT secret",
               responses=answers(ClearedAnswer))
async def clear_device_secret(
    dc: DeviceCtx = Depends(DeviceGuard("devices.keys:update")),
) -> dict[str, Any]:
    """Clear the MQTT secret of a device the caller owns (or may manage)."""
    cleared = await service.clear_mqtt_secret(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip,
                                              device=dc.device)
    return ok(device_id=dc.device.id, cleared=cleared)


# --- product CA certificates (JITP) ----------------------------------------------------------

@router.get("/v1/products/{product}/certificate_authorities",
            summary="List the product's CA certificates", responses=answers(CasAnswer))
async def list_cas(pc: ProductCtx = Depends(ProductGuard("products:get"))) -> dict[str, Any]:
    """The CA certificates registered for just-in-time provisioning, oldest first."""
    return {"certificate_authorities": [service.ca_json(ca)
                                        for ca in await service.list_cas(pc.db, pc.product)]}


@router.post("/v1/products/{product}/certificate_authorities", status_code=201,
             summary="Register a CA certificate", responses=answers(CaAnswer, 409, status=201))
async def create_ca(
    request: Request, pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
    req: CaCreate = body(CaCreate, files=True),
) -> dict[str, Any]:
    """`{certificate (PEM), jitp?: {groups, tags, development, quarantine}, active?}` or a multipart `file`."""
    cert: str | bytes | None = req.certificate
    if cert is None:
        cert = await uploaded_file(request, req.file, service.MAX_CERT_TEXT)
    ca = await service.create_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                 certificate=cert, jitp=req.jitp, active=req.active)
    return ok(certificate_authority=service.ca_json(ca, full=True))


@router.get("/v1/products/{product}/certificate_authorities/{ca_id}",
            summary="Get a CA certificate", responses=answers(CaAnswer))
async def get_ca(
    ca_id: str, pc: ProductCtx = Depends(ProductGuard("products:get")),
) -> dict[str, Any]:
    """One registered CA with its PEM certificate."""
    ca = await service.get_ca(pc.db, pc.product, ca_id)
    return {"certificate_authority": service.ca_json(ca, full=True)}


@router.put("/v1/products/{product}/certificate_authorities/{ca_id}",
            summary="Change a CA's active flag or JITP settings", responses=answers(CaAnswer))
async def update_ca(
    ca_id: str, pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
    req: CaChange = body(CaChange),
) -> dict[str, Any]:
    """`{active?, jitp?}`; the jitp keys given replace those settings."""
    ca = await service.get_ca(pc.db, pc.product, ca_id)
    ca = await service.update_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                 ca=ca, req=req)
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
