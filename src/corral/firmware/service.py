"""Product firmware rules: upload, list, edit, delete, signing keys, adoption.

Binaries are kept by :mod:`corral.firmware.storage`. Releasing, the impact preview and device
locks are in :mod:`corral.firmware.releases`, per-device update state in
:mod:`corral.firmware.updates`, targeting in :mod:`corral.firmware.resolver`, rollouts in
:mod:`corral.rollouts`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.subject import Subject
from corral.db.session import after_commit
from corral.devices.models import Device, DeviceGroup
from corral.firmware import signing
from corral.firmware.models import (
    DeviceUpdate,
    FirmwareGroupRelease,
    ProductFirmware,
    SigningKey,
)
from corral.firmware.module import NOT_SET, ModuleInfo, parse_module
from corral.firmware.schemas import (
    MAX_VERSION,
    FirmwareChange,
    FirmwareFields,
    SigningKeyCreate,
)
from corral.firmware.storage import blob_path, store_blob
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.kit.ids import path_id
from corral.products.models import Product
from corral.settings import Settings

FILENAME_RE = re.compile(r"[^A-Za-z0-9._+-]")


async def flush_or_conflict(db: AsyncSession, message: str, code: str) -> None:
    """Flush; a uniqueness race lost to a concurrent request becomes 409 (the boundary
    rolls the transaction back)."""
    try:
        await db.flush()
    except IntegrityError as exc:
        raise Conflict(message, code=code) from exc


# --- reading and shaping ------------------------------------------------------------------------

def version_of_path(value: str) -> int:
    """The ``{version}`` path part; anything but a version is simply not found."""
    version = path_id(value, hi=MAX_VERSION)
    if version is None:
        raise NotFound(f"Firmware version {value[:40]!r} not found", code="firmware_not_found")
    return version


async def get_firmware(db: AsyncSession, product: Product, version: int) -> ProductFirmware:
    row = (await db.execute(select(ProductFirmware).where(
        ProductFirmware.product_id == product.id, ProductFirmware.version == version)
    )).scalar_one_or_none()
    if row is None:
        raise NotFound(f"Firmware version {version} not found", code="firmware_not_found")
    return row


async def release_groups(db: AsyncSession, firmware_ids: list[int]) -> dict[int, list[str]]:
    """Firmware id -> names of the groups it is released to."""
    out: dict[int, list[str]] = {i: [] for i in firmware_ids}
    if not firmware_ids:
        return out
    for fid, name in (await db.execute(
            select(FirmwareGroupRelease.firmware_id, DeviceGroup.name)
            .join(DeviceGroup, DeviceGroup.id == FirmwareGroupRelease.group_id)
            .where(FirmwareGroupRelease.firmware_id.in_(firmware_ids))
            .order_by(DeviceGroup.name))).all():
        out[int(fid)].append(name)
    return out


async def device_counts(db: AsyncSession, product: Product) -> dict[int, int]:
    """Firmware version -> how many of the product's devices report running it."""
    rows = await db.execute(select(Device.firmware_version, func.count())
                            .where(Device.product_id == product.id,
                                   Device.firmware_version.is_not(None))
                            .group_by(Device.firmware_version))
    return {int(v): int(n) for v, n in rows.all() if v is not None}


def firmware_json(fw: ProductFirmware, *, groups: list[str] | None = None,
                  device_count: int = 0) -> dict[str, Any]:
    """Particle's product firmware object, plus corral's integrity and signing fields."""
    return {
        "_id": str(fw.id),
        "id": fw.id,
        "version": fw.version,
        "title": fw.title,
        "description": fw.description,
        "name": fw.filename,
        "size": fw.size,
        "product_id": fw.product_id,
        "product_default": fw.product_default,
        "current": fw.product_default,
        "groups": list(groups or []),
        "intelligent": fw.intelligent,
        "mandatory": fw.mandatory,
        "device_count": device_count,
        "uploaded_on": clock.iso(fw.created_at),
        "uploaded_by": {"username": fw.uploaded_by} if fw.uploaded_by else None,
        "released_at": clock.iso(fw.released_at),
        "released_by": {"username": fw.released_by} if fw.released_by else None,
        "updated_at": clock.iso(fw.updated_at),
        "sha256": fw.sha256,
        "signature": signing.b64(fw.signature) if fw.signature else None,
        "signing_key_id": fw.signing_key_id,
        "module": fw.module,
    }


