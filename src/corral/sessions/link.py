"""What a transport and the session core exchange: what a transport learned when the device
connected (:class:`Hello`), how the core reaches the device (:class:`DeviceLink`, implemented
by each transport), firmware images and transfer results, refusals, the gate billing puts on
device traffic, and the checks on the names and values a device sends."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from corral.kit import clock
from corral.metering.ledger import Kind

VARIABLE_TYPES = {"bool": "bool", "boolean": "bool", "int": "int32", "int32": "int32",
                  "integer": "int32", "double": "double", "float": "double", "number": "double",
                  "string": "string", "str": "string"}
NAME_RE = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces
INT32 = (-(2**31), 2**31 - 1)


# --- values ---------------------------------------------------------------------------------

class Refused(Exception):
    """The core refuses something a device asked for. ``code`` is machine-readable:
    ``bad_credentials``, ``unknown_device``, ``unknown_product``, ``wrong_product``,
    ``quarantined``, ``denied``, ``invalid``, ``too_large``, ``rate_limited``, ``paused``,
    ``closed``, ``busy``, ``forbidden``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class DeviceError(Exception):
    """The device answered a request with an error (``text`` is what it said)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """What a transport learned when the device connected."""

    device_id: str
    product_id: int | None = None  # a Particle device names its product; MQTT: the device's
    platform_id: int | None = None
    firmware_version: int | None = None
    system_version: str | None = None
    remote: str | None = None  # peer IP address


@dataclasses.dataclass(slots=True)
class DeviceFacts:
    """Tenancy and limits of a connected device (refreshed on ``control`` ``refresh``)."""

    device_id: str
    product_id: int | None
    org_id: int | None
    owner_user_id: int | None
    customer_id: int | None
    development: bool
    platform_id: int
    event_data_max: int
    rate_per_s: float
    rate_burst: int
    cellular: bool = False  # its session traffic counts towards the cellular allowance
    iccid: str | None = None  # the SIM it last reported (None once that SIM was released)


@dataclasses.dataclass(frozen=True, slots=True)
class FirmwareImage:
    """A firmware update as a transport sends it: Particle streams the file at ``path`` over
    OTA; MQTT offers ``url`` (a short-lived download) with the rest as facts to check."""

    version: int
    size: int
    sha256: str  # hex
    path: Path
    url: str | None = None
    signature: str | None = None  # base64 Ed25519 signature (corral.firmware.signing)
    key_id: str | None = None
    public_keys: tuple[str, ...] = ()  # base64, the product's active signing keys
    chunk_size: int = 1_048_576  # MQTT: the Range size a device should ask for


@dataclasses.dataclass(frozen=True, slots=True)
class TransferResult:
    """How a firmware transfer ended. ``dropped``: the connection ended during it (the
    update is retried when the device reconnects). ``retry`` False: trying again cannot
    help (the device does not take firmware updates at all)."""

    ok: bool
    reason: str
    bytes_sent: int = 0
    dropped: bool = False
    retry: bool = True


FirmwareProgress = Callable[[int, int], Any]  # (bytes sent, total)


UpdateNotice = Literal["pending", "forced"]


class DeviceLink(Protocol):
    """How the core reaches one connected device (implemented by each transport)."""

    transport: str  # "mqtt" | "particle" | ...

    async def call_function(self, name: str, arg: str) -> int:
        """Run a function on the device; its int32 result. Raise :class:`DeviceError` if the
        device reports a failure. The core applies the timeout (by cancelling)."""
        ...

    async def read_variable(self, name: str) -> Any:
        """Read a variable's current value (bool, int, float or str)."""
        ...

    async def deliver_event(self, name: str, data: str | None, *, published_at: str,
                            ttl: int, coreid: str) -> None:
        """Send an event the device subscribed to."""
        ...

    async def request_describe(self) -> None:
        """Ask the device to describe itself again (it answers through ``describe``)."""
        ...

    async def request_vitals(self) -> None:
        """Ask the device for its vitals now (it answers through ``DeviceSession.vitals``
        or the ``spark/device/diagnostics/update`` event). Never raises."""
        ...

    async def disconnect(self, reason: str) -> None:
        """Close the connection from the server side (kicked, shut down). Must not call
        back into :meth:`DeviceSession.close` synchronously with a different reason."""
        ...

    async def deliver_firmware(self, image: FirmwareImage, *,
                               progress: FirmwareProgress | None = None) -> TransferResult:
        """Transfer ``image`` to the device (Particle: OTA chunks; MQTT: an offer the device
        downloads). Ok once the device has the whole image and will apply it (it reboots
        and reconnects on the new version). Never raises for device-side failures."""
        ...

    async def update_notice(self, kind: UpdateNotice, value: bool) -> None:
        """Tell a device with updates disabled that an update waits for it (``pending``),
        or that the next one is forced and to be applied anyway (``forced``,
        ``firmware_updates_forced``)."""
        ...

    async def deliver_ledger(self, name: str, document: dict[str, Any]) -> bool:
        """Send a cloud-to-device ledger's document (``name``, ``version``, ``data``, ...);
        False when the device does not take ledgers over this transport. Never raises."""
        ...


class CommunicationGate(Protocol):
    """The seam where billing decides whether device traffic is allowed right now.

    Returns ``None`` to allow, or a human-readable reason to refuse (for example "The
    organization's data operations for this month are used up"). Called for every
    publish, delivery, function call and variable read, on the ingest hot path, so it is
    synchronous: an implementation answers from state it keeps current in the background
    (for example usage totals refreshed on a timer and on threshold events)."""

    def refuse(self, facts: DeviceFacts, kind: Kind) -> str | None: ...

    def refuse_connect(self, facts: DeviceFacts) -> str | None:
        """A device that has never been online connects: ``None`` admits it, else why not
        (the plan's device cap)."""
        ...


class OpenGate:
    """The default gate: everything is allowed."""

    def refuse(self, facts: DeviceFacts, kind: Kind) -> str | None:
        return None

    def refuse_connect(self, facts: DeviceFacts) -> str | None:
        return None


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; time from the injected clock."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = clock.now()

    def take(self, now: dt.datetime | None = None) -> bool:
        now = now or clock.now()
        elapsed = max(0.0, (now - self.updated).total_seconds())
        self.updated = now
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# --- validation -----------------------------------------------------------------------------

def check_event_name(name: Any, *, system: bool = False) -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise Refused("invalid", "Event names are 1 to 64 printable ASCII characters, no spaces")
    if not system and name.lower().startswith(("spark", "particle")):
        raise Refused("invalid", "Event names starting with 'spark' or 'particle' are reserved")
    return name


def check_member_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise Refused("invalid", f"{what} names are 1 to 64 printable characters")
    return name


def coerce_variable(value: Any, vtype: str) -> Any:
    """A device's variable value as its described type (Particle's JSON result)."""
    if vtype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif vtype == "int32":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) and INT32[0] <= value <= INT32[1]:
            return value
        if isinstance(value, float) and value.is_integer() and INT32[0] <= value <= INT32[1]:
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return coerce_variable(int(value, 10), vtype)
    elif vtype == "double":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            f = float(value)
            if math.isfinite(f):
                return f
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return coerce_variable(float(value), vtype)
    elif vtype == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, bool)):
            return str(value)
    raise DeviceError(f"the device sent a value that is not a {vtype}")
