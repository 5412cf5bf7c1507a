"""Product firmware rules: upload, list, edit, delete, release, impact, locks, signing keys.

Binaries are stored once per content under ``<data_dir>/firmware/<sha[:2]>/<sha256>``; the
database holds the metadata. Per-device update state is in :mod:`corral.firmware.updates`,
targeting in :mod:`corral.firmware.resolver`, rollouts in :mod:`corral.rollouts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.policy import Role, role_allows
from corral.auth.subject import Subject
from corral.db.session import after_commit
from corral.devices import groups as group_rules
from corral.devices.models import Device, DeviceGroup
from corral.firmware import signing
from corral.firmware.models import (
    OPEN_STATES,
    DeviceUpdate,
    FirmwareGroupRelease,
    ProductFirmware,
    SigningKey,
)
from corral.firmware.module import NOT_SET, ModuleInfo, parse_module
from corral.firmware.resolver import (
    DeviceFacts,
    ProductTargets,
    ReleaseSet,
    Target,
    device_facts,
    finish_count_gates,
    load_releases,
    resolve,
)
from corral.firmware.signals import UpdateIntent, request_updates
from corral.kit import clock
from corral.kit.body import as_bool, as_int, as_str
from corral.kit.errors import BadRequest, Conflict, Forbidden, NotFound
from corral.kit.responses import paging
from corral.products.models import Product
from corral.settings import Settings

MAX_VERSION = 65_535  # PRODUCT_VERSION is a u16 in the module suffix
MAX_TITLE = 200
MAX_DESCRIPTION = 5_000
FILENAME_RE = re.compile(r"[^A-Za-z0-9._+-]")


async def flush_or_conflict(db: AsyncSession, message: str, code: str) -> None:
    """Flush; a uniqueness race lost to a concurrent request becomes 409 (the boundary
    rolls the transaction back)."""
    try:
        await db.flush()
    except IntegrityError as exc:
        raise Conflict(message, code=code) from exc


# --- storage ------------------------------------------------------------------------------------

def firmware_dir(settings: Settings) -> Path:
    return settings.data_dir / "firmware"


def blob_path(settings: Settings, sha256: str) -> Path:
    """Where the binary with this SHA-256 lives (content-addressed: one file per content)."""
    return firmware_dir(settings) / sha256[:2] / sha256


def store_blob(settings: Settings, data: bytes, sha256: str) -> Path:
    """Write ``data`` under its digest (atomically; an existing copy is kept)."""
    path = blob_path(settings, sha256)
    if path.is_file() and path.stat().st_size == len(data):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_blob(settings: Settings, fw: ProductFirmware) -> bytes:
    return blob_path(settings, fw.sha256).read_bytes()


# --- reading and shaping ------------------------------------------------------------------------

def clean_version(value: Any, *, field: str = "version") -> int:
    v = as_int(value, field=field, required=True, lo=1, hi=MAX_VERSION)
    assert v is not None
    return v


def version_of_path(value: str) -> int:
    """The ``{version}`` path part; anything but a version is simply not found."""
    if not value.isdigit() or not 1 <= int(value) <= MAX_VERSION:
        raise NotFound(f"Firmware version {value[:40]!r} not found", code="firmware_not_found")
    return int(value)


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


async def list_firmware(db: AsyncSession, product: Product) -> list[dict[str, Any]]:
    """Every firmware of the product, newest version first."""
    rows = list((await db.execute(select(ProductFirmware).where(
        ProductFirmware.product_id == product.id)
        .order_by(ProductFirmware.version.desc()))).scalars())
    groups = await release_groups(db, [f.id for f in rows])
    counts = await device_counts(db, product)
    return [firmware_json(f, groups=groups[f.id], device_count=counts.get(f.version, 0))
            for f in rows]


# --- upload -------------------------------------------------------------------------------------

@dataclass
class Upload:
    data: bytes
    filename: str
    fields: dict[str, Any]


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
                         supplied: Any, key_hint: Any) -> tuple[bytes | None, str | None]:
    """The firmware's (signature, key id): the uploader's, checked against the product's
    keys, or corral's own with the product's newest key that can sign. A product with
    signing keys accepts only signed firmware."""
    keys = await active_keys(db, product)
    hint = as_str(key_hint, field="signing_key_id", max_len=64)
    if hint is not None and hint not in {k.key_id for k in keys}:
        raise BadRequest(f"The product has no active signing key {hint!r}",
                         code="unknown_signing_key")
    if supplied not in (None, ""):
        if not isinstance(supplied, str):
            raise BadRequest("signature must be base64 text", code="invalid_signature")
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
    unknown = set(f) - {"version", "title", "description", "mandatory", "signature",
                        "signing_key_id"}
    if unknown:
        raise BadRequest(f"Unknown fields: {', '.join(sorted(unknown)[:10])}",
                         code="invalid_request")
    version = clean_version(f.get("version"))
    title = as_str(f.get("title"), field="title", required=True, max_len=MAX_TITLE)
    description = as_str(f.get("description"), field="description", max_len=MAX_DESCRIPTION)
    mandatory = as_bool(f.get("mandatory"), field="mandatory")
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
    signature, key_id = await _signature_for(db, product, digest, f.get("signature"),
                                             f.get("signing_key_id"))
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
                          fw: ProductFirmware, body: dict[str, Any]) -> ProductFirmware:
    """Change ``title``, ``description`` and/or ``mandatory``."""
    allowed = {"title", "description", "mandatory"}
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"Unknown fields: {', '.join(sorted(unknown)[:10])}",
                         code="invalid_request")
    if not body:
        raise BadRequest("Nothing to update: send title, description or mandatory",
                         code="invalid_request")
    if "title" in body:
        fw.title = as_str(body["title"], field="title", required=True,
                          max_len=MAX_TITLE) or fw.title
    if "description" in body:
        fw.description = as_str(body["description"], field="description",
                                max_len=MAX_DESCRIPTION)
    if "mandatory" in body:
        fw.mandatory = as_bool(body["mandatory"], field="mandatory")
    fw.updated_at = clock.now()
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="firmware.updated", org_id=product.org_id,
                 product_id=product.id, target_type="firmware", target_id=fw.version,
                 details={"fields": sorted(body)})
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


# --- release and impact ---------------------------------------------------------------------------

@dataclass
class ReleaseRequest:
    version: int
    product_default: bool
    groups: list[str]
    intelligent: bool
    rollout: dict[str, Any] | None
    dry_run: bool


def parse_release(body: dict[str, Any]) -> ReleaseRequest:
    allowed = {"version", "product_default", "groups", "intelligent", "rollout", "dry_run"}
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"Unknown fields: {', '.join(sorted(unknown)[:10])}",
                         code="invalid_request")
    rollout = body.get("rollout")
    if rollout is not None and not isinstance(rollout, dict):
        raise BadRequest("rollout must be an object such as {\"percent\": 10}",
                         code="invalid_request")
    return ReleaseRequest(
        version=clean_version(body.get("version")),
        product_default=as_bool(body.get("product_default"), field="product_default"),
        groups=group_rules.clean_group_names(body.get("groups")),
        intelligent=as_bool(body.get("intelligent"), field="intelligent"),
        rollout=rollout, dry_run=as_bool(body.get("dry_run"), field="dry_run"))


async def group_ids_by_name(db: AsyncSession, product: Product, names: list[str]) -> dict[str, int]:
    """Group name -> id; 400 naming the groups the product does not have."""
    if not names:
        return {}
    found = {n: int(i) for i, n in (await db.execute(select(DeviceGroup.id, DeviceGroup.name)
                                                      .where(DeviceGroup.product_id == product.id,
                                                             DeviceGroup.name.in_(names)))).all()}
    missing = [n for n in names if n not in found]
    if missing:
        raise BadRequest(f"The product has no group(s) {', '.join(missing[:20])}",
                         code="group_not_found")
    return found


def after_release(releases: ReleaseSet, fw: ProductFirmware, product_default: bool,
                  group_ids: set[int], gate_change: Any = None) -> ReleaseSet:
    """``releases`` as they are once ``fw`` is released to exactly ``group_ids`` (and as the
    product default or not): the release is absolute for this firmware."""
    default = releases.default_version
    if product_default:
        default = fw.version
    elif default == fw.version:
        default = None
    groups = {g: v for g, v in releases.group_versions.items()
              if v != fw.version and g not in group_ids}
    groups.update({g: fw.version for g in group_ids})
    gates = dict(releases.gates)
    if gate_change is not None:
        gates[fw.version] = gate_change
    return ReleaseSet(default_version=default, group_versions=groups, gates=gates)


def replaced_by(releases: ReleaseSet, fw: ProductFirmware, product_default: bool,
                group_ids: set[int]) -> tuple[int | None, dict[int, int]]:
    """What releasing ``fw`` replaces: the previous default version (if it takes the
    default over) and each group's previous release."""
    default = releases.default_version
    fallback_default = default if product_default and default != fw.version else None
    fallback_groups = {g: v for g, v in releases.group_versions.items()
                       if g in group_ids and v != fw.version}
    return fallback_default, fallback_groups


