"""A fleet of simulated sensors speaking Particle's protocol, over TCP with RSA keys
(``corral simulate --transport particle``, ``bench/bench_particle.py``) or, with P-256 keys,
as Gen 3 devices over DTLS/UDP (``--transport particle-udp``,
``bench/bench_particle_udp.py``).

Each :class:`SimulatedParticleDevice` drives a
:class:`~corral.transports.particle.device.ParticleDevice` (corral's device side of the
protocol, no server code) and behaves like the MQTT simulator's devices:

* publishes ``sim/temperature`` every ``interval`` seconds (jittered) as a confirmed (CON)
  event, so that a refusal (rate limit) is seen and counted;
* offers the functions ``led`` (``on``/``off``/``toggle``), ``reboot`` and ``interval`` and
  the variables ``temperature`` (double), ``uptime`` (int32), ``label`` (string), ``on``
  (bool); a bad argument is answered with ``-1`` (Particle functions return an int);
* applies OTA firmware updates: after a complete image it restarts (Goodbye, reconnect) and
  reports the image's product version (read from its module header) in its Hello;
* reconnects with :class:`~corral.device.backoff.Backoff` when the connection drops or a
  connect fails (a refused key looks like a dropped connection: the server just closes);
* given an ``iccid``, is a cellular device: it sends its SIM's ICCID in its system describe
  (over TCP and UDP alike), as Device OS does.

:class:`ParticleFleet` runs many of them in one event loop and bounds how many handshakes
run at the same moment. Keys: :func:`generate_keys` makes RSA-1024 device keys (PEM) in a
process pool, since one takes ~10 ms of CPU; :func:`generate_ec_keys` makes P-256 ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from corral.device.backoff import Backoff
from corral.device.simulator import (
    EVENT_NAME,
    FIRMWARE_VERSION,
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    FleetStats,
    SimulatedBehaviour,
)
from corral.firmware.module import parse_module
from corral.transports.particle import coap
from corral.transports.particle.device import DeviceClosed, ParticleDevice
from corral.transports.particle.errors import ParticleProtocolError
from corral.transports.particle.udp_device import ParticleUdpDevice

log = logging.getLogger("corral.device.particle_fleet")

DEVICE_KEY_BITS: Final = 1024
SYSTEM_VERSION: Final = 6200  # Device OS 6.2.0, as the Hello encodes it
DEFAULT_PLATFORM: Final = 12  # Argon
CONNECT_TIMEOUT_S: Final = 20.0  # TCP connect + handshake + Hello + describes
PUBLISH_TIMEOUT_S: Final = 10.0
SPKI_SEQUENCE: Final = 0x30

DeviceKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
ServerKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# Errors of one connection attempt: the device waits (backoff) and tries again.
CONNECT_ERRORS: Final = (OSError, EOFError, TimeoutError, DeviceClosed, ParticleProtocolError,
                         ValueError)


class ServerKeyError(ValueError):
    """A server key file that cannot be used."""


def load_server_key(data: bytes) -> ServerKey:
    """The server's public key from a ``server_key`` file as ``corral keys server`` writes it
    (TCP: RSA DER SubjectPublicKeyInfo zero-padded to 384 bytes, then an address TLV; UDP:
    a P-256 DER SPKI padded to 192), from a bare DER SPKI, or from PEM."""
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ServerKeyError(f"not a PEM public key: {exc}") from None
    else:
        # a DER SEQUENCE: 30 LL (P-256), 30 81 LL or 30 82 LL LL (RSA)
        if len(data) < 4 or data[0] != SPKI_SEQUENCE or data[1] in (0x80, 0x83, 0x84) \
                or data[1] > 0x84:
            raise ServerKeyError("not a server_key file (no DER public key at its start)")
        n = data[1] & 0x7F if data[1] & 0x80 else 0
        size = 2 + n + (int.from_bytes(data[2:2 + n], "big") if n else data[1])
        if size > len(data):
            raise ServerKeyError("the DER public key is truncated")
        try:
            key = serialization.load_der_public_key(data[:size])
        except ValueError as exc:
            raise ServerKeyError(f"not a DER public key: {exc}") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if not isinstance(key, rsa.RSAPublicKey):
        raise ServerKeyError("the server key is neither RSA (TCP) nor P-256 (UDP)")
    return key


def _new_key_pem(_: int = 0) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=DEVICE_KEY_BITS)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_keys(n: int, *, workers: int | None = None) -> list[bytes]:
    """``n`` new RSA-1024 device keys (PKCS#8 PEM). Many are made in a process pool."""
    if n <= 0:
        return []
    if n < 16:
        return [_new_key_pem() for _ in range(n)]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_new_key_pem, range(n), chunksize=max(1, n // (workers * 8))))


def generate_ec_keys(n: int) -> list[bytes]:
    """``n`` new P-256 device keys (PKCS#8 PEM), as Gen 3 devices have."""
    return [ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()) for _ in range(max(0, n))]


def load_device_key(pem: bytes | str) -> DeviceKey:
    """A device key from PEM; ``ValueError`` unless it is RSA-1024 or P-256."""
    key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem,
                                             password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != DEVICE_KEY_BITS:
        raise ValueError(f"a device key must be RSA-{DEVICE_KEY_BITS} or P-256")
    return key


def public_pem(key: DeviceKey) -> str:
    """The device's public key as PEM SubjectPublicKeyInfo (for ``POST /v1/provisioning``)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass
class ParticleFleetStats(FleetStats):
    """:class:`FleetStats` and the failed connection attempts (a refused key is one)."""

    connect_failures: int = 0


class SimulatedParticleDevice(SimulatedBehaviour):
    """One simulated sensor over Particle TCP (see the module docstring)."""

    def __init__(self, device_id: str, key: DeviceKey, server_key: ServerKey,
                 host: str, port: int, *, stats: ParticleFleetStats, interval: float = 5.0,
                 label: str | None = None, product_id: int | None = None,
                 platform_id: int = DEFAULT_PLATFORM,
                 connect_limit: asyncio.Semaphore | None = None,
                 backoff: Backoff | None = None, rng: random.Random | None = None,
                 on_connect: Callable[[], None] | None = None,
                 iccid: str | None = None) -> None:
        self.device_id = device_id.lower()
        self.iccid = iccid  # its SIM: a cellular device
        self.key = key
        self.server_key = server_key
        self.host = host
        self.port = port
        self.stats = stats
        self.rng = rng or random.Random()
        self.interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, interval))
        self.label = label or f"sim-{self.device_id[-6:]}"
        self.product_id = product_id
        self.platform_id = platform_id
        self.connect_limit = connect_limit
        self.backoff = backoff or Backoff(0.5, 30.0, rng=self.rng.random)
        self.on_connect = on_connect
        self.base = self.rng.uniform(18.0, 24.0)
        self.temperature = self.base + self.rng.uniform(-1.0, 1.0)
        self.on = False
        self.connects = 0
        self.device: ParticleDevice | None = None  # the current connection's device
        self.firmware_version = FIRMWARE_VERSION  # the Hello's product version
        self._boot = asyncio.get_running_loop().time()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def connected(self) -> bool:
        d = self.device
        return d is not None and d.hello_event.is_set() and not d.closed.is_set()

    # --- functions and variables --------------------------------------------------------------

    def _counted(self, fn: Callable[[str], int]) -> Callable[[str], int]:
        def run(arg: str) -> int:
            try:
                value = fn(arg)
            except ValueError:
                return -1  # a failure is answered, not counted
            self.stats.calls_answered += 1
            return value

        return run

    def _read(self, getter: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            self.stats.calls_answered += 1
            return getter()

        return run

    def _updated(self, image: bytes) -> None:
        """A whole OTA image arrived: "flash" it and restart on its product version (an
        image without one leaves the version as it was, and the cloud sees that)."""
        info = parse_module(image)
        if info is not None and info.product_version is not None:
            self.firmware_version = info.product_version
        self.stats.updates_applied += 1
        self._boot = asyncio.get_running_loop().time()
        dev = self.device
        if dev is not None:
            task = asyncio.get_running_loop().create_task(dev.goodbye())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _new_device(self) -> ParticleDevice:
        kw: dict[str, Any] = dict(
            product_id=self.product_id, product_version=self.firmware_version,
            platform_id=self.platform_id, system_version=SYSTEM_VERSION, iccid=self.iccid,
            functions={"led": self._counted(self._led), "reboot": self._counted(self._reboot),
                       "interval": self._counted(self._set_interval)},
            variables={"temperature": ("double", self._read(lambda: round(self.temperature, 2))),
                       "uptime": ("int32", self._read(self.uptime)),
                       "label": ("string", self._read(lambda: self.label)),
                       "on": ("bool", self._read(lambda: self.on))})
        dev: ParticleDevice
        if isinstance(self.key, ec.EllipticCurvePrivateKey):  # a Gen 3 device: DTLS over UDP
            if not isinstance(self.server_key, ec.EllipticCurvePublicKey):
                raise ServerKeyError("a P-256 device needs the UDP server key")
            dev = ParticleUdpDevice(self.device_id, self.key, self.server_key, **kw)
        else:
            dev = ParticleDevice(self.device_id, self.key, self.server_key, **kw)
        dev.on_update = self._updated
        dev.vitals = self.vitals_doc  # answers the cloud's metrics describe
        return dev

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected and publish until cancelled or :meth:`close`."""
        while not self._closing:
            dev = self._new_device()
            self.device = dev
            try:
                async with self.connect_limit or contextlib.nullcontext():
                    if self._closing:
                        return
                    await dev.connect(self.host, self.port, within=CONNECT_TIMEOUT_S)
            except CONNECT_ERRORS as exc:
                await dev.close()
                if self._closing:
                    return
                self.stats.connect_failures += 1
                log.debug("simulated device %s: connect failed: %r", self.device_id, exc)
                await asyncio.sleep(self.backoff.next())
                continue
            self.backoff.reset()
            self.connects += 1
            self.stats.connects += 1
            if self.on_connect is not None:
                self.on_connect()
            try:
                await self._publish_while_connected(dev)
            finally:
                await dev.close()
            if self._closing:
                return
            self.stats.disconnects += 1
            await asyncio.sleep(self.backoff.next())

    async def _publish_while_connected(self, dev: ParticleDevice) -> None:
        # the first event at a random point of the first interval: no fleet-wide bursts
        wait = self.rng.uniform(0.0, self.interval)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dev.closed.wait(), wait)
            if dev.closed.is_set():
                return
            try:
                code = await dev.publish_confirmed(EVENT_NAME, f"{self.next_temperature():.2f}",
                                                   within=PUBLISH_TIMEOUT_S)
            except (DeviceClosed, TimeoutError, OSError):
                self.stats.events_failed += 1
            else:
                if code == coap.CHANGED:
                    self.stats.events_sent += 1
                else:
                    self.stats.events_refused += 1
            wait = self.interval * self.rng.uniform(0.8, 1.2)

    async def close(self) -> None:
        """Say Goodbye (if connected) and stop."""
        self._closing = True
        dev = self.device
        if dev is None:
            return
        if self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(dev.goodbye(), 5.0)
        await dev.close()


