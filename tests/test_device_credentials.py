"""Device credentials: RSA public keys (single and bulk), MQTT secrets, the credentials view,
and the service functions the transports call."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.devices import credentials
from corral.devices.models import Device
from corral.kit.secrets import digest
from helpers import add_devices, add_member, assert_error, bearer, new_user, two_tenants

DEV_A = "0123456789abcdef0123aaaa"
DEV_B = "0123456789abcdef0123bbbb"
DEV_C = "0123456789abcdef0123cccc"
DEV_OTHER = "0123456789abcdef0123dddd"

_KEYS: dict[int, rsa.RSAPrivateKey] = {}


def rsa_key(bits: int = 1024) -> rsa.RSAPrivateKey:
    """Cached RSA keys (generation is the slow part of these tests)."""
    if bits not in _KEYS:
        _KEYS[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[bits]


def pub_pem(key: Any, fmt: serialization.PublicFormat = serialization.PublicFormat.SubjectPublicKeyInfo) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, fmt).decode()


def pub_der(key: Any, fmt: serialization.PublicFormat = serialization.PublicFormat.SubjectPublicKeyInfo) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, fmt)


_EC: list[ec.EllipticCurvePrivateKey] = []


def ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 device key, as Gen 3 devices have."""
    if not _EC:
        _EC.append(ec.generate_private_key(ec.SECP256R1()))
    return _EC[0]


def spki_fp(key: Any) -> str:
    return hashlib.sha256(pub_der(key)).hexdigest()


def raw_public_pem(n: int, e: int) -> str:
    return rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


async def load(app, device_id: str) -> Device:
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, device_id)
        assert d is not None
        return d


async def audits(app, action: str) -> list[AuditEntry]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry).where(AuditEntry.action == action)
                                      .order_by(AuditEntry.id))).scalars())


@pytest.fixture
async def world(app, client) -> dict[str, Any]:
    """ada owns product Widget with devices A, B, C; bob owns Gadget with device OTHER."""
    w = await two_tenants(client)
    await add_devices(app, w["widget"]["id"], DEV_A, DEV_B, DEV_C)
    await add_devices(app, w["gadget"]["id"], DEV_OTHER)
    return {**w, "p": f"/v1/products/{w['widget']['slug']}"}


# --- POST /v1/provisioning/:deviceId -------------------------------------------------------


async def test_provision_with_product_id_imports_a_new_device(app, client, world):
    """particle-cli's ``keys send <new id> --product_id P``: a device nobody has is imported
    into P (the caller needs devices:import there) and gets the key; without product_id, or
    for another tenant's product, it does not exist."""
    new, key = "00112233445566778899fe01", rsa_key(1024)
    form = {"deviceID": new, "publicKey": pub_pem(key), "order": "manual_1",
            "filename": "cli", "algorithm": "rsa"}
    r = await client.post(f"/v1/provisioning/{new}", headers=bearer(world["ada"]), data=form)
    assert_error(r, 404)
    r = await client.post(f"/v1/provisioning/{new}", headers=bearer(world["bob"]),
                          data={**form, "product_id": str(world["widget"]["id"])})
    assert_error(r, 404)  # bob has no role in Widget: the product does not exist for him
    async with app.state.sessionmaker() as db:
        assert await db.get(Device, new) is None
    r = await client.post(f"/v1/provisioning/{new}", headers=bearer(world["ada"]),
                          data={**form, "product_id": world["widget"]["slug"]})
    assert r.status_code == 200, r.text
    d = await load(app, new)
    assert d.product_id == world["widget"]["id"] and d.public_key_der == pub_der(key)
    assert [e.action for e in await audits(app, "devices.imported")] == ["devices.imported"]
    # an existing device keeps its product: product_id does not move it
    r = await client.post(f"/v1/provisioning/{DEV_OTHER}", headers=bearer(world["ada"]),
                          data={**form, "deviceID": DEV_OTHER,
                                "product_id": str(world["widget"]["id"])})
    assert_error(r, 404)
    assert (await load(app, DEV_OTHER)).product_id == world["gadget"]["id"]

