"""The MQTT gateway's session features over real sockets: persistent sessions (resume,
resend with DUP, expiry), last will, and TLS (server certificate, password over TLS, client
certificates from a product CA with just-in-time provisioning, CAs added at runtime)."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

import mqtt_helpers
from corral.events.writer import NewEvent
from corral.sessions import contract
from corral.transports.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    Disconnect,
    Puback,
    Publish,
    Will,
)
from corral.transports.mqtt.properties import Properties
from helpers import bearer
from mqtt_helpers import (
    DEV,
    DEV2,
    Paho,
    Raw,
    device_row,
    events,
    t,
    until,
)
from test_product_cas import ec_key, make_cert, name, new_ca, pem

# the gateway fixtures shared by the MQTT test files (pytest finds them by name)
settings, gw = mqtt_helpers.settings, mqtt_helpers.gw

DEV3 = "00112233445566778899aabb"


async def cloud_event(gw: Any, name: str, data: str) -> None:
    await gw.app.state.runtime.writer.write(NewEvent(
        name=name, data=data, source="cloud", product_id=gw.product["id"],
        org_id=gw.product["org_id"]))


async def offline(app: Any, device_id: str = DEV) -> str | None:
    row = await device_row(app, device_id)
    return None if row.online else row.last_disconnect_reason


# --- persistent sessions -------------------------------------------------------------------------

async def test_paho_v5_persistent_session_resumes_subscriptions(gw):
    dev = Paho(gw.port, DEV, gw.secret, clean=False)
    await dev.connect(session_expiry=600)
    assert dev.session_present is False
    assert dev.connack_props.SessionExpiryInterval == 60  # capped by the server
    await dev.subscribe(t("inbox", "#"))
    await dev.subscribe(t("requests", "+"))
    await dev.publish(t("describe"), json.dumps({"variables": {"v": "int32"}}))
    await dev.disconnect()
    await until(lambda: offline(gw.app))

    again = Paho(gw.port, DEV, gw.secret, clean=False)
    again.handlers.append(lambda d, m: d.c.publish(
        t("replies", m.topic.rsplit("/", 1)[1]), '{"result": 7}', qos=1)
        if "/requests/" in m.topic else None)
    await again.connect(session_expiry=600)
    assert again.session_present is True
    await cloud_event(gw, "resumed", "1")
    await until(lambda: again.messages, what="delivery without resubscribing")
    assert again.messages[0].topic == t("inbox", "resumed")
    reply = await gw.hub.bus.request(contract.request_subject(DEV),
                                     {"kind": "variable", "name": "v", "timeout": 5}, timeout=6)
    assert reply.json() == {"ok": True, "result": 7, "type": "int32"}
    await again.disconnect()


@pytest.mark.parametrize("version", [4, 5])
async def test_unacknowledged_qos1_is_resent_with_dup(gw, version):
    props = Properties(session_expiry_interval=300) if version == MQTT_5 else Properties()
    r = await Raw.open(gw.port, version)
    assert (await r.connect(DEV, gw.secret, clean=False, properties=props)).reason_code == 0
    assert await r.subscribe(t("inbox", "#"), qos=1) == (1,)
    await cloud_event(gw, "important", "42")
    first = await r.recv_type(Publish)
    assert first.qos == 1 and not first.dup and first.payload == b"42"
    r.close()  # gone without acknowledging
    await until(lambda: offline(gw.app))

    r = await Raw.open(gw.port, version)
    ack = await r.connect(DEV, gw.secret, clean=False, properties=props)
    assert ack.reason_code == 0 and ack.session_present
    again = await r.recv_type(Publish)
    assert (again.topic, again.payload, again.packet_id, again.dup) == (
        first.topic, b"42", first.packet_id, True)
    r.send(Puback(again.packet_id))
    await r.ping()
    r.close()
    await until(lambda: offline(gw.app))

    r = await Raw.open(gw.port, version)
    assert (await r.connect(DEV, gw.secret, clean=False, properties=props)).session_present
    await r.ping()
    assert r.inbox == []  # nothing left to resend
    r.close()


async def test_clean_session_discards_kept_state(gw):
    r = await Raw.open(gw.port, MQTT_311)
    assert (await r.connect(DEV, gw.secret, clean=False)).reason_code == 0
    await r.subscribe(t("inbox", "#"))
    r.close()
    await until(lambda: offline(gw.app))
    r = await Raw.open(gw.port, MQTT_311)
    ack = await r.connect(DEV, gw.secret, clean=True)
    assert not ack.session_present
    await cloud_event(gw, "nobody", "1")
    await asyncio.sleep(0.2)
    await r.ping()
    assert r.inbox == []
    r.close()
    await until(lambda: offline(gw.app))
    assert DEV not in gw.server.sessions  # a clean session is not kept


async def test_v5_session_expiry_zero_keeps_nothing_and_disconnect_can_shorten(gw):
    r = await Raw.open(gw.port)
    await r.connect(DEV, gw.secret, clean=False)  # no expiry interval: 0
    await r.subscribe(t("inbox", "#"))
    r.close()
    await until(lambda: offline(gw.app))
    r = await Raw.open(gw.port)
    assert not (await r.connect(DEV, gw.secret, clean=False)).session_present
    r.close()
    await until(lambda: offline(gw.app))
    # kept at CONNECT, then dropped by DISCONNECT's session expiry 0
    r = await Raw.open(gw.port)
    await r.connect(DEV, gw.secret, clean=False,
                    properties=Properties(session_expiry_interval=30))
    r.send(Disconnect(0, Properties(session_expiry_interval=0)))
    await r.closed()
    await until(lambda: offline(gw.app))
    r = await Raw.open(gw.port)
    assert not (await r.connect(DEV, gw.secret, clean=False,
                                properties=Properties(session_expiry_interval=30))
                ).session_present
    # setting an expiry at DISCONNECT after connecting with 0 is a protocol error
    r = await Raw.open(gw.port)
    await r.connect(DEV, gw.secret)
    r.send(Disconnect(0, Properties(session_expiry_interval=30)))
    seen = await r.closed()
    assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x82


async def test_kept_session_expires(gw):
    gw.server.settings = gw.server.settings.model_copy(update={"mqtt_session_expiry_s": 1})
    r = await Raw.open(gw.port, MQTT_311)
    await r.connect(DEV, gw.secret, clean=False)
    r.close()
    await until(lambda: offline(gw.app))
    assert DEV in gw.server.sessions
    await asyncio.sleep(1.1)
    r = await Raw.open(gw.port, MQTT_311)
    assert not (await r.connect(DEV, gw.secret, clean=False)).session_present
    r.close()


# --- last will -----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
async def test_will_published_when_the_connection_is_lost(gw, version):
    r = await Raw.open(gw.port, version)
    will = Will(t("events", "gone"), b"bye", qos=1)
    assert (await r.connect(DEV, gw.secret, will=will)).reason_code == 0
    r.close()
    await until(lambda: offline(gw.app))
    evs = await until(lambda: events(gw.app, name="gone"), what="the will")
    assert [e.data for e in evs] == ["bye"]


async def test_will_not_published_after_disconnect_unless_v5_asks(gw):
    r = await Raw.open(gw.port, MQTT_311)
    await r.connect(DEV, gw.secret, will=Will(t("events", "gone"), b"v3"))
    r.send(Disconnect())
    await r.closed()
    await until(lambda: offline(gw.app))
    r = await Raw.open(gw.port)
    await r.connect(DEV, gw.secret, will=Will(t("events", "gone"), b"v5-normal"))
    r.send(Disconnect(0))
    await r.closed()
    await until(lambda: offline(gw.app))
    r = await Raw.open(gw.port)
    await r.connect(DEV, gw.secret, will=Will(t("events", "gone"), b"v5-with-will",
                                              properties=Properties(message_expiry_interval=9)))
    r.send(Disconnect(0x04))
    await r.closed()
    evs = await until(lambda: events(gw.app, name="gone"), what="the will")
    assert [(e.data, e.ttl) for e in evs] == [("v5-with-will", 9)]


async def test_will_not_published_on_takeover(gw):
    r = await Raw.open(gw.port)
    await r.connect(DEV, gw.secret, will=Will(t("events", "gone"), b"x"))
    r2 = await Raw.open(gw.port)
    await r2.connect(DEV, gw.secret)
    await r.closed()
    await r2.ping()
    assert await events(gw.app, name="gone") == []
    r2.close()


@pytest.mark.parametrize(("version", "topic", "code"), [
    (MQTT_311, t("events", "x", DEV2), 5),
    (MQTT_5, t("events", "x", DEV2), 0x87),
    (MQTT_5, t("describe"), 0x87),
    (MQTT_5, t("events", "spark/x"), 0x90),
    (MQTT_311, t("events", "spark/x"), 5),
])
async def test_will_on_a_forbidden_topic_refuses_connect(gw, version, topic, code):
    r = await Raw.open(gw.port, version)
    ack = await r.connect(DEV, gw.secret, will=Will(topic, b"x"))
    assert ack.reason_code == code
    assert await r.closed() == []
    assert not (await device_row(gw.app)).online


async def test_v5_will_qos2_and_retain_refused(gw):
    r = await Raw.open(gw.port)
    assert (await r.connect(DEV, gw.secret, will=Will(t("events", "w"), b"", qos=2))
            ).reason_code == 0x9B
    r = await Raw.open(gw.port)
    assert (await r.connect(DEV, gw.secret, will=Will(t("events", "w"), b"", retain=True))
            ).reason_code == 0x9A


# --- TLS -----------------------------------------------------------------------------------------

@pytest.fixture
async def tls(gw, tmp_path) -> Any:
    listener = await gw.server.listen("127.0.0.1", 0, tls=True)
    cert = gw.app.state.settings.data_dir / "mqtt-tls" / "cert.pem"
    assert cert.exists()
    ca_cert, ca_key = new_ca("Widget Fleet CA")
    return SimpleNamespace(port=listener.port, server_cert=cert, ca=ca_cert, ca_key=ca_key,
                           tmp=tmp_path)


def client_context(tls: Any, device_id: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls.server_cert))
    if device_id is not None:
        cert_path, key_path = write_leaf(tls, device_id)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def write_leaf(tls: Any, device_id: str) -> tuple[Path, Path]:
    key = ec_key()
    leaf = make_cert(subject=name(device_id, org="device"), key=key, issuer=tls.ca.subject,
                     issuer_key=tls.ca_key, ca=False)
    cert_path, key_path = tls.tmp / f"{device_id}.pem", tls.tmp / f"{device_id}.key"
    cert_path.write_text(pem(leaf))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def register_ca(gw: Any, tls: Any) -> None:
    r = await gw.client.post(f"/v1/products/{gw.product['slug']}/certificate_authorities",
                             headers=bearer(gw.token), json={"certificate": pem(tls.ca)})
    assert r.status_code == 201, r.text
    assert await gw.server.refresh_tls()


async def test_tls_with_password(gw, tls):
    r = await Raw.open(tls.port, MQTT_311, ssl=client_context(tls))
    assert (await r.connect(DEV, gw.secret)).reason_code == 0
    assert (await r.publish(t("events", "secure"), "1")).packet_id == 1
    assert [e.data for e in await events(gw.app, name="secure")] == ["1"]
    r.close()


async def test_paho_tls_client_certificate_of_an_imported_device(gw, tls):
    await register_ca(gw, tls)
    cert_path, key_path = write_leaf(tls, DEV2)
    dev = Paho(tls.port, DEV2, None, client_id="")
    dev.c.tls_set(ca_certs=str(tls.server_cert), certfile=str(cert_path),
                  keyfile=str(key_path))
    await dev.connect()
    assert dev.connack_props.AssignedClientIdentifier == DEV2
    assert (await device_row(gw.app, DEV2)).online
    assert (await dev.publish(t("events", "cert", DEV2), "ok")).value == 0
    await dev.disconnect()


async def test_tls_client_certificate_provisions_an_unknown_device(gw, tls):
    await register_ca(gw, tls)
    r = await Raw.open(tls.port, MQTT_5, ssl=client_context(tls, DEV3))
    ack = await r.connect(DEV3, None, username=None)
    assert ack.reason_code == 0, ack
    row = await device_row(gw.app, DEV3)
    assert row.product_id == gw.product["id"] and row.online
    r.close()



@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
async def test_tls_client_certificate_of_a_quarantining_ca(gw, tls, version):
    """A CA whose JITP settings say ``quarantine: true`` provisions the unknown device into
    quarantine: refused as not authorized until someone approves it, then accepted."""
    url = f"/v1/products/{gw.product['slug']}/certificate_authorities"
    r = await gw.client.post(url, headers=bearer(gw.token), json={
        "certificate": pem(tls.ca), "jitp": {"quarantine": True, "tags": ["held"]}})
    assert r.status_code == 201, r.text
    assert r.json()["certificate_authority"]["jitp"]["quarantine"] is True
    assert await gw.server.refresh_tls()
    r = await Raw.open(tls.port, version, ssl=client_context(tls, DEV3))
    ack = await r.connect(DEV3, None, username=None)
    assert ack.reason_code == (0x87 if version == MQTT_5 else 5)
    row = await device_row(gw.app, DEV3)
    assert row.product_id == gw.product["id"] and row.quarantined and not row.online
    listed = await gw.client.get(f"/v1/products/{gw.product['slug']}/devices",
                                 params={"quarantined": "true"}, headers=bearer(gw.token))
    assert [d["id"] for d in listed.json()["devices"]] == [DEV3]
    approve = await gw.client.put(f"/v1/products/{gw.product['slug']}/devices/{DEV3}",
                                  headers=bearer(gw.token), json={"quarantined": False})
    assert approve.status_code == 200, approve.text
    r = await Raw.open(tls.port, version, ssl=client_context(tls, DEV3))
    assert (await r.connect(DEV3, None, username=None)).reason_code == 0
    assert (await device_row(gw.app, DEV3)).online
    r.close()

async def test_tls_client_certificate_must_match_the_client_id(gw, tls):
    await register_ca(gw, tls)
    r = await Raw.open(tls.port, MQTT_5, ssl=client_context(tls, DEV3))
    ack = await r.connect(DEV, None, username=None)
    assert ack.reason_code == 0x85
    r = await Raw.open(tls.port, MQTT_311, ssl=client_context(tls, DEV3))
    ack = await r.connect(DEV3, None, username=DEV)
    assert ack.reason_code == 4


async def test_tls_trust_follows_registered_cas(gw, tls):
    # before the CA is registered, its certificates fail the handshake
    r = await Raw.open(tls.port, MQTT_5, ssl=client_context(tls, DEV3))
    r.send_raw(b"")
    with pytest.raises((EOFError, ConnectionError, ssl.SSLError, AssertionError)):
        await r.connect(DEV3, None, username=None)
    await register_ca(gw, tls)
    r = await Raw.open(tls.port, MQTT_5, ssl=client_context(tls, DEV3))
    assert (await r.connect(DEV3, None, username=None)).reason_code == 0
    r.close()
    # deactivating the CA takes the trust away again
    cas = (await gw.client.get(f"/v1/products/{gw.product['slug']}/certificate_authorities",
                               headers=bearer(gw.token))).json()["certificate_authorities"]
    url = f"/v1/products/{gw.product['slug']}/certificate_authorities/{cas[0]['id']}"
    assert (await gw.client.delete(url, headers=bearer(gw.token))).status_code in (200, 204)
    assert await gw.server.refresh_tls()
    r = await Raw.open(tls.port, MQTT_5, ssl=client_context(tls, DEV3))
    with pytest.raises((EOFError, ConnectionError, ssl.SSLError, AssertionError)):
        await r.connect(DEV3, None, username=None)


async def test_tls_slow_handshake_is_closed(gw, tls):
    r = await Raw.open(tls.port)  # plain TCP to the TLS port, no ClientHello
    assert await r.closed(within=3) == []


def test_server_certificate_is_reused(settings):
    from corral.transports.mqtt.tls import ensure_server_certificate

    cert, key = ensure_server_certificate(settings)
    assert (key.stat().st_mode & 0o777) == 0o600
    assert ensure_server_certificate(settings) == (cert, key)
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
