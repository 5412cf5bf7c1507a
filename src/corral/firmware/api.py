"""/v1 product firmware routes (Particle's), the impact preview, and signing keys (corral's)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from starlette.datastructures import FormData, UploadFile

from corral.db.session import TransactionRoute
from corral.firmware import releases, service, storage
from corral.firmware.schemas import (
    Adoption,
    DryRun,
    Firmware,
    FirmwareChange,
    FirmwareFields,
    FirmwareUpload,
    Impact,
    ImpactQuery,
    Release,
    ReleasePage,
    SigningKeyAnswer,
    SigningKeyCreate,
    SigningKeysAnswer,
)
from corral.kit.body import body, documented_body, query, validate
from corral.kit.errors import BadRequest, NotFound, PayloadTooLarge
from corral.kit.responses import answers
from corral.products.access import ProductCtx, ProductGuard
from corral.settings import Settings

router = APIRouter(tags=["firmware"], route_class=TransactionRoute)

READ_CHUNK = 64 * 1024


async def read_upload(request: Request, settings: Settings, *,
                      ignore: frozenset[str] = frozenset()) -> service.Upload:
    """The multipart upload: the binary (field ``binary``, or ``file`` as particle-api-js
    sends it) read in chunks up to ``firmware_max_bytes``, and the form fields (those named
    in ``ignore`` are the caller's: the console's CSRF token)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise BadRequest("Upload firmware as multipart/form-data with the binary in the "
                         "field binary (or file), and version and title",
                         code="invalid_request")
    form = await request.form(max_files=2, max_fields=20)
    try:
        return await _read_form(form, settings, ignore)
    finally:
        await form.close()  # the spooled temporary files, now, not at garbage collection


async def _read_form(form: FormData, settings: Settings,
                     ignore: frozenset[str]) -> service.Upload:
    files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile) or key == "access_token" or key in ignore:
            continue
        if key in fields:
            raise BadRequest(f"{key} was sent more than once", code="invalid_request")
        if "\x00" in value:
            raise BadRequest("NUL characters are not allowed", code="invalid_request")
        fields[key] = value
    checked = validate(FirmwareFields, fields)  # before the binary is read
    if len(files) != 1 or files[0][0] not in ("binary", "file"):
        raise BadRequest("Send exactly one file, in the field binary (or file)",
                         code="invalid_request")
    upload = files[0][1]
    limit = settings.firmware_max_bytes
    data = bytearray()
    while chunk := await upload.read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"The binary is larger than {limit:,} bytes "
                                  "(CORRAL_FIRMWARE_MAX_BYTES)")
    return service.Upload(data=bytes(data), filename=upload.filename or "firmware.bin",
                          fields=checked)


@router.get("/v1/products/{product}/firmware", summary="List product firmware",
            responses=answers(list[Firmware]))
async def list_firmware(pc: ProductCtx = Depends(ProductGuard("firmware:list"))) -> list[dict[str, Any]]:
    """Every uploaded version, newest first, with its release groups and `device_count`."""
    return await service.list_firmware(pc.db, pc.product)


@router.post("/v1/products/{product}/firmware", status_code=201,
             summary="Upload product firmware", responses=answers(Firmware, 409, status=201),
             dependencies=[Depends(documented_body(FirmwareUpload,
                                                   media=("multipart/form-data",)))])
async def upload_firmware(
    request: Request, pc: ProductCtx = Depends(ProductGuard("firmware:create")),
) -> dict[str, Any]:
    """Multipart: `binary` (or `file`), `version` (greater than every earlier one), `title`, `description`; optional `signature` and `signing_key_id`."""
    upload = await read_upload(request, pc.ctx.settings)
    fw = await service.create_firmware(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                       product=pc.product, settings=pc.ctx.settings,
                                       upload=upload)
    return service.firmware_json(fw)


@router.put("/v1/products/{product}/firmware/release", summary="Release product firmware",
            responses=answers(Firmware | DryRun, 409))
async def release_firmware(
    pc: ProductCtx = Depends(ProductGuard("firmware:release")),
    req: Release = body(Release), paged: ReleasePage = query(ReleasePage),
) -> dict[str, Any]:
    """`version`, `product_default`, `groups`, `intelligent`; corral adds `rollout` (`{"percent": n}` or `{"count": n}`) and `dry_run`."""
    return await releases.release(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                  req=req, page=paged.page, per_page=paged.per_page)


@router.get("/v1/products/{product}/impact", summary="Preview a release's impact",
            responses=answers(Impact))
