"""``corral simulate``: a fleet of simulated MQTT devices in a product, with a live summary.

Over the REST API (the stored login, as every client command): import the simulated device
IDs into the product, give each an MQTT secret; then connect them all with the device SDK
(``corral.device.simulator``). IDs and secrets are kept in a state file (mode 0600) so the
next run reuses the same devices. ``--transport particle``: Particle TCP devices instead, each
with its own RSA key registered over the API (``corral.cli.simulate_particle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Protocol
from urllib.parse import urlsplit

import httpx
import typer
from rich.live import Live
from rich.table import Table

from corral.cli import config
from corral.cli.client import TIMEOUT_S, Api, Product, api, error_message
from corral.cli.output import console, errors, fail
from corral.device.simulator import MAX_INTERVAL_S, MIN_INTERVAL_S, Fleet, FleetStats

MAX_DEVICES = 10_000
IMPORT_CHUNK = 10_000
API_CONCURRENCY = 16  # secret requests in flight
REFRESH_S = 0.5
STATE_VERSION = 1
DEVICE_ID_RE = re.compile(r"^[0-9a-f]{24}$")
# per device in the state file: the MQTT secret, the Particle key (PEM) and whether the
# server has that key
KEPT_FIELDS = ("secret", "rsa_key", "rsa_registered")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "default"


def default_state_path(a: Api, product: str) -> Path:
    """``<config dir>/simulate/<server>-<product>.json``: one fleet per server and product."""
    netloc = urlsplit(a.api_url).netloc or a.api_url
    return a.config_path.parent / "simulate" / f"{_safe(netloc)}-{_safe(product)}.json"


def load_state(path: Path, a: Api, product: str) -> list[dict[str, str]]:
    """The devices a previous run left for this server and product (others are ignored)."""
    data = config.load(path)
    if not data:
        return []
    if data.get("api_url") != a.api_url or str(data.get("product")) != product:
        errors.print(f"[yellow]Warning:[/] {path} belongs to another server or product; "
                     "starting a new fleet.", highlight=False)
        return []
    out: list[dict[str, str]] = []
    for entry in data.get("devices") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) \
                and DEVICE_ID_RE.fullmatch(entry["id"]):
            out.append({"id": entry["id"], **{k: v for k in KEPT_FIELDS
                                               if isinstance(v := entry.get(k), str) and v}})
    return out


def save_state(path: Path, a: Api, product: str, devices: list[dict[str, str]]) -> None:
    config.save(path, {"version": STATE_VERSION, "api_url": a.api_url, "product": product,
                       "devices": devices})


def import_ids(a: Api, product: str, ids: list[str]) -> dict[str, set[str]]:
    """Import ``ids`` into the product (idempotent); the IDs per outcome."""
    outcome: dict[str, set[str]] = {}
    for i in range(0, len(ids), IMPORT_CHUNK):
        body = a.call("POST", f"/v1/products/{product}/devices",
                      json={"ids": ids[i:i + IMPORT_CHUNK]})
        if not isinstance(body, dict):
            fail(f"The server at {a.api_url} did not answer with an import result.")
        for key in ("updatedDeviceIds", "existingDeviceIds", "invalidDeviceIds",
                    "nonmemberDeviceIds", "protectedDeviceIds"):
            outcome.setdefault(key, set()).update(str(x).lower() for x in body.get(key) or [])
    return outcome


class SecretMinter:
    """Rotates MQTT secrets over the API (bounded concurrency)."""

    def __init__(self, a: Api, product: str) -> None:
        self.a = a
        self.product = product
        self.limit = asyncio.Semaphore(API_CONCURRENCY)
        self.http = httpx.AsyncClient(
            base_url=a.api_url, timeout=TIMEOUT_S,
            headers={"User-Agent": "corral-cli", "Authorization": f"Bearer {a.token}"})

    async def rotate(self, device_id: str) -> str:
        """A new secret for the device; ``RuntimeError`` with the server's message if not."""
        async with self.limit:
            try:
                r = await self.http.post(
                    f"/v1/products/{self.product}/devices/{device_id}/mqtt_secret")
            except httpx.HTTPError as exc:
                raise RuntimeError(f"cannot reach {self.a.api_url}: {exc!r}") from exc
        if r.status_code >= 400:
            raise RuntimeError(error_message(r))
        try:
            secret = r.json().get("mqtt_secret")
        except (ValueError, AttributeError):
            secret = None
        if not isinstance(secret, str) or not secret:
            raise RuntimeError("the server answered without an mqtt_secret")
        return secret

    async def close(self) -> None:
        await self.http.aclose()