async def test_provision_pem_json_shape_storage_and_audit(app, client, world):
    key = rsa_key(2048)
    r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                          json={"publicKey": pub_pem(key)})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "device_id": DEV_A, "public_key": {
        "algorithm": "rsa", "bits": 2048, "fingerprint": spki_fp(key)}}
    d = await load(app, DEV_A)
    assert d.public_key_der == pub_der(key) and d.public_key_algorithm == "rsa"
    assert d.credentials_version == 1
    (entry,) = await audits(app, "device.key_set")
    assert entry.target_id == DEV_A and entry.product_id == world["widget"]["id"]
    assert entry.details["fingerprint"] == spki_fp(key)
    assert "BEGIN" not in str(entry.details) and "public_key" not in entry.details


async def test_provision_form_like_particle_cli_and_replace(app, client, world):
    r = await client.post(f"/v1/provisioning/{DEV_A.upper()}", headers=bearer(world["ada"]), data={
        "deviceID": DEV_A, "publicKey": pub_pem(rsa_key(1024)), "filename": "cli",
        "order": "manual_1", "algorithm": "rsa"})
    assert r.status_code == 200, r.text
    assert r.json()["public_key"]["bits"] == 1024
    r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                          json={"public_key": pub_pem(rsa_key(2048)), "algorithm": "RSA"})
    assert r.status_code == 200, r.text
    d = await load(app, DEV_A)
    assert d.public_key_der == pub_der(rsa_key(2048)) and d.credentials_version == 2


