"""Just-in-time provisioning: a device presenting a certificate signed by a product's CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.devices import credentials
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember, DeviceTag
from helpers import bearer, make_product, new_user
from test_product_cas import ec_key, make_cert, name, new_ca, pem, rsa_key

DEV = "00112233445566778899aabb"
DEV2 = "00112233445566778899ccdd"

_LEAF_KEY = ec_key()  # leaf keys can be shared; each certificate is still distinct


def leaf(ca_cert: x509.Certificate, ca_key: Any, cn: str | None = DEV, *, ca: bool | None = False,
         start: dt.datetime | None = None, days: float = 30, key: Any = None) -> x509.Certificate:
    return make_cert(subject=name(cn, org="device"), key=key or _LEAF_KEY, issuer=ca_cert.subject,
                     issuer_key=ca_key, ca=ca, start=start, days=days)


def fp(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def provision(app, chain: list[x509.Certificate], ip: str | None = "10.0.0.7"):
    async with app.state.sessionmaker() as db:
        res = await credentials.provision_from_certificate(db, chain, ip=ip)
        await db.commit()
        return res


async def count(app, model: Any, *where: Any) -> int:
    async with app.state.sessionmaker() as db:
        return (await db.execute(select(func.count()).select_from(model).where(*where))).scalar_one()


async def jitp_audits(app) -> list[AuditEntry]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry).where(
            AuditEntry.action == "device.jitp_provisioned").order_by(AuditEntry.id))).scalars())


@pytest.fixture
async def world(app, client, manual_clock) -> dict[str, Any]:
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    widget = await make_product(client, ada, "Widget", platform_id=12)
    gadget = await make_product(client, bob, "Gadget")
    ca_cert, ca_key = new_ca("Widget Fleet CA")
    url = f"/v1/products/{widget['slug']}/certificate_authorities"
    r = await client.post(url, headers=bearer(ada), json={
        "certificate": pem(ca_cert),
        "jitp": {"groups": ["field", "batch-7"], "tags": ["jitp", "eu"], "development": True}})
    assert r.status_code == 201, r.text
    return {"ada": ada, "bob": bob, "widget": widget, "gadget": gadget, "ca": ca_cert,
            "ca_key": ca_key, "ca_url": f"{url}/{r.json()['certificate_authority']['id']}",
            "ca_id": r.json()["certificate_authority"]["id"]}


async def test_first_connect_creates_device_with_settings(app, world, manual_clock):
    cert = leaf(world["ca"], world["ca_key"])
    res = await provision(app, [cert, world["ca"]])
    assert res.accepted and res.created and res.product_id == world["widget"]["id"], res.reason
    assert res.device is not None and res.device.id == DEV
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV)
        assert d.product_id == world["widget"]["id"] and d.platform_id == 12
        assert d.tags == ["jitp", "eu"] and d.development is True
        indexed = (await db.execute(select(DeviceTag.tag).where(
            DeviceTag.device_id == DEV))).scalars().all()
        assert sorted(indexed) == ["eu", "jitp"]  # the tag filter's index, same transaction
        assert d.imported_at == manual_clock.now() and d.certificate_fingerprint == fp(cert)
        assert d.quarantined is False and d.denied is False and d.owner_user_id is None
        groups = (await db.execute(select(DeviceGroup.name).join(
            DeviceGroupMember, DeviceGroupMember.group_id == DeviceGroup.id).where(
            DeviceGroupMember.device_id == DEV))).scalars().all()
        assert sorted(groups) == ["batch-7", "field"]
        all_groups = (await db.execute(select(DeviceGroup).where(
            DeviceGroup.product_id == world["widget"]["id"]))).scalars().all()
        assert len(all_groups) == 2
    (entry,) = await jitp_audits(app)
    assert entry.target_id == DEV and entry.product_id == world["widget"]["id"]
    assert entry.ip == "10.0.0.7" and entry.actor == "jitp" and entry.actor_user_id is None
    assert entry.details["created"] is True and entry.details["fingerprint"] == fp(cert)
    assert entry.details["ca_id"] == world["ca_id"]

    async with app.state.sessionmaker() as db:
        found = await credentials.device_for_certificate(db, cert)
        assert found is not None and found.id == DEV
        assert await credentials.device_for_certificate(db, leaf(world["ca"], world["ca_key"])) is None


async def test_second_connect_does_not_duplicate(app, world):
    cert = leaf(world["ca"], world["ca_key"])
    assert (await provision(app, [cert])).created
    res = await provision(app, [cert])
    assert res.accepted and not res.created and res.device.id == DEV, res.reason
    assert await count(app, Device) == 1
    assert await count(app, DeviceGroup) == 2
    assert await count(app, DeviceGroupMember) == 2
    assert len(await jitp_audits(app)) == 1  # nothing changed the second time
    # a renewed certificate for the same device is accepted and recorded
    renewed = leaf(world["ca"], world["ca_key"], key=ec_key())
    res = await provision(app, [renewed])
    assert res.accepted and not res.created
    async with app.state.sessionmaker() as db:
        assert (await db.get(Device, DEV)).certificate_fingerprint == fp(renewed)
    audits = await jitp_audits(app)
    assert len(audits) == 2 and audits[1].details["created"] is False


async def test_second_device_joins_existing_groups(app, client, world):
    # a group that already exists (created through the CA of another device) is reused
    assert (await provision(app, [leaf(world["ca"], world["ca_key"])])).created
    res = await provision(app, [leaf(world["ca"], world["ca_key"], DEV2.upper())])
    assert res.accepted and res.created and res.device.id == DEV2
    assert await count(app, DeviceGroup) == 2
    assert await count(app, DeviceGroupMember) == 4


async def test_preimported_device_in_product_is_accepted(app, world):
    async with app.state.sessionmaker() as db:
        db.add(Device(id=DEV, product_id=world["widget"]["id"], platform_id=12, tags=["keep"]))
        await db.commit()
    cert = leaf(world["ca"], world["ca_key"])
    res = await provision(app, [cert])
    assert res.accepted and not res.created, res.reason
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV)
        assert d.certificate_fingerprint == fp(cert) and d.tags == ["keep"]
        assert d.development is False and d.imported_at is None
    assert await count(app, DeviceGroupMember) == 0


@pytest.mark.parametrize("case", ["other-product", "sandbox", "denied"])
async def test_refused_existing_devices(app, world, case):
    product_id = {"other-product": world["gadget"]["id"], "sandbox": None,
                  "denied": world["widget"]["id"]}[case]
    async with app.state.sessionmaker() as db:
        db.add(Device(id=DEV, product_id=product_id, platform_id=6, denied=case == "denied"))
        await db.commit()
    cert = leaf(world["ca"], world["ca_key"])
    res = await provision(app, [cert])
    assert not res.accepted and res.device is None and not res.created
    assert ("denied" if case == "denied" else "another product") in res.reason
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV)
        assert d.product_id == product_id and d.certificate_fingerprint is None
    assert await jitp_audits(app) == []


async def test_expired_and_not_yet_valid_leaf(app, world, manual_clock):
    now = manual_clock.now()
    expired = leaf(world["ca"], world["ca_key"], start=now - dt.timedelta(days=10), days=5)
    res = await provision(app, [expired])
    assert not res.accepted and "expired" in res.reason
    early = leaf(world["ca"], world["ca_key"], start=now + dt.timedelta(hours=1))
    res = await provision(app, [early])
    assert not res.accepted and "not yet valid" in res.reason
    # time passes: the same certificate becomes valid, then expires
    manual_clock.advance(hours=2)
    assert (await provision(app, [early])).accepted
    manual_clock.advance(days=40)
    res = await provision(app, [early])
    assert not res.accepted and "expired" in res.reason
    assert await count(app, Device) == 1


async def test_wrong_ca(app, world):
    # same subject name as the registered CA, different key: the signature must not verify
    impostor, impostor_key = new_ca("Widget Fleet CA")
    res = await provision(app, [leaf(impostor, impostor_key), impostor])
    assert not res.accepted and "not signed by a registered CA" in res.reason
    other, other_key = new_ca("Some Other CA")
    res = await provision(app, [leaf(other, other_key)])
    assert not res.accepted and "not signed by a registered CA" in res.reason
    assert await count(app, Device) == 0


async def test_deactivated_and_deleted_ca(app, client, world):
    cert = leaf(world["ca"], world["ca_key"])
    r = await client.put(world["ca_url"], headers=bearer(world["ada"]), json={"active": False})
    assert r.status_code == 200
    res = await provision(app, [cert])
    assert not res.accepted and "deactivated" in res.reason
    assert await count(app, Device) == 0
    await client.put(world["ca_url"], headers=bearer(world["ada"]), json={"active": True})
    assert (await provision(app, [cert])).accepted
    r = await client.delete(world["ca_url"], headers=bearer(world["ada"]))
    assert r.status_code == 204
    res = await provision(app, [leaf(world["ca"], world["ca_key"], DEV2)])
    assert not res.accepted and "not signed by a registered CA" in res.reason
    async with app.state.sessionmaker() as db:  # provisioned devices stay
        assert (await db.get(Device, DEV)).product_id == world["widget"]["id"]


async def test_expired_ca(app, world, manual_clock):
    cert = leaf(world["ca"], world["ca_key"], days=1000)
    manual_clock.advance(days=400)  # the CA was valid for 365 days
    res = await provision(app, [cert])
    assert not res.accepted and "CA certificate is expired" in res.reason


@pytest.mark.parametrize("cn", [None, "device-1", "00112233445566778899aab", "00112233445566778899aabbc",
                                "0011223344556677889zaabb"])
async def test_bad_common_name(app, world, cn):
    res = await provision(app, [leaf(world["ca"], world["ca_key"], cn)])
    assert not res.accepted and "CommonName" in res.reason
    assert res.product_id == world["widget"]["id"]
    assert await count(app, Device) == 0


async def test_uppercase_common_name_is_lowercased(app, world):
    res = await provision(app, [leaf(world["ca"], world["ca_key"], DEV.upper())])
    assert res.accepted and res.device.id == DEV


async def test_leaf_that_is_a_ca_and_empty_chain(app, world):
    res = await provision(app, [leaf(world["ca"], world["ca_key"], ca=True)])
    assert not res.accepted and "is a CA" in res.reason
    res = await provision(app, [])
    assert not res.accepted and "no client certificate" in res.reason
    assert await count(app, Device) == 0


async def test_ec_ca_and_rsa_leaf(app, client, world):
    ca_cert, ca_key = new_ca("EC Fleet CA", key=ec_key())
    url = f"/v1/products/{world['widget']['slug']}/certificate_authorities"
    r = await client.post(url, headers=bearer(world["ada"]), json={"certificate": pem(ca_cert)})
    assert r.status_code == 201
    res = await provision(app, [leaf(ca_cert, ca_key, key=rsa_key())])
    assert res.accepted and res.created, res.reason
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV)
        assert d.tags == [] and d.development is False  # this CA has no JITP settings
    assert await count(app, DeviceGroup) == 0


async def test_ca_in_other_product_provisions_there(app, client, world):
    ca_cert, ca_key = new_ca("Gadget CA")
    url = f"/v1/products/{world['gadget']['slug']}/certificate_authorities"
    r = await client.post(url, headers=bearer(world["bob"]),
                          json={"certificate": pem(ca_cert), "jitp": {"groups": ["field"]}})
    assert r.status_code == 201
    res = await provision(app, [leaf(ca_cert, ca_key, DEV2)])
    assert res.accepted and res.product_id == world["gadget"]["id"]
    # the group is created in Gadget, not confused with Widget's groups
    async with app.state.sessionmaker() as db:
        (g,) = (await db.execute(select(DeviceGroup))).scalars().all()
        assert g.product_id == world["gadget"]["id"] and g.name == "field"
    # and the device cannot then be taken into Widget through Widget's CA
    res = await provision(app, [leaf(world["ca"], world["ca_key"], DEV2)])
    assert not res.accepted and "another product" in res.reason


async def test_device_for_certificate_refuses_denied_and_reset(app, world):
    cert = leaf(world["ca"], world["ca_key"])
    assert (await provision(app, [cert])).accepted
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, DEV)
        credentials.reset_credentials(d)
        await db.commit()
    async with app.state.sessionmaker() as db:
        assert await credentials.device_for_certificate(db, cert) is None
    assert (await provision(app, [cert])).accepted  # the CA vouches for it again
    async with app.state.sessionmaker() as db:
        (await db.get(Device, DEV)).denied = True
        await db.commit()
    async with app.state.sessionmaker() as db:
        assert await credentials.device_for_certificate(db, cert) is None


async def test_active_ca_certificates(app, client, world):
    async with app.state.sessionmaker() as db:
        (c,) = await credentials.active_ca_certificates(db)
        assert c == world["ca"]
    await client.put(world["ca_url"], headers=bearer(world["ada"]), json={"active": False})
    async with app.state.sessionmaker() as db:
        assert await credentials.active_ca_certificates(db) == []


async def test_concurrent_first_connects(app, world):
    """Many devices (and the same device twice) connecting at once: one row each, groups once."""
    certs = [leaf(world["ca"], world["ca_key"], f"{i:024x}") for i in range(1, 6)]
    certs.append(certs[0])
    results = await asyncio.gather(*(provision(app, [c]) for c in certs))
    assert all(r.accepted for r in results), [r.reason for r in results]
    assert sum(r.created for r in results) == 5
    assert await count(app, Device) == 5
    assert await count(app, DeviceGroup) == 2
    assert await count(app, DeviceGroupMember) == 10