async def firmware_view(db: AsyncSession, product: Product, fw: ProductFirmware) -> dict[str, Any]:
    groups = (await release_groups(db, [fw.id]))[fw.id]
    count = (await device_counts(db, product)).get(fw.version, 0)
    return firmware_json(fw, groups=groups, device_count=count)


async def product_firmware(db: AsyncSession, product: Product) -> list[ProductFirmware]:
    """The product's firmware, newest version first (no device counts: cheap at any size)."""
    return list((await db.execute(select(ProductFirmware).where(
        ProductFirmware.product_id == product.id)
        .order_by(ProductFirmware.version.desc()))).scalars())


async def list_firmware(db: AsyncSession, product: Product) -> list[dict[str, Any]]:
    """Every firmware of the product, newest version first."""
    rows = await product_firmware(db, product)
    groups = await release_groups(db, [f.id for f in rows])
    counts = await device_counts(db, product)
    return [firmware_json(f, groups=groups[f.id], device_count=counts.get(f.version, 0))
            for f in rows]


# --- upload -------------------------------------------------------------------------------------

@dataclass
class Upload:
    data: bytes
    filename: str
    fields: FirmwareFields


def _clean_filename(name: str | None) -> str:
    base = os.path.basename((name or "").replace("\\", "/")) or "firmware.bin"
    return FILENAME_RE.sub("_", base)[:200]


def check_module(info: ModuleInfo | None, product: Product, version: int) -> None:
    """A Particle module must be application firmware for this product's platform, with
    this product's ID (if it carries one) and ``version`` as its PRODUCT_VERSION."""
    if info is None:
        return  # not a Particle module: opaque firmware (e.g. for MQTT devices)
    if not info.crc_ok:
        raise BadRequest("The binary is damaged: its CRC-32 does not match its contents",
                         code="invalid_binary")
    if not info.is_application:
        raise BadRequest(f"The binary is a {info.function_name} module; product firmware "
                         "must be an application (user part)", code="invalid_binary")
    if product.platform_id and info.platform_id != product.platform_id:
        raise BadRequest(f"The binary is for platform {info.platform_id}, but this product "
                         f"is for platform {product.platform_id}", code="platform_mismatch")
    if info.product_id is not None and info.product_id not in (product.id, NOT_SET):
        raise BadRequest(f"The binary was built for product {info.product_id}, not for "
                         f"this product ({product.id}); check PRODUCT_ID",
                         code="product_mismatch")
    if info.product_version is None:
        raise BadRequest("The binary has no product version: build it with "
                         f"PRODUCT_VERSION({version})", code="product_version_mismatch")
    if info.product_version != version:
        raise BadRequest(f"The binary says PRODUCT_VERSION({info.product_version}), but the "
                         f"upload says version {version}; they must match",
                         code="product_version_mismatch")


async def active_keys(db: AsyncSession, product: Product) -> list[SigningKey]:
    return list((await db.execute(select(SigningKey).where(
        SigningKey.product_id == product.id, SigningKey.revoked_at.is_(None))
        .order_by(SigningKey.id))).scalars())


async def _signature_for(db: AsyncSession, product: Product, digest: bytes,
                         supplied: str | None,
                         key_hint: str | None) -> tuple[bytes | None, str | None]:
    """The firmware's (signature, key id): the uploader's, checked against the product's
    keys, or corral's own with the product's newest key that can sign. A product with
    signing keys accepts only signed firmware."""
    keys = await active_keys(db, product)
    hint = key_hint
    if hint is not None and hint not in {k.key_id for k in keys}:
        raise BadRequest(f"The product has no active signing key {hint!r}",
                         code="unknown_signing_key")
    if supplied is not None:
        try:
            sig = signing.decode_signature(supplied)
        except signing.SigningError as exc:
            raise BadRequest(str(exc), code="invalid_signature") from exc
        candidates = [k for k in keys if hint is None or k.key_id == hint]
        if not candidates:
            raise BadRequest("The product has no signing keys to check this signature "
                             "against; add one first (POST .../signing_keys)",
                             code="unknown_signing_key")
        kid = signing.verify_digest(digest, sig, [k.public_key for k in candidates])
        if kid is None:
            raise BadRequest("The signature does not verify with the product's signing "
                             "keys", code="invalid_signature")
        return sig, kid
    signers = [k for k in keys if k.private_key and (hint is None or k.key_id == hint)]
    if signers:
        key = signers[-1]
        assert key.private_key is not None
        return signing.sign_digest(digest, key.private_key), key.key_id
    if keys:
        raise BadRequest("This product signs its firmware, and none of its active keys can "
                         "sign here: upload with a signature", code="signature_required")
    return None, None