@pytest.mark.parametrize(("encoding", "fmt"), [
    (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    (serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
    (serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
    (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
])
async def test_provision_multipart_file_formats(app, client, world, encoding, fmt):
    key = rsa_key(1024)
    blob = key.public_key().public_bytes(encoding, fmt)
    r = await client.post(f"/v1/provisioning/{DEV_B}", headers=bearer(world["ada"]),
                          files={"file": ("device.pub", blob, "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["public_key"]["fingerprint"] == spki_fp(key)
    assert (await load(app, DEV_B)).public_key_der == pub_der(key)  # stored as SPKI DER


@pytest.mark.parametrize("how", ["pem", "pem-no-algorithm", "der-file", "form"])
async def test_provision_an_ecc_p256_key_as_particle_does(app, client, world, how):
    """Gen 3 devices (DTLS over UDP) have P-256 keys: ``algorithm`` ``ecc`` (particle-cli
    ``keys send`` over UDP), or no algorithm at all: the key says what it is."""
    key = ec_key()
    url = f"/v1/provisioning/{DEV_A}"
    if how == "pem":
        r = await client.post(url, headers=bearer(world["ada"]),
                              json={"publicKey": pub_pem(key), "algorithm": "ecc"})
    elif how == "pem-no-algorithm":
        r = await client.post(url, headers=bearer(world["ada"]), json={"publicKey": pub_pem(key)})
    elif how == "der-file":
        r = await client.post(url, headers=bearer(world["ada"]), data={"algorithm": "ecc"},
                              files={"file": ("device.pub.der", pub_der(key), "application/x")})
    else:
        r = await client.post(url, headers=bearer(world["ada"]), data={
            "deviceID": DEV_A, "publicKey": pub_pem(key), "filename": "cli",
            "order": "manual_1", "algorithm": "ECC"})
    assert r.status_code == 200, r.text
    assert r.json()["public_key"] == {"algorithm": "ecc", "bits": 256,
                                      "fingerprint": spki_fp(key)}
    d = await load(app, DEV_A)
    assert d.public_key_der == pub_der(key) and len(d.public_key_der) == 91
    assert d.public_key_algorithm == "ecc" and d.credentials_version == 1
    (entry,) = await audits(app, "device.key_set")
    assert entry.details["algorithm"] == "ecc"
    r = await client.get(f"{world['p']}/devices/{DEV_A}/credentials", headers=bearer(world["ada"]))
    assert r.json()["public_key"]["algorithm"] == "ecc"


def _bad_keys() -> list[tuple[str, Any, str]]:
    big = (1 << 8191) | secrets.randbits(8191) | 1
    small = (1 << 511) | secrets.randbits(511) | 1
    n = (1 << 1023) | secrets.randbits(1023) | 1
    priv = rsa_key(1024).private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()).decode()
    p384_pem = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    ec_priv = ec_key().private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()).decode()
    return [
        ("garbage", {"publicKey": "hello"}, "could not be parsed"),
        ("broken-pem", {"publicKey": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"},
         "could not be parsed"),
        ("p-384", {"publicKey": p384_pem}, "P-256"),
        ("ec-private", {"publicKey": ec_priv}, "private key"),
        ("rsa-says-ecc", {"publicKey": pub_pem(rsa_key(1024)), "algorithm": "ecc"},
         "is an RSA key"),
        ("ecc-says-rsa", {"publicKey": pub_pem(ec_key()), "algorithm": "rsa"}, "is an ECC key"),
        ("512-bit", {"publicKey": raw_public_pem(small, 65537)}, "512 bits"),
        ("8192-bit", {"publicKey": raw_public_pem(big, 65537)}, "8192 bits"),
        ("huge-exponent", {"publicKey": raw_public_pem(n, 2**40 + 1)}, "exponent"),
        ("private", {"publicKey": priv}, "private key"),
        ("other-algo", {"publicKey": pub_pem(rsa_key(1024)), "algorithm": "dsa"}, "rsa or ecc"),
        ("missing", {}, "publicKey is required"),
        ("not-a-string", {"publicKey": ["a"]}, "publicKey: Input should be a valid string"),
        ("id-mismatch", {"publicKey": pub_pem(rsa_key(1024)), "deviceID": DEV_B}, "does not match"),
    ]


@pytest.mark.parametrize(("label", "body", "text"), _bad_keys(), ids=[b[0] for b in _bad_keys()])
async def test_provision_refuses_bad_keys(app, client, world, label, body, text):
    r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]), json=body)
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["ok"] is False and text in data["error_description"], data
    d = await load(app, DEV_A)
    assert d.public_key_der is None and d.credentials_version == 0
    assert await audits(app, "device.key_set") == []


async def test_provision_binary_junk_file(client, world):
    r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                          files={"file": ("k.der", b"\x00\xff" * 500, "application/octet-stream")})
    assert r.status_code == 400 and r.json()["error"] == "invalid_key", r.text
    r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                          files={"file": ("k.der", b"x" * 70_000, "application/octet-stream")})
    assert r.status_code == 413, r.text


async def test_provision_permissions(app, client, world):
    body = {"publicKey": pub_pem(rsa_key(1024))}
    # a stranger: the device does not exist for them
    r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["bob"]), json=body)
    assert r.status_code == 404 and r.json()["error_description"] == "Device not found"
    # support and view-only members may not change keys; a developer may
    for name, role in (("sue@example.com", "Support"), ("vic@example.com", "View-only"),
                       ("dev@example.com", "Developer")):
        tok = await new_user(client, name)
        await add_member(app, name, org_id=world["widget"]["org_id"],
                         product_id=world["widget"]["id"], role=role)
        r = await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(tok), json=body)
        assert r.status_code == (200 if role == "Developer" else 403), (role, r.text)
    # an unknown device id
    r = await client.post("/v1/provisioning/ffffffffffffffffffffffff",
                          headers=bearer(world["ada"]), json=body)
    assert r.status_code == 404
    r = await client.post(f"/v1/provisioning/{DEV_A}", json=body)
    assert r.status_code == 401


async def test_provision_sandbox_device_by_owner(app, client, world):
    async with app.state.sessionmaker() as db:
        from corral.auth.models import User
        bob = (await db.execute(select(User).where(User.username == "bob@example.com"))).scalar_one()
        db.add(Device(id="aaaaaaaaaaaaaaaaaaaaaaaa", product_id=None, platform_id=6,
                      owner_user_id=bob.id, name="bobs-photon"))
        await db.commit()
    body = {"publicKey": pub_pem(rsa_key(1024))}
    r = await client.post("/v1/provisioning/bobs-photon", headers=bearer(world["bob"]), json=body)
    assert r.status_code == 200, r.text
    assert r.json()["device_id"] == "aaaaaaaaaaaaaaaaaaaaaaaa"
    r = await client.post("/v1/provisioning/aaaaaaaaaaaaaaaaaaaaaaaa",
                          headers=bearer(world["ada"]), json=body)
    assert r.status_code == 404


# --- bulk keys --------------------------------------------------------------------------

