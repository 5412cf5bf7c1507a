"""Flashing one device with a binary: ``PUT /v1/devices/:id`` (and the product variant) with
a multipart ``file``, as ``particle flash <device> app.bin`` and ``particle cloud flash``
send it.

The binary is checked (a Particle module must be an intact application module for the
device's platform; a device on the Particle protocol takes nothing else, an MQTT device also
takes opaque bytes), stored once per content (:class:`DeviceBinary`, the bytes under their
SHA-256 next to product firmware), recorded as the device's update (trigger ``binary``) and
handed to the delivery engine at once, which transfers it over the device's transport with
the same states and ``spark/flash/status`` events as product firmware.

Who may (Particle's rule): the device's owner for a device outside any product; for a
product device, a development device, or a caller who may release the product's firmware
(``firmware:release``; a non-development device is otherwise brought back to its released
firmware on its next connect, as on Particle). Customers never flash.

The device must be online: corral answers 400 ``device_offline`` ("Device is not
connected") rather than queueing a binary for later, like a function call to an offline
device; product firmware (locks and releases) is what waits for a device to connect.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import delete, exists, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile

from corral.audit import service as audit
from corral.auth.policy import Role, role_allows
from corral.auth.subject import Subject
from corral.db.session import after_commit
from corral.devices.models import Device
from corral.firmware.models import OPEN_STATES, DeviceBinary, DeviceUpdate, ProductFirmware
from corral.firmware.module import ModuleInfo, parse_module
from corral.firmware.signals import UpdateIntent, request_updates
from corral.firmware.storage import blob_path, store_blob
from corral.kit import clock
from corral.kit.body import content_type
from corral.kit.errors import BadRequest, Forbidden, PayloadTooLarge
from corral.products.access import load_product
from corral.products.models import Product
from corral.settings import Settings

READ_CHUNK = 64 * 1024
TRIGGER = "binary"
MAX_FILENAME = 200


@dataclass(frozen=True)
class FlashUpload:
    data: bytes
    filename: str


async def read_flash_file(request: Request, settings: Settings) -> FlashUpload | None:
    """The binary of a flash request (the multipart field ``file``), read up to
    ``firmware_max_bytes``; None when the request carries no file. More than one file
    (particle-cli's source files ``file1``... for the compile service) is refused."""
    if content_type(request) != "multipart/form-data":
        return None
    form = await request.form()  # parsed once per request (the body reader did already)
    files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        return None
    if len(files) != 1 or files[0][0] != "file":
        raise BadRequest("Send one firmware binary in the field file; corral flashes "
                         "binaries and compiles no source code", code="invalid_request")
    upload = files[0][1]
    limit = settings.firmware_max_bytes
    data = bytearray()
    await upload.seek(0)
    while chunk := await upload.read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"The binary is larger than {limit:,} bytes "
                                  "(CORRAL_FIRMWARE_MAX_BYTES)")
    name = os.path.basename((upload.filename or "").replace("\\", "/")) or "firmware.bin"
    return FlashUpload(data=bytes(data), filename=name[:MAX_FILENAME])


def may_flash(subject: Subject, device: Device, role: Role | None, via: str) -> bool:
    """Particle's rule (see the module docstring)."""
    if subject.kind == "customer" or via == "customer":
        return False
    if device.product_id is None:
        return via == "owner"
    if device.development:
        return True
    if role is not None:
        return role_allows(role, "firmware:release")
    return "firmware:release" in subject.scopes


def check_binary(info: ModuleInfo | None, device: Device, size: int) -> None:
    """What a device may be flashed with (400 with a code naming the problem)."""
    if size == 0:
        raise BadRequest("The binary is empty", code="invalid_binary")
    if info is None:
        if device.transport == "mqtt":
            return  # an MQTT device runs any firmware: the bytes are opaque to corral
        raise BadRequest("The file is not a Particle firmware module (no module header "
                         "was found); flash a .bin built for this device",
                         code="invalid_binary")
    if not info.crc_ok:
        raise BadRequest("The binary is damaged: its CRC-32 does not match its contents",
                         code="invalid_binary")
    if not info.is_application:
        raise BadRequest(f"The binary is a {info.function_name} module; only an "
                         "application (user part) can be flashed over the air here",
                         code="invalid_binary")
    if device.platform_id and info.platform_id != device.platform_id:
        raise BadRequest(f"The binary is for platform {info.platform_id}, but device "
                         f"{device.id} is platform {device.platform_id}",
                         code="platform_mismatch")