@dataclass
class Change:
    device: DeviceFacts
    before: Target
    after: Target


def _resolve_all(devices: list[DeviceFacts], pt: ProductTargets,
                 releases: ReleaseSet) -> dict[str, Target]:
    rs = finish_count_gates(replace(pt, releases=releases), devices) if pt.counts else releases
    return {d.id: resolve(d, rs) for d in devices}


async def simulate(db: AsyncSession, product: Product, fw: ProductFirmware,
                   product_default: bool, groups: list[str],
                   rollout: dict[str, Any] | None = None
                   ) -> tuple[list[DeviceFacts], dict[str, Target], dict[str, Target]]:
    """Every device of the product with its target before and after releasing ``fw``."""
    from corral.rollouts.service import trial_gate

    ids = await group_ids_by_name(db, product, groups)
    pt = await load_releases(db, product.id)
    devices = await device_facts(db, product.id)
    before = _resolve_all(devices, pt, pt.releases)
    gate = None
    pt_after = pt
    if rollout is not None:
        fallback_default, fallback_groups = replaced_by(pt.releases, fw, product_default,
                                                        set(ids.values()))
        gate, count = trial_gate(fw, rollout, fallback_default=fallback_default,
                                 fallback_groups=fallback_groups)
        counts = dict(pt.counts)
        if count is None:
            counts.pop(fw.version, None)
        else:
            counts[fw.version] = count
        pt_after = replace(pt, counts=counts)
    after_rs = after_release(pt.releases, fw, product_default, set(ids.values()), gate)
    after = _resolve_all(devices, pt_after, after_rs)
    return devices, before, after