async def test_bulk_keys_json_and_file(app, client, world):
    k1, k2 = rsa_key(1024), rsa_key(2048)
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]), json={"keys": [
        {"device_id": DEV_A, "public_key": pub_pem(k1)},
        {"device_id": DEV_B.upper(), "public_key": pub_pem(k2, serialization.PublicFormat.PKCS1)},
    ]})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "updated": 2}
    assert (await load(app, DEV_A)).public_key_der == pub_der(k1)
    assert (await load(app, DEV_B)).public_key_der == pub_der(k2)
    assert (await load(app, DEV_C)).public_key_der is None
    entries = await audits(app, "device.key_set")
    assert {(e.target_id, e.product_id, e.details["fingerprint"], e.details["bits"])
            for e in entries} == {(DEV_A, world["widget"]["id"], spki_fp(k1), 1024),
                                  (DEV_B, world["widget"]["id"], spki_fp(k2), 2048)}
    assert all(e.actor == "ada@example.com" and e.org_id == world["widget"]["org_id"]
               for e in entries)

    import json
    blob = json.dumps({"keys": [{"device_id": DEV_C, "public_key": pub_pem(k1)}]}).encode()
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]),
                          files={"file": ("keys.json", blob, "application/json")})
    assert r.status_code == 200, r.text
    assert r.json()["updated"] == 1
    d = await load(app, DEV_C)
    assert d.public_key_der == pub_der(k1) and d.credentials_version == 1


async def test_bulk_keys_mix_rsa_and_ecc(app, client, world):
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]), json={"keys": [
        {"device_id": DEV_A, "public_key": pub_pem(rsa_key(1024))},
        {"device_id": DEV_B, "public_key": pub_pem(ec_key()), "algorithm": "ecc"},
        {"device_id": DEV_C, "public_key": pub_pem(ec_key())},
    ]})
    assert r.status_code == 200, r.text
    assert [(d.public_key_algorithm, len(d.public_key_der or b"")) for d in
            [await load(app, x) for x in (DEV_A, DEV_B, DEV_C)]] == [
        ("rsa", 162), ("ecc", 91), ("ecc", 91)]
    bits = {e.target_id: (e.details["algorithm"], e.details["bits"])
            for e in await audits(app, "device.key_set")}
    assert bits == {DEV_A: ("rsa", 1024), DEV_B: ("ecc", 256), DEV_C: ("ecc", 256)}
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]), json={"keys": [
        {"device_id": DEV_A, "public_key": pub_pem(rsa_key(1024)), "algorithm": "ecc"}]})
    assert r.status_code == 400 and "is an RSA key" in str(r.json()["invalid"]), r.text


async def test_bulk_keys_all_or_nothing(app, client, world):
    good = pub_pem(rsa_key(1024))
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]), json={"keys": [
        {"device_id": DEV_A, "public_key": good},
        {"device_id": DEV_B, "public_key": "nope"},
        {"device_id": DEV_OTHER, "public_key": good},
        {"device_id": "ffffffffffffffffffffffff", "public_key": good},
        {"device_id": "xyz", "public_key": good},
        {"device_id": DEV_A, "public_key": good},
        {"device_id": DEV_C},
        "not an object",
    ]})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["ok"] is False and body["error"] == "invalid_keys"
    reasons = {(i["device_id"], i["reason"]) for i in body["invalid"]}
    assert any(d == DEV_B and why.startswith("The public key could not be parsed")
               for d, why in reasons)
    assert (DEV_OTHER, "device is not in this product") in reasons
    assert ("ffffffffffffffffffffffff", "device is not in this product") in reasons
    assert ("xyz", "device_id must be 24 hex characters") in reasons
    assert (DEV_A, "listed more than once") in reasons
    assert (DEV_C, "public_key (PEM) is required") in reasons
    assert (None, "entry must be an object") in reasons
    assert len(body["invalid"]) == 7
    for dev in (DEV_A, DEV_B, DEV_C, DEV_OTHER):
        assert (await load(app, dev)).public_key_der is None
    assert await audits(app, "device.key_set") == []


@pytest.mark.parametrize("body", [
    {}, {"keys": []}, {"keys": "x"}, {"keys": {"a": 1}}, {"keys": None},
])
async def test_bulk_keys_bad_bodies(client, world, body):
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]), json=body)
    assert r.status_code == 400 and r.json()["ok"] is False, r.text