async def _binary_row(db: AsyncSession, settings: Settings, upload: FlashUpload,
                      info: ModuleInfo | None) -> DeviceBinary:
    sha = hashlib.sha256(upload.data).hexdigest()
    now = clock.now()
    row = (await db.execute(select(DeviceBinary).where(DeviceBinary.sha256 == sha))
           ).scalar_one_or_none()
    if row is None:
        row = DeviceBinary(sha256=sha, size=len(upload.data), filename=upload.filename,
                           platform_id=info.platform_id if info else None,
                           product_version=info.product_version if info else None,
                           module=info.json() if info else None, created_at=now,
                           last_flashed_at=now)
        db.add(row)
        await db.flush()
    else:
        row.last_flashed_at = now
    store_blob(settings, upload.data, sha)
    return row


async def flash_binary(db: AsyncSession, *, settings: Settings, actor: Subject, ip: str,
                       device: Device, product: Product | None, role: Role | None, via: str,
                       upload: FlashUpload) -> dict[str, Any]:
    """Check, store and start delivering ``upload`` to ``device``; Particle's answer."""
    if role is None and via == "owner" and device.product_id is not None:
        # the owner of a product device may also be on its team (their role decides)
        found = await load_product(db, str(device.product_id), actor)
        role = found[1] if found is not None else None
    if not may_flash(actor, device, role, via):
        raise Forbidden("Flashing this product device needs the firmware:release "
                        "permission, or the device must be a development device",
                        code="forbidden", required="firmware:release")
    info = parse_module(upload.data)
    check_binary(info, device, len(upload.data))
    if device.quarantined or device.denied:
        raise BadRequest("The device is quarantined or denied; approve it first",
                         code="invalid_request")
    if not device.online:
        raise BadRequest("Device is not connected", code="device_offline")
    binary = await _binary_row(db, settings, upload, info)
    target = binary.product_version if binary.product_version is not None else (
        device.firmware_version or 0)
    now = clock.now()
    for u in (await db.execute(select(DeviceUpdate).where(
            DeviceUpdate.device_id == device.id, DeviceUpdate.state.in_(OPEN_STATES))
            .order_by(DeviceUpdate.id))).scalars():
        u.state, u.reason = "cancelled", "Superseded by a binary flashed to the device"
        u.finished_at = u.updated_at = now
    u = DeviceUpdate(device_id=device.id, product_id=device.product_id, firmware_id=None,
                     binary_id=binary.id, rollout_id=None, target_version=target,
                     from_version=device.firmware_version, trigger=TRIGGER, state="pending",
                     created_at=now, updated_at=now)
    db.add(u)
    await db.flush()
    request_updates(db, [UpdateIntent(device_id=device.id, version=target, firmware_id=0,
                                      update_id=u.id, trigger=TRIGGER)])
    audit.record(db, actor=actor, ip=ip, action="device.flashed",
                 org_id=product.org_id if product else None,
                 product_id=device.product_id, target_type="device", target_id=device.id,
                 details={"sha256": binary.sha256, "size": binary.size,
                          "filename": binary.filename, "update_id": u.id,
                          "platform_id": binary.platform_id})
    await prune_binaries(db, settings)
    return {"id": device.id, "status": "Update started"}


async def prune_binaries(db: AsyncSession, settings: Settings) -> int:
    """Drop binaries last flashed more than ``firmware_binary_retention_days`` ago that no
    open update needs; their files go after the commit unless product firmware has the
    same content. Returns how many rows went."""
    cutoff = clock.now() - dt.timedelta(days=settings.firmware_binary_retention_days)
    old = list((await db.execute(select(DeviceBinary.id, DeviceBinary.sha256).where(
        DeviceBinary.last_flashed_at < cutoff,
        ~exists().where(DeviceUpdate.binary_id == DeviceBinary.id,
                        DeviceUpdate.state.in_(OPEN_STATES))).limit(500))).all())
    if not old:
        return 0
    await db.execute(delete(DeviceBinary).where(DeviceBinary.id.in_([i for i, _ in old])))
    shas = [s for _, s in old]
    kept = set((await db.execute(select(ProductFirmware.sha256).where(
        ProductFirmware.sha256.in_(shas)))).scalars())
    doomed = [blob_path(settings, s) for s in shas if s not in kept]

    def unlink() -> None:
        for path in doomed:
            with contextlib.suppress(OSError):
                path.unlink()

    after_commit(db, unlink)
    return len(old)
