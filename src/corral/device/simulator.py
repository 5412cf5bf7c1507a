"""A fleet of simulated sensors on the device SDK (``corral simulate``, ``serve --demo``).

Each :class:`SimulatedDevice` is a :class:`~corral.device.Device` that

* publishes ``sim/temperature`` (a plausible, slowly wandering value) every ``interval``
  seconds, jittered, with QoS 1;
* offers the functions ``led`` (``on``/``off``/``toggle``), ``reboot`` and ``interval``
  (seconds between events) and the variables ``temperature`` (double), ``uptime`` (int32),
  ``label`` (string) and ``on`` (bool);
* reconnects with the SDK's backoff;
* applies firmware updates the cloud offers (:class:`~corral.device.ota.OtaUpdater`: the
  image is downloaded and checked, then the device reports the new version and reconnects);
* given an ``iccid``, is a cellular device: it reports its SIM in its describe.

A :class:`Fleet` runs many of them in one event loop, bounds how many connect at the same
moment, and counts what happens in :class:`FleetStats`. Credentials come from the caller
(the CLI provisions them over the REST API; the demo directly in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

from corral.device.client import Device
from corral.device.errors import ConnectError, NotConnected, PublishRefused
from corral.device.ledgers import Ledger
from corral.device.ota import Offer, OtaUpdater

log = logging.getLogger("corral.device.simulator")

EVENT_NAME: Final = "sim/temperature"
FIRMWARE_VERSION: Final = 1
SYSTEM_VERSION: Final = "sim-1.0.0"
MIN_INTERVAL_S: Final = 0.5
VITALS_EVERY_S: Final = 3600.0  # simulated devices report vitals hourly (and when asked)
MAX_INTERVAL_S: Final = 3600.0

# A device whose secret is refused asks for a new one through this (``None``: give up).
Reprovision = Callable[[str], Awaitable[str | None]]


@dataclass
class FleetStats:
    """Running totals of a fleet (``connected`` is counted live by :class:`Fleet`)."""

    devices: int = 0
    connects: int = 0  # successful connections, reconnects included
    disconnects: int = 0
    events_sent: int = 0  # acknowledged by the server (stored)
    events_refused: int = 0  # PUBACK with an error, e.g. rate-limited
    events_failed: int = 0  # no connection, or no acknowledgement in time
    calls_answered: int = 0  # function calls and variable reads
    reprovisioned: int = 0  # secrets replaced after a refusal
    gave_up: int = 0  # devices that stopped (credentials refused for good)
    updates_applied: int = 0  # firmware images downloaded, checked and applied
    ledgers_applied: int = 0  # cloud-to-device ledger versions applied


class SimulatedBehaviour:
    """What every simulated device does, whatever its transport: the functions ``led``,
    ``reboot``, ``interval`` and the values behind the variables. The class using it sets
    ``on``, ``interval``, ``temperature``, ``base``, ``rng`` and ``_boot``."""

    on: bool
    interval: float
    temperature: float
    base: float
    rng: random.Random
    _boot: float

    def _led(self, arg: str) -> int:
        command = arg.strip().lower()
        if command in ("on", "1", "true"):
            self.on = True
        elif command in ("off", "0", "false"):
            self.on = False
        elif command == "toggle":
            self.on = not self.on
        else:
            raise ValueError("led takes on, off or toggle")
        return int(self.on)

    def _reboot(self, _arg: str) -> int:
        self._boot = asyncio.get_running_loop().time()
        return 1

    def _set_interval(self, arg: str) -> int:
        try:
            seconds = float(arg)
        except ValueError:
            raise ValueError("interval takes a number of seconds") from None
        if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
            raise ValueError(f"interval is {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds")
        self.interval = seconds
        return round(seconds)

    def uptime(self) -> int:
        return int(asyncio.get_running_loop().time() - self._boot)

    def vitals_doc(self) -> dict[str, Any]:
        """This device's vitals in Particle's diagnostics shape (signal and round trip
        wander; uptime is real)."""
        rssi = -50 - int(self.rng.random() * 40)
        return {"device": {
            "network": {"signal": {"rssi": rssi, "strength": max(0, min(100, 2 * (rssi + 100))),
                                   "quality": 60 + int(self.rng.random() * 40)}},
            "cloud": {"connection": {"status": "connected"},
                      "coap": {"transmit": 0, "retransmit": 0, "unack": 0,
                               "round_trip": 40 + int(self.rng.random() * 200)},
                      "publish": {"rate_limited": 0}, "disconnects": 0},
            "system": {"uptime": self.uptime(),
                       "memory": {"used": 30_000 + int(self.rng.random() * 20_000),
                                  "total": 160_000}}},
            "service": {"device": {"status": "ok"}}}

    def next_temperature(self) -> float:
        """A mean-reverting random walk around this device's base temperature."""
        self.temperature += 0.1 * (self.base - self.temperature) + self.rng.gauss(0.0, 0.15)
        return round(self.temperature, 2)


