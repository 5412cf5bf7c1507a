"""Product CA certificates for just-in-time provisioning: register, list, get, update, delete."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from corral.audit.models import AuditEntry
from corral.devices.models import ProductCA
from corral.kit import clock
from helpers import add_member, bearer, new_user, two_tenants


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def name(cn: str | None, org: str = "corral tests") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_cert(*, subject: x509.Name, key: Any, issuer: x509.Name | None = None,
              issuer_key: Any = None, ca: bool | None = True, days: float = 365,
              start: dt.datetime | None = None, public_key: Any = None) -> x509.Certificate:
    """A certificate; self-signed unless ``issuer``/``issuer_key`` are given.
    ``ca=None`` leaves out BasicConstraints."""
    start = start or (clock.now() - dt.timedelta(hours=1))
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer or subject)
               .public_key(public_key or key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                        critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def cert_fp(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def new_ca(cn: str = "Widget Root CA", key: Any = None, **kw: Any) -> tuple[x509.Certificate, Any]:
    key = key or rsa_key()
    return make_cert(subject=name(cn), key=key, **kw), key


async def audits(app, prefix: str) -> list[AuditEntry]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry).where(
            AuditEntry.action.startswith(prefix)).order_by(AuditEntry.id))).scalars())


@pytest.fixture
async def world(app, client) -> dict[str, Any]:
    w = await two_tenants(client)
    return {**w, "url": f"/v1/products/{w['widget']['slug']}/certificate_authorities"}


async def test_register_list_get(app, client, world):
    cert, _ = new_ca()
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={
        "certificate": pem(cert),
        "jitp": {"groups": ["field-units", "eu_west"], "tags": ["jitp", "batch-7"],
                 "development": True}})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["ok"] is True
    ca = body["certificate_authority"]
    assert ca["fingerprint"] == cert_fp(cert) and len(ca["fingerprint"]) == 64
    assert ca["subject"] == cert.subject.rfc4514_string() and "Widget Root CA" in ca["subject"]
    assert ca["not_after"] == clock.iso(cert.not_valid_after_utc)
    assert ca["active"] is True and ca["product_id"] == world["widget"]["id"]
    assert ca["jitp"] == {"groups": ["field-units", "eu_west"], "tags": ["jitp", "batch-7"],
                          "development": True, "quarantine": False}
    assert ca["certificate"] == pem(cert)

    r = await client.get(world["url"], headers=bearer(world["ada"]))
    assert r.status_code == 200
    (listed,) = r.json()["certificate_authorities"]
    assert listed["id"] == ca["id"] and "certificate" not in listed
    assert {k: listed[k] for k in ("fingerprint", "subject", "not_after", "active", "jitp")} == \
        {k: ca[k] for k in ("fingerprint", "subject", "not_after", "active", "jitp")}

    r = await client.get(f"{world['url']}/{ca['id']}", headers=bearer(world["ada"]))
    assert r.status_code == 200 and r.json()["certificate_authority"] == ca

    (entry,) = await audits(app, "ca.")
    assert entry.action == "ca.created" and entry.target_id == str(ca["id"])
    assert entry.product_id == world["widget"]["id"] and entry.details["fingerprint"] == ca["fingerprint"]
    assert "BEGIN CERTIFICATE" not in str(entry.details)


async def test_register_defaults_inactive_and_file_upload(client, world):
    cert, _ = new_ca(key=ec_key())
    der = cert.public_bytes(serialization.Encoding.DER)
    r = await client.post(world["url"], headers=bearer(world["ada"]),
                          files={"file": ("ca.der", der, "application/octet-stream")},
                          data={"active": "false"})
    assert r.status_code == 201, r.text
    ca = r.json()["certificate_authority"]
    assert ca["active"] is False and ca["fingerprint"] == cert_fp(cert)
    assert ca["jitp"] == {"groups": [], "tags": [], "development": False, "quarantine": False}
    # form with the PEM and jitp as JSON text
    cert2, _ = new_ca("Second CA")
    r = await client.post(world["url"], headers=bearer(world["ada"]), data={
        "certificate": pem(cert2), "jitp": '{"groups": ["a"]}'})
    assert r.status_code == 201, r.text
    assert r.json()["certificate_authority"]["jitp"]["groups"] == ["a"]


def _bad_certificates() -> list[tuple[str, Any, str]]:
    now = clock.now()
    leafish, _ = new_ca("not a ca", ca=False)
    no_bc, _ = new_ca("no basic constraints", ca=None)
    expired, _ = new_ca("old", start=now - dt.timedelta(days=30), days=10)
    future, _ = new_ca("future", start=now + dt.timedelta(days=2), days=10)
    a, key_a = new_ca("A")
    b, _ = new_ca("B")
    key_pem = key_a.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()
    return [
        ("missing", {}, "certificate is required"),
        ("garbage", {"certificate": "hello"}, "could not be parsed"),
        ("broken-pem", {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"},
         "could not be parsed"),
        ("not-string", {"certificate": ["x"]}, "certificate: Input should be a valid string"),
        ("not-ca", {"certificate": pem(leafish)}, "not a CA"),
        ("no-basic-constraints", {"certificate": pem(no_bc)}, "not a CA"),
        ("expired", {"certificate": pem(expired)}, "expired"),
        ("not-yet-valid", {"certificate": pem(future)}, "not yet valid"),
        ("chain", {"certificate": pem(a) + pem(b)}, "exactly one"),
        ("with-key", {"certificate": pem(a) + key_pem}, "private key"),
        ("upper-group", {"certificate": pem(a), "jitp": {"groups": ["Field"]}}, "lowercase letters"),
        ("space-group", {"certificate": pem(a), "jitp": {"groups": ["a b"]}}, "lowercase letters"),
        ("long-group", {"certificate": pem(a), "jitp": {"groups": ["g" * 65]}}, "lowercase letters"),
        ("empty-group", {"certificate": pem(a), "jitp": {"groups": [""]}}, "lowercase letters"),
        ("groups-string", {"certificate": pem(a), "jitp": {"groups": "a"}}, "jitp.groups"),
        ("tags-type", {"certificate": pem(a), "jitp": {"tags": [1]}}, "jitp.tags"),
        ("dev-type", {"certificate": pem(a), "jitp": {"development": "maybe"}}, "boolean"),
        ("jitp-type", {"certificate": pem(a), "jitp": [1]}, "jitp: Input should be a valid dictionary"),
        ("jitp-unknown", {"certificate": pem(a), "jitp": {"product": 3}}, "Unknown jitp"),
        ("active-type", {"certificate": pem(a), "active": "sometimes"}, "boolean"),
    ]


BAD_CERTIFICATES = _bad_certificates()


@pytest.mark.parametrize(("label", "body", "text"), BAD_CERTIFICATES,
                         ids=[b[0] for b in BAD_CERTIFICATES])
async def test_register_refuses(app, client, world, label, body, text):
    r = await client.post(world["url"], headers=bearer(world["ada"]), json=body)
    assert r.status_code == 400, r.text
    assert text in r.json()["error_description"], r.json()
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(ProductCA))).first() is None
    assert await audits(app, "ca.") == []


async def test_duplicate_fingerprint_anywhere_is_409(client, world):
    cert, _ = new_ca()
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={"certificate": pem(cert)})
    assert r.status_code == 201
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={"certificate": pem(cert)})
    assert r.status_code == 409 and r.json()["error"] == "ca_exists", r.text
    other = f"/v1/products/{world['gadget']['slug']}/certificate_authorities"
    r = await client.post(other, headers=bearer(world["bob"]), json={"certificate": pem(cert)})
    assert r.status_code == 409, r.text


async def test_update(app, client, world):
    cert, _ = new_ca()
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={
        "certificate": pem(cert), "jitp": {"groups": ["a"], "tags": ["t"]}})
    ca_url = f"{world['url']}/{r.json()['certificate_authority']['id']}"

    r = await client.put(ca_url, headers=bearer(world["ada"]), json={"active": False})
    assert r.status_code == 200, r.text
    ca = r.json()["certificate_authority"]
    assert ca["active"] is False and ca["jitp"] == {"groups": ["a"], "tags": ["t"], "development": False,
                                             "quarantine": False}

    r = await client.put(ca_url, headers=bearer(world["ada"]),
                         json={"jitp": {"development": True, "groups": ["b", "c", "b"]}})
    assert r.status_code == 200, r.text
    assert r.json()["certificate_authority"]["jitp"] == {
        "groups": ["b", "c"], "tags": ["t"], "development": True, "quarantine": False}

    r = await client.put(ca_url, headers=bearer(world["ada"]), data={"active": "true"})
    assert r.status_code == 200 and r.json()["certificate_authority"]["active"] is True

    updates = [e for e in await audits(app, "ca.") if e.action == "ca.updated"]
    assert [sorted(e.details) for e in updates] == [
        ["active", "fingerprint"], ["fingerprint", "jitp"], ["active", "fingerprint"]]

    # bad changes leave the CA as it was
    for body in ({"jitp": {"groups": ["UPPER"]}}, {"certificate": pem(cert)}, {"active": "x"},
                 {"jitp": "nope"}):
        r = await client.put(ca_url, headers=bearer(world["ada"]), json=body)
        assert r.status_code == 400, (body, r.text)
    r = await client.get(ca_url, headers=bearer(world["ada"]))
    assert r.json()["certificate_authority"]["jitp"]["groups"] == ["b", "c"]
    # no change, no audit
    r = await client.put(ca_url, headers=bearer(world["ada"]), json={"active": True})
    assert r.status_code == 200
    assert len([e for e in await audits(app, "ca.") if e.action == "ca.updated"]) == 3


async def test_delete(app, client, world):
    cert, _ = new_ca()
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={"certificate": pem(cert)})
    ca_url = f"{world['url']}/{r.json()['certificate_authority']['id']}"
    r = await client.delete(ca_url, headers=bearer(world["ada"]))
    assert r.status_code == 204, r.text
    assert (await client.get(ca_url, headers=bearer(world["ada"]))).status_code == 404
    assert (await client.get(world["url"], headers=bearer(world["ada"]))).json() == {
        "certificate_authorities": []}
    assert [e.action for e in await audits(app, "ca.")] == ["ca.created", "ca.deleted"]
    # registering it again is fine once deleted
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={"certificate": pem(cert)})
    assert r.status_code == 201


async def test_not_found_and_other_tenants(client, world):
    cert, _ = new_ca()
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={"certificate": pem(cert)})
    ca_id = r.json()["certificate_authority"]["id"]
    other = f"/v1/products/{world['gadget']['slug']}/certificate_authorities"
    # bob cannot see Widget's CAs at all, nor reach ada's CA through his product
    r = await client.get(world["url"], headers=bearer(world["bob"]))
    assert r.status_code == 404 and r.json()["error_description"] == "Product not found"
    for method in ("GET", "PUT", "DELETE"):
        r = await client.request(method, f"{other}/{ca_id}", headers=bearer(world["bob"]), json={})
        assert r.status_code == 404 and "Certificate authority" in r.json()["error_description"]
    for bad in ("abc", "0", "99999", "-1", "1" * 40):
        r = await client.get(f"{world['url']}/{bad}", headers=bearer(world["ada"]))
        assert r.status_code == 404, bad


async def test_roles(app, client, world):
    cert, _ = new_ca()
    r = await client.post(world["url"], headers=bearer(world["ada"]), json={"certificate": pem(cert)})
    ca_url = f"{world['url']}/{r.json()['certificate_authority']['id']}"
    org_id, product_id = world["widget"]["org_id"], world["widget"]["id"]
    dev = await new_user(client, "dev@example.com")
    await add_member(app, "dev@example.com", org_id=org_id, product_id=None, role="Developer")
    admin = await new_user(client, "adm@example.com")
    await add_member(app, "adm@example.com", org_id=org_id, product_id=product_id,
                     role="Administrator")
    view = await new_user(client, "vic@example.com")
    await add_member(app, "vic@example.com", org_id=org_id, product_id=product_id, role="View-only")
    for tok in (dev, view):
        assert (await client.get(world["url"], headers=bearer(tok))).status_code == 200
        assert (await client.get(ca_url, headers=bearer(tok))).status_code == 200
        cert2, _ = new_ca("Another")
        r = await client.post(world["url"], headers=bearer(tok), json={"certificate": pem(cert2)})
        assert r.status_code == 403 and r.json()["required"] == "products.settings:update"
        assert (await client.put(ca_url, headers=bearer(tok), json={"active": False})).status_code == 403
        assert (await client.delete(ca_url, headers=bearer(tok))).status_code == 403
    r = await client.put(ca_url, headers=bearer(admin), json={"active": False})
    assert r.status_code == 200 and r.json()["certificate_authority"]["active"] is False
