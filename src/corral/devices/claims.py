"""Claiming: who may claim a device, unclaiming, and claim codes.

A device is claimed to at most one owner: a person (``Device.owner_user_id``) or a customer
of the device's product (``Device.customer_id``). The rules, in the order they are applied:

* already claimed to the caller -> fine (idempotent);
* a **customer** may claim only a device of their own product (anything else: 404);
* a **person** may claim a product device only with a role on that product that allows
  ``devices:update`` (no role: 404, as if it did not exist; a weaker role: 403);
* claimed to someone else -> 403 "That belongs to someone else." (particle-cli matches it);
* denied by its product -> 403;
* a person claiming an unknown id creates it as their developer device (no product).

Claim codes bind a person or a customer (and a product, when made on a product path) for
24 hours; a device presents one after connecting (:func:`redeem_claim_code`) and the same
rules decide. Codes are stored only as SHA-256 digests.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.models import Customer, User
from corral.auth.policy import api_users_not_allowed, role_allows
from corral.auth.subject import Subject
from corral.devices import signals
from corral.devices.access import is_device_id
from corral.devices.models import ClaimCode, Device
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, CorralError, Forbidden, NotFound
from corral.kit.secrets import digest
from corral.products.access import product_role
from corral.products.models import Product

CLAIM_CODE_LIFETIME = dt.timedelta(hours=24)
CLAIM_CODE_BYTES = 36  # token_urlsafe -> 48 characters (Device OS takes up to 63)
MAX_CLAIM_CODE = 63
CHUNK = 5000  # bound parameters per IN (...) list
BELONGS_TO_SOMEONE_ELSE = "That belongs to someone else."
ICCID_RE = re.compile(r"^[0-9]{18,22}[Ff]?$")
IMEI_RE = re.compile(r"^[0-9]{14,16}$")

# why a claim (or a claim-code redemption) was refused
NOT_FOUND = "not_found"
ROLE_FORBIDDEN = "role_forbidden"
SOMEONE_ELSE = "owned_by_someone_else"
DENIED = "denied"


def belongs_to_someone_else() -> Forbidden:
    """403 in the shape particle-cli recognises (it matches "belongs to someone else")."""
    return Forbidden(BELONGS_TO_SOMEONE_ELSE, code="forbidden", errors=[BELONGS_TO_SOMEONE_ELSE])


@dataclass(frozen=True)
class Claimant:
    """Who a device would be claimed to: a person, or a customer of one product."""

    label: str
    user_id: int | None = None
    customer_id: int | None = None
    product_id: int | None = None  # customers: their product

    def owns(self, device: Device) -> bool:
        if self.customer_id is not None:
            return device.customer_id == self.customer_id
        return device.owner_user_id is not None and device.owner_user_id == self.user_id


def claimant_for(me: Subject, *, on_product_path: bool = False) -> Claimant:
    """The claimant a token stands for. API users and client tokens cannot own devices.

    On a product path the product guard has already let an API user with ``devices:update``
    through; the refusal then uses HTTP 400, as Particle documents it for API users."""
    if me.kind == "user":
        assert me.user_id is not None
        return Claimant(label=me.label, user_id=me.user_id)
    if me.kind == "customer":
        assert me.customer_id is not None
        return Claimant(label=me.label, customer_id=me.customer_id, product_id=me.product_id)
    err = api_users_not_allowed()
    if on_product_path:
        err.status = 400
    raise err


def clean_device_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("id is required: the 24-character hex device ID", code="invalid_request")
    if not is_device_id(value.strip()):
        raise BadRequest("id must be a 24-character hex device ID", code="invalid_device_id")
    return value.strip().lower()


@dataclass(frozen=True)
class Refusal:
    reason: str
    error: CorralError


async def refusal(db: AsyncSession, device: Device, claimant: Claimant) -> Refusal | None:
    """Why ``claimant`` may not claim ``device`` (None: they may, or already own it)."""
    if claimant.owns(device):
        return None
    if claimant.customer_id is not None:
        if device.product_id is None or device.product_id != claimant.product_id:
            return Refusal(NOT_FOUND, NotFound("Device not found"))
    elif device.product_id is not None:
        product = await db.get(Product, device.product_id)
        assert product is not None and claimant.user_id is not None
        role = await product_role(db, claimant.user_id, product)
        if role is None:
            return Refusal(NOT_FOUND, NotFound("Device not found"))
        if not role_allows(role, "devices:update"):
            return Refusal(ROLE_FORBIDDEN, Forbidden(
                f"The {role.label} role may not claim this product's devices (devices:update)",
                code="forbidden", required="devices:update"))
    if device.owner_user_id is not None or device.customer_id is not None:
        return Refusal(SOMEONE_ELSE, belongs_to_someone_else())
    if device.denied:
        return Refusal(DENIED, Forbidden("This device was denied by its product and cannot be "
                                         "claimed", code="forbidden"))
    return None


def _assign(db: AsyncSession, device: Device, claimant: Claimant) -> None:
    device.owner_user_id = claimant.user_id
    device.customer_id = claimant.customer_id
    device.claimed_at = clock.now()
    signals.tenancy_changed(db, device.id)


async def _product_org(db: AsyncSession, product_id: int | None) -> tuple[int | None, int | None]:
    if product_id is None:
        return None, None
    product = await db.get(Product, product_id)
    return (product.org_id if product else None), product_id


def _owner_details(claimant: Claimant) -> dict[str, Any]:
    if claimant.customer_id is not None:
        return {"customer": claimant.label}
    return {"user": claimant.label}


# --- claim and unclaim ---------------------------------------------------------------------

async def claim_device(db: AsyncSession, *, actor: Subject, device_id: Any,
                       request_transfer: bool = False, ip: str | None) -> Device:
    """Claim ``device_id`` to the caller (a person or a customer); see the module rules.

    ``request_transfer`` is accepted for particle-api-js; transfers are not implemented, so a
    device owned by someone else is refused either way."""
    claimant = claimant_for(actor)
    did = clean_device_id(device_id)
    device = await db.get(Device, did)
    if device is None:
        if claimant.customer_id is not None:
            raise NotFound("Device not found")
        device = Device(id=did, owner_user_id=claimant.user_id, claimed_at=clock.now(),
                        platform_id=0)
        db.add(device)
        try:
            await db.flush()
        except IntegrityError as exc:  # created concurrently by someone else
            raise Conflict("That device was just created by another request; try again") from exc
        audit.record(db, actor=actor, ip=ip, action="device.claimed", target_type="device",
                     target_id=did, details={**_owner_details(claimant), "created": True})
        return device
    refused = await refusal(db, device, claimant)
    if refused is not None:
        raise refused.error
    if claimant.owns(device):
        return device
    _assign(db, device, claimant)
    org_id, product_id = await _product_org(db, device.product_id)
    audit.record(db, actor=actor, ip=ip, action="device.claimed", org_id=org_id,
                 product_id=product_id, target_type="device", target_id=did,
                 details={**_owner_details(claimant),
                          **({"request_transfer": True} if request_transfer else {})})
    return device


async def unclaim_device(db: AsyncSession, *, actor: Subject, device: Device,
                         ip: str | None) -> bool:
    """Release ``device`` from its owner (person or customer); the caller was authorized by a
    guard. A developer device (no product) is deleted entirely; a product device stays in its
    product, fully usable. Returns whether anything changed."""
    previous = {"owner_user_id": device.owner_user_id, "customer_id": device.customer_id}
    org_id, product_id = await _product_org(db, device.product_id)
    if device.product_id is None:
        audit.record(db, actor=actor, ip=ip, action="device.unclaimed", target_type="device",
                     target_id=device.id, details={**previous, "deleted": True})
        await db.delete(device)
        await db.flush()
        return True
    if device.owner_user_id is None and device.customer_id is None and device.claimed_at is None:
        return False
    device.owner_user_id = None
    device.customer_id = None
    device.claimed_at = None
    signals.tenancy_changed(db, device.id)
    audit.record(db, actor=actor, ip=ip, action="device.unclaimed", org_id=org_id,
                 product_id=product_id, target_type="device", target_id=device.id,
                 details=previous)
    return True


async def customer_device_ids(db: AsyncSession, customer_ids: list[int]) -> dict[int, list[str]]:
    """The ids of the devices claimed to each customer (sorted)."""
    out: dict[int, list[str]] = {cid: [] for cid in customer_ids}
    for start in range(0, len(customer_ids), CHUNK):
        rows = await db.execute(select(Device.customer_id, Device.id).where(
            Device.customer_id.in_(customer_ids[start:start + CHUNK])).order_by(Device.id))
        for customer_id, device_id in rows:
            if customer_id is not None:  # the IN above
                out[customer_id].append(device_id)
    return out


async def release_customer(db: AsyncSession, customer_id: int) -> tuple[int, int]:
    """Before a customer is deleted: drop their claim codes and release their devices (they
    stay in their product, unclaimed). Returns (codes deleted, devices released)."""
    codes = await db.execute(delete(ClaimCode).where(ClaimCode.customer_id == customer_id)
                             .execution_options(synchronize_session=False))
    released = await db.execute(
        update(Device).where(Device.customer_id == customer_id)
        .values(customer_id=None, claimed_at=None).execution_options(synchronize_session=False))
    return _rowcount(codes), _rowcount(released)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


# --- claim codes ----------------------------------------------------------------------------

def _code_from(iccid: Any, imei: Any) -> tuple[str, str]:
    """The claim code and its kind: the ICCID or IMEI when given, else a random one."""
    iccid = None if iccid in (None, "") else iccid
    imei = None if imei in (None, "") else imei
    if iccid is not None and imei is not None:
        raise BadRequest("Send iccid or imei, not both")
    if iccid is not None:
        if not isinstance(iccid, str) or not ICCID_RE.match(iccid.strip()):
            raise BadRequest("iccid must be 18 to 22 digits", code="invalid_iccid")
        return iccid.strip().upper(), "iccid"
    if imei is not None:
        if not isinstance(imei, str) or not IMEI_RE.match(imei.strip()):
            raise BadRequest("imei must be 14 to 16 digits", code="invalid_imei")
        return imei.strip(), "imei"
    return secrets.token_urlsafe(CLAIM_CODE_BYTES), "random"


async def owned_device_ids(db: AsyncSession, claimant: Claimant) -> list[str]:
    q = select(Device.id)
    if claimant.customer_id is not None:
        q = q.where(Device.customer_id == claimant.customer_id)
    else:
        q = q.where(Device.owner_user_id == claimant.user_id)
    return list((await db.execute(q.order_by(Device.id))).scalars())


@dataclass
class NewClaimCode:
    code: str  # shown once; stored only as a digest
    row: ClaimCode
    device_ids: list[str]


async def create_claim_code(db: AsyncSession, *, actor: Subject, product: Product | None,
                            iccid: Any = None, imei: Any = None, ip: str | None) -> NewClaimCode:
    """A 24-hour claim code for the caller (a person, or a customer of ``product``).

    ``product`` is the product of a product path (the guard checked access) or None; a
    customer's code is always bound to the customer's product."""
    claimant = claimant_for(actor, on_product_path=product is not None)
    product_id = product.id if product is not None else claimant.product_id
    code, kind = _code_from(iccid, imei)
    code_hash = digest(code)
    now = clock.now()
    # codes are per claimant: an ICCID/IMEI code someone else holds does not stand in the way
    # (the device's owner decides on redemption); asking again replaces one's own code
    mine = ClaimCode.customer_id == claimant.customer_id if claimant.customer_id is not None \
        else ClaimCode.user_id == claimant.user_id
    existing = (await db.execute(select(ClaimCode).where(ClaimCode.code_hash == code_hash, mine))
                ).scalar_one_or_none()
    if existing is not None:
        await db.delete(existing)
        await db.flush()
    row = ClaimCode(code_hash=code_hash, user_id=claimant.user_id,
                    customer_id=claimant.customer_id, product_id=product_id, created_at=now,
                    expires_at=now + CLAIM_CODE_LIFETIME)
    db.add(row)
    try:
        await db.flush()
    except IntegrityError as exc:
        raise Conflict("That claim code was just created by another request; try again",
                       code="claim_code_taken") from exc
    org_id, _ = await _product_org(db, product_id)
    audit.record(db, actor=actor, ip=ip, action="claim_code.created", org_id=org_id,
                 product_id=product_id, target_type="claim_code", target_id=row.id,
                 details={**_owner_details(claimant), "kind": kind})
    return NewClaimCode(code=code, row=row, device_ids=await owned_device_ids(db, claimant))


@dataclass(frozen=True)
class ClaimResult:
    """What happened when a device presented a claim code."""

    ok: bool
    device_id: str
    reason: str | None = None  # None when ok; else one of the REDEEM_* / refusal reasons
    user_id: int | None = None
    customer_id: int | None = None
    changed: bool = False  # False when the device already belonged to the code's owner


REDEEM_INVALID_DEVICE = "invalid_device_id"
REDEEM_UNKNOWN_DEVICE = "unknown_device"
REDEEM_UNKNOWN_CODE = "unknown_code"
REDEEM_EXPIRED = "expired"
REDEEM_USED = "used"
REDEEM_WRONG_PRODUCT = "wrong_product"


async def _code_claimant(db: AsyncSession, row: ClaimCode) -> Claimant | None:
    if row.customer_id is not None:
        customer = await db.get(Customer, row.customer_id)
        if customer is None:
            return None
        return Claimant(label=customer.email, customer_id=customer.id,
                        product_id=customer.product_id)
    user = await db.get(User, row.user_id) if row.user_id is not None else None
    if user is None or user.kind != "user":
        return None
    return Claimant(label=user.username, user_id=user.id)


async def redeem_claim_code(db: AsyncSession, *, device_id: str, code: str) -> ClaimResult:
    """A connected device presents ``code``: claim it to the code's person or customer.

    Called by the device-session core inside its own transaction (this never commits). A
    valid, unexpired, unused code claims the device (a customer's only when the device is in
    the customer's product; a product-bound code only for that product's devices), marks the
    code used and audits ``device.claimed``. Anything else returns ``ok=False`` and a reason;
    nothing changes."""
    if not isinstance(device_id, str) or not is_device_id(device_id):
        return ClaimResult(False, str(device_id)[:24], REDEEM_INVALID_DEVICE)
    did = device_id.lower()
    if not isinstance(code, str) or not code.strip() or len(code.strip()) > MAX_CLAIM_CODE:
        return ClaimResult(False, did, REDEEM_UNKNOWN_CODE)
    code = code.strip()
    hashes = list(dict.fromkeys([digest(code), digest(code.upper())]))  # ICCIDs: upper-case
    rows = list((await db.execute(select(ClaimCode).where(ClaimCode.code_hash.in_(hashes))
                                  .order_by(ClaimCode.id.desc()).with_for_update())).scalars())
    device = await db.get(Device, did)
    # an ICCID/IMEI code may be held by several claimants: the newest one the device accepts
    # wins; when none does, the newest holder's refusal is the answer
    first: ClaimResult | None = None
    for row in rows:
        verdict = await _judge(db, row, device, did)
        if isinstance(verdict, ClaimResult):
            if verdict.ok:
                return verdict
            first = first or verdict
            continue
        return await _redeem(db, row, device, verdict)
    return first or ClaimResult(False, did, REDEEM_UNKNOWN_CODE)


def _outcome(claimant: Claimant, did: str, ok: bool, reason: str | None, *,
             changed: bool = False) -> ClaimResult:
    return ClaimResult(ok, did, reason, user_id=claimant.user_id,
                       customer_id=claimant.customer_id, changed=changed)


async def _judge(db: AsyncSession, row: ClaimCode, device: Device | None,
                 did: str) -> ClaimResult | Claimant:
    """The outcome of ``row`` for the device (nothing changes), or its claimant when the
    claim may go ahead."""
    claimant = await _code_claimant(db, row)
    if claimant is None:
        return ClaimResult(False, did, REDEEM_UNKNOWN_CODE)
    if row.used_at is not None:
        if row.device_id == did and device is not None and claimant.owns(device):
            return _outcome(claimant, did, True, None)  # the device repeated itself
        return _outcome(claimant, did, False, REDEEM_USED)
    if row.expires_at <= clock.now():
        return _outcome(claimant, did, False, REDEEM_EXPIRED)
    if device is None:
        return _outcome(claimant, did, False, REDEEM_UNKNOWN_DEVICE)
    if row.product_id is not None and device.product_id != row.product_id:
        return _outcome(claimant, did, False, REDEEM_WRONG_PRODUCT)
    refused = await refusal(db, device, claimant)
    if refused is not None:
        reason = REDEEM_WRONG_PRODUCT if (refused.reason == NOT_FOUND
                                          and claimant.customer_id is not None) else refused.reason
        return _outcome(claimant, did, False, reason)
    return claimant


async def _redeem(db: AsyncSession, row: ClaimCode, device: Device | None,
                  claimant: Claimant) -> ClaimResult:
    assert device is not None
    did = device.id
    row.used_at = clock.now()
    row.device_id = did
    if claimant.owns(device):
        return _outcome(claimant, did, True, None, changed=False)
    _assign(db, device, claimant)
    org_id, product_id = await _product_org(db, device.product_id)
    audit.record(db, actor=None, actor_label=claimant.label, ip=None, action="device.claimed",
                 org_id=org_id, product_id=product_id, target_type="device", target_id=did,
                 details={**_owner_details(claimant), "via": "claim_code",
                          "claim_code_id": row.id})
    return _outcome(claimant, did, True, None, changed=True)
