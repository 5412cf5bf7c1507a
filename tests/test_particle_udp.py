"""The Gen 3 gateway (DTLS 1.2 over UDP) over real UDP sockets with corral's own DTLS device
(transports/particle/udp_device.py): a whole session (handshake, Hello, describes, publish,
subscribe, functions, variables, time, pings, Goodbye), key checks after the Hello,
retransmission and de-duplication, session resumption from a new source port with no
handshake, and robustness (garbage, ClientHello floods, half handshakes close only their own
state; a bystander keeps working)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from corral.transports.particle import coap, dtls
from corral.transports.particle.coap import Message
from corral.transports.particle.device import DeviceClosed
from corral.transports.particle.keys import public_pem
from corral.transports.particle.udp import start_particle_udp_listener
from corral.transports.particle.udp_device import ParticleUdpDevice
from helpers import bearer, owner_and_product
from mqtt_helpers import DEV, DEV2, device_row, events, statuses, until

WAIT = 5.0
_KEYS: dict[str, ec.EllipticCurvePrivateKey] = {}


def key(name: str) -> ec.EllipticCurvePrivateKey:
    if name not in _KEYS:
        _KEYS[name] = ec.generate_private_key(ec.SECP256R1())
    return _KEYS[name]


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={
        "event_rate_burst": 1000, "event_rate_per_s": 1000.0, "presence_flush_s": 0.05,
        "particle_handshake_timeout_s": 2.0, "device_call_timeout_s": 5.0,
        "particle_udp_max_handshakes": 64, "particle_udp_max_handshakes_per_address": 16})


@pytest.fixture
async def gw(app, client, settings) -> AsyncIterator[Any]:
    """The UDP listener on a free port; product Widget with DEV and DEV2, their P-256 keys
    registered over the API."""
    listener = await start_particle_udp_listener(app.state.runtime.hub, settings,
                                                 host="127.0.0.1", port=0)
    listener.ack_timeout_s = 0.3
    token, product = await owner_and_product(client, platform_id=12)
    r = await client.post(f"/v1/products/{product['id']}/devices", headers=bearer(token),
                          json={"ids": [DEV, DEV2]})
    assert r.status_code == 200, r.text
    for did, name in ((DEV, "dev"), (DEV2, "dev2")):
        r = await client.post(f"/v1/provisioning/{did}", headers=bearer(token),
                              json={"publicKey": public_pem(key(name).public_key())})
        assert r.status_code == 200, r.text
    devices: list[ParticleUdpDevice] = []
    server_public = listener.server_key.public_key()

    def device(did: str = DEV, keyname: str = "dev", **kw: Any) -> ParticleUdpDevice:
        state: dict[str, Any] = {"counter": 7, "last": ""}

        def echo(arg: str) -> int:
            state["last"] = arg
            return len(arg)

        kw.setdefault("ack_timeout_s", 0.3)
        kw.setdefault("handshake_retransmit_s", 0.5)
        d = ParticleUdpDevice(did, key(keyname), server_public, product_id=product["id"],
                              functions={"echo": echo},
                              variables={"counter": ("int32", lambda: state["counter"]),
                                         "lastArg": ("string", lambda: state["last"])}, **kw)
        d.state = state  # type: ignore[attr-defined]
        devices.append(d)
        return d

    try:
        yield SimpleNamespace(app=app, client=client, hub=app.state.runtime.hub,
                              listener=listener, port=listener.port, token=token,
                              product=product, device=device, settings=settings)
    finally:
        for d in devices:
            await d.close()
        await listener.stop()


async def call(gw: Any, did: str, arg: str) -> Any:
    r = await gw.client.post(f"/v1/devices/{did}/echo", headers=bearer(gw.token),
                             data={"arg": arg})
    assert r.status_code == 200, r.text
    return r.json()["return_value"]


async def variable(gw: Any, did: str, name: str) -> Any:
    r = await gw.client.get(f"/v1/devices/{did}/{name}", headers=bearer(gw.token))
    assert r.status_code == 200, r.text
    return r.json()["result"]


async def cloud_event(gw: Any, name: str, data: str) -> None:
    r = await gw.client.post(f"/v1/products/{gw.product['id']}/events",
                             headers=bearer(gw.token), data={"name": name, "data": data})
    assert r.status_code == 200, r.text


async def described(gw: Any, did: str = DEV) -> bool:
    r = await gw.client.get(f"/v1/devices/{did}", headers=bearer(gw.token))
    return bool(r.json().get("functions") == ["echo"])


async def test_gen3_session_over_udp(gw):
    dev = gw.device()
    await dev.connect("127.0.0.1", gw.port)
    assert dev.full_handshakes == 1
    row = await device_row(gw.app)
    assert row.online and row.transport == "particle-udp" and row.platform_id == 12
    # online is not described is not callable: wait for each fact before using it
    assert await until(lambda: described(gw), what="the describe")
    r = await gw.client.get(f"/v1/devices/{DEV}", headers=bearer(gw.token))
    assert r.json()["variables"] == {"counter": "int32", "lastArg": "string"}
    # a CON event is stored and ACKed
    dev.publish("temp", "21.5")
    [temp] = await until(lambda: events(gw.app, DEV, "temp"), what="the event")
    assert temp.data == "21.5"
    await until(lambda: not dev._unacked, what="every CON acknowledged")
    # subscribe, then an event from the cloud arrives
    dev.subscribe("ping")
    await until(lambda: gw.hub.sessions[DEV].prefixes >= {"particle", "spark", "ping"},
                what="the subscriptions")
    await cloud_event(gw, "ping/x", "from-cloud")
    async with asyncio.timeout(WAIT):
        assert await dev.events.get() == ("ping/x", "from-cloud")
    # functions and variables: an empty ACK, then a separate CON answer the server ACKs
    assert await call(gw, DEV, "hello-gen3") == 10
    assert await variable(gw, DEV, "lastArg") == "hello-gen3"
    assert await variable(gw, DEV, "counter") == 7
    await until(lambda: not dev._unacked, what="the answers acknowledged")
    assert abs(await dev.time() - int(__import__("time").time())) <= 2
    await dev.ping()
    assert dev.resent == 0
    # Goodbye: offline, but the session is kept for resumption
    await dev.goodbye()
    assert await until(lambda: _offline_reason(gw)) == "goodbye"
    assert len(gw.listener.channels) == 1


async def _offline_reason(gw: Any, did: str = DEV) -> str | None:
    row = await device_row(gw.app, did)
    return None if row.online else row.last_disconnect_reason


async def test_resumption_from_a_new_port_skips_the_handshake_and_the_hello(gw):
    gw.listener.keepalive_timeout_s = 1.5  # the device goes offline soon after it stops
    dev = gw.device()
    await dev.connect("127.0.0.1", gw.port)
    dev.subscribe("ping")
    await until(lambda: "ping" in gw.hub.sessions[DEV].prefixes, what="the subscription")
    await until(lambda: described(gw), what="the describe")
    old_port = dev.local_port()
    await dev.close()  # e.g. a ping timeout: the device keeps its session
    assert await until(lambda: _offline_reason(gw), what="offline") == "keep-alive timeout"
    gw.listener.keepalive_timeout_s = 600.0
    ch = next(iter(gw.listener.channels.values()))
    seq_before = ch.session.out_seq
    dev.received = []
    await dev.resume("127.0.0.1", gw.port)  # records 253, a CON ping, no Hello
    assert dev.local_port() != old_port and dev.full_handshakes == 1
    assert ch.addr[1] == dev.local_port()  # the server followed the device
    assert ch.session.out_seq > seq_before  # never a sequence number twice
    assert not dev.dtls.moved  # the server answered: back to type 25
    assert await until(lambda: _online(gw), what="online again")
    assert await call(gw, DEV, "after-resume") == 12
    # its subscriptions were kept: Device OS does not send them again
    await cloud_event(gw, "ping/y", "again")
    async with asyncio.timeout(WAIT):
        while (got := await dev.events.get())[0] != "ping/y":
            pass
    assert got == ("ping/y", "again")
    assert await statuses(gw.app) == ["online", "offline", "online"]


async def _online(gw: Any, did: str = DEV) -> bool:
    return bool((await device_row(gw.app, did)).online)


async def test_wrong_key_is_refused_after_the_hello_and_nothing_is_pinned(gw):
    dev = gw.device(DEV, "intruder")
    with pytest.raises(Exception, match=r"reset|closed"):
        await dev.connect("127.0.0.1", gw.port)
    assert dev.resets == 1 and dev.dtls is None  # RST: the device discards its session
    assert not await _online(gw)
    assert not gw.listener.channels
    row = await device_row(gw.app)
    assert row.public_key_der == dtls.spki(key("dev").public_key())


async def test_retransmission_and_deduplication(gw):
    dev = gw.device()
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: described(gw), what="the describe")
    # the function call's first transmission is lost: the server sends it again
    dev.drop_incoming = 1
    assert await call(gw, DEV, "lost-once") == 9
    # the device sends the same CON event twice (its ACK was lost): stored once, ACKed twice
    mid = dev.next_mid()
    event = Message(coap.CON, coap.POST, mid, options=((coap.URI_PATH, b"E"),
                                                       (coap.URI_PATH, b"twice")),
                    payload=b"1")
    fut = asyncio.get_running_loop().create_future()
    dev.pending[mid] = fut
    dev.send_plain(coap.encode(event))
    async with asyncio.timeout(WAIT):
        await fut
    fut2 = asyncio.get_running_loop().create_future()
    dev.pending[mid] = fut2
    dev.send_plain(coap.encode(event))
    async with asyncio.timeout(WAIT):
        assert (await fut2).type == coap.ACK
    await asyncio.sleep(0.2)
    assert len(await events(gw.app, DEV, "twice")) == 1


async def test_garbage_floods_and_half_handshakes_touch_only_their_own_state(gw):
    bystander = gw.device(DEV2, "dev2")
    await bystander.connect("127.0.0.1", gw.port)
    await until(lambda: described(gw, DEV2), what="the bystander's describe")
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
        target = ("127.0.0.1", gw.port)
        jar_s = socks[0]
        # garbage, runts, unknown CIDs, forged CID records of the bystander's session
        ch = next(iter(gw.listener.channels.values()))
        junk = [b"\x00", b"\x17" * 13, os.urandom(200),
                dtls.encode_record(25, 1, 99, os.urandom(40), os.urandom(8)),
                dtls.encode_record(25, 1, 10**6, os.urandom(40), ch.cid),
                dtls.encode_record(253, 1, 10**6, os.urandom(40), ch.cid),
                bytes.fromhex("16fefd") + os.urandom(100)]
        for data in junk * 20:
            jar_s.sendto(data, target)
        # a ClientHello flood without cookies: answered, never remembered
        client_hello = dtls.ClientHandshake(key("x"), key("y").public_key()).start()
        for _ in range(300):
            jar_s.sendto(client_hello, target)
        # half handshakes: echo the cookie, then never finish (from several ports)
        for s in socks:
            for _ in range(30):
                hs = dtls.ClientHandshake(key("x"), gw.listener.server_key.public_key())
                s.sendto(hs.start(), target)
                reply = await asyncio.wait_for(loop.sock_recv(s, 2048), WAIT)
                s.sendto(hs.receive(reply)[0], target)
                await asyncio.wait_for(loop.sock_recv(s, 2048), WAIT)  # the server's flight
        # bounded: at most the per-address cap, and the total cap
        assert len(gw.listener.handshakes) <= gw.settings.particle_udp_max_handshakes
        assert max(gw.listener.per_address.values()) <= 16
        assert len(gw.listener.channels) == 1  # only the bystander's session
        assert gw.listener.dropped
        # the bystander's session is untouched and works
        assert await call(gw, DEV2, "still-here") == 10
        bystander.publish("alive", "yes")
        await until(lambda: events(gw.app, DEV2, "alive"), what="the event")
        # a new device still gets in while the half handshakes are held
        dev = gw.device()
        await dev.connect("127.0.0.1", gw.port)
        assert await until(lambda: _online(gw), what="online")
    finally:
        for s in socks:
            s.close()


async def test_sessions_survive_a_server_restart(gw):
    """Device OS resumes with no handshake and no Hello after corral restarted: the session
    (keys, sequence numbers, the bound device, its Hello and subscriptions) was stored."""
    from sqlalchemy import select

    from corral.transports.particle.models import ParticleUdpSession

    dev = gw.device()
    await dev.connect("127.0.0.1", gw.port)
    dev.subscribe("ping")
    await until(lambda: "ping" in gw.hub.sessions[DEV].prefixes, what="the subscription")
    await until(lambda: described(gw), what="the describe")
    old = next(iter(gw.listener.channels.values()))
    sent_before = old.session.out_seq
    await gw.listener.stop()  # a restart: the open session is stored on the way down
    assert await until(lambda: _offline_reason(gw), what="offline")
    async with gw.app.state.sessionmaker() as db:
        [row] = (await db.scalars(select(ParticleUdpSession))).all()
    assert row.cid == old.cid.hex() and row.device_id == DEV
    assert row.state["prefixes"] == ["particle", "ping", "spark"]
    again = await start_particle_udp_listener(gw.hub, gw.settings, host="127.0.0.1",
                                              port=gw.port)
    try:
        await dev.resume("127.0.0.1", gw.port)  # a new source port, records 253, no Hello
        assert dev.full_handshakes == 1
        assert await until(lambda: _online(gw), what="online again")
        ch = again.channels[old.cid]
        assert ch.session.out_seq > sent_before + 1000  # past the stored reservation
        assert ch.addr[1] == dev.local_port()
        assert await call(gw, DEV, "restarted") == 9
        await cloud_event(gw, "ping/z", "after-restart")
        async with asyncio.timeout(WAIT):
            while (got := await dev.events.get())[0] != "ping/z":
                pass
        assert got == ("ping/z", "after-restart")
        # the device's key is replaced: its stored session no longer resumes
        await dev.close()
        await again.stop()
        r = await gw.client.post(f"/v1/provisioning/{DEV}", headers=bearer(gw.token),
                                 json={"publicKey": public_pem(key("new").public_key())})
        assert r.status_code == 200, r.text
    finally:
        await again.stop()
    third = await start_particle_udp_listener(gw.hub, gw.settings, host="127.0.0.1",
                                              port=gw.port)
    try:
        with pytest.raises(Exception, match=r"reset|closed"):
            await dev.resume("127.0.0.1", gw.port)
        assert dev.resets == 1 and dev.dtls is None
        await until(lambda: _no_rows(gw), what="the session forgotten")
    finally:
        await third.stop()


async def _no_rows(gw: Any) -> bool:
    from sqlalchemy import func, select

    from corral.transports.particle.models import ParticleUdpSession

    async with gw.app.state.sessionmaker() as db:
        return (await db.scalar(select(func.count()).select_from(ParticleUdpSession))) == 0


async def test_ota_v3_window_lost_chunks_and_resume_from_the_offset(gw, tmp_path):
    """Gen 3 hardware sets Hello flag 0x80: UpdateStart, NON chunks without a token, UpdateAck
    bitmaps, UpdateFinish (applied once its 2.04 is ACKed); a second attempt continues from
    the offset the device reports."""
    import hashlib

    from corral.sessions.link import FirmwareImage

    dev = gw.device(ota_chunk_size=512)
    await dev.connect("127.0.0.1", gw.port)
    conn = gw.listener.connection(DEV)
    assert conn is not None and conn.hello.has(0x80)
    image = os.urandom(512 * 40 + 100)
    path = tmp_path / "fw.bin"
    path.write_bytes(image)
    dev.drop_chunks = {3, 17}  # lost once on the way: the bitmap shows the gaps
    seen: list[tuple[int, int]] = []
    result = await conn.deliver_firmware(
        FirmwareImage(version=2, size=len(image), sha256=hashlib.sha256(image).hexdigest(),
                      path=path), progress=lambda sent, total: seen.append((sent, total)))
    assert result.ok, result.reason
    # the device applies it once our ACK of its 2.04 arrives
    await until(lambda: dev.updates == [image], what="the update applied")
    assert dev.tokened_chunks == 0
    assert seen[-1] == (len(image), len(image))
    # the device stops hearing us in the middle: the transfer fails, the next one resumes
    image2 = os.urandom(512 * 60)

    def deafen(sent: int, total: int) -> None:
        if sent >= 20 * 512:
            dev.drop_incoming = 10**6

    failed = await conn.send_firmware(image2, progress=deafen, step_timeout=1.5)
    assert not failed.ok and "acknowledging" in failed.reason
    dev.drop_incoming = 0
    again = await conn.send_firmware(image2, step_timeout=5.0)
    assert again.ok, again.reason
    assert 0 < again.bytes_sent <= len(image2) - 20 * 512  # only what was missing
    await until(lambda: dev.updates[-1:] == [image2], what="the second update applied")


async def test_legacy_ota_over_udp_without_the_v3_flag(gw):
    """Without flag 0x80 (Device OS's Linux build): the legacy protocol, a 1-byte token on
    every chunk, the device's separate answers CON."""
    dev = gw.device(ota_v3=False)
    await dev.connect("127.0.0.1", gw.port)
    conn = gw.listener.connection(DEV)
    assert not conn.hello.has(0x80)
    image = os.urandom(1568)
    for fast in (False, True):
        result = await conn.send_firmware(image, fast=fast)
        assert result.ok, result.reason
    assert dev.updates == [image, image]


async def test_device_hello_and_v3_chunk_bytes_are_the_references() -> None:
    """corral's Gen 3 device against the reference's observed bytes (§4): the CON Hello
    ``40 02 0001 b1 68 ff`` + ``0003 ffff 0036 0003 00 0c ‖ id ‖ 1838 0480 00a00000 0200``
    over a real UDP socket and DTLS record; and a v3 chunk is NON, tokenless, CHUNK_INDEX 2049
    with CoAP's extended delta (§5.1)."""
    from corral.transports.particle import ota_v3

    h = bytes.fromhex
    did = "0123456789abcdef01234567"
    cr, sr, master, cid = b"\x01" * 32, b"\x02" * 32, b"\x03" * 48, b"C" * 8
    server = dtls.Session("server", cid, master, cr, sr)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        dev = ParticleUdpDevice(did, key("dev"), key("server").public_key(), product_id=3,
                                product_version=0xFFFF, platform_id=3, ota_v3=False,
                                system_version=6200, max_binary_size=0xA00000,
                                ota_chunk_size=512)
        dev.dtls = dtls.Session("client", cid, master, cr, sr)
        await dev._open_socket("127.0.0.1", sock.getsockname()[1], None)
        hello = asyncio.create_task(dev._hello(within=5))
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), WAIT)
        finally:
            hello.cancel()
            await dev.close()
    [rec] = dtls.parse_records(data)
    assert rec.type == dtls.TLS12_CID and rec.cid == cid
    assert server.open(rec) == (23, h("40020001 b168 ff") + h("0003ffff00360003000c") + h(did)
                                + h("18380480 00a00000 0200"))
    assert coap.encode(ota_v3.chunk_message(0x1234, 1, b"data")) == h(
        "5002 1234 b143 e106e9 01 ff") + b"data"