async def release_impact(
    pc: ProductCtx = Depends(ProductGuard("firmware:list")),
    q: ImpactQuery = query(ImpactQuery),
) -> dict[str, Any]:
    """`firmware_version`, `groups`, `product_default` (`action=edit_groups_for_firmware`): devices that would update, by the version they run."""
    return await releases.impact(pc.db, pc.product, q)


@router.get("/v1/products/{product}/firmware/{version}", summary="Get product firmware",
            responses=answers(Firmware))
async def get_firmware(
    version: str, pc: ProductCtx = Depends(ProductGuard("firmware:get")),
) -> dict[str, Any]:
    """One version, with its release groups and `device_count`."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    return await service.firmware_view(pc.db, pc.product, fw)


@router.put("/v1/products/{product}/firmware/{version}", summary="Edit product firmware",
            responses=answers(Firmware))
async def edit_firmware(
    version: str, pc: ProductCtx = Depends(ProductGuard("firmware:update")),
    req: FirmwareChange = body(FirmwareChange),
) -> dict[str, Any]:
    """Change `title`, `description` or `mandatory`."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    fw = await service.update_firmware(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                       product=pc.product, fw=fw, req=req)
    return await service.firmware_view(pc.db, pc.product, fw)


@router.delete("/v1/products/{product}/firmware/{version}", status_code=204,
               summary="Delete unreleased firmware", responses=answers(None))
async def delete_firmware(
    version: str, pc: ProductCtx = Depends(ProductGuard("firmware:remove")),
) -> Response:
    """Only firmware that was never released (and that no device is locked to)."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    await service.delete_firmware(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                  settings=pc.ctx.settings, fw=fw)
    return Response(status_code=204)


@router.get("/v1/products/{product}/firmware/{version}/binary",
            summary="Download a firmware binary", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}},
                "description": "The binary (HTTP Range works)"}, 206: {
                "description": "A range of the binary", "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}}, 416: {
                "description": "The range is not satisfiable"}})
async def download_firmware(
    version: str, pc: ProductCtx = Depends(ProductGuard("firmware:get")),
) -> FileResponse:
    """The binary as uploaded (HTTP Range requests work, for resumable downloads)."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    path = storage.blob_path(pc.ctx.settings, fw.sha256)
    if not path.is_file():
        raise NotFound("The binary of this firmware is missing from the data directory",
                       code="binary_missing")
    return FileResponse(path, media_type="application/octet-stream", filename=fw.filename,
                        headers={"X-Firmware-SHA256": fw.sha256})


@router.get("/v1/products/{product}/firmware/{version}/adoption",
            summary="Adoption of a firmware version", responses=answers(Adoption))
async def firmware_adoption(
    version: str, pc: ProductCtx = Depends(ProductGuard("firmware:get")),
) -> dict[str, Any]:
    """Devices running it, updates to it by state and by day, success rate, failure reasons."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    return await service.adoption(pc.db, pc.product, fw)


# --- signing keys (corral's own) ------------------------------------------------------------------

@router.get("/v1/products/{product}/signing_keys", summary="List firmware signing keys",
            responses=answers(SigningKeysAnswer))
async def list_signing_keys(
    pc: ProductCtx = Depends(ProductGuard("firmware:list")),
) -> dict[str, Any]:
    """The product's Ed25519 keys (public halves; devices verify firmware with the active ones)."""
    return {"signing_keys": [service.key_json(k) for k in await service.list_keys(pc.db, pc.product)]}


@router.post("/v1/products/{product}/signing_keys", status_code=201,
             summary="Add a firmware signing key", responses=answers(SigningKeyAnswer, 409, status=201))
async def create_signing_key(
    pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
    req: SigningKeyCreate = body(SigningKeyCreate),
) -> dict[str, Any]:
    """No `public_key`: corral makes a key pair and signs uploads with it. With `public_key`: uploads must carry a `signature` by its private half."""
    key = await service.create_key(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                   req=req)
    return {"signing_key": service.key_json(key)}


@router.delete("/v1/products/{product}/signing_keys/{key_id}", status_code=204,
               summary="Revoke a firmware signing key", responses=answers(None))
async def revoke_signing_key(
    key_id: str, pc: ProductCtx = Depends(ProductGuard("products.settings:update")),
) -> Response:
    """The key signs and verifies no new uploads; its private half is erased."""
    await service.revoke_key(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                             key_id=key_id)
    return Response(status_code=204)