def impact_json(version: int, devices: list[DeviceFacts],
                after: dict[str, Target]) -> dict[str, Any]:
    """Particle's impact shape: devices that would be updated to ``version``, by the
    version they run now (``null``: not known yet)."""
    by_version: Counter[int | None] = Counter(
        d.firmware_version for d in devices
        if after[d.id].version == version and d.firmware_version != version)
    rows = sorted(by_version.items(), key=lambda kv: (kv[0] is None, -(kv[0] or 0)))
    return {"devices": {"firmware_update": {
        "total": sum(by_version.values()),
        "by_version": [{"version": v, "total": n} for v, n in rows]}}}


async def impact(db: AsyncSession, product: Product, params: dict[str, Any]) -> dict[str, Any]:
    """``GET /impact``: what releasing ``firmware_version`` (to ``groups``, as the
    ``product_default``) would update."""
    action = params.get("action")
    if action not in (None, "", "edit_groups_for_firmware"):
        raise BadRequest("action must be edit_groups_for_firmware", code="invalid_request")
    version = clean_version(params.get("firmware_version", params.get("version")),
                            field="firmware_version")
    fw = await get_firmware(db, product, version)
    groups = group_rules.clean_group_names(params.get("groups"))
    product_default = as_bool(params.get("product_default"), field="product_default")
    devices, _before, after = await simulate(db, product, fw, product_default, groups)
    return impact_json(version, devices, after)


async def _device_names(db: AsyncSession, ids: list[str]) -> dict[str, str | None]:
    if not ids:
        return {}
    return {i: n for i, n in (await db.execute(select(Device.id, Device.name)
                                               .where(Device.id.in_(ids)))).all()}


def _target_json(t: Target) -> dict[str, Any]:
    return {"version": t.version, "source": t.source, "rollout_id": t.rollout_id,
            "held": t.held}