async def _tick(stop: asyncio.Event, deadline: float | None) -> bool:
    """Wait one refresh period; False once stopped (signal) or past the deadline."""
    wait = REFRESH_S if deadline is None else min(REFRESH_S, deadline - time.monotonic())
    if stop.is_set() or wait <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), wait)
    return not stop.is_set()


class Transport(StrEnum):
    MQTT = "mqtt"
    PARTICLE = "particle"


class FleetView(Protocol):
    """What the summary shows of a fleet (MQTT or Particle)."""

    @property
    def stats(self) -> FleetStats: ...
    @property
    def connected(self) -> int: ...
    @property
    def ever_connected(self) -> int: ...


def _summary(fleet: FleetView, started: float, duration: float | None) -> Table:
    s = fleet.stats
    elapsed = time.monotonic() - started
    t = Table(title="corral simulate", title_justify="left")
    for name in ("devices", "online", "events", "refused", "failed", "calls", "reconnects",
                 "elapsed"):
        t.add_column(name, justify="right", no_wrap=True)
    limit = f"/{duration:g}s" if duration else "s"
    t.add_row(f"{s.devices:,}", f"{fleet.connected:,}", f"{s.events_sent:,}",
              f"{s.events_refused:,}", f"{s.events_failed:,}", f"{s.calls_answered:,}",
              f"{s.connects - fleet.ever_connected:,}", f"{elapsed:,.0f}{limit}")
    return t


async def _run(a: Api, product: str, fleet_devices: list[dict[str, str]],
               all_devices: list[dict[str, str]], state_path: Path, *, host: str, port: int, interval: float, duration: float | None,
               connect_concurrency: int, protocol: int) -> Fleet:
    minter = SecretMinter(a, product)
    lock = asyncio.Lock()

    async def reprovision(device_id: str) -> str | None:
        """A stored secret was refused (rotated elsewhere): get a new one, keep it."""
        try:
            secret = await minter.rotate(device_id)
        except RuntimeError as exc:
            errors.print(f"[yellow]Warning:[/] no new secret for {device_id}: {exc}",
                         highlight=False)
            return None
        async with lock:
            for d in fleet_devices:
                if d["id"] == device_id:
                    d["secret"] = secret
            save_state(state_path, a, product, all_devices)
        return secret

    try:
        missing = [d for d in fleet_devices if "secret" not in d]
        if missing:
            results = await asyncio.gather(*(minter.rotate(d["id"]) for d in missing),
                                           return_exceptions=True)
            failed: list[str] = []
            for d, result in zip(missing, results, strict=True):
                if isinstance(result, BaseException):
                    failed.append(f"{d['id']}: {result}")
                else:
                    d["secret"] = result
            save_state(state_path, a, product, all_devices)
            if failed:
                fail(f"Could not get MQTT secrets for {len(failed)} device(s), e.g. {failed[0]}")

        fleet = Fleet([(d["id"], d["secret"]) for d in fleet_devices], host, port,
                      interval=interval, protocol=protocol,
                      connect_concurrency=connect_concurrency, reprovision=reprovision)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        started = time.monotonic()
        deadline = started + duration if duration else None
        await fleet.start()
        try:
            if console.is_terminal:  # a live table; otherwise (a log, a pipe) only the last
                with Live(_summary(fleet, started, duration), console=console,
                          refresh_per_second=4) as live:
                    while await _tick(stop, deadline):
                        live.update(_summary(fleet, started, duration))
            else:
                while await _tick(stop, deadline):
                    pass
                console.print(_summary(fleet, started, duration))
            await fleet.stop()
        finally:
            await fleet.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return fleet
    finally:
        await minter.close()


