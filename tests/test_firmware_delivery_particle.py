"""Firmware delivery to Particle devices over real sockets (corral's simulated Device OS):
a standard release on the next connect, applied when the device comes back on the new
version; came back on the old one -> failed; killed mid-transfer -> retried and applied;
a chunk corrupted in transit is never applied; deferral while updates are disabled, and
forced updates; the update states and events through the API; OTA is not metered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import test_particle_gateway
from corral.firmware.module import build_module, parse_module
from corral.transports.particle.device import ParticleDevice
from helpers import bearer
from meteringkit import counters
from mqtt_helpers import DEV, DEV2, device_row, events, until
from test_particle_gateway import echo_device

# the Particle gateway fixture (pytest finds it by name)
gw = test_particle_gateway.gw

WAIT = 10.0


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={
        "event_rate_burst": 1000, "event_rate_per_s": 1000.0, "presence_flush_s": 0.05,
        "particle_handshake_timeout_s": 1.0, "device_call_timeout_s": 3.0,
        "firmware_retry_backoff_s": 0.0, "firmware_max_attempts": 3})


def module(gw: Any, version: int, size: int = 3000) -> bytes:
    """Product firmware as Device OS 4+ builds it (no PRODUCT_ID macro any more: the module
    carries the platform ID in its product ID field)."""
    return build_module(bytes((i * 13) % 251 for i in range(size)), platform_id=6,
                        product_id=6, product_version=version)


async def upload_and_release(gw: Any, version: int, **release: Any) -> bytes:
    data = module(gw, version)
    pid = gw.product["id"]
    r = await gw.client.post(f"/v1/products/{pid}/firmware", headers=bearer(gw.token),
                             data={"version": str(version), "title": f"v{version}"},
                             files={"file": ("fw.bin", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    r = await gw.client.put(f"/v1/products/{pid}/firmware/release", headers=bearer(gw.token),
                            json={"version": version, "product_default": True, **release})
    assert r.status_code == 200, r.text
    return data


async def updates_of(gw: Any, did: str = DEV) -> list[dict[str, Any]]:
    r = await gw.client.get(f"/v1/products/{gw.product['id']}/devices/{did}/updates",
                            headers=bearer(gw.token))
    assert r.status_code == 200, r.text
    return list(r.json()["updates"])


async def flash_statuses(gw: Any, did: str = DEV) -> list[str | None]:
    return [e.data for e in await events(gw.app, did, "spark/flash/status")]


async def reboot(gw: Any, dev: ParticleDevice, version: int) -> ParticleDevice:
    """The device restarts running ``version`` (a new connection, Hello with it)."""
    await dev.close()
    new = echo_device(gw, product_version=version)
    await new.connect("127.0.0.1", gw.port)
    return new


async def test_standard_release_is_sent_on_connect_and_applied_on_the_new_version(gw):
    data = await upload_and_release(gw, 2)
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: dev.updates, WAIT, "the OTA image")
    assert dev.updates == [data]
    assert parse_module(dev.updates[0]).product_version == 2  # type: ignore[union-attr]
    await until(lambda: _state_is(gw, "sending", bytes_sent=len(data)), WAIT, "transferred")
    await gw.app.state.runtime.delivery.idle()
    assert await flash_statuses(gw) == ["started", "success"]

    dev = await reboot(gw, dev, 2)
    await until(lambda: _state_is(gw, "applied"), WAIT, "applied")
    [u] = await updates_of(gw)
    assert (u["version"], u["from_version"], u["attempts"], u["transport"], u["trigger"]) == \
        (2, 1, 1, "particle", "release")
    assert (await device_row(gw.app)).firmware_version == 2
    await gw.app.state.runtime.delivery.idle()
    assert dev.updates == []  # running v2 now: nothing more is sent


async def _state_is(gw: Any, state: str, did: str = DEV, **fields: Any) -> bool:
    ups = await updates_of(gw, did)
    return bool(ups) and ups[0]["state"] == state and all(
        ups[0][k] == v for k, v in fields.items())


async def test_a_device_back_on_the_old_version_counts_as_failed(gw):
    await upload_and_release(gw, 2)
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: dev.updates, WAIT, "the OTA image")
    await until(lambda: _state_is(gw, "sending"), WAIT, "sending")
    await gw.app.state.runtime.delivery.idle()
    dev = await reboot(gw, dev, 1)
    await until(lambda: _state_is(gw, "failed"), WAIT, "failed")
    [u] = await updates_of(gw)
    assert u["reason"] == "The device came back on version 1"
    await gw.app.state.runtime.delivery.idle()
    assert dev.updates == []  # not retried on this connect: failed is final for the release
    assert (await flash_statuses(gw))[-1] == "failed"


async def test_a_device_killed_mid_transfer_ends_on_the_new_version(gw):
    data = await upload_and_release(gw, 2)
    dev = echo_device(gw, product_version=1)
    handle = dev._handle

    async def dies_after_three_chunks(m: Any, raw: bytes) -> None:
        if dev.closed.is_set() or dev.close_reason == "dying":
            return  # what was already on its way is never read
        await handle(m, raw)
        if dev.update is not None and len(dev.update.received) == 3:
            dev.close_reason = "dying"
            dev._later(dev.close())

    dev._handle = dies_after_three_chunks  # type: ignore[method-assign]
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _state_is(gw, "sending", attempts=1), WAIT, "sending")
    await dev.wait_closed(WAIT)
    await gw.app.state.runtime.delivery.idle()
    [u] = await updates_of(gw)
    assert u["state"] == "sending" and 0 < u["bytes_sent"] < len(data), u
    assert dev.updates == []

    dev = echo_device(gw, product_version=1)  # it comes back, still on version 1
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: dev.updates, WAIT, "the second transfer")
    assert dev.updates == [data]
    dev = await reboot(gw, dev, 2)
    await until(lambda: _state_is(gw, "applied", attempts=2), WAIT, "applied")
    assert await flash_statuses(gw) == ["started", "failed", "started", "success"]


async def test_a_corrupted_chunk_is_never_applied(gw):
    await upload_and_release(gw, 2)
    dev = echo_device(gw, product_version=1)
    dev.corrupt_chunks = {2}  # every copy of chunk 2 arrives damaged (bad CRC)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _state_is(gw, "failed"), WAIT, "failed")
    [u] = await updates_of(gw)
    assert u["attempts"] == 3 and "misses chunk(s) 2 after" in u["reason"], u
    assert dev.updates == []
    assert (await device_row(gw.app)).firmware_version == 1


async def test_updates_disabled_defer_until_enabled_and_forced_overrides(gw):
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await dev.publish_confirmed("particle/device/updates/enabled", "false")
    await until(lambda: _enabled(gw, False), WAIT, "updates disabled")
    data = await upload_and_release(gw, 2, intelligent=True)
    await until(lambda: _state_is(gw, "deferred"), WAIT, "deferred")
    name, payload = await asyncio.wait_for(_next_event(dev, "particle/device/updates/pending"),
                                           WAIT)
    assert payload == "true"
    assert dev.updates == []
    [u] = await updates_of(gw)
    assert u["reason"] == "The device has firmware updates disabled"

    await dev.publish_confirmed("particle/device/updates/enabled", "true")
    await until(lambda: dev.updates, WAIT, "the update once enabled")
    assert dev.updates == [data]

    # forced: a device with updates disabled still gets the next release
    dev = await reboot(gw, dev, 2)
    await until(lambda: _state_is(gw, "applied"), WAIT, "applied")
    await dev.publish_confirmed("particle/device/updates/enabled", "false")
    await until(lambda: _enabled(gw, False), WAIT, "updates disabled")
    r = await gw.client.put(f"/v1/products/{gw.product['id']}/devices/{DEV}",
                            headers=bearer(gw.token), json={"firmware_updates_forced": True})
    assert r.status_code == 200, r.text
    data3 = await upload_and_release(gw, 3, intelligent=True)
    name, payload = await asyncio.wait_for(_next_event(dev, "particle/device/updates/forced"),
                                           WAIT)
    assert payload == "true"  # the device is told before the transfer begins
    await until(lambda: dev.updates, WAIT, "the forced update")
    assert dev.updates == [data3]
    names = [e.name for e in await events(gw.app, DEV) if e.name.startswith("particle/")]
    assert "particle/device/updates/forced" in names
    assert "particle/device/updates/pending" in names


async def _enabled(gw: Any, value: bool) -> bool:
    return (await device_row(gw.app)).firmware_updates_enabled is value


async def _next_event(dev: ParticleDevice, name: str) -> tuple[str, str]:
    while True:
        got = await dev.events.get()
        if got[0] == name:
            return got


async def test_ota_is_not_metered(gw):
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _online(gw), WAIT, "online")
    before = [(c.events_published, c.events_delivered) for c in await counters(gw.app, DEV)]
    await upload_and_release(gw, 2, intelligent=True)
    await until(lambda: dev.updates, WAIT, "the update")
    await until(lambda: _state_is(gw, "sending", bytes_sent=len(dev.updates[0])), WAIT, "sent")
    await gw.app.state.runtime.delivery.idle()
    after = [(c.events_published, c.events_delivered) for c in await counters(gw.app, DEV)]
    assert before == after
    assert await flash_statuses(gw) == ["started", "success"]


async def _online(gw: Any) -> bool:
    return bool((await device_row(gw.app)).online)


async def test_the_particle_fleet_simulator_applies_an_update_and_reconnects(gw):
    from corral.device.particle_fleet import ParticleFleet
    from test_particle_gateway import key

    fleet = ParticleFleet([(DEV, key("dev")), (DEV2, key("dev2"))],
                          gw.listener.server_key.public_key(), "127.0.0.1", gw.port,
                          interval=3600.0, product_id=gw.product["id"], platform_id=6, seed=1)
    await fleet.start()
    try:
        async with asyncio.timeout(WAIT):
            await fleet.wait_connected()
        await upload_and_release(gw, 2, intelligent=True)
        for did in (DEV, DEV2):
            await until(lambda did=did: _state_is(gw, "applied", did=did), WAIT, "applied")
            assert (await device_row(gw.app, did)).firmware_version == 2
        assert fleet.stats.updates_applied == 2
        assert [d.firmware_version for d in fleet.devices] == [2, 2]
    finally:
        await fleet.stop()


async def test_ota_still_works_while_communication_is_paused(gw):
    """Issue 7: on the Free plan at its limit, publishes, calls and reads are refused, but
    the device stays connected and still gets its firmware."""
    from corral.sessions.link import Refused
    from meteringkit import set_plan_terms, tick

    await set_plan_terms(gw.app, "free", max_data_ops=1)
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _online(gw), WAIT, "online")
    session = gw.app.state.runtime.hub.sessions[DEV]
    await session.publish("temp", "21")  # the one operation the plan allows
    await tick(gw.app)
    with pytest.raises(Refused) as refused:
        await session.publish("temp", "22")
    assert refused.value.code == "paused"
    data = await upload_and_release(gw, 2, intelligent=True)
    await until(lambda: dev.updates, WAIT, "the update while paused")
    assert dev.updates == [data]
    await reboot(gw, dev, 2)
    await until(lambda: _state_is(gw, "applied"), WAIT, "applied")
    assert sum(c.data_operations for c in await counters(gw.app, DEV)) == 1


async def test_a_group_release_reaches_a_connecting_device_and_nothing_runs_without_one(gw):
    """The connect pre-check: a device with no open update, no lock and no release in its
    product is left alone (the full check is skipped); a group-only release is found."""
    delivery = gw.app.state.runtime.delivery
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _online(gw), WAIT, "online")
    await delivery.idle()
    assert delivery._connect_rows.gets >= 1 and await updates_of(gw) == []
    await dev.close()

    pid = gw.product["id"]
    r = await gw.client.put(f"/v1/products/{pid}/devices/{DEV}", headers=bearer(gw.token),
                            json={"groups": ["beta"]})
    assert r.status_code == 200, r.text
    data = module(gw, 2)
    r = await gw.client.post(f"/v1/products/{pid}/firmware", headers=bearer(gw.token),
                             data={"version": "2", "title": "v2"},
                             files={"file": ("fw.bin", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    r = await gw.client.put(f"/v1/products/{pid}/firmware/release", headers=bearer(gw.token),
                            json={"version": 2, "groups": ["beta"]})
    assert r.status_code == 200, r.text
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: dev.updates, WAIT, "the group release on connect")
    assert dev.updates == [data]


async def test_a_refused_transfer_is_tried_again_after_the_backoff(gw, settings):
    """A failed attempt is retried once its backoff has passed: the backoff counts from
    the failure, and looking at the update again must not restart it (it did on every
    pass, so the next attempt never came)."""
    delivery = gw.app.state.runtime.delivery
    delivery.settings = settings.model_copy(update={"firmware_retry_backoff_s": 1.0})
    data = await upload_and_release(gw, 2)
    dev = echo_device(gw, product_version=1)
    dev.corrupt_chunks = {2}  # the first attempt cannot succeed
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _statuses_are(gw, ["started", "failed"]), WAIT, "the first attempt")
    dev.corrupt_chunks = set()
    await until(lambda: dev.updates, WAIT, "the second attempt")
    assert dev.updates == [data]
    [u] = await updates_of(gw)
    assert u["attempts"] == 2 and u["state"] == "sending", u


async def _statuses_are(gw: Any, expected: list[str]) -> bool:
    return await flash_statuses(gw) == expected