async def create_firmware(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                          settings: Settings, upload: Upload) -> ProductFirmware:
    """Validate and store an upload; everything is checked before anything is written."""
    f = upload.fields
    version, title, description, mandatory = f.version, f.title, f.description, f.mandatory
    if not upload.data:
        raise BadRequest("The binary is empty", code="invalid_binary")
    newest = (await db.execute(select(func.max(ProductFirmware.version)).where(
        ProductFirmware.product_id == product.id))).scalar_one()
    if newest is not None and version <= int(newest):
        raise BadRequest(f"version must be greater than every earlier version (the newest "
                         f"is {newest})", code="version_too_low")
    info = parse_module(upload.data)
    check_module(info, product, version)
    digest = hashlib.sha256(upload.data).digest()
    signature, key_id = await _signature_for(db, product, digest, f.signature,
                                             f.signing_key_id)
    sha = digest.hex()
    fw = ProductFirmware(
        product_id=product.id, version=version, title=title, description=description,
        filename=_clean_filename(upload.filename), size=len(upload.data), sha256=sha,
        module=info.json() if info else None, mandatory=mandatory, signature=signature,
        signing_key_id=key_id, uploaded_by_user_id=actor.user_id,
        uploaded_by=actor.username or actor.client)
    db.add(fw)
    await flush_or_conflict(db, f"Version {version} was uploaded meanwhile",
                            "version_too_low")
    store_blob(settings, upload.data, sha)
    audit.record(db, actor=actor, ip=ip, action="firmware.uploaded", org_id=product.org_id,
                 product_id=product.id, target_type="firmware", target_id=version,
                 details={"size": fw.size, "sha256": sha, "signed": signature is not None,
                          "module": info is not None})
    return fw


async def update_firmware(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                          fw: ProductFirmware, req: FirmwareChange) -> ProductFirmware:
    """Change ``title``, ``description`` and/or ``mandatory``."""
    sent = req.model_fields_set
    if not sent:
        raise BadRequest("Nothing to update: send title, description or mandatory",
                         code="invalid_request")
    if "title" in sent:
        fw.title = req.title or fw.title
    if "description" in sent:
        fw.description = req.description
    if "mandatory" in sent:
        fw.mandatory = bool(req.mandatory)
    fw.updated_at = clock.now()
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="firmware.updated", org_id=product.org_id,
                 product_id=product.id, target_type="firmware", target_id=fw.version,
                 details={"fields": sorted(sent)})
    return fw


async def delete_firmware(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                          settings: Settings, fw: ProductFirmware) -> None:
    """Only firmware that was never released, and that no device is locked to, goes."""
    if fw.released_at is not None:
        raise BadRequest("Released firmware cannot be deleted", code="firmware_released")
    locked = (await db.execute(select(func.count()).select_from(Device).where(
        Device.product_id == product.id,
        Device.desired_firmware_version == fw.version))).scalar_one()
    if locked:
        raise BadRequest(f"{locked} device(s) are locked to version {fw.version}; unlock "
                         "them first", code="firmware_locked")
    sha = fw.sha256
    await db.delete(fw)
    await db.flush()
    others = (await db.execute(select(func.count()).select_from(ProductFirmware).where(
        ProductFirmware.sha256 == sha))).scalar_one()
    if not others:
        path = blob_path(settings, sha)
        after_commit(db, lambda: path.unlink(missing_ok=True))
    audit.record(db, actor=actor, ip=ip, action="firmware.deleted", org_id=product.org_id,
                 product_id=product.id, target_type="firmware", target_id=fw.version)


# --- signing keys -------------------------------------------------------------------------------

def key_json(k: SigningKey) -> dict[str, Any]:
    return {"key_id": k.key_id, "algorithm": "ed25519", "name": k.name,
            "public_key": signing.b64(k.public_key), "can_sign": k.private_key is not None,
            "active": k.revoked_at is None, "created_at": clock.iso(k.created_at),
            "created_by": k.created_by, "revoked_at": clock.iso(k.revoked_at)}


