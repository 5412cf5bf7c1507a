"""Firmware delivery to MQTT devices over real sockets: corral's MQTT listener, the HTTP API
on a live port (the download links), and SDK devices with :class:`corral.device.ota.
OtaUpdater`. A release is offered, downloaded with Range requests, checked (SHA-256 and the
product's Ed25519 signature), applied, and the device comes back on the new version; a
tampered download is never applied; a device killed mid-download resumes; deferral; the
intelligent release updates online devices at once; the download link is checked; OTA is
not metered."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from corral.device import Device
from corral.device.ota import Offer, OtaUpdater
from corral.firmware import links
from corral.firmware.signing import b64, generate_key
from corral.firmware.storage import blob_path
from corral.kit import clock
from devicekit import mqtt_listener, owner_product_devices
from helpers import bearer
from meteringkit import counters
from mqtt_helpers import device_row, events, until
from sessionkit import live_server, sse

WAIT = 10.0


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={
        "event_rate_burst": 1000, "event_rate_per_s": 1000.0, "presence_flush_s": 0.05,
        "firmware_retry_backoff_s": 0.0, "firmware_max_attempts": 3,
        "firmware_download_chunk_bytes": 1024})


@pytest.fixture
async def w(app, client) -> AsyncIterator[Any]:
    token, product, devs = await owner_product_devices(client, 3)
    r = await client.post(f"/v1/products/{product['id']}/signing_keys", headers=bearer(token),
                          json={"name": "release key"})
    assert r.status_code == 201, r.text
    devices: list[Device] = []
    updaters: list[OtaUpdater] = []
    async with mqtt_listener(app) as mqtt, live_server(app) as base:
        app.state.runtime.delivery.base_url = base

        def device(i: int = 0, version: int = 1, **kw: Any) -> tuple[Device, OtaUpdater]:
            did, secret = devs[i]
            d = Device(did, secret, "127.0.0.1", mqtt.port, reconnect_initial=0.05)
            d.describe(firmware_version=version)
            applied: list[tuple[int, bytes]] = []

            def apply(offer: Offer, image: bytes) -> None:
                applied.append((offer.version, image))

            u = OtaUpdater(d, apply, **kw).attach()
            u.images = applied  # type: ignore[attr-defined]
            devices.append(d)
            updaters.append(u)
            return d, u

        try:
            yield SimpleNamespace(app=app, client=client, token=token, product=product,
                                  ids=[d for d, _ in devs], secrets=[x for _, x in devs],
                                  port=mqtt.port, device=device, base=base,
                                  key=r.json()["signing_key"])
        finally:
            for u in updaters:
                await u.close()
            for d in devices:
                with contextlib.suppress(Exception):
                    await d.close()
            await app.state.runtime.delivery.idle()


def image(version: int, size: int = 8000) -> bytes:
    return bytes(((i * 31) + version) % 256 for i in range(size))


async def upload(w: Any, version: int, data: bytes | None = None) -> dict[str, Any]:
    data = image(version) if data is None else data
    r = await w.client.post(f"/v1/products/{w.product['id']}/firmware", headers=bearer(w.token),
                            data={"version": str(version), "title": f"v{version}"},
                            files={"file": ("fw.bin", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def release(w: Any, version: int, **body: Any) -> None:
    r = await w.client.put(f"/v1/products/{w.product['id']}/firmware/release",
                           headers=bearer(w.token),
                           json={"version": version, "product_default": True, **body})
    assert r.status_code == 200, r.text


async def updates_of(w: Any, did: str) -> list[dict[str, Any]]:
    r = await w.client.get(f"/v1/products/{w.product['id']}/devices/{did}/updates",
                           headers=bearer(w.token))
    assert r.status_code == 200, r.text
    return list(r.json()["updates"])


async def state_is(w: Any, did: str, state: str, **fields: Any) -> bool:
    ups = await updates_of(w, did)
    return bool(ups) and ups[0]["state"] == state and all(
        ups[0][k] == v for k, v in fields.items())


async def test_a_cohorts_release_reaches_a_connecting_device(w):
    """The product has released nothing else: the cohort's release alone is work for the
    connect check (it once looked only at the product default and group releases)."""
    await upload(w, 2)
    base = f"/v1/products/{w.product['id']}/cohorts"
    r = await w.client.post(base, headers=bearer(w.token),
                            json={"name": "early", "firmware_version": 2})
    assert r.status_code == 201, r.text
    r = await w.client.put(f"{base}/early/devices", headers=bearer(w.token),
                           json={"add": [w.ids[0]]})
    assert r.status_code == 200, r.text
    d, u = w.device(0, trusted_keys=[w.key["public_key"]])
    other, _ = w.device(1, trusted_keys=[w.key["public_key"]])
    await d.connect()
    await other.connect()
    await until(lambda: state_is(w, w.ids[0], "applied"), WAIT, "applied")
    assert u.applied == [2]  # type: ignore[attr-defined]
    await w.app.state.runtime.delivery.idle()
    assert await updates_of(w, w.ids[1]) == []  # not in the cohort: nothing to do


async def test_a_release_is_downloaded_verified_applied_and_reported(w):
    fw = await upload(w, 2)
    assert fw["signing_key_id"] == w.key["key_id"]
    await release(w, 2)
    d, u = w.device(0, trusted_keys=[w.key["public_key"]])
    did = w.ids[0]
    before = [(c.events_published, c.events_delivered) for c in await counters(w.app, did)]
    async with sse(w.base, f"/v1/products/{w.product['id']}/events/spark/flash",
                   w.token) as stream:
        assert await stream.read(5) == b":ok\n\n"
        await d.connect()
        seen = [await stream.event(), await stream.event()]
    assert [(name, ev["data"], ev["coreid"]) for name, ev in seen] == \
        [("spark/flash/status", "started", did), ("spark/flash/status", "success", did)]
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied")
    assert u.applied == [2] and u.images == [(2, image(2))]  # type: ignore[attr-defined]
    assert d.connects == 2  # it restarted on the new version
    row = await device_row(w.app, did)
    assert row.firmware_version == 2 and row.online
    [up] = await updates_of(w, did)
    assert (up["from_version"], up["attempts"], up["transport"], up["bytes_sent"]) == \
        (1, 1, "mqtt", 8000)
    assert [e.data for e in await events(w.app, did, "spark/flash/status")] == \
        ["started", "success"]
    after = [(c.events_published, c.events_delivered) for c in await counters(w.app, did)]
    assert before == after  # OTA traffic is not data operations


async def test_a_tampered_download_is_never_applied(w, settings):
    fw = await upload(w, 2)
    await release(w, 2)
    assert fw["size"] == 8000
    path = blob_path(w.app.state.settings, _sha(image(2)))
    good = path.read_bytes()
    path.write_bytes(good[:100] + bytes((good[100] ^ 0xFF,)) + good[101:])  # tampered at rest
    d, u = w.device(0)
    did = w.ids[0]
    await d.connect()
    await until(lambda: state_is(w, did, "failed"), WAIT, "failed")
    [up] = await updates_of(w, did)
    assert up["attempts"] == 3 and "sha256 mismatch" in up["reason"], up
    assert u.applied == [] and u.images == []  # type: ignore[attr-defined]
    assert u.failures == ["sha256 mismatch: the download is corrupted"] * 3
    assert (await device_row(w.app, did)).firmware_version == 1


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


async def test_a_signature_from_an_untrusted_key_is_refused(w):
    await upload(w, 2)
    await release(w, 2)
    _, other = generate_key()
    d, u = w.device(0, trusted_keys=[b64(other)])
    await d.connect()
    await until(lambda: state_is(w, w.ids[0], "failed"), WAIT, "failed")
    [up] = await updates_of(w, w.ids[0])
    assert "signature does not verify" in up["reason"]
    assert u.applied == []


async def test_a_device_killed_mid_download_resumes_and_ends_on_the_new_version(w):
    await upload(w, 2)
    await release(w, 2)
    ranges: list[str] = []
    d: Device

    async def on_request(request: httpx.Request) -> None:
        ranges.append(request.headers.get("range", ""))
        if len(ranges) == 4:  # the device dies during its fourth request
            assert d._conn is not None
            d._conn.lose("killed")
            raise httpx.ReadError("killed", request=request)

    http = httpx.AsyncClient(event_hooks={"request": [on_request]})
    d, u = w.device(0, http=http)
    did = w.ids[0]
    try:
        await d.connect()
        await until(lambda: not d.connected, WAIT, "the device died")
        await until(lambda: state_is(w, did, "sending", attempts=1), WAIT, "dropped")
        await w.app.state.runtime.delivery.idle()
        [up] = await updates_of(w, did)
        assert up["bytes_sent"] == 2048, up  # its last "downloading" report
        assert u.applied == []
        await d.connect()  # it comes back, still on version 1
        await until(lambda: state_is(w, did, "applied", attempts=2), WAIT, "applied")
    finally:
        await http.aclose()
    assert u.images == [(2, image(2))]  # type: ignore[attr-defined]
    assert ranges[:4] == ["bytes=0-1023", "bytes=1024-2047", "bytes=2048-3071",
                          "bytes=3072-4095"]
    assert ranges[4] == "bytes=3072-4095"  # resumed where it stopped
    assert len(ranges) == 4 + 5


async def test_deferred_while_disabled_then_sent_when_enabled(w):
    await upload(w, 2)
    d, u = w.device(0)
    d.describe(updates_enabled=False)
    did = w.ids[0]
    await d.connect()
    await until(lambda: _disabled(w, did), WAIT, "updates disabled")
    await release(w, 2, intelligent=True)
    await until(lambda: state_is(w, did, "deferred"), WAIT, "deferred")
    await until(lambda: u.pending, WAIT, "ota/pending")
    assert u.applied == []
    d.describe(updates_enabled=True)
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied")
    assert u.applied == [2]


async def _disabled(w: Any, did: str) -> bool:
    return (await device_row(w.app, did)).firmware_updates_enabled is False


async def test_intelligent_release_updates_online_devices_at_once(w):
    await upload(w, 2)
    pairs = [w.device(i) for i in range(3)]
    for d, _ in pairs:
        await d.connect()
    for did in w.ids:
        await until(lambda did=did: _version(w, did, 1), WAIT, "described")
    await release(w, 2)  # standard: online devices wait for their next connect
    await w.app.state.runtime.delivery.idle()
    for did in w.ids:
        assert await updates_of(w, did) == []
    await upload(w, 3)
    await release(w, 3, intelligent=True)
    for did in w.ids:
        await until(lambda did=did: state_is(w, did, "applied", version=3), WAIT, "applied")
    assert all(u.applied == [3] for _, u in pairs)
    assert w.app.state.runtime.delivery.peak_transfers >= 1


async def _version(w: Any, did: str, v: int) -> bool:
    return (await device_row(w.app, did)).firmware_version == v


async def test_download_links_are_checked(w, client):
    await upload(w, 2)
    did = w.ids[0]
    r = await client.get("/v1/firmware/downloads/garbage")
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    offers: list[Offer] = []
    done = asyncio.Event()
    d, u = w.device(0)

    async def keep(offer: Offer, image: bytes) -> None:
        offers.append(offer)
        async with asyncio.timeout(WAIT):
            await done.wait()  # the update stays open while the links are tried

    u.apply = keep
    await release(w, 2)
    await d.connect()
    await until(lambda: offers, WAIT, "an offer")
    url = offers[0].url
    assert url.startswith(f"{w.base}/v1/firmware/downloads/")
    token = url.rsplit("/", 1)[1]
    grant = links.check_token(w.app.state.settings, token, did)
    assert grant is not None and grant.device_id == did
    assert links.check_token(w.app.state.settings, token, w.ids[1]) is None  # another device
    r = await client.get(f"/v1/firmware/downloads/{token[:-2]}xx")  # forged
    assert r.status_code == 401
    previous = clock.install(clock.ManualClock(dt.datetime(2020, 1, 1, tzinfo=dt.UTC)))
    try:
        old = links.make_token(w.app.state.settings, device_id=did,
                               firmware_id=grant.firmware_id, update_id=grant.update_id)
    finally:
        clock.install(previous)
    r = await client.get(f"/v1/firmware/downloads/{old}")  # expired
    assert r.status_code == 401
    r = await client.get(f"/v1/firmware/downloads/{token}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == image(2)[10:20]
    done.set()
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied")
    r = await client.get(f"/v1/firmware/downloads/{token}")  # the update is over
    assert r.status_code == 404 and r.json()["error"] == "update_not_found"


async def test_the_mqtt_fleet_simulator_applies_an_update_and_reconnects(w):
    from corral.device.simulator import Fleet

    fleet = Fleet(list(zip(w.ids[:2], w.secrets[:2], strict=True)), "127.0.0.1", w.port,
                  interval=3600.0, seed=1)
    await fleet.start()
    try:
        async with asyncio.timeout(WAIT):
            await fleet.wait_connected()
        await upload(w, 2)
        await release(w, 2, intelligent=True)
        for did in w.ids[:2]:
            await until(lambda did=did: state_is(w, did, "applied"), WAIT, "applied")
        assert fleet.stats.updates_applied == 2
        assert [s.firmware_version for s in fleet.devices] == [2, 2]
    finally:
        await fleet.stop()


async def test_a_device_without_ota_fails_at_once(w):
    await upload(w, 2)
    await release(w, 2)
    did, secret = w.ids[0], w.secrets[0]
    d = Device(did, secret, "127.0.0.1", w.port)  # no OtaUpdater: no ota/# subscription
    d.describe(firmware_version=1)
    async with d:
        await until(lambda: state_is(w, did, "failed"), WAIT, "failed")
    [up] = await updates_of(w, did)
    assert up["attempts"] == 1 and "does not take firmware updates" in up["reason"], up


class _CutShort(httpx.AsyncByteStream):
    """A response body that stops after ``keep`` bytes (the connection dropped)."""

    def __init__(self, body: bytes, keep: int) -> None:
        self.body, self.keep = body, keep

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body[:self.keep]
        raise httpx.ReadError("connection lost")


async def test_the_sdk_resumes_from_the_last_byte_of_a_cut_response():
    """The updater against a stand-in download server (the HTTP edge): the first response is
    cut after 3,000 bytes; the next offer resumes at byte 3000, and the image is applied."""
    import hashlib
    import json

    data = image(2, 10_000)
    asked: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["range"])
        start, end = (int(x) for x in request.headers["range"][6:].split("-"))
        body = data[start:end + 1]
        if len(asked) == 1:
            return httpx.Response(206, stream=_CutShort(body, 3000))
        return httpx.Response(206, content=body)

    offer = json.dumps({"version": 2, "size": len(data), "url": "http://fw.test/x",
                        "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": 8192,
                        "signature": None}).encode()
    applied: list[bytes] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as http:
        d = Device("0123456789abcdef01234567", "secret")  # never connected: reports are lost
        u = OtaUpdater(d, lambda o, img: applied.append(img), http=http, restart=False)
        await u.handle("offer", offer)
        await u.wait()
        assert applied == [] and "download failed" in u.failures[0]
        await u.handle("offer", offer)  # the cloud offers again
        await u.wait()
    assert asked == ["bytes=0-8191", "bytes=3000-9999"]  # resumed at the last byte received
    assert applied == [data] and u.applied == [2]


async def test_a_forced_update_reaches_a_device_with_updates_disabled(w):
    await upload(w, 2)
    d, u = w.device(1)
    d.describe(updates_enabled=False)
    did = w.ids[1]
    await d.connect()
    await until(lambda: _disabled(w, did), WAIT, "updates disabled")
    r = await w.client.put(f"/v1/products/{w.product['id']}/devices/{did}",
                           headers=bearer(w.token), json={"firmware_updates_forced": True})
    assert r.status_code == 200, r.text
    await release(w, 2, intelligent=True)
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied although disabled")
    assert u.forced is True and u.pending is False  # told it is forced, never deferred
    assert u.applied == [2]


async def test_ota_still_works_while_communication_is_paused(w):
    """Issue 7: at the Free plan's limit the device's publishes are refused, but its
    firmware offer, download and status reports still go through."""
    from corral.sessions.link import Refused
    from meteringkit import set_plan_terms, tick

    await set_plan_terms(w.app, "free", max_data_ops=1)
    await upload(w, 2)
    d, u = w.device(2)
    did = w.ids[2]
    await d.connect()
    await until(lambda: did in w.app.state.runtime.hub.sessions, WAIT, "online")
    session = w.app.state.runtime.hub.sessions[did]
    await session.publish("temp", "21")  # the one operation the plan allows
    await tick(w.app)
    with pytest.raises(Refused):
        await session.publish("temp", "22")
    await release(w, 2, intelligent=True)
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied while paused")
    assert u.applied == [2]


async def test_an_intelligent_release_reaches_a_device_whose_online_state_was_not_stored(w):
    """The race the Free-plan test above once lost: the device's connect check ran before
    the release (nothing to do then), and its online state was not yet stored when the
    release read who is online, so it got no intent. The release's announcement on
    ``firmware.released`` makes its node check it again."""
    from sqlalchemy import update as sql_update

    from corral.devices.models import Device as DeviceRow

    await upload(w, 2)
    d, u = w.device(0)
    did = w.ids[0]
    await d.connect()
    await until(lambda: _version(w, did, 1), WAIT, "described")
    delivery = w.app.state.runtime.delivery
    await until(lambda: delivery._checked.get(did) is not None, WAIT, "connect checked")
    await delivery.idle()
    await until(lambda: device_row(w.app, did), WAIT, "the device row")
    await until(lambda: _online(w, did), WAIT, "online stored")
    # as it was between the connect check and the event writer's next batch
    async with w.app.state.sessionmaker() as db:
        await db.execute(sql_update(DeviceRow).where(DeviceRow.id == did).values(online=False))
        await db.commit()
    assert delivery.released(w.product["id"] + 1000) == 0  # another product's release
    await release(w, 2, intelligent=True)
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied")
    assert u.applied == [2]
    [up] = await updates_of(w, did)
    assert up["trigger"] == "intelligent", up


async def _online(w: Any, did: str) -> bool:
    return bool((await device_row(w.app, did)).online)