async def release(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                  body: dict[str, Any], page: int = 1, per_page: int = 100) -> dict[str, Any]:
    """``PUT /firmware/release``. With ``dry_run`` nothing is written: the answer lists the
    devices whose target would change (paged) and the impact."""
    req = parse_release(body)
    fw = await get_firmware(db, product, req.version)
    devices, before, after = await simulate(db, product, fw, req.product_default, req.groups,
                                            req.rollout)
    changes = [Change(d, before[d.id], after[d.id]) for d in devices
               if before[d.id] != after[d.id]]
    if req.dry_run:
        start = (page - 1) * per_page
        shown = changes[start:start + per_page]
        names = await _device_names(db, [c.device.id for c in shown])
        return {"ok": True, "dry_run": True, "version": fw.version,
                "impact": impact_json(fw.version, devices, after),
                "devices": [{"id": c.device.id, "name": names.get(c.device.id),
                             "firmware_version": c.device.firmware_version,
                             "development": c.device.development,
                             "desired_firmware_version": c.device.desired_version,
                             "before": _target_json(c.before), "after": _target_json(c.after)}
                            for c in shown],
                "meta": paging(page, per_page, len(changes))}

    ids = await group_ids_by_name(db, product, req.groups)
    pt = await load_releases(db, product.id)
    fallback_default, fallback_groups = replaced_by(pt.releases, fw, req.product_default,
                                                    set(ids.values()))
    now = clock.now()
    if req.product_default:
        for other in (await db.execute(select(ProductFirmware).where(
                ProductFirmware.product_id == product.id, ProductFirmware.product_default,
                ProductFirmware.id != fw.id))).scalars():
            other.product_default = False
            other.updated_at = now
    fw.product_default = req.product_default
    # the release is absolute for this firmware, and a group has one release at a time
    replaced = [FirmwareGroupRelease.firmware_id == fw.id]
    if ids:
        replaced.append(FirmwareGroupRelease.group_id.in_(list(ids.values())))
    await db.execute(delete(FirmwareGroupRelease).where(
        FirmwareGroupRelease.product_id == product.id, or_(*replaced))
        .execution_options(synchronize_session=False))
    db.add_all([FirmwareGroupRelease(group_id=gid, product_id=product.id, firmware_id=fw.id,
                                     released_at=now) for gid in ids.values()])
    fw.intelligent = req.intelligent
    if fw.released_at is None and (req.product_default or ids):
        fw.released_at = now
        fw.released_by = actor.username or actor.client
    fw.updated_at = now
    await flush_or_conflict(db, "Another release changed these groups meanwhile; try again",
                            "conflict")
    if req.rollout is not None:
        from corral.rollouts.service import start_rollout

        await start_rollout(db, actor=actor, ip=ip, product=product, fw=fw, body=req.rollout,
                            fallback_default=fallback_default, fallback_groups=fallback_groups)
    await cancel_stale_updates(db, [(c.device.id, c.after.version) for c in changes])
    if req.intelligent:
        await _intelligent_intents(db, product, fw, devices, after)
    audit.record(db, actor=actor, ip=ip, action="firmware.released", org_id=product.org_id,
                 product_id=product.id, target_type="firmware", target_id=fw.version,
                 details={"product_default": req.product_default, "groups": sorted(ids),
                          "intelligent": req.intelligent, "rollout": req.rollout,
                          "devices_retargeted": len(changes)})
    return await firmware_view(db, product, fw)


async def cancel_stale_updates(db: AsyncSession, changed: list[tuple[str, int | None]]) -> None:
    """Open updates of devices whose target moved elsewhere end as ``cancelled``."""
    if not changed:
        return
    wanted = dict(changed)
    ids = sorted(wanted)
    now = clock.now()
    for i in range(0, len(ids), 5000):
        for u in (await db.execute(select(DeviceUpdate).where(
                DeviceUpdate.device_id.in_(ids[i:i + 5000]),
                DeviceUpdate.state.in_(OPEN_STATES),
                DeviceUpdate.trigger.in_(("release", "intelligent"))))).scalars():
            if u.target_version != wanted.get(u.device_id):
                u.state, u.reason = "cancelled", "The device's release target changed"
                u.finished_at = u.updated_at = now
    await db.flush()


