"""Device credentials for the two transports, product CA certificates and JITP.

* **Particle protocol**: each device may have one public key, RSA (1024-4096 bits; TCP
  devices use RSA-1024) or ECC P-256 (Gen 3 devices over DTLS/UDP), stored as DER
  SubjectPublicKeyInfo (:func:`spki_der`); the device servers compare the key a device
  presents with it byte for byte (:meth:`corral.sessions.core.SessionHub.check_device_key`).
* **MQTT**: each device may have one generated secret, shown once and stored as a SHA-256
  digest. The MQTT server checks it with :func:`verify_mqtt_secret`.
* **X.509 (JITP)**: a product registers CA certificates; a device presenting a leaf
  certificate signed by an active one (CommonName = its 24-hex id) is provisioned into that
  product on first connect by :func:`provision_from_certificate`. Reconnects may use
  :func:`device_for_certificate`.

Every credential change bumps ``Device.credentials_version`` (transports compare it to drop
sessions whose credentials were revoked), except recording a JITP certificate fingerprint,
which only adds a credential. :func:`reset_credentials` clears all of them (a forced switch
to another product calls it). Services never commit; they audit every change, and never put
a secret or a key in audit details (fingerprints only).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.audit.models import AuditEntry
from corral.auth.subject import Subject
from corral.devices import signals
from corral.devices import tags as tag_rules
from corral.devices.access import is_device_id
from corral.devices.groups import clean_group_name
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember, ProductCA
from corral.devices.schemas import CaChange
from corral.kit import clock
from corral.kit.body import as_bool, as_str
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.kit.ids import path_id
from corral.kit.secrets import digest, new_secret, same
from corral.products.models import Product

MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096
MAX_KEY_TEXT = 64 * 1024  # one PEM/DER key, generously
MAX_BULK_KEYS = 10_000
MAX_CERT_TEXT = 64 * 1024
MAX_JITP_GROUPS = 50
MAX_JITP_TAGS = 50
MAX_TAG_LEN = 100
CHUNK = 5_000  # IN (...) lists stay well under SQLite's bound-parameter limit
CREDENTIALS_CHANGED = "The device's credentials changed"  # why its live session ended


# --- helpers ------------------------------------------------------------------------------

def fingerprint(der: bytes) -> str:
    """SHA-256 of DER bytes, lowercase hex (64 characters)."""
    return hashlib.sha256(der).hexdigest()


def _audit(db: AsyncSession, *, actor: Subject | None, ip: str | None, action: str,
           device: Device, org_id: int | None, details: dict[str, Any] | None = None,
           actor_label: str | None = None) -> None:
    audit.record(db, actor=actor, ip=ip, action=action, org_id=org_id,
                 product_id=device.product_id, target_type="device", target_id=device.id,
                 details=details, actor_label=actor_label)


async def _org_id(db: AsyncSession, product_id: int | None) -> int | None:
    if product_id is None:
        return None
    product = await db.get(Product, product_id)
    return product.org_id if product else None


# --- public keys (Particle protocol: RSA over TCP, ECC P-256 over DTLS/UDP) -----------------

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
ALGORITHMS = {"rsa": "rsa", "ecc": "ecc", "ec": "ecc", "ecdsa": "ecc"}


def _parse_public_key(data: bytes | str) -> Any:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_KEY_TEXT:
        raise BadRequest("The public key is too large", code="invalid_key")
    text = raw.strip()
    if not text:
        raise BadRequest("The public key is empty", code="invalid_key")
    if b"PRIVATE KEY" in text[:100]:
        raise BadRequest("That is a private key; send only the public key", code="invalid_key")
    try:
        if text.startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(text)
        return serialization.load_der_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadRequest("The public key could not be parsed (expected a PEM or DER RSA "
                         "or ECC P-256 public key)", code="invalid_key") from None


def _check_rsa(key: rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    bits = key.key_size
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise BadRequest(f"The RSA key has {bits} bits; {MIN_RSA_BITS}-{MAX_RSA_BITS} are "
                         "accepted", code="invalid_key")
    e = key.public_numbers().e
    if e % 2 == 0 or not 3 <= e <= 2**32:
        raise BadRequest("The RSA public exponent is not acceptable", code="invalid_key")
    return key


def load_rsa_public_key(data: bytes | str) -> rsa.RSAPublicKey:
    """Parse a PEM or DER RSA public key (SubjectPublicKeyInfo or PKCS#1) and check it.

    400 ``invalid_key`` unless it parses, is RSA, has 1024-4096 bits and an odd public
    exponent between 3 and 2**32. Private keys are refused (send only the public half).
    """
    key = _parse_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadRequest("The public key is not an RSA key", code="invalid_key")
    return _check_rsa(key)


def load_public_key(data: bytes | str, algorithm: Any = None) -> PublicKey:
    """A device public key as Particle takes it: RSA (see :func:`load_rsa_public_key`) or
    ECC, which must be P-256 (secp256r1, the only curve Device OS's DTLS speaks), PEM or
    DER SubjectPublicKeyInfo. ``algorithm`` (``rsa`` | ``ecc``; None: the key says) must
    match the key. 400 ``invalid_key`` otherwise."""
    algo = check_algorithm(algorithm) if algorithm not in (None, "") else None
    key = _parse_public_key(data)
    if isinstance(key, rsa.RSAPublicKey):
        if algo == "ecc":
            raise BadRequest("The public key is an RSA key, but algorithm says ecc",
                             code="invalid_key")
        return _check_rsa(key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if algo == "rsa":
            raise BadRequest("The public key is an ECC key, but algorithm says rsa",
                             code="invalid_key")
        if not isinstance(key.curve, ec.SECP256R1):
            raise BadRequest(f"The ECC key is on {key.curve.name}; device keys are P-256 "
                             "(secp256r1)", code="invalid_key")
        return key
    raise BadRequest("The public key is neither RSA nor ECC P-256", code="invalid_key")


def key_algorithm(key: PublicKey) -> str:
    """``rsa`` or ``ecc``, as Particle names them."""
    return "ecc" if isinstance(key, ec.EllipticCurvePublicKey) else "rsa"


def spki_der(key: PublicKey) -> bytes:
    """The one form device public keys are stored in (compare stored keys as bytes)."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_json(device: Device) -> dict[str, Any] | None:
    """``{"algorithm", "bits", "fingerprint"}`` of the stored key, or ``None``."""
    if not device.public_key_der:
        return None
    try:
        bits: int | None = serialization.load_der_public_key(device.public_key_der).key_size  # type: ignore[union-attr]
    except (ValueError, UnsupportedAlgorithm, AttributeError):
        bits = None
    return {"algorithm": device.public_key_algorithm or "rsa", "bits": bits,
            "fingerprint": fingerprint(device.public_key_der)}


def check_algorithm(value: Any) -> str:
    """The ``algorithm`` field: ``rsa`` (the default) or ``ecc`` (also ``ec``, ``ecdsa``)."""
    algo = (as_str(value, field="algorithm", max_len=20) or "rsa").strip().lower()
    if algo not in ALGORITHMS:
        raise BadRequest("algorithm must be rsa or ecc", code="invalid_key")
    return ALGORITHMS[algo]


def _store_key(device: Device, der: bytes, algorithm: str) -> None:
    device.public_key_der = der
    device.public_key_algorithm = algorithm
    device.credentials_version = (device.credentials_version or 0) + 1


async def set_public_key(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                         device: Device, key_data: bytes | str,
                         algorithm: Any = None) -> dict[str, Any]:
    """Validate and store ``device``'s public key (RSA or ECC P-256); returns
    :func:`public_key_json`. A different key replacing one ends the device's live session
    (after the commit)."""
    key = load_public_key(key_data, algorithm)
    der = spki_der(key)
    replaced = device.public_key_der is not None and device.public_key_der != der
    _store_key(device, der, key_algorithm(key))
    if replaced:  # a live session authenticated with the old key must not outlive it
        _credentials_changed(db, device)
    info = public_key_json(device)
    assert info is not None
    _audit(db, actor=actor, ip=ip, action="device.key_set", device=device,
           org_id=await _org_id(db, device.product_id), details=dict(info))
    return info


def _entry_field(entry: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in entry:
            return entry[n]
    return None


def parse_bulk_keys(body: dict[str, Any] | list[Any] | bytes | str) -> list[Any]:
    """The ``keys`` list of a bulk upload: a JSON object ``{"keys": [...]}`` (or its text, or
    the bytes of an uploaded file), or a bare list. 400 when it is none of those."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("The file is not valid JSON (expected {\"keys\": [...]})",
                             code="invalid_json") from None
    keys = body.get("keys") if isinstance(body, dict) else body
    if isinstance(keys, str):
        return parse_bulk_keys(keys if keys.lstrip().startswith("[") else "null")
    if not isinstance(keys, list):
        raise BadRequest("keys must be a list of {device_id, public_key}", code="invalid_request")
    if not keys:
        raise BadRequest("keys is empty", code="invalid_request")
    if len(keys) > MAX_BULK_KEYS:
        raise BadRequest(f"At most {MAX_BULK_KEYS:,} keys per request", code="too_many_keys")
    return keys


async def bulk_set_keys(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                        product: Product, keys: Sequence[Any]) -> int:
    """Set many devices' keys in ``product``, all or nothing.

    Any bad entry (malformed, bad key, device not in the product, listed twice) makes the
    whole request fail with 400 ``invalid_keys`` and an ``invalid`` list of
    ``{device_id, reason}``; nothing is written. Returns the number of devices updated. A
    device whose key is replaced by a different one has its live session ended (after the
    commit), as :func:`set_public_key` does.
    """
    if len(keys) > MAX_BULK_KEYS:
        raise BadRequest(f"At most {MAX_BULK_KEYS:,} keys per request", code="too_many_keys")
    invalid: list[dict[str, Any]] = []
    parsed: dict[str, tuple[bytes, int, str]] = {}  # device id -> (SPKI DER, bits, algorithm)
    for entry in keys:
        if not isinstance(entry, dict):
            invalid.append({"device_id": None, "reason": "entry must be an object"})
            continue
        raw_id = _entry_field(entry, "device_id", "deviceId", "deviceID", "id")
        if not isinstance(raw_id, str) or not is_device_id(raw_id):
            invalid.append({"device_id": raw_id[:100] if isinstance(raw_id, str) else None,
                            "reason": "device_id must be 24 hex characters"})
            continue
        device_id = raw_id.lower()
        if device_id in parsed:
            invalid.append({"device_id": device_id, "reason": "listed more than once"})
            continue
        pem = _entry_field(entry, "public_key", "publicKey")
        if not isinstance(pem, str) or not pem.strip():
            invalid.append({"device_id": device_id, "reason": "public_key (PEM) is required"})
            parsed[device_id] = (b"", 0, "")
            continue
        try:
            key = load_public_key(pem, entry.get("algorithm"))
            parsed[device_id] = (spki_der(key), key.key_size, key_algorithm(key))
        except BadRequest as exc:
            invalid.append({"device_id": device_id, "reason": exc.description})
            parsed[device_id] = (b"", 0, "")

    ids = list(parsed)
    found: dict[str, bytes | None] = {}  # device id -> the key it has now
    for i in range(0, len(ids), CHUNK):
        found.update((r[0], r[1]) for r in await db.execute(
            select(Device.id, Device.public_key_der).where(
                Device.id.in_(ids[i:i + CHUNK]), Device.product_id == product.id)))
    invalid.extend({"device_id": d, "reason": "device is not in this product"}
                   for d in ids if d not in found)
    if invalid:
        raise BadRequest(f"{len(invalid)} key(s) are invalid; nothing was changed",
                         code="invalid_keys", invalid=invalid)

    # one executemany UPDATE; devices already in this session are expired so they reload
    now = clock.now()
    table = _table(Device)
    stmt = (update(table).where(table.c.id == bindparam("b_id"))
            .values(public_key_der=bindparam("b_der"), public_key_algorithm=bindparam("b_alg"),
                    credentials_version=table.c.credentials_version + 1, updated_at=now))
    await db.execute(stmt, [{"b_id": d, "b_der": der, "b_alg": alg}
                            for d, (der, _, alg) in parsed.items()])
    for obj in list(db.identity_map.values()):
        if isinstance(obj, Device) and obj.id in parsed:
            db.expire(obj)
    # as for one key: a live session authenticated with a replaced key must not outlive it
    # (a device whose key is the same keeps its session)
    signals.disconnect_many(db, [d for d, (der, _, _) in parsed.items()
                                 if found[d] is not None and found[d] != der],
                            CREDENTIALS_CHANGED)
    # one audit row per device, written as one executemany (ORM inserts of 10k rows that
    # each need their id back are issued one by one on SQLite: seconds instead of ms)
    await db.execute(insert(_table(AuditEntry)), [
        {"at": now, "actor_user_id": actor.user_id if actor else None,
         "actor": actor.label if actor else "system", "ip": ip, "action": "device.key_set",
         "org_id": product.org_id, "product_id": product.id, "target_type": "device",
         "target_id": device_id,
         "details": {"algorithm": alg, "bits": bits, "fingerprint": fingerprint(der),
                     "bulk": True}}
        for device_id, (der, bits, alg) in parsed.items()])
    return len(parsed)


async def clear_public_key(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                           device: Device) -> bool:
    """Remove the device's public key; False (and no change) when it had none."""
    if device.public_key_der is None:
        return False
    old = fingerprint(device.public_key_der)
    device.public_key_der = None
    device.public_key_algorithm = None
    device.credentials_version = (device.credentials_version or 0) + 1
    _audit(db, actor=actor, ip=ip, action="device.key_cleared", device=device,
           org_id=await _org_id(db, device.product_id), details={"fingerprint": old})
    return True


async def device_public_key(db: AsyncSession, device_id: str) -> rsa.RSAPublicKey | None:
    """The device's RSA public key for the Particle TCP handshake; ``None`` for an unknown
    or denied device, or one without an RSA key."""
    if not isinstance(device_id, str) or not is_device_id(device_id):
        return None
    device = await db.get(Device, device_id.lower())
    if device is None or device.denied or not device.public_key_der:
        return None
    try:
        key = serialization.load_der_public_key(device.public_key_der)
    except (ValueError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


async def pin_public_key(db: AsyncSession, device_id: str, key: PublicKey) -> bool:
    """Trust on first use: record ``key`` for a device that has none yet (a device that was
    unknown until its first handshake); audited. False when the device already had a key
    or does not exist."""
    did = device_id.lower()
    res = await db.execute(
        update(Device).where(Device.id == did, Device.public_key_der.is_(None))
        .values(public_key_der=spki_der(key), public_key_algorithm=key_algorithm(key),
                credentials_version=Device.credentials_version + 1)
        .execution_options(synchronize_session=False))
    if not res.rowcount:  # type: ignore[attr-defined]
        return False
    device = await db.get(Device, did)
    if device is not None:
        await db.refresh(device)
        _audit(db, actor=None, ip=None, action="device.key_pinned", device=device,
               org_id=await _org_id(db, device.product_id))
    return True


# --- MQTT secrets -------------------------------------------------------------------------

async def rotate_mqtt_secret(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                             device: Device) -> str:
    """Generate a new MQTT secret (the old one stops working); returns it, once."""
    secret = new_secret(24)
    device.mqtt_secret_hash = digest(secret)
    device.mqtt_secret_rotated_at = clock.now()
    device.credentials_version = (device.credentials_version or 0) + 1
    _credentials_changed(db, device)
    _audit(db, actor=actor, ip=ip, action="device.mqtt_secret_rotated", device=device,
           org_id=await _org_id(db, device.product_id))
    return secret


async def clear_mqtt_secret(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                            device: Device) -> bool:
    """Remove the device's MQTT secret; False (and no change) when it had none."""
    if device.mqtt_secret_hash is None:
        return False
    device.mqtt_secret_hash = None
    device.mqtt_secret_rotated_at = None
    device.credentials_version = (device.credentials_version or 0) + 1
    _credentials_changed(db, device)
    _audit(db, actor=actor, ip=ip, action="device.mqtt_secret_cleared", device=device,
           org_id=await _org_id(db, device.product_id))
    return True


async def verify_mqtt_secret(db: AsyncSession, device_id: str, secret: str, *,
                             denied_ok: bool = False) -> Device | None:
    """The device when ``secret`` is its current MQTT secret (constant-time compare);
    ``None`` for an unknown device, a device without a secret, a wrong one, or a denied device
    (unless ``denied_ok``: the MQTT server then refuses it as not authorized on admission)."""
    if not isinstance(device_id, str) or not is_device_id(device_id):
        return None
    if not isinstance(secret, str) or not secret or len(secret) > 1024:
        return None
    device = await db.get(Device, device_id.lower())
    if device is None or (device.denied and not denied_ok) or not device.mqtt_secret_hash:
        return None
    return device if same(digest(secret), device.mqtt_secret_hash) else None


# --- all credentials ----------------------------------------------------------------------

def reset_credentials(device: Device) -> None:
    """Clear every credential (key, MQTT secret, certificate) and bump the version.

    No audit entry: the caller (e.g. the importer's forced product switch) audits its own
    change. The caller flushes/commits.
    """
    device.public_key_der = None
    device.public_key_algorithm = None
    device.mqtt_secret_hash = None
    device.mqtt_secret_rotated_at = None
    device.certificate_fingerprint = None
    device.credentials_version = (device.credentials_version or 0) + 1


def _credentials_changed(db: AsyncSession, device: Device) -> None:
    signals.disconnect(db, device.id, CREDENTIALS_CHANGED)


def credentials_json(device: Device) -> dict[str, Any]:
    """What credentials a device has, never the secrets themselves."""
    return {
        "device_id": device.id,
        "public_key": public_key_json(device),
        "mqtt_secret": {"set": device.mqtt_secret_hash is not None,
                        "rotated_at": clock.iso(device.mqtt_secret_rotated_at)},
        "certificate_fingerprint": device.certificate_fingerprint,
        "credentials_version": device.credentials_version or 0,
    }


# --- product CA certificates ---------------------------------------------------------------

def _subject_text(name: x509.Name) -> str:
    return name.rfc4514_string()[:500]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def _valid_now(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """None when ``cert`` is valid at ``now``; else "expired" / "not yet valid"."""
    if now < cert.not_valid_before_utc:
        return "not yet valid"
    if now > cert.not_valid_after_utc:
        return "expired"
    return None


def load_certificate(data: bytes | str) -> x509.Certificate:
    """Exactly one X.509 certificate, PEM or DER; 400 ``invalid_certificate`` otherwise."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_CERT_TEXT:
        raise BadRequest("The certificate is too large", code="invalid_certificate")
    text = raw.strip()
    if not text:
        raise BadRequest("certificate is required", code="invalid_request")
    if b"PRIVATE KEY" in text:
        raise BadRequest("Send only the CA certificate, never its private key",
                         code="invalid_certificate")
    try:
        if text.startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(text)
        else:
            certs = [x509.load_der_x509_certificate(raw)]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadRequest("The certificate could not be parsed (expected one PEM or DER "
                         "X.509 certificate)", code="invalid_certificate") from None
    if len(certs) != 1:
        raise BadRequest("Send exactly one certificate (the CA), not a chain",
                         code="invalid_certificate")
    return certs[0]


def clean_jitp(value: Any, *, current: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate JITP settings ``{groups, tags, development, quarantine}``; keys not given keep
    ``current`` (or the defaults: no groups, no tags, not development, approved: a device
    the CA vouches for joins the product; ``quarantine: true`` holds it for approval)."""
    base = {"groups": [], "tags": [], "development": False, "quarantine": False,
            **(current or {})}
    if value is None:
        return base
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequest("jitp must be an object", code="invalid_request") from None
    if not isinstance(value, dict):
        raise BadRequest("jitp must be an object", code="invalid_request")
    unknown = set(value) - {"groups", "tags", "development", "quarantine"}
    if unknown:
        raise BadRequest(f"Unknown jitp setting(s): {', '.join(sorted(map(str, unknown)))}",
                         code="invalid_request")
    out = dict(base)
    if "groups" in value:
        groups = value["groups"] if value["groups"] is not None else []
        if not isinstance(groups, list) or len(groups) > MAX_JITP_GROUPS:
            raise BadRequest(f"jitp.groups must be a list of at most {MAX_JITP_GROUPS} "
                             "group names", code="invalid_request")
        for g in groups:
            clean_group_name(g, field="jitp.groups[]")
        out["groups"] = list(dict.fromkeys(groups))
    if "tags" in value:
        tags = value["tags"] if value["tags"] is not None else []
        if not isinstance(tags, list) or len(tags) > MAX_JITP_TAGS:
            raise BadRequest(f"jitp.tags must be a list of at most {MAX_JITP_TAGS} strings",
                             code="invalid_request")
        for t in tags:
            if not isinstance(t, str) or not t.strip() or len(t) > MAX_TAG_LEN:
                raise BadRequest(f"jitp.tags must be non-empty strings of at most "
                                 f"{MAX_TAG_LEN} characters", code="invalid_request")
        out["tags"] = list(dict.fromkeys(t.strip() for t in tags))
    if "development" in value:
        out["development"] = as_bool(value["development"], field="jitp.development")
    if "quarantine" in value:
        out["quarantine"] = as_bool(value["quarantine"], field="jitp.quarantine")
    return out


def ca_json(ca: ProductCA, *, full: bool = False) -> dict[str, Any]:
    """A CA as the API shows it; ``full`` adds the PEM certificate (public)."""
    jitp = clean_jitp(None, current=ca.jitp or {})
    out: dict[str, Any] = {
        "id": ca.id, "product_id": ca.product_id, "fingerprint": ca.fingerprint,
        "subject": ca.subject, "not_after": clock.iso(ca.not_after), "active": ca.active,
        "jitp": {"groups": jitp["groups"], "tags": jitp["tags"],
                 "development": jitp["development"], "quarantine": jitp["quarantine"]},
        "created_at": clock.iso(ca.created_at), "updated_at": clock.iso(ca.updated_at),
    }
    if full:
        out["certificate"] = ca.pem
    return out


async def list_cas(db: AsyncSession, product: Product) -> list[ProductCA]:
    return list((await db.execute(
        select(ProductCA).where(ProductCA.product_id == product.id).order_by(ProductCA.id)
    )).scalars())


async def get_ca(db: AsyncSession, product: Product, ca_id: str | int) -> ProductCA:
    """The CA ``ca_id`` of ``product``, or 404."""
    cid = path_id(ca_id)
    ca = await db.get(ProductCA, cid) if cid is not None else None
    if ca is None or ca.product_id != product.id:
        raise NotFound("Certificate authority not found")
    return ca


async def create_ca(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                    product: Product, certificate: bytes | str | None, jitp: Any = None,
                    active: bool | None = None) -> ProductCA:
    """Register a CA certificate for ``product``.

    400 unless it is one X.509 certificate with BasicConstraints ca=True, valid now; 409 if
    its SHA-256 fingerprint is already registered (to any product).
    """
    if certificate is None or certificate in ("", b""):
        raise BadRequest("certificate is required", code="invalid_request")
    cert = load_certificate(certificate)
    if not _is_ca(cert):
        raise BadRequest("The certificate is not a CA (BasicConstraints ca=TRUE is required)",
                         code="invalid_certificate")
    problem = _valid_now(cert, clock.now())
    if problem:
        raise BadRequest(f"The CA certificate is {problem}", code="invalid_certificate")
    settings = clean_jitp(jitp)
    is_active = True if active is None else bool(active)
    der = cert.public_bytes(serialization.Encoding.DER)
    fp = fingerprint(der)
    taken = (await db.execute(select(ProductCA.id).where(ProductCA.fingerprint == fp))).first()
    if taken is not None:
        raise Conflict("This CA certificate is already registered", code="ca_exists")
    ca = ProductCA(product_id=product.id, fingerprint=fp, subject=_subject_text(cert.subject),
                   pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                   not_after=cert.not_valid_after_utc, active=is_active, jitp=settings)
    db.add(ca)
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="ca.created", org_id=product.org_id,
                 product_id=product.id, target_type="ca", target_id=ca.id,
                 details={"fingerprint": fp, "subject": ca.subject, "active": is_active,
                          "jitp": settings})
    return ca


async def update_ca(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                    product: Product, ca: ProductCA, req: CaChange) -> ProductCA:
    """Change ``active`` and/or ``jitp`` (given jitp keys replace those keys)."""
    changes: dict[str, Any] = {}
    if req.active is not None and req.active != ca.active:
        changes["active"] = req.active
    if req.sent("jitp"):
        settings = clean_jitp(req.jitp, current=clean_jitp(None, current=ca.jitp or {}))
        if settings != clean_jitp(None, current=ca.jitp or {}):
            changes["jitp"] = settings
    if "active" in changes:
        ca.active = changes["active"]
    if "jitp" in changes:
        ca.jitp = changes["jitp"]
    if changes:
        ca.updated_at = clock.now()
        audit.record(db, actor=actor, ip=ip, action="ca.updated", org_id=product.org_id,
                     product_id=product.id, target_type="ca", target_id=ca.id,
                     details={"fingerprint": ca.fingerprint, **changes})
        await db.flush()
    return ca


async def delete_ca(db: AsyncSession, *, actor: Subject | None, ip: str | None,
                    product: Product, ca: ProductCA) -> None:
    """Unregister a CA. Devices it provisioned keep their product and certificate."""
    audit.record(db, actor=actor, ip=ip, action="ca.deleted", org_id=product.org_id,
                 product_id=product.id, target_type="ca", target_id=ca.id,
                 details={"fingerprint": ca.fingerprint, "subject": ca.subject})
    await db.delete(ca)
    await db.flush()


async def active_ca_certificates(db: AsyncSession) -> list[x509.Certificate]:
    """Every active registered CA certificate (a TLS server's client-certificate trust set)."""
    pems = (await db.execute(select(ProductCA.pem).where(ProductCA.active.is_(True)))).scalars()
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


# --- just-in-time provisioning -------------------------------------------------------------

@dataclass
class JitpResult:
    """The outcome of a device presenting a certificate. ``reason`` explains a refusal (or
    says what happened on acceptance)."""

    accepted: bool
    device: Device | None
    product_id: int | None
    created: bool
    reason: str


def _refuse(reason: str, product_id: int | None = None) -> JitpResult:
    return JitpResult(accepted=False, device=None, product_id=product_id, created=False,
                      reason=reason)


def certificate_device_id(leaf: x509.Certificate) -> str | None:
    """The lowercased 24-hex device id in the leaf's subject CommonName, or None."""
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    value = cns[0].value
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    value = value.strip()
    return value.lower() if is_device_id(value) else None


async def _issuing_ca(db: AsyncSession, leaf: x509.Certificate) -> tuple[ProductCA | None, str]:
    """The registered CA that signed ``leaf`` (subject = leaf issuer, signature verifies)."""
    rows = (await db.execute(select(ProductCA).where(
        ProductCA.subject == _subject_text(leaf.issuer)).order_by(ProductCA.id))).scalars()
    inactive = False
    for ca in rows:
        try:
            ca_cert = x509.load_pem_x509_certificate(ca.pem.encode())
            if ca_cert.subject != leaf.issuer:
                continue
            leaf.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        if not ca.active:
            inactive = True
            continue
        problem = _valid_now(ca_cert, clock.now())
        if problem:
            return None, f"the issuing CA certificate is {problem}"
        return ca, ""
    if inactive:
        return None, "the issuing CA is deactivated"
    return None, "the certificate is not signed by a registered CA"


def _table(model: Any) -> Table:
    """A mapped class's table (typed as any FROM clause by SQLAlchemy)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _insert_ignore(db: AsyncSession, table: Table, conflict: list[str]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for PostgreSQL and SQLite (concurrent JITP)."""
    if db.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=conflict)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=conflict)


async def _join_groups(db: AsyncSession, product_id: int, device_id: str,
                       names: list[str]) -> None:
    if not names:
        return
    now = clock.now()
    await db.execute(_insert_ignore(db, _table(DeviceGroup), ["product_id", "name"]),
                     [{"product_id": product_id, "name": n, "created_at": now, "updated_at": now}
                      for n in names])
    # a dynamic group has no members to add: the device is in it when it matches its query
    group_ids = (await db.execute(select(DeviceGroup.id).where(
        DeviceGroup.product_id == product_id, DeviceGroup.name.in_(names),
        DeviceGroup.query.is_(None)))).scalars().all()
    await db.execute(_insert_ignore(db, _table(DeviceGroupMember), ["device_id", "group_id"]),
                     [{"device_id": device_id, "group_id": gid} for gid in group_ids])


async def provision_from_certificate(db: AsyncSession, chain: list[x509.Certificate], *,
                                     ip: str | None = None) -> JitpResult:
    """Decide on a device presenting ``chain`` (``chain[0]`` its leaf) and provision it.

    Accepted when the leaf (not a CA, valid now, CommonName = 24-hex device id) is signed
    by an active, valid registered CA and the device is either in that CA's product (its
    certificate fingerprint is recorded) or unknown (created in the product with the CA's
    JITP tags, development flag and groups, and quarantined when its JITP settings say so (the
    session is then refused until someone approves the device); missing groups are created;
    audited as
    ``device.jitp_provisioned``). Refused for a device in another product, a sandbox
    device, or a denied one. Safe under concurrent first connects. Never commits.
    """
    if not chain or not isinstance(chain[0], x509.Certificate):
        return _refuse("no client certificate was presented")
    leaf = chain[0]
    if _is_ca(leaf):
        return _refuse("the presented certificate is a CA, not a device certificate")
    ca, why = await _issuing_ca(db, leaf)
    if ca is None:
        return _refuse(why)
    now = clock.now()
    problem = _valid_now(leaf, now)
    if problem:
        return _refuse(f"the device certificate is {problem}", ca.product_id)
    device_id = certificate_device_id(leaf)
    if device_id is None:
        return _refuse("the certificate CommonName must be the device id (24 hex characters)",
                       ca.product_id)
    fp = fingerprint(leaf.public_bytes(serialization.Encoding.DER))
    product = await db.get(Product, ca.product_id)
    if product is None:  # deleted under us
        return _refuse("the issuing CA's product no longer exists")
    settings = clean_jitp(None, current=ca.jitp or {})

    for _ in range(2):
        device = await db.get(Device, device_id, populate_existing=True)
        if device is not None:
            if device.denied:
                return _refuse("the device is denied", ca.product_id)
            if device.product_id != ca.product_id:
                return _refuse("the device belongs to another product", ca.product_id)
            if device.certificate_fingerprint != fp:
                device.certificate_fingerprint = fp
                audit.record(db, actor=None, actor_label="jitp", ip=ip,
                             action="device.jitp_provisioned", org_id=product.org_id,
                             product_id=product.id, target_type="device", target_id=device.id,
                             details={"created": False, "ca_id": ca.id, "fingerprint": fp})
                await db.flush()
            return JitpResult(accepted=True, device=device, product_id=product.id,
                              created=False, reason="known device")
        inserted = (await db.execute(
            _insert_ignore(db, _table(Device), ["id"]).values(
                id=device_id, product_id=product.id, platform_id=product.platform_id,
                tags=list(settings["tags"]), development=bool(settings["development"]),
                quarantined=bool(settings["quarantine"]), imported_at=now,
                certificate_fingerprint=fp, created_at=now, updated_at=now,
            ).returning(Device.__table__.c.id)
        )).first()
        if inserted is None:
            continue  # another connection created it first: decide on that row
        await _join_groups(db, product.id, device_id, list(settings["groups"]))
        await tag_rules.add_rows(db, device_id, list(settings["tags"]))
        device = await db.get(Device, device_id, populate_existing=True)
        assert device is not None
        audit.record(db, actor=None, actor_label="jitp", ip=ip,
                     action="device.jitp_provisioned", org_id=product.org_id,
                     product_id=product.id, target_type="device", target_id=device_id,
                     details={"created": True, "ca_id": ca.id, "fingerprint": fp,
                              "groups": settings["groups"], "tags": settings["tags"],
                              "development": settings["development"],
                              "quarantined": settings["quarantine"]})
        await db.flush()
        return JitpResult(accepted=True, device=device, product_id=product.id, created=True,
                          reason="provisioned")
    return _refuse("the device could not be provisioned; try again", ca.product_id)


async def device_for_certificate(db: AsyncSession, leaf: x509.Certificate) -> Device | None:
    """The (non-denied) device whose recorded certificate fingerprint is ``leaf``'s.

    A lookup for reconnects only: it does not re-check the CA (a transport that must honour
    a CA being deactivated calls :func:`provision_from_certificate` instead).
    """
    fp = fingerprint(leaf.public_bytes(serialization.Encoding.DER))
    device = (await db.execute(select(Device).where(
        Device.certificate_fingerprint == fp).limit(1))).scalar_one_or_none()
    if device is None or device.denied:
        return None
    return device