async def test_bulk_keys_bad_file(client, world):
    for blob in (b"\x00\x01garbage", b"", b"[1, 2"):
        r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]),
                              files={"file": ("keys.json", blob, "application/json")})
        assert r.status_code == 400, (blob, r.text)


async def test_bulk_keys_limit_and_permissions(app, client, world):
    pem = pub_pem(rsa_key(1024))
    too_many = [{"device_id": f"{i:024x}", "public_key": pem} for i in range(10_001)]
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]),
                          json={"keys": too_many})
    assert r.status_code == 400 and r.json()["error"] == "too_many_keys", r.text[:300]
    r = await client.post(f"/v1/products/{world['gadget']['slug']}/device_keys",
                          headers=bearer(world["ada"]),
                          json={"keys": [{"device_id": DEV_OTHER, "public_key": pem}]})
    assert r.status_code == 404
    assert (await load(app, DEV_OTHER)).public_key_der is None


async def test_bulk_keys_ten_thousand(app, client, world):
    ids = [f"{i:024x}" for i in range(1, 10_001)]
    async with app.state.sessionmaker() as db:
        db.add_all([Device(id=i, product_id=world["widget"]["id"], platform_id=12) for i in ids])
        await db.commit()
    pems = [pub_pem(rsa_key(b)) for b in (1024, 2048)]
    keys = [{"device_id": i, "public_key": pems[n % 2]} for n, i in enumerate(ids)]
    r = await client.post(f"{world['p']}/device_keys", headers=bearer(world["ada"]),
                          json={"keys": keys})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["updated"] == 10_000
    async with app.state.sessionmaker() as db:
        n = (await db.execute(select(func.count()).select_from(Device).where(
            Device.public_key_der.is_not(None), Device.credentials_version == 1))).scalar_one()
    assert n == 10_000
    assert len(await audits(app, "device.key_set")) == 10_000
    assert (await load(app, ids[1])).public_key_der == pub_der(rsa_key(2048))


# --- credentials view and clearing ------------------------------------------------------------