class SimulatedDevice(SimulatedBehaviour):
    """One simulated sensor (see the module docstring)."""

    def __init__(self, device_id: str, secret: str, host: str, port: int, *,
                 stats: FleetStats, interval: float = 5.0, label: str | None = None,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 protocol: int = 5, keepalive: int = 60,
                 connect_limit: asyncio.Semaphore | None = None,
                 reprovision: Reprovision | None = None,
                 rng: random.Random | None = None,
                 http: httpx.AsyncClient | None = None, iccid: str | None = None,
                 ledgers: bool = False) -> None:
        self.stats = stats
        self.iccid = iccid  # its SIM: a cellular device
        self.rng = rng or random.Random()
        self.interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, interval))
        self.label = label or f"sim-{device_id[-6:]}"
        self.base = self.rng.uniform(18.0, 24.0)
        self.temperature = self.base + self.rng.uniform(-1.0, 1.0)
        self.on = False
        self.reprovision = reprovision
        loop = asyncio.get_running_loop()
        self._boot = loop.time()
        self.device = Device(device_id, secret, host, port, tls=tls,
                             server_hostname=server_hostname, protocol=protocol,
                             keepalive=keepalive, connect_limit=connect_limit)
        self._wire()
        if ledgers:  # it takes cloud-to-device ledgers (docs/mqtt.md "Ledgers")
            self.device.on_ledger(self._ledger_changed)
        self.ota = OtaUpdater(self.device, self._apply_update, http=http).attach()

    def _apply_update(self, offer: Offer, image: bytes) -> None:
        """"Flash" the checked image: the updater then reports the new version and
        reconnects, as a device restarting on new firmware does."""
        self.stats.updates_applied += 1
        self._boot = asyncio.get_running_loop().time()

    @property
    def firmware_version(self) -> int | None:
        value = self.device.describe_payload().get("firmware_version")
        return value if isinstance(value, int) else None

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def _wire(self) -> None:
        dev = self.device
        stats = self.stats

        def counted(fn: Callable[[str], int]) -> Callable[[str], int]:
            def run(arg: str) -> int:
                value = fn(arg)  # a failure is answered with an error, not counted
                stats.calls_answered += 1
                return value

            return run

        dev.function("led")(counted(self._led))
        dev.function("reboot")(counted(self._reboot))
        dev.function("interval")(counted(self._set_interval))

        def read(getter: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                stats.calls_answered += 1
                return getter()

            return run

        dev.variable("temperature", "double", read(lambda: round(self.temperature, 2)))
        dev.variable("uptime", "int32", read(self.uptime))
        dev.variable("label", "string", read(lambda: self.label))
        dev.variable("on", "bool", read(lambda: self.on))
        dev.describe(firmware_version=FIRMWARE_VERSION, system_version=SYSTEM_VERSION,
                     iccid=self.iccid)
        dev.vitals(self.vitals_doc, every=VITALS_EVERY_S)

        def connected() -> None:
            stats.connects += 1

        def disconnected(_reason: str) -> None:
            stats.disconnects += 1

        dev.on_connect(connected)
        dev.on_disconnect(disconnected)

    def _ledger_changed(self, ledger: Ledger) -> None:
        """A cloud-to-device ledger's new version: an ``interval`` key (seconds) sets the
        publish interval, as the ``interval`` function does."""
        self.stats.ledgers_applied += 1
        value = (ledger.data or {}).get("interval")
        if isinstance(value, int | float) and not isinstance(value, bool):
            self.interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, float(value)))

    # --- functions and variables --------------------------------------------------------------

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected and publish until cancelled or :meth:`close`."""
        publisher = asyncio.ensure_future(self._publish_loop())
        try:
            await self._connection_loop()
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher

    async def _connection_loop(self) -> None:
        reprovisioned = False
        while True:
            try:
                await self.device.run_forever()
                return  # closed
            except ConnectError as exc:
                if self.reprovision is None or reprovisioned:
                    log.warning("simulated device %s gives up: %s", self.device_id, exc)
                    self.stats.gave_up += 1
                    return
                reprovisioned = True
                secret = await self.reprovision(self.device_id)
                if secret is None:
                    self.stats.gave_up += 1
                    return
                self.stats.reprovisioned += 1
                self.device.secret = secret

    async def _publish_loop(self) -> None:
        # start at a random point of the first interval so a fleet does not publish in bursts
        await asyncio.sleep(self.rng.uniform(0.0, self.interval))
        while True:
            if self.device.connected:
                try:
                    await self.device.publish(EVENT_NAME, f"{self.next_temperature():.2f}")
                    self.stats.events_sent += 1
                except PublishRefused:
                    self.stats.events_refused += 1
                except (NotConnected, TimeoutError):
                    self.stats.events_failed += 1
            await asyncio.sleep(self.interval * self.rng.uniform(0.8, 1.2))

    async def close(self) -> None:
        await self.ota.close()
        await self.device.close()


class Fleet:
    """Many simulated devices in this event loop. ``start()`` returns at once; the devices
    connect in the background, at most ``connect_concurrency`` at the same moment. A device
    with an entry in ``iccids`` is cellular and reports that SIM. With ``ledgers`` the
    devices take cloud-to-device ledgers (an ``interval`` key sets their publish interval)."""

    def __init__(self, credentials: Sequence[tuple[str, str]], host: str = "127.0.0.1",
                 port: int = 1883, *, interval: float = 5.0, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, protocol: int = 5, keepalive: int = 60,
                 connect_concurrency: int = 50, reprovision: Reprovision | None = None,
                 labels: Sequence[str] | None = None, seed: int | None = None,
                 iccids: Mapping[str, str] | None = None, ledgers: bool = False) -> None:
        if connect_concurrency < 1:
            raise ValueError("connect_concurrency must be at least 1")
        self.credentials = list(credentials)
        self.iccids = dict(iccids or {})  # device id -> its SIM (cellular devices)
        self.ledgers = ledgers
        self.host = host
        self.port = port
        self.interval = interval
        self.tls = tls
        self.server_hostname = server_hostname
        self.protocol = protocol
        self.keepalive = keepalive
        self.connect_concurrency = connect_concurrency
        self.reprovision = reprovision
        self.labels = list(labels) if labels is not None else None
        self.rng = random.Random(seed)
        self.stats = FleetStats(devices=len(self.credentials))
        self.devices: list[SimulatedDevice] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()  # set whenever a device connects
        self._http: httpx.AsyncClient | None = None  # firmware downloads, shared

    @property
    def connected(self) -> int:
        """How many devices are connected right now."""
        return sum(1 for d in self.devices if d.device.connected)

    @property
    def ever_connected(self) -> int:
        """How many devices have connected at least once."""
        return sum(1 for d in self.devices if d.device.connects)

    async def start(self) -> None:
        limit = asyncio.Semaphore(self.connect_concurrency)
        self._http = httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(
            max_connections=self.connect_concurrency, max_keepalive_connections=20))
        for i, (device_id, secret) in enumerate(self.credentials):
            label = self.labels[i] if self.labels is not None and i < len(self.labels) else None
            sim = SimulatedDevice(device_id, secret, self.host, self.port, stats=self.stats,
                                  interval=self.interval, label=label, tls=self.tls,
                                  server_hostname=self.server_hostname, protocol=self.protocol,
                                  keepalive=self.keepalive, connect_limit=limit,
                                  reprovision=self.reprovision,
                                  rng=random.Random(self.rng.random()), http=self._http,
                                  iccid=self.iccids.get(device_id), ledgers=self.ledgers)
            sim.device.on_connect(self._progress.set)
            self.devices.append(sim)
            self._tasks.append(asyncio.get_running_loop().create_task(
                sim.run(), name=f"simulated-{device_id}"))

    async def wait_connected(self, count: int | None = None) -> None:
        """Wait until ``count`` devices (default: all) are connected; bound it with
        ``asyncio.timeout``."""
        want = len(self.devices) if count is None else count
        while self.connected < want:
            self._progress.clear()  # no await between the check and here: no lost wake-up
            await self._progress.wait()

    async def stop(self) -> None:
        """Disconnect every device cleanly and stop their tasks."""
        await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None


__all__ = ["EVENT_NAME", "Fleet", "FleetStats", "Reprovision", "SimulatedDevice"]
