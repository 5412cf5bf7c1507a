"""``corral simulate --transport particle`` (Particle's TCP protocol) and ``--transport
particle-udp`` (Gen 3 devices, DTLS over UDP): the fleet over Particle's device protocol.

The device IDs are imported by ``corral simulate`` as for MQTT. Here: every device gets a
key (RSA-1024 over TCP, P-256 over UDP; made once, kept as PEM in the same 0600 state file),
its public key is registered with ``POST /v1/provisioning/:id`` (bounded concurrency; only
once per key), the server's public key comes from ``--server-key``, and the devices run
(``corral.device.particle_fleet``). With ``--cellular`` each device sends its SIM's ICCID in
its system describe, as Device OS does on a cellular device.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import typer
from cryptography.hazmat.primitives.asymmetric import ec
from rich.live import Live

from corral.cli.client import TIMEOUT_S, Api, error_message
from corral.cli.fleet import API_CONCURRENCY, save_state, summary, tick
from corral.cli.output import console, fail
from corral.device.particle_fleet import (
    DEFAULT_PLATFORM,
    ParticleFleet,
    ServerKeyError,
    generate_ec_keys,
    generate_keys,
    load_device_key,
    load_server_key,
    public_pem,
)


def _product_facts(a: Api, product: str) -> tuple[int | None, int | None]:
    """The product's numeric id and platform, for the devices' Hello."""
    body = a.call("GET", f"/v1/products/{product}")
    p: Any = body.get("product", body) if isinstance(body, dict) else {}
    pid, platform = p.get("id"), p.get("platform_id")
    return (pid if isinstance(pid, int) else None,
            platform if isinstance(platform, int) else None)


async def _register(a: Api, devices: list[dict[str, str]], field: str) -> list[str]:
    """Register each device's public key (``POST /v1/provisioning/:id``); the failures."""
    limit = asyncio.Semaphore(API_CONCURRENCY)
    failed: list[str] = []
    async with httpx.AsyncClient(base_url=a.api_url, timeout=TIMEOUT_S, headers={
            "User-Agent": "corral-cli", "Authorization": f"Bearer {a.token}"}) as http:

        async def one(d: dict[str, str]) -> None:
            pem = public_pem(load_device_key(d[f"{field}_key"]))
            async with limit:
                try:
                    r = await http.post(f"/v1/provisioning/{d['id']}", json={"publicKey": pem})
                except httpx.HTTPError as exc:
                    failed.append(f"{d['id']}: cannot reach {a.api_url}: {exc!r}")
                    return
            if r.status_code >= 400:
                failed.append(f"{d['id']}: {error_message(r)}")
            else:
                d[f"{field}_registered"] = "1"

        await asyncio.gather(*(one(d) for d in devices))
    return failed


async def _run(fleet: ParticleFleet, duration: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    deadline = started + duration if duration else None
    await fleet.start()
    try:
        if console.is_terminal:
            with Live(summary(fleet, started, duration), console=console,
                      refresh_per_second=4) as live:
                while await tick(stop, deadline):
                    live.update(summary(fleet, started, duration))
        else:
            while await tick(stop, deadline):
                pass
            console.print(summary(fleet, started, duration))
    finally:
        await fleet.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def simulate_particle(a: Api, product: str, fleet_devices: list[dict[str, str]],
                      all_devices: list[dict[str, str]], state_path: Path, *, server_key: Path,
                      where: Callable[[], tuple[str, int]], interval: float,
                      duration: float | None,
                      connect_concurrency: int, udp: bool = False,
                      iccids: dict[str, str] | None = None) -> None:
    """Keys, their registration, then the fleet until ``duration`` or Ctrl-C. ``where``
    gives the gateway's host and port; ``iccids`` (device id -> ICCID) makes the devices
    cellular."""
    try:
        server_public = load_server_key(server_key.read_bytes())
    except OSError as exc:
        fail(f"Cannot read {server_key}: {exc}", code=2)
    except ServerKeyError as exc:
        fail(f"{server_key}: {exc}", code=2)
    if isinstance(server_public, ec.EllipticCurvePublicKey) != udp:
        fail(f"{server_key} is the server key of the {'TCP' if udp else 'UDP'} gateway; "
             f"use `corral keys server{' --protocol udp' if udp else ''}`'s file.", code=2)
    host, port = where()  # the gateway's address (asked of the server once the key fits)
    product_id, platform_id = _product_facts(a, product)

    field, kind = ("ec", "P-256") if udp else ("rsa", "RSA-1024")
    need_keys = [d for d in fleet_devices if f"{field}_key" not in d]
    if need_keys:
        console.print(f"Making {len(need_keys):,} {kind} device key(s)...", highlight=False)
        made = generate_ec_keys(len(need_keys)) if udp else generate_keys(len(need_keys))
        for d, pem in zip(need_keys, made, strict=True):
            d[f"{field}_key"] = pem.decode()
            d.pop(f"{field}_registered", None)
        save_state(state_path, a, product, all_devices)
    keys = {}
    for d in fleet_devices:
        try:
            keys[d["id"]] = load_device_key(d[f"{field}_key"])
        except ValueError as exc:
            fail(f"The key of {d['id']} in {state_path} cannot be used ({exc}); remove the "
                 "state file to start a new fleet.")
    unregistered = [d for d in fleet_devices if f"{field}_registered" not in d]
    if unregistered:
        failed = asyncio.run(_register(a, unregistered, field))
        save_state(state_path, a, product, all_devices)
        if failed:
            fail(f"Could not register the keys of {len(failed)} device(s), e.g. {failed[0]}")

    console.print(f"Simulating {len(fleet_devices):,} {'cellular ' if iccids else ''}Particle "
                  f"device(s) of {product} on {'udp' if udp else 'tcp'}://{host}:{port} "
                  f"(state: {state_path})", highlight=False, soft_wrap=True)
    fleet = ParticleFleet([(d["id"], keys[d["id"]]) for d in fleet_devices], server_public,
                          host, port, interval=interval, product_id=product_id,
                          platform_id=platform_id or DEFAULT_PLATFORM,
                          connect_concurrency=connect_concurrency, iccids=iccids)
    try:
        asyncio.run(_run(fleet, duration))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise typer.Exit(130) from None
    s = fleet.stats
    console.print(f"Simulated {s.devices:,} Particle devices: {s.connects:,} connections, "
                  f"{s.events_sent:,} events sent, {s.events_refused:,} refused, "
                  f"{s.calls_answered:,} calls answered, {s.connect_failures:,} failed "
                  "connection attempts.", highlight=False, soft_wrap=True)
    if fleet.ever_connected == 0:
        fail("No device could connect (is the Particle port right, and the server key "
             "that server's?).")