async def test_a_new_handshake_replaces_the_devices_old_session(gw):
    """A device that rebooted does a full handshake: its older session is over, in memory and
    in the database (Device OS keeps one), and that old session cannot be resumed."""
    dev = gw.device()
    await dev.connect("127.0.0.1", gw.port)
    old_cid = dev.dtls.cid
    await dev.close()
    old_session = dev.dtls
    dev.dtls = None  # rebooted: no saved session
    await dev.connect("127.0.0.1", gw.port)
    assert dev.full_handshakes == 2 and dev.dtls.cid != old_cid
    assert list(gw.listener.channels) == [dev.dtls.cid]
    assert gw.listener.by_device == {DEV: dev.dtls.cid}
    await gw.listener.store.flush()
    from sqlalchemy import select

    from corral.transports.particle.models import ParticleUdpSession

    async with gw.app.state.sessionmaker() as db:
        rows = (await db.scalars(select(ParticleUdpSession.cid))).all()
    assert rows == [dev.dtls.cid.hex()]
    assert await call(gw, DEV, "second") == 6
    # the old session's records find nothing to answer with
    stale = gw.device()
    stale.dtls = old_session
    with pytest.raises((TimeoutError, DeviceClosed)):
        await stale.resume("127.0.0.1", gw.port, within=1.0)
    await until(lambda: gw.listener.dropped["unknown connection ID"], what="the miss")