def simulate(
    ctx: typer.Context,
    product: Product,
    devices: Annotated[int, typer.Option(
        "--devices", "-n", min=1, max=MAX_DEVICES, help="How many simulated devices.")] = 10,
    interval: Annotated[float, typer.Option(
        min=MIN_INTERVAL_S, max=MAX_INTERVAL_S,
        help="Seconds between a device's events (jittered; corral's default rate limit is "
        "1 event/s per device).")] = 5.0,
    mqtt_host: Annotated[str | None, typer.Option(
        "--mqtt-host", help="MQTT server (default: the API server's host).")] = None,
    mqtt_port: Annotated[int, typer.Option(
        "--mqtt-port", min=1, max=65535, help="MQTT port (plain).")] = 1883,
    duration: Annotated[float | None, typer.Option(
        min=0.1, help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    state: Annotated[Path | None, typer.Option(
        "--state", help="State file with the fleet's device IDs and MQTT secrets (default: "
        "per server and product under the CLI config directory).")] = None,
    connect_concurrency: Annotated[int, typer.Option(
        min=1, max=1000, help="Devices connecting at the same moment, at most.")] = 50,
    protocol: Annotated[int, typer.Option(
        min=4, max=5, help="MQTT protocol level: 5 (MQTT 5) or 4 (MQTT 3.1.1).")] = 5,
    transport: Annotated[Transport, typer.Option(
        "--transport", help="How the devices connect: mqtt, or particle (Particle's TCP "
        "protocol; needs --server-key).")] = Transport.MQTT,
    server_key: Annotated[Path | None, typer.Option(
        "--server-key", help="Particle: the server_key file `corral keys server` writes "
        "(or the server's public key as PEM).")] = None,
    particle_host: Annotated[str, typer.Option(
        "--particle-host", help="Particle: the gateway's address.")] = "127.0.0.1",
    particle_port: Annotated[int, typer.Option(
        "--particle-port", min=1, max=65535, help="Particle: the gateway's TCP port.")] = 5683,
) -> None:
    """Run simulated devices in a product: they publish `sim/temperature`, answer the
    functions led/reboot/interval and the variables temperature/uptime/label/on."""
    a = api(ctx)
    if not a.token:
        fail("Not logged in: run `corral login` (or pass --token / set CORRAL_TOKEN).")
    if transport is Transport.PARTICLE and server_key is None:
        fail("--transport particle needs --server-key (the file `corral keys server` writes).",
             code=2)
    state_path = state or default_state_path(a, product)
    known = load_state(state_path, a, product)
    fleet_devices = known[:devices]
    while len(fleet_devices) < devices:
        fleet_devices.append({"id": secrets.token_hex(12)})
    # remember new IDs before importing them, so an interrupted run does not lose them
    save_state(state_path, a, product, fleet_devices + known[devices:])

    outcome = import_ids(a, product, [d["id"] for d in fleet_devices])
    refused = (outcome.get("invalidDeviceIds", set()) | outcome.get("nonmemberDeviceIds", set())
               | outcome.get("protectedDeviceIds", set()))
    if refused:
        errors.print(f"[yellow]Warning:[/] {len(refused)} device ID(s) could not be imported "
                     f"into {product} and are left out (e.g. {sorted(refused)[0]}).",
                     highlight=False)
    new = outcome.get("updatedDeviceIds", set())
    for d in fleet_devices:
        if d["id"] in new:  # new to the product (or re-added): credentials start empty
            d.pop("secret", None)
            d.pop("rsa_registered", None)
    fleet_devices = [d for d in fleet_devices if d["id"] not in refused]
    if not fleet_devices:
        fail("No device could be imported into the product.")
    all_devices = fleet_devices + known[devices:]  # the state keeps devices of bigger runs
    save_state(state_path, a, product, all_devices)

    if transport is Transport.PARTICLE:
        from corral.cli.simulate_particle import simulate_particle

        assert server_key is not None
        simulate_particle(a, product, fleet_devices, all_devices, state_path,
                          server_key=server_key, host=particle_host, port=particle_port,
                          interval=interval, duration=duration,
                          connect_concurrency=connect_concurrency)
        return
    host = mqtt_host or urlsplit(a.api_url).hostname or "127.0.0.1"
    console.print(f"Simulating {len(fleet_devices):,} device(s) of {product} on "
                  f"mqtt://{host}:{mqtt_port} (state: {state_path})", highlight=False,
                  soft_wrap=True)
    try:
        fleet = asyncio.run(_run(a, product, fleet_devices, all_devices, state_path, host=host,
                                 port=mqtt_port, interval=interval, duration=duration,
                                 connect_concurrency=connect_concurrency, protocol=protocol))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise typer.Exit(130) from None
    s = fleet.stats
    console.print(f"Simulated {s.devices:,} devices: {s.connects:,} connections, "
                  f"{s.events_sent:,} events sent, {s.events_refused:,} refused, "
                  f"{s.calls_answered:,} calls answered.", highlight=False, soft_wrap=True)
    if s.gave_up:
        fail(f"{s.gave_up} device(s) could not connect (credentials refused).")