async def test_credentials_view_and_delete_key(app, client, world):
    url = f"{world['p']}/devices/{DEV_A}/credentials"
    r = await client.get(url, headers=bearer(world["ada"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"device_id": DEV_A, "public_key": None,
                        "mqtt_secret": {"set": False, "rotated_at": None},
                        "certificate_fingerprint": None, "credentials_version": 0}
    key = rsa_key(1024)
    await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                      json={"publicKey": pub_pem(key)})
    r = await client.post(f"{world['p']}/devices/{DEV_A}/mqtt_secret", headers=bearer(world["ada"]))
    secret = r.json()["mqtt_secret"]
    r = await client.get(url, headers=bearer(world["ada"]))
    body = r.json()
    assert body["public_key"] == {"algorithm": "rsa", "bits": 1024, "fingerprint": spki_fp(key)}
    assert body["mqtt_secret"]["set"] is True and body["mqtt_secret"]["rotated_at"].endswith("Z")
    assert body["credentials_version"] == 2
    assert secret not in r.text and digest(secret) not in r.text

    r = await client.delete(f"{world['p']}/devices/{DEV_A}/public_key", headers=bearer(world["ada"]))
    assert r.status_code == 200 and r.json() == {"ok": True, "device_id": DEV_A, "cleared": True}
    d = await load(app, DEV_A)
    assert d.public_key_der is None and d.public_key_algorithm is None
    assert d.credentials_version == 3 and d.mqtt_secret_hash is not None
    (entry,) = await audits(app, "device.key_cleared")
    assert entry.details == {"fingerprint": spki_fp(key)}
    # clearing again changes nothing
    r = await client.delete(f"{world['p']}/devices/{DEV_A}/public_key", headers=bearer(world["ada"]))
    assert r.json()["cleared"] is False
    assert (await load(app, DEV_A)).credentials_version == 3
    assert len(await audits(app, "device.key_cleared")) == 1


async def test_credentials_routes_scope_to_product(app, client, world):
    for method, path in (("GET", "credentials"), ("DELETE", "public_key"),
                         ("POST", "mqtt_secret"), ("DELETE", "mqtt_secret")):
        r = await client.request(method, f"{world['p']}/devices/{DEV_OTHER}/{path}",
                                 headers=bearer(world["ada"]))
        assert r.status_code == 404 and r.json()["error_description"] == "Device not found", path
        r = await client.request(method, f"{world['p']}/devices/not-an-id/{path}",
                                 headers=bearer(world["ada"]))
        assert r.status_code == 404, path
    tok = await new_user(client, "vic@example.com")
    await add_member(app, "vic@example.com", org_id=world["widget"]["org_id"],
                     product_id=world["widget"]["id"], role="View-only")
    r = await client.get(f"{world['p']}/devices/{DEV_A}/credentials", headers=bearer(tok))
    assert r.status_code == 200
    r = await client.post(f"{world['p']}/devices/{DEV_A}/mqtt_secret", headers=bearer(tok))
    assert r.status_code == 403 and r.json()["required"] == "devices.keys:update"
    assert (await load(app, DEV_OTHER)).mqtt_secret_hash is None


# --- MQTT secrets ---------------------------------------------------------------------------

async def test_mqtt_secret_rotate_verify_clear(app, client, world, manual_clock):
    url = f"{world['p']}/devices/{DEV_A}/mqtt_secret"
    r = await client.post(url, headers=bearer(world["ada"]))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    first = body["mqtt_secret"]
    assert body["ok"] is True and body["device_id"] == DEV_A
    assert len(first) == 48 and int(first, 16) >= 0
    d = await load(app, DEV_A)
    assert d.mqtt_secret_hash == digest(first) and d.credentials_version == 1
    assert d.mqtt_secret_rotated_at == manual_clock.now()

    async with app.state.sessionmaker() as db:
        assert (await credentials.verify_mqtt_secret(db, DEV_A, first)).id == DEV_A
        assert await credentials.verify_mqtt_secret(db, DEV_A.upper(), first) is not None
        assert await credentials.verify_mqtt_secret(db, DEV_A, first + "0") is None
        assert await credentials.verify_mqtt_secret(db, DEV_A, "") is None
        assert await credentials.verify_mqtt_secret(db, DEV_B, first) is None  # B has none
        assert await credentials.verify_mqtt_secret(db, "ffffffffffffffffffffffff", first) is None
        assert await credentials.verify_mqtt_secret(db, "bogus", first) is None

    manual_clock.advance(60)
    r = await client.post(url, headers=bearer(world["ada"]))
    second = r.json()["mqtt_secret"]
    assert second != first
    async with app.state.sessionmaker() as db:
        assert await credentials.verify_mqtt_secret(db, DEV_A, first) is None
        assert await credentials.verify_mqtt_secret(db, DEV_A, second) is not None
    d = await load(app, DEV_A)
    assert d.credentials_version == 2 and d.mqtt_secret_rotated_at == manual_clock.now()

    rotations = await audits(app, "device.mqtt_secret_rotated")
    assert len(rotations) == 2
    assert all(first not in str(e.details) and second not in str(e.details)
               and digest(second) not in str(e.details) for e in rotations)

    r = await client.delete(url, headers=bearer(world["ada"]))
    assert r.status_code == 200 and r.json()["cleared"] is True
    async with app.state.sessionmaker() as db:
        assert await credentials.verify_mqtt_secret(db, DEV_A, second) is None
    d = await load(app, DEV_A)
    assert d.mqtt_secret_hash is None and d.mqtt_secret_rotated_at is None
    assert d.credentials_version == 3
    assert len(await audits(app, "device.mqtt_secret_cleared")) == 1
    r = await client.delete(url, headers=bearer(world["ada"]))
    assert r.json()["cleared"] is False
    assert len(await audits(app, "device.mqtt_secret_cleared")) == 1


async def test_mqtt_secret_denied_device(app, client, world):
    r = await client.post(f"{world['p']}/devices/{DEV_B}/mqtt_secret", headers=bearer(world["ada"]))
    secret = r.json()["mqtt_secret"]
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV_B)
        d.denied = True
        await db.commit()
    async with app.state.sessionmaker() as db:
        assert await credentials.verify_mqtt_secret(db, DEV_B, secret) is None