async def test_a_denied_device_loses_its_session_with_a_reset(gw):
    """The product denies the device while it is online: its session is closed and
    forgotten, and the RST makes the device do a full handshake, where it is refused."""
    dev = gw.device()
    await dev.connect("127.0.0.1", gw.port)
    r = await gw.client.request("DELETE", f"/v1/products/{gw.product['id']}/devices/{DEV}",
                                headers=bearer(gw.token), json={"deny": True})
    assert r.status_code in (200, 204), r.text
    await until(lambda: dev.resets == 1, what="the RST")
    assert dev.dtls is None and not gw.listener.channels
    assert await until(lambda: _offline_reason(gw)) == "The device was denied by its product"
    with pytest.raises(DeviceClosed, match="reset"):
        await dev.connect("127.0.0.1", gw.port)
    assert dev.resets == 2 and not await _online(gw)


async def test_a_release_reaches_a_gen3_device_with_the_v3_protocol(gw):
    """The firmware delivery sends a product release to a Gen 3 device (v3 OTA); the device
    applies it, resumes its session with a Hello carrying the new version, and the update
    is recorded as applied."""
    from corral.firmware.module import build_module, parse_module

    data = build_module(bytes((i * 13) % 251 for i in range(3000)), platform_id=12,
                        product_id=12, product_version=2)
    pid = gw.product["id"]
    r = await gw.client.post(f"/v1/products/{pid}/firmware", headers=bearer(gw.token),
                             data={"version": "2", "title": "v2"},
                             files={"file": ("fw.bin", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    r = await gw.client.put(f"/v1/products/{pid}/firmware/release", headers=bearer(gw.token),
                            json={"version": 2, "product_default": True})
    assert r.status_code == 200, r.text
    dev = gw.device(product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: dev.updates, WAIT, "the OTA image")
    assert dev.updates == [data] and parse_module(dev.updates[0]).product_version == 2
    await gw.app.state.runtime.delivery.idle()
    # Gen 3 keeps its session across the reset: it resumes with a Hello (its app changed)
    await dev.close()
    dev.product_version = 2
    await dev.resume("127.0.0.1", gw.port, hello=True)
    assert dev.full_handshakes == 1

    async def applied() -> bool:
        r = await gw.client.get(f"/v1/products/{pid}/devices/{DEV}/updates",
                                headers=bearer(gw.token))
        ups = r.json()["updates"]
        return bool(ups) and ups[0]["state"] == "applied"

    await until(applied, WAIT, "applied")
    # its subscriptions were kept across the resumption with a Hello
    assert gw.hub.sessions[DEV].prefixes >= {"particle", "spark"}
    r = await gw.client.get(f"/v1/products/{pid}/devices/{DEV}/updates",
                            headers=bearer(gw.token))
    assert r.json()["updates"][0]["transport"] == "particle-udp"
    assert (await device_row(gw.app)).firmware_version == 2


async def test_unacknowledged_cons_give_up_on_both_sides(gw):
    """A server request the device never ACKs goes out 4 times (Device OS's MAX_RETRANSMIT
    3), then fails; a device CON the server never ACKs costs the device its session, as
    Device OS's CoAP channel does."""
    from corral.sessions.link import DeviceError

    dev = gw.device(ack_timeout_s=0.05)
    await dev.connect("127.0.0.1", gw.port)
    conn = gw.listener.connection(DEV)
    await until(lambda: described(gw), what="the describe")
    await until(lambda: not dev._unacked, what="a quiet line")
    await asyncio.sleep(0.3)
    gw.listener.ack_timeout_s = 0.05
    dev.drop_incoming = 1000  # the device hears nothing from now on
    with pytest.raises(DeviceError, match="did not acknowledge"):
        await asyncio.wait_for(conn.call_function("echo", "x"), WAIT)
    assert dev.drop_incoming == 1000 - 4  # the request and its 3 retransmissions
    resent = dev.resent
    dev.publish("unheard", "1")  # its ACK is lost as well
    assert await dev.wait_closed(WAIT) == "a CON was never acknowledged"
    assert dev.dtls is None and dev.resent - resent == 3