async def _intelligent_intents(db: AsyncSession, product: Product, fw: ProductFirmware,
                               devices: list[DeviceFacts], after: dict[str, Target]) -> None:
    """Intelligent release: online devices that now target ``fw`` and do not run it get an
    update recorded and a "flash now" intent (offline ones update when they connect)."""
    from corral.firmware.updates import begin_update

    wanted = [d for d in devices if after[d.id].version == fw.version
              and not after[d.id].held and d.firmware_version != fw.version]
    if not wanted:
        return
    ids = [d.id for d in wanted]
    online: set[str] = set()
    for i in range(0, len(ids), 5000):
        online.update((await db.execute(select(Device.id).where(
            Device.id.in_(ids[i:i + 5000]), Device.online.is_(True)))).scalars())
    intents = []
    for d in wanted:
        if d.id not in online:
            continue
        u = await begin_update(db, device_id=d.id, product_id=product.id, fw=fw,
                               trigger="intelligent", rollout_id=after[d.id].rollout_id,
                               from_version=d.firmware_version)
        intents.append(UpdateIntent(device_id=d.id, version=fw.version, firmware_id=fw.id,
                                    update_id=u.id, trigger="intelligent"))
    request_updates(db, intents)


# --- locking one device (PUT /v1/products/:product/devices/:id) --------------------------------

@dataclass
class LockRequest:
    set_version: bool  # desired_firmware_version was sent
    version: int | None
    flash: bool
    firmware: ProductFirmware | None


def may_release(subject: Subject, role: Role | None) -> bool:
    if role is not None:
        return role_allows(role, "firmware:release")
    return "firmware:release" in subject.scopes


async def parse_lock(db: AsyncSession, *, actor: Subject, role: Role | None, product: Product,
                     device: Device, body: dict[str, Any]) -> LockRequest:
    """Validate ``desired_firmware_version`` (a version of the product, or ``null``) and
    ``flash``; nothing changes yet."""
    if not may_release(actor, role):
        raise Forbidden("Locking device firmware needs the firmware:release permission",
                        code="forbidden", required="firmware:release")
    set_version = "desired_firmware_version" in body
    raw = body.get("desired_firmware_version")
    version = None if raw in (None, "", "null") else clean_version(
        raw, field="desired_firmware_version")
    flash = as_bool(body.get("flash"), field="flash")
    if not set_version:
        version = device.desired_firmware_version
    fw = await get_firmware(db, product, version) if version is not None else None
    if flash and fw is None:
        raise BadRequest("flash needs a firmware version: send desired_firmware_version",
                         code="invalid_request")
    return LockRequest(set_version=set_version, version=version, flash=flash, firmware=fw)


async def apply_lock(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                     device: Device, req: LockRequest) -> dict[str, Any]:
    """Store the lock; with ``flash`` record an update and send a "flash now" intent."""
    from corral.firmware.updates import begin_update

    out: dict[str, Any] = {}
    if req.set_version:
        device.desired_firmware_version = req.version
        out["desired_firmware_version"] = req.version
        await cancel_stale_updates(db, [(device.id, req.version)])
    if req.flash:
        assert req.firmware is not None
        u = await begin_update(db, device_id=device.id, product_id=product.id, fw=req.firmware,
                               trigger="flash", rollout_id=None,
                               from_version=device.firmware_version)
        request_updates(db, [UpdateIntent(device_id=device.id, version=req.firmware.version,
                                          firmware_id=req.firmware.id, update_id=u.id,
                                          trigger="flash")])
        out["flash"] = True
    audit.record(db, actor=actor, ip=ip,
                 action="device.firmware_locked" if req.version is not None
                 else "device.firmware_unlocked",
                 org_id=product.org_id, product_id=product.id, target_type="device",
                 target_id=device.id, details={"version": req.version, "flash": req.flash})
    return out


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
                     body: dict[str, Any]) -> SigningKey:
    """Generate a key pair (corral signs uploads with it), or register an uploader's
    ``public_key`` (base64, hex or PEM) to check the signatures they send."""
    unknown = set(body) - {"name", "public_key"}
    if unknown:
        raise BadRequest(f"Unknown fields: {', '.join(sorted(unknown)[:10])}",
                         code="invalid_request")
    name = as_str(body.get("name"), field="name", max_len=100)
    raw = body.get("public_key")
    private: bytes | None = None
    if raw in (None, ""):
        private, public = signing.generate_key()
    else:
        if not isinstance(raw, str):
            raise BadRequest("public_key must be text (base64, hex or PEM)",
                             code="invalid_key")
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