async def test_mqtt_secret_sandbox_variant(app, client, world):
    async with app.state.sessionmaker() as db:
        from corral.auth.models import User
        bob = (await db.execute(select(User).where(User.username == "bob@example.com"))).scalar_one()
        db.add(Device(id="bbbbbbbbbbbbbbbbbbbbbbbb", product_id=None, platform_id=6,
                      owner_user_id=bob.id))
        await db.commit()
    url = "/v1/devices/bbbbbbbbbbbbbbbbbbbbbbbb/mqtt_secret"
    r = await client.post(url, headers=bearer(world["ada"]))
    assert r.status_code == 404
    r = await client.post(url, headers=bearer(world["bob"]))
    assert r.status_code == 200, r.text
    secret = r.json()["mqtt_secret"]
    assert r.headers["cache-control"] == "no-store"
    async with app.state.sessionmaker() as db:
        assert await credentials.verify_mqtt_secret(db, "bbbbbbbbbbbbbbbbbbbbbbbb", secret)
    r = await client.delete(url, headers=bearer(world["bob"]))
    assert r.status_code == 200 and r.json()["cleared"] is True
    async with app.state.sessionmaker() as db:
        assert await credentials.verify_mqtt_secret(db, "bbbbbbbbbbbbbbbbbbbbbbbb", secret) is None
    # a product device through the sandbox path: product members with the permission may
    r = await client.post(f"/v1/devices/{DEV_A}/mqtt_secret", headers=bearer(world["ada"]))
    assert r.status_code == 200
    r = await client.post(f"/v1/devices/{DEV_A}/mqtt_secret", headers=bearer(world["bob"]))
    assert r.status_code == 404


# --- service functions for the transports -----------------------------------------------------

async def test_device_public_key_lookup(app, client, world):
    key = rsa_key(1024)
    await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                      json={"publicKey": pub_pem(key)})
    async with app.state.sessionmaker() as db:
        got = await credentials.device_public_key(db, DEV_A.upper())
        assert isinstance(got, rsa.RSAPublicKey)
        assert got.public_numbers() == key.public_key().public_numbers()
        assert await credentials.device_public_key(db, DEV_B) is None
        assert await credentials.device_public_key(db, "ffffffffffffffffffffffff") is None
        assert await credentials.device_public_key(db, "nope") is None
        d = await db.get(Device, DEV_A)
        d.denied = True
        await db.commit()
    async with app.state.sessionmaker() as db:
        assert await credentials.device_public_key(db, DEV_A) is None


async def test_reset_credentials(app, client, world):
    await client.post(f"/v1/provisioning/{DEV_A}", headers=bearer(world["ada"]),
                      json={"publicKey": pub_pem(rsa_key(1024))})
    r = await client.post(f"{world['p']}/devices/{DEV_A}/mqtt_secret", headers=bearer(world["ada"]))
    secret = r.json()["mqtt_secret"]
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV_A)
        d.certificate_fingerprint = "ab" * 32
        assert d.credentials_version == 2
        credentials.reset_credentials(d)
        await db.commit()
    d = await load(app, DEV_A)
    assert (d.public_key_der, d.public_key_algorithm, d.mqtt_secret_hash,
            d.mqtt_secret_rotated_at, d.certificate_fingerprint) == (None,) * 5
    assert d.credentials_version == 3
    async with app.state.sessionmaker() as db:
        assert await credentials.verify_mqtt_secret(db, DEV_A, secret) is None
        assert await credentials.device_public_key(db, DEV_A) is None


def test_load_rsa_public_key_direct():
    key = rsa_key(1024)
    for blob in (pub_der(key), pub_der(key, serialization.PublicFormat.PKCS1),
                 pub_pem(key), pub_pem(key, serialization.PublicFormat.PKCS1).encode(),
                 "\r\n" + pub_pem(key).replace("\n", "\r\n")):
        assert credentials.load_rsa_public_key(blob).public_numbers() == \
            key.public_key().public_numbers()
    from corral.kit.errors import BadRequest
    for bad in (b"", b"   ", b"\x30\x03\x02\x01\x01", "x" * 70_000):
        with pytest.raises(BadRequest):
            credentials.load_rsa_public_key(bad)