async def list_keys(db: AsyncSession, product: Product) -> list[SigningKey]:
    return list((await db.execute(select(SigningKey).where(
        SigningKey.product_id == product.id).order_by(SigningKey.id))).scalars())


async def create_key(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                     req: SigningKeyCreate) -> SigningKey:
    """Generate a key pair (corral signs uploads with it), or register an uploader's
    ``public_key`` (base64, hex or PEM) to check the signatures they send."""
    name, raw = req.name, req.public_key
    private: bytes | None = None
    if raw is None:
        private, public = signing.generate_key()
    else:
        try:
            public = signing.parse_public_key(raw)
        except signing.SigningError as exc:
            raise BadRequest(str(exc), code="invalid_key") from exc
    kid = signing.key_id(public)
    taken = (await db.execute(select(SigningKey.id).where(
        SigningKey.product_id == product.id, SigningKey.key_id == kid))).first()
    if taken:
        raise Conflict("The product already has this key", code="key_exists")
    key = SigningKey(product_id=product.id, key_id=kid, name=name, public_key=public,
                     private_key=private, created_at=clock.now(),
                     created_by=actor.username or actor.client)
    db.add(key)
    await flush_or_conflict(db, "The product already has this key", "key_exists")
    audit.record(db, actor=actor, ip=ip, action="firmware.signing_key_created",
                 org_id=product.org_id, product_id=product.id, target_type="signing_key",
                 target_id=kid, details={"generated": private is not None})
    return key


async def revoke_key(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                     key_id: str) -> None:
    """A revoked key signs and verifies no new uploads; its private half is erased."""
    key = (await db.execute(select(SigningKey).where(
        SigningKey.product_id == product.id, SigningKey.key_id == key_id[:64])
    )).scalar_one_or_none()
    if key is None or key.revoked_at is not None:
        raise NotFound("Signing key not found", code="key_not_found")
    key.revoked_at = clock.now()
    key.private_key = None
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="firmware.signing_key_revoked",
                 org_id=product.org_id, product_id=product.id, target_type="signing_key",
                 target_id=key.key_id)


# --- adoption -----------------------------------------------------------------------------------

async def adoption(db: AsyncSession, product: Product, fw: ProductFirmware) -> dict[str, Any]:
    """How a version spreads: devices running it now, updates to it by state and by day
    (cumulative), the success rate of finished updates, and why updates failed."""
    running = (await device_counts(db, product)).get(fw.version, 0)
    states = {s: int(n) for s, n in (await db.execute(
        select(DeviceUpdate.state, func.count()).where(DeviceUpdate.firmware_id == fw.id)
        .group_by(DeviceUpdate.state))).all()}
    reasons = [{"reason": r or "unknown", "count": int(n)} for r, n in (await db.execute(
        select(DeviceUpdate.reason, func.count()).where(
            DeviceUpdate.firmware_id == fw.id, DeviceUpdate.state == "failed")
        .group_by(DeviceUpdate.reason).order_by(func.count().desc(), DeviceUpdate.reason)
        .limit(20))).all()]
    finished = (await db.execute(select(DeviceUpdate.finished_at, DeviceUpdate.state).where(
        DeviceUpdate.firmware_id == fw.id, DeviceUpdate.state.in_(("applied", "failed")),
        DeviceUpdate.finished_at.is_not(None)).order_by(DeviceUpdate.finished_at))).all()
    days: dict[str, dict[str, int]] = {}
    for at, state in finished:
        counts = days.setdefault(clock.aware(at).date().isoformat(),  # type: ignore[union-attr]
                                 {"applied": 0, "failed": 0})
        counts[state] += 1
    timeline: list[dict[str, Any]] = []
    total = 0
    for day, n in sorted(days.items()):
        total += n["applied"]
        timeline.append({"date": day, "applied": n["applied"], "failed": n["failed"],
                         "cumulative_applied": total})
    applied, failed = states.get("applied", 0), states.get("failed", 0)
    return {"version": fw.version, "device_count": running,
            "updates": {s: states.get(s, 0) for s in
                        ("pending", "sending", "deferred", "applied", "failed", "cancelled")},
            "success_rate": round(applied / (applied + failed), 4) if applied + failed else None,
            "failure_reasons": reasons, "timeline": timeline}
