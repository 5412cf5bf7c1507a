"""``corral simulate``: a fleet of simulated MQTT devices in a product, with a live summary.

Over the REST API (the stored login, as every client command): import the simulated device
IDs into the product, give each an MQTT secret; then connect them all with the device SDK
(``corral.device.simulator``). IDs and secrets are kept in a state file (mode 0600) so the
next run reuses the same devices. ``--transport particle``: Particle TCP devices instead, each
with its own RSA key registered over the API (``corral.cli.simulate_particle``).
``--cellular``: every device also has a SIM (an ICCID made once and kept in the state file)
that it reports as its transport does (MQTT: its describe; Particle: its system describe).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.live import Live

from corral.cli.client import TIMEOUT_S, Api, Product, api, error_message
from corral.cli.fleet import (
    API_CONCURRENCY,
    ServerCheck,
    claim_state,
    give_sims,
    load_state,
    save_state,
    summary,
    tick,
)
from corral.cli.output import console, errors, fail
from corral.device.simulator import MAX_INTERVAL_S, MIN_INTERVAL_S, Fleet

MAX_DEVICES = 10_000
IMPORT_CHUNK = 10_000


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


class Transport(StrEnum):
    MQTT = "mqtt"
    PARTICLE = "particle"
    PARTICLE_UDP = "particle-udp"


async def _run(a: Api, product: str, fleet_devices: list[dict[str, str]],
               all_devices: list[dict[str, str]], state_path: Path, *, host: str, port: int,
               interval: float, duration: float | None, connect_concurrency: int, protocol: int,
               iccids: dict[str, str] | None, ledgers: bool = False
               ) -> tuple[Fleet, str | None]:
    """Run the fleet; also why the run failed (None: the server saw the devices)."""
    minter = SecretMinter(a, product)
    check = ServerCheck(a, product)
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
                      connect_concurrency=connect_concurrency, reprovision=reprovision,
                      iccids=iccids, ledgers=ledgers)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        started = time.monotonic()
        deadline = started + duration if duration else None
        await fleet.start()
        watcher = loop.create_task(check.watch(fleet, stop), name="simulate-server-check")
        try:
            if console.is_terminal:  # a live table; otherwise (a log, a pipe) only the last
                with Live(summary(fleet, started, duration), console=console,
                          refresh_per_second=4) as live:
                    while await tick(stop, deadline):
                        live.update(summary(fleet, started, duration))
            else:
                while await tick(stop, deadline):
                    pass
                console.print(summary(fleet, started, duration))
            problem = await check.verdict(fleet)  # while they are still connected
            await fleet.stop()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await fleet.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return fleet, problem
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
        "--mqtt-host", help="MQTT server (default: what the server reports, "
        "GET /v1/device_endpoints).")] = None,
    mqtt_port: Annotated[int | None, typer.Option(
        "--mqtt-port", min=1, max=65535, help="MQTT port, plain (default: what the server "
        "reports).")] = None,
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
        "--transport", help="How the devices connect: mqtt, particle (Particle's TCP "
        "protocol, RSA keys) or particle-udp (Gen 3 devices: DTLS over UDP, P-256 keys); "
        "both Particle ones need --server-key.")] = Transport.MQTT,
    server_key: Annotated[Path | None, typer.Option(
        "--server-key", help="Particle: the server_key file `corral keys server` writes "
        "(or the server's public key as PEM).")] = None,
    particle_host: Annotated[str | None, typer.Option(
        "--particle-host", help="Particle: the gateway's address (default: what the server "
        "reports).")] = None,
    particle_port: Annotated[int | None, typer.Option(
        "--particle-port", min=1, max=65535, help="Particle: the gateway's port (default: "
        "what the server reports).")] = None,
    cellular: Annotated[bool, typer.Option(
        "--cellular", help="Cellular devices: each has a SIM (an ICCID made once and kept in "
        "the state file, so a rerun reuses it) and reports it (MQTT: in its describe; "
        "Particle: in its system describe); the server lists the SIMs and counts the "
        "devices' traffic as cellular data.")] = False,
    ledgers: Annotated[bool, typer.Option(
        "--ledgers", help="MQTT: the devices take the product's cloud-to-device ledgers "
        "(an `interval` key in a ledger's document sets their publish interval).")] = False,
) -> None:
    """Run simulated devices in a product: they publish `sim/temperature`, answer the
    functions led/reboot/interval and the variables temperature/uptime/label/on."""
    a = api(ctx)
    if not a.token:
        fail("Not logged in: run `corral login` (or pass --token / set CORRAL_TOKEN).")
    if transport in (Transport.PARTICLE, Transport.PARTICLE_UDP) and server_key is None:
        fail(f"--transport {transport.value} needs --server-key (the file `corral keys server"
             f"{' --protocol udp' if transport is Transport.PARTICLE_UDP else ''}` writes).",
             code=2)
    state_path, _held = claim_state(state, a, product)  # locked until the process ends
    known = load_state(state_path, a, product)
    fleet_devices = known[:devices]
    while len(fleet_devices) < devices:
        fleet_devices.append({"id": secrets.token_hex(12)})
    if cellular:  # a SIM for each device that has none yet
        give_sims(fleet_devices, known[devices:])
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
            d.pop("ec_registered", None)
    fleet_devices = [d for d in fleet_devices if d["id"] not in refused]
    if not fleet_devices:
        fail("No device could be imported into the product.")
    all_devices = fleet_devices + known[devices:]  # the state keeps devices of bigger runs
    save_state(state_path, a, product, all_devices)
    iccids = {d["id"]: d["iccid"] for d in fleet_devices} if cellular else None

    if transport in (Transport.PARTICLE, Transport.PARTICLE_UDP):
        from corral.cli.simulate_particle import simulate_particle  # only its users pay

        assert server_key is not None
        udp = transport is Transport.PARTICLE_UDP

        def where() -> tuple[str, int]:
            return _endpoint(a, "particle_udp" if udp else "particle_tcp",
                             "Particle UDP" if udp else "Particle TCP", particle_host,
                             particle_port, 5684 if udp else 5683)

        simulate_particle(a, product, fleet_devices, all_devices, state_path,
                          server_key=server_key, where=where,
                          interval=interval, duration=duration,
                          connect_concurrency=connect_concurrency, udp=udp, iccids=iccids)
        return
    host, port = _endpoint(a, "mqtt", "MQTT", mqtt_host, mqtt_port, 1883)
    console.print(f"Simulating {len(fleet_devices):,} {'cellular ' if cellular else ''}"
                  f"device(s) of {product} on mqtt://{host}:{port} (state: {state_path})",
                  highlight=False, soft_wrap=True)
    try:
        fleet, problem = asyncio.run(_run(
            a, product, fleet_devices, all_devices, state_path, host=host, port=port,
            interval=interval, duration=duration, connect_concurrency=connect_concurrency,
            protocol=protocol, iccids=iccids, ledgers=ledgers))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise typer.Exit(130) from None
    s = fleet.stats
    console.print(f"Simulated {s.devices:,} devices: {s.connects:,} connections, "
                  f"{s.events_sent:,} events sent, {s.events_refused:,} refused, "
                  f"{s.calls_answered:,} calls answered"
                  + (f", {s.ledgers_applied:,} ledger versions applied" if ledgers else "")
                  + ".", highlight=False, soft_wrap=True)
    if s.gave_up:
        fail(f"{s.gave_up} device(s) could not connect (credentials refused).")
    if problem:
        fail(f"The simulation did not reach corral: {problem}.")


def _endpoint(a: Api, name: str, label: str, host: str | None, port: int | None,
              fallback_port: int) -> tuple[str, int]:
    """Where the devices connect: the options given, else what the server reports
    (``GET /v1/device_endpoints``; a server without that route: the API's host and the
    default port)."""
    api_host = urlsplit(a.api_url).hostname or "127.0.0.1"
    if host is not None and port is not None:
        return host, port
    found = discover_endpoints(a)
    if found is None:
        errors.print(f"[yellow]Warning:[/] the server does not report its device endpoints; "
                     f"assuming {label} on port {port or fallback_port}.", highlight=False)
        return host or api_host, port or fallback_port
    ep = found.get(name)
    if not isinstance(ep, dict):
        fail(f"The server at {a.api_url} has {label} turned off (see `corral serve --help`).")
    return host or str(ep.get("host") or api_host), port or int(ep["port"])


def discover_endpoints(a: Api) -> dict[str, Any] | None:
    """The server's device endpoints, or None when it does not report them (404)."""
    try:
        r = httpx.get(f"{a.api_url}/v1/device_endpoints", timeout=TIMEOUT_S,
                      headers={"User-Agent": "corral-cli", "Authorization": f"Bearer {a.token}"})
    except httpx.HTTPError as exc:
        fail(f"Cannot reach {a.api_url}: {exc}")
    if r.status_code == 404:
        return None
    if r.status_code >= 400:
        fail(error_message(r))
    try:
        found = r.json().get("endpoints")
    except (ValueError, AttributeError):
        found = None
    if not isinstance(found, dict):
        fail(f"The server at {a.api_url} answered GET /v1/device_endpoints without endpoints.")
    return found