class ParticleFleet:
    """Many simulated Particle devices in this event loop. ``start()`` returns at once; the
    devices connect in the background, at most ``connect_concurrency`` handshakes at once. A
    device with an entry in ``iccids`` is cellular and reports that SIM."""

    def __init__(self, devices: Sequence[tuple[str, DeviceKey]],
                 server_key: ServerKey, host: str = "127.0.0.1", port: int = 5683, *,
                 interval: float = 5.0, product_id: int | None = None,
                 platform_id: int = DEFAULT_PLATFORM, connect_concurrency: int = 50,
                 labels: Sequence[str] | None = None, seed: int | None = None,
                 iccids: Mapping[str, str] | None = None) -> None:
        if connect_concurrency < 1:
            raise ValueError("connect_concurrency must be at least 1")
        self.credentials = list(devices)
        self.iccids = dict(iccids or {})  # device id -> its SIM (cellular devices)
        self.server_key = server_key
        self.host = host
        self.port = port
        self.interval = interval
        self.product_id = product_id
        self.platform_id = platform_id
        self.connect_concurrency = connect_concurrency
        self.labels = list(labels) if labels is not None else None
        self.rng = random.Random(seed)
        self.stats = ParticleFleetStats(devices=len(self.credentials))
        self.devices: list[SimulatedParticleDevice] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()

    @property
    def connected(self) -> int:
        """How many devices are connected right now."""
        return sum(1 for d in self.devices if d.connected)

    @property
    def ever_connected(self) -> int:
        """How many devices have connected at least once."""
        return sum(1 for d in self.devices if d.connects)

    async def start(self) -> None:
        limit = asyncio.Semaphore(self.connect_concurrency)
        loop = asyncio.get_running_loop()
        for i, (device_id, key) in enumerate(self.credentials):
            label = self.labels[i] if self.labels is not None and i < len(self.labels) else None
            sim = SimulatedParticleDevice(
                device_id, key, self.server_key, self.host, self.port, stats=self.stats,
                interval=self.interval, label=label, product_id=self.product_id,
                platform_id=self.platform_id, connect_limit=limit,
                rng=random.Random(self.rng.random()), on_connect=self._progress.set,
                iccid=self.iccids.get(device_id))
            self.devices.append(sim)
            self._tasks.append(loop.create_task(sim.run(), name=f"particle-sim-{device_id}"))

    async def wait_connected(self, count: int | None = None) -> None:
        """Wait until ``count`` devices (default: all) are connected; bound it with
        ``asyncio.timeout``."""
        want = len(self.devices) if count is None else count
        while self.connected < want:
            self._progress.clear()
            await self._progress.wait()

    async def stop(self) -> None:
        """Goodbye from every connected device, then stop their tasks."""
        await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


__all__ = ["DEVICE_KEY_BITS", "ParticleFleet", "ParticleFleetStats", "ServerKeyError",
           "SimulatedParticleDevice", "generate_ec_keys", "generate_keys", "load_device_key",
           "load_server_key", "public_pem"]
