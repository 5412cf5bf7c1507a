"""What Particle's CoAP messages mean: builders and parsers for both ends (sans-IO).

Resources are one-letter Uri-Path options: ``h`` hello, ``d`` describe, ``t`` time, ``E``
event from the device, ``e`` event to the device or subscription, ``f`` function, ``v``
variable, ``u`` update begin/done, ``c`` OTA chunk, ``x`` goodbye. An event, function or
variable name is ONE second Uri-Path option and may contain ``/``. Particle uses 1-byte
tokens. Builders return :class:`~corral.transports.particle.coap.Message`; parsers raise
:class:`MessageError` (a ``ParticleProtocolError``) when a device sends something
unusable.

System describe (``/d?1``, Content-Format 42) is protobuf ``particle.cloud.SystemDescribe``;
:func:`parse_system_describe` reads it with a minimal protobuf reader (modules with type,
index, version, size, dependencies; IMEI/ICCID when present) and ignores unknown fields.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from corral.kit.text import bounded_loads
from corral.transports.particle import coap
from corral.transports.particle.coap import Message
from corral.transports.particle.errors import ParticleProtocolError

# -- resources, flags, formats ---------------------------------------------------------------

HELLO: Final = "h"
DESCRIBE: Final = "d"
TIME: Final = "t"
EVENT: Final = "E"  # device -> cloud
EVENT_TO_DEVICE: Final = "e"  # cloud -> device, and device subscriptions
FUNCTION: Final = "f"
VARIABLE: Final = "v"
UPDATE: Final = "u"  # POST begin, PUT done
CHUNK: Final = "c"  # POST chunk, device GET = missed chunks
GOODBYE: Final = "x"
KEY_CHANGE: Final = "k"
SIGNAL: Final = "s"

HELLO_FLAG_OTA_UPGRADE_SUCCESSFUL: Final = 0x01
HELLO_FLAG_DIAGNOSTICS_SUPPORT: Final = 0x02
HELLO_FLAG_IMMEDIATE_UPDATES_SUPPORT: Final = 0x04
HELLO_FLAG_GOODBYE_SUPPORT: Final = 0x10
HELLO_FLAG_DEVICE_INITIATED_DESCRIBE: Final = 0x20
HELLO_FLAG_COMPRESSED_OTA: Final = 0x40
HELLO_FLAG_OTA_PROTOCOL_V3: Final = 0x80

DESCRIBE_SYSTEM: Final = 1
DESCRIBE_APPLICATION: Final = 2
DESCRIBE_METRICS: Final = 4

CONTENT_FORMAT_TEXT: Final = 0
CONTENT_FORMAT_OCTET_STREAM: Final = 42  # also the system describe (protobuf)
CONTENT_FORMAT_JSON: Final = 50
CONTENT_FORMAT_CBOR: Final = 60

DEFAULT_TTL: Final = 60

# Variable type numbers in the app describe, and Particle's API names for them.
VAR_BOOL: Final = 1
VAR_INT: Final = 2
VAR_STRING: Final = 4
VAR_NULL: Final = 5
VAR_DOUBLE: Final = 9
VARIABLE_TYPE_NAMES: Final = {VAR_BOOL: "bool", VAR_INT: "int32", VAR_STRING: "string",
                              VAR_DOUBLE: "double"}
VARIABLE_TYPE_NUMBERS: Final = {name: num for num, name in VARIABLE_TYPE_NAMES.items()}

# OTA
UPDATE_FLAG_FAST: Final = 0x01
CHUNK_OK: Final = coap.CHANGED  # ChunkReceived 2.04
CHUNK_BAD: Final = coap.BAD_REQUEST  # ChunkReceived 4.00 (bad CRC)


class MessageError(ParticleProtocolError):
    """A well-formed CoAP message whose Particle content is unusable."""


def _uint(value: int) -> bytes:
    """CoAP uint option value: minimal big-endian bytes (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def option_uint(value: bytes | None) -> int | None:
    """Decode a CoAP uint option (0-4 bytes big-endian); None if absent."""
    if value is None:
        return None
    if len(value) > 4:
        raise MessageError("uint option longer than 4 bytes")
    return int.from_bytes(value, "big")


def _text(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _token(token: bytes) -> bytes:
    if len(token) > coap.MAX_TOKEN_LEN:
        raise ValueError("token longer than 8 bytes")
    return bytes(token)


def resource(m: Message) -> str | None:
    """The first Uri-Path segment (``"h"``, ``"E"``, ``"f"``...), or None."""
    first = m.option(coap.URI_PATH)
    return first.decode("utf-8", "replace") if first is not None else None


def resource_name(m: Message) -> str | None:
    """The second Uri-Path segment: the event, function or variable name, or None."""
    paths = m.options_of(coap.URI_PATH)
    if len(paths) < 2:
        return None
    try:
        return paths[1].decode()
    except UnicodeDecodeError:
        raise MessageError("name is not UTF-8") from None


def _path(*segments: str | bytes) -> tuple[tuple[int, bytes], ...]:
    return tuple((coap.URI_PATH, _text(s)) for s in segments)


# -- common ------------------------------------------------------------------------------------


def ping(mid: int) -> Message:
    """Keep-alive: an empty CON."""
    return Message(coap.CON, coap.EMPTY, mid)


def ack(mid: int, code: int = coap.EMPTY, token: bytes = b"", payload: bytes = b"",
        options: tuple[tuple[int, bytes], ...] = ()) -> Message:
    """An ACK: empty (code 0.00), or piggy-backing a response (``code``, ``token``, payload)."""
    return Message(coap.ACK, code, mid, _token(token), options, payload)


def reset(mid: int) -> Message:
    """RST for a message we cannot process."""
    return Message(coap.RST, coap.EMPTY, mid)


# -- Hello ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The device Hello (payload of ``POST /h``).

    Layout (20 bytes, big-endian): product_id u16, product_version u16, flags u16 (the high
    byte is reserved), platform_id u16, reserved u8, device_id_len u8, [device_id],
    system_version u16, max_message_size u16, max_binary_size u32, ota_chunk_size u16.
    Older firmware sent shorter payloads (down to nothing; or only ``max_message_size``
    after the device id): missing fields are 0.
    """

    product_id: int
    product_version: int
    flags: int
    platform_id: int
    system_version: int = 0
    max_message_size: int = 0
    max_binary_size: int = 0
    ota_chunk_size: int = 0
    device_id: bytes = b""

    def has(self, flag: int) -> bool:
        """Whether a ``HELLO_FLAG_*`` bit is set."""
        return bool(self.flags & flag)


def parse_hello(payload: bytes) -> Hello:
    """Parse a device Hello payload (see :class:`Hello`)."""
    p = payload
    n = len(p)
    if n and n < 4:
        raise MessageError(f"Hello payload of {n} bytes is too short")

    def u16(at: int) -> int:
        return int.from_bytes(p[at : at + 2], "big") if n >= at + 2 else 0

    product_id, product_version, flags, platform_id = u16(0), u16(2), u16(4), u16(6)
    if n <= 9:
        return Hello(product_id, product_version, flags, platform_id)
    id_len = p[9]
    rest = 10 + id_len
    if n < rest:
        raise MessageError("Hello device id runs past the payload")
    device_id = bytes(p[10:rest])
    tail = p[rest:]
    if len(tail) >= 10:
        system_version, max_msg, max_bin, chunk = struct.unpack_from(">HHIH", tail)
        return Hello(product_id, product_version, flags, platform_id, system_version, max_msg,
                     max_bin, chunk, device_id)
    if len(tail) >= 2:  # legacy: only max_content_len after the device id
        return Hello(product_id, product_version, flags, platform_id,
                     max_message_size=int.from_bytes(tail[:2], "big"), device_id=device_id)
    return Hello(product_id, product_version, flags, platform_id, device_id=device_id)


def hello_payload(h: Hello) -> bytes:
    """The device's Hello payload (20 bytes when ``device_id`` is empty)."""
    return (
        struct.pack(">HHHHBB", h.product_id, h.product_version, h.flags, h.platform_id, 0,
                    len(h.device_id))
        + h.device_id
        + struct.pack(">HHIH", h.system_version, h.max_message_size, h.max_binary_size,
                      h.ota_chunk_size)
    )


def device_hello(mid: int, h: Hello) -> Message:
    """Device side: ``NON POST /h`` with the Hello payload."""
    return Message(coap.NON, coap.POST, mid, b"", _path(HELLO), hello_payload(h))


def server_hello(mid: int, *, confirmable: bool = False) -> Message:
    """Server side: ``POST /h`` without payload (NON, as in the capture)."""
    return Message(coap.CON if confirmable else coap.NON, coap.POST, mid, b"", _path(HELLO))


# -- describe ------------------------------------------------------------------------------


def describe_request(mid: int, token: bytes, kind: int) -> Message:
    """Server side: ``CON GET /d?<kind>``; kind is ONE of 1 (system), 2 (app), 4 (metrics)."""
    if kind not in (DESCRIBE_SYSTEM, DESCRIBE_APPLICATION, DESCRIBE_METRICS):
        raise ValueError("describe one type at a time: 1, 2 or 4 (3 disconnects Device OS)")
    return Message(coap.CON, coap.GET, mid, _token(token),
                   (*_path(DESCRIBE), (coap.URI_QUERY, bytes((kind,)))))


def describe_kind(m: Message) -> int | None:
    """The describe type in a ``/d`` request or device POST (a raw byte in Uri-Query)."""
    q = m.option(coap.URI_QUERY)
    if q is None or len(q) != 1:
        return None
    return q[0]


def describe_post(mid: int, token: bytes, kind: int, payload: bytes) -> Message:
    """Device side: device-initiated ``CON POST /d?<kind>`` (system: Content-Format 42)."""
    opts: list[tuple[int, bytes]] = [*_path(DESCRIBE)]
    if kind == DESCRIBE_SYSTEM:
        opts.append((coap.CONTENT_FORMAT, _uint(CONTENT_FORMAT_OCTET_STREAM)))
    opts.append((coap.URI_QUERY, bytes((kind,))))
    return Message(coap.CON, coap.POST, mid, _token(token), tuple(opts), payload)


def describe_response(mid: int, token: bytes, kind: int, payload: bytes) -> Message:
    """Device side: the separate ``CON 2.05`` answering a server describe request."""
    opts: tuple[tuple[int, bytes], ...] = ()
    if kind == DESCRIBE_SYSTEM:
        opts = ((coap.CONTENT_FORMAT, _uint(CONTENT_FORMAT_OCTET_STREAM)),)
    return Message(coap.CON, coap.CONTENT, mid, _token(token), opts, payload)


@dataclass(frozen=True, slots=True)
class AppDescribe:
    """The application describe: function names and variables ``{name: "int32"|...}``.

    ``unknown`` holds variables whose type number has no API type (e.g. 5, null).
    """

    functions: list[str]
    variables: dict[str, str]
    unknown: dict[str, int] = field(default_factory=dict)


def parse_app_describe(payload: bytes) -> AppDescribe:
    """Parse ``{"f":[...],"v":{name: type_int}}``; both keys are optional."""
    try:
        doc = bounded_loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise MessageError("application describe is not JSON") from None
    if not isinstance(doc, dict):
        raise MessageError("application describe is not a JSON object")
    functions = doc.get("f", [])
    variables = doc.get("v", {})
    if not isinstance(functions, list) or not all(isinstance(f, str) for f in functions):
        raise MessageError('application describe "f" is not a list of names')
    if not isinstance(variables, dict):
        raise MessageError('application describe "v" is not an object')
    known: dict[str, str] = {}
    unknown: dict[str, int] = {}
    for name, num in variables.items():
        if isinstance(num, bool) or not isinstance(num, int):
            raise MessageError(f"variable {name!r} has a non-integer type")
        if num in VARIABLE_TYPE_NAMES:
            known[name] = VARIABLE_TYPE_NAMES[num]
        else:
            unknown[name] = num
    return AppDescribe(list(functions), known, unknown)


def app_describe_payload(functions: list[str], variables: dict[str, str]) -> bytes:
    """Device side: the compact JSON Device OS sends (types as numbers)."""
    doc = {"f": list(functions), "v": {n: VARIABLE_TYPE_NUMBERS[t] for n, t in variables.items()}}
    return json.dumps(doc, separators=(",", ":")).encode()


# -- system describe (protobuf) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModuleDependency:
    type: int
    index: int
    version: int


@dataclass(frozen=True, slots=True)
class FirmwareModule:
    """One ``particle.cloud.FirmwareModule`` (type: 2 bootloader, 3 monolithic, 4 system
    part, 5 user part, 7 NCP, 8 radio stack...)."""

    type: int = 0
    index: int = 0
    version: int = 0
    store: int = 0
    max_size: int = 0
    checked_flags: int = 0
    passed_flags: int = 0
    size: int = 0
    hash: bytes = b""
    dependencies: tuple[ModuleDependency, ...] = ()


@dataclass(frozen=True, slots=True)
class SystemDescribe:
    modules: tuple[FirmwareModule, ...] = ()
    imei: str | None = None
    iccid: str | None = None
    modem_firmware_version: str | None = None

    @property
    def system_version(self) -> int | None:
        """The version of the system (monolithic 3 or system-part 4) module, if any."""
        for kind in (3, 4):
            versions = [m.version for m in self.modules if m.type == kind]
            if versions:
                return max(versions)
        return None


MODULE_MONOLITHIC: Final = 3
MODULE_SYSTEM_PART: Final = 4
MODULE_USER_PART: Final = 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise MessageError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MessageError("protobuf varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of a protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            if pos + 8 > len(data):
                raise MessageError("truncated protobuf fixed64")
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise MessageError("truncated protobuf bytes field")
            value, pos = bytes(data[pos : pos + length]), pos + length
        elif wire == 5:
            if pos + 4 > len(data):
                raise MessageError("truncated protobuf fixed32")
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise MessageError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _ints(data: bytes) -> dict[int, int]:
    return {n: v for n, _w, v in _fields(data) if isinstance(v, int)}


def parse_system_describe(payload: bytes) -> SystemDescribe:
    """Read the parts of ``particle.cloud.SystemDescribe`` corral uses."""
    modules: list[FirmwareModule] = []
    texts: dict[int, str] = {}
    for number, _wire, value in _fields(payload):
        if number == 1 and isinstance(value, bytes):
            ints: dict[int, int] = {}
            deps: list[ModuleDependency] = []
            digest = b""
            for n, _w, v in _fields(value):
                if isinstance(v, int):
                    ints[n] = v
                elif n == 8:
                    digest = v
                elif n == 9:
                    d = _ints(v)
                    deps.append(ModuleDependency(d.get(1, 0), d.get(2, 0), d.get(3, 0)))
            modules.append(FirmwareModule(
                type=ints.get(1, 0), index=ints.get(2, 0), version=ints.get(3, 0),
                store=ints.get(4, 0), max_size=ints.get(5, 0), checked_flags=ints.get(6, 0),
                passed_flags=ints.get(7, 0), size=ints.get(11, 0), hash=digest,
                dependencies=tuple(deps),
            ))
        elif number in (2, 3, 4) and isinstance(value, bytes):
            texts[number] = value.decode("utf-8", "replace")
    return SystemDescribe(tuple(modules), texts.get(2), texts.get(3), texts.get(4))


# -- time ------------------------------------------------------------------------------------


def time_request(mid: int, token: bytes) -> Message:
    """Device side: ``CON GET /t``."""
    return Message(coap.CON, coap.GET, mid, _token(token), _path(TIME))


def time_response(mid: int, token: bytes, unix_time: int) -> Message:
    """Server side: piggy-backed ``ACK 2.05`` with the unix time as u32 big-endian."""
    return ack(mid, coap.CONTENT, token, (int(unix_time) & 0xFFFFFFFF).to_bytes(4, "big"))


def parse_time(payload: bytes) -> int:
    """Device side: the unix time in a time response."""
    if len(payload) != 4:
        raise MessageError("time response is not 4 bytes")
    return int.from_bytes(payload, "big")


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """An event in either direction (``/E/<name>`` from the device, ``/e/<name>`` to it)."""

    name: str
    data: bytes
    ttl: int = DEFAULT_TTL
    content_format: int | None = None


def _event(mtype: int, mid: int, resource_: str, name: str, data: str | bytes, ttl: int,
           content_format: int | None) -> Message:
    opts: list[tuple[int, bytes]] = [*_path(resource_, name)]
    if content_format is not None and content_format != CONTENT_FORMAT_TEXT:
        opts.append((coap.CONTENT_FORMAT, _uint(content_format)))
    if ttl != DEFAULT_TTL:
        opts.append((coap.MAX_AGE, _uint(ttl)))
    return Message(mtype, coap.POST, mid, b"", tuple(opts), _text(data))


def event(mid: int, name: str, data: str | bytes = b"", ttl: int = DEFAULT_TTL, *,
          content_format: int | None = None) -> Message:
    """Server side: an event for the device, ``NON POST /e/<name>``."""
    return _event(coap.NON, mid, EVENT_TO_DEVICE, name, data, ttl, content_format)


def publish(mid: int, name: str, data: str | bytes = b"", ttl: int = DEFAULT_TTL, *,
            content_format: int | None = None, confirmable: bool = False) -> Message:
    """Device side: ``NON POST /E/<name>`` [Content-Format] [Max-Age if ttl != 60]."""
    return _event(coap.CON if confirmable else coap.NON, mid, EVENT, name, data, ttl,
                  content_format)


def parse_event(m: Message) -> Event:
    """An event publish (``POST /E/<name>`` or ``/e/<name>``): name, data, ttl, format."""
    name = resource_name(m)
    if m.code != coap.POST or resource(m) not in (EVENT, EVENT_TO_DEVICE) or not name:
        raise MessageError("not an event publish")
    ttl = option_uint(m.option(coap.MAX_AGE))
    return Event(name, m.payload, DEFAULT_TTL if ttl is None else ttl,
                 option_uint(m.option(coap.CONTENT_FORMAT)))


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A device subscription: ``GET /e/<prefix>`` [``?c`` CBOR / ``?b`` binary]."""

    prefix: str
    query: tuple[str, ...] = ()


def subscribe(mid: int, prefix: str) -> Message:
    """Device side: ``NON GET /e/<prefix>``."""
    return Message(coap.NON, coap.GET, mid, b"", _path(EVENT_TO_DEVICE, prefix))


def parse_subscribe(m: Message) -> Subscribe:
    """The prefix (may be empty: every event) of a ``GET /e/<prefix>``."""
    if m.code != coap.GET or resource(m) != EVENT_TO_DEVICE:
        raise MessageError("not a subscription")
    return Subscribe(resource_name(m) or "", tuple(m.uri_query))


# -- functions and variables ---------------------------------------------------------------


def function_call(mid: int, token: bytes, name: str, arg: str) -> Message:
    """Server side: ``CON POST /f/<name>?<arg>`` (no Uri-Query when ``arg`` is empty)."""
    opts = _path(FUNCTION, name)
    if arg:
        opts = (*opts, (coap.URI_QUERY, arg.encode()))
    return Message(coap.CON, coap.POST, mid, _token(token), opts)


def parse_function_call(m: Message) -> tuple[str, str]:
    """Device side: (name, argument) of a function call."""
    name = resource_name(m)
    if m.code != coap.POST or resource(m) != FUNCTION or not name:
        raise MessageError("not a function call")
    return name, "&".join(m.uri_query)


def function_result(mid: int, token: bytes, value: int, *, confirmable: bool = False) -> Message:
    """Device side: the separate ``NON 2.04`` with the int32 big-endian result."""
    return Message(coap.CON if confirmable else coap.NON, coap.CHANGED, mid, _token(token), (),
                   struct.pack(">i", value))


def parse_function_result(payload: bytes) -> int:
    """A function's return value: int32 big-endian."""
    if len(payload) != 4:
        raise MessageError(f"function result is {len(payload)} bytes, expected 4")
    value: int = struct.unpack(">i", payload)[0]
    return value


def variable_request(mid: int, token: bytes, name: str) -> Message:
    """Server side: ``CON GET /v/<name>``."""
    return Message(coap.CON, coap.GET, mid, _token(token), _path(VARIABLE, name))


def variable_value(mid: int, token: bytes, payload: bytes, *, confirmable: bool = False) -> Message:
    """Device side: the separate ``NON 2.05`` with the encoded value."""
    return Message(coap.CON if confirmable else coap.NON, coap.CONTENT, mid, _token(token), (),
                   payload)


def decode_variable(vtype: str | int, payload: bytes) -> bool | int | float | str:
    """A variable's value by its type (name or number): int32 BE, bool 1 byte, double 8
    bytes little-endian, string raw UTF-8."""
    name = VARIABLE_TYPE_NAMES.get(vtype, "") if isinstance(vtype, int) else vtype
    if name == "int32":
        if len(payload) != 4:
            raise MessageError(f"int32 variable is {len(payload)} bytes")
        ivalue: int = struct.unpack(">i", payload)[0]
        return ivalue
    if name == "bool":
        if len(payload) != 1:
            raise MessageError(f"bool variable is {len(payload)} bytes")
        return payload != b"\x00"
    if name == "double":
        if len(payload) != 8:
            raise MessageError(f"double variable is {len(payload)} bytes")
        fvalue: float = struct.unpack("<d", payload)[0]
        if not math.isfinite(fvalue):
            raise MessageError("double variable is not a finite number")
        return fvalue
    if name == "string":
        try:
            return payload.decode()
        except UnicodeDecodeError:
            raise MessageError("string variable is not UTF-8") from None
    raise MessageError(f"unknown variable type {vtype!r}")


def encode_variable(vtype: str | int, value: bool | int | float | str) -> bytes:
    """Device side: the inverse of :func:`decode_variable`."""
    name = VARIABLE_TYPE_NAMES.get(vtype, "") if isinstance(vtype, int) else vtype
    if name == "int32":
        return struct.pack(">i", int(value))
    if name == "bool":
        return b"\x01" if value else b"\x00"
    if name == "double":
        return struct.pack("<d", float(value))
    if name == "string":
        return str(value).encode()
    raise ValueError(f"unknown variable type {vtype!r}")


# -- goodbye -----------------------------------------------------------------------------------

_GOODBYE_CLOUD: Final = 0x01
_GOODBYE_RESET: Final = 0x02
_GOODBYE_SLEEP: Final = 0x04
_GOODBYE_NETWORK: Final = 0x08
NO_RESPONSE: Final = 258  # CoAP No-Response option (RFC 7967), sent with a NON Goodbye


@dataclass(frozen=True, slots=True)
class Goodbye:
    """A device's Goodbye (``POST /x``): reasons as Device OS numbers; None when absent."""

    cloud_reason: int | None = None
    reset_reason: int | None = None
    sleep_duration: int | None = None
    network_reason: int | None = None


def parse_goodbye(payload: bytes) -> Goodbye:
    """Varint flags, then one varint per flagged field (cloud, reset, sleep, network)."""
    if not payload:
        return Goodbye()
    flags, pos = _varint(payload, 0)
    values: dict[int, int] = {}
    for bit in (_GOODBYE_CLOUD, _GOODBYE_RESET, _GOODBYE_SLEEP, _GOODBYE_NETWORK):
        if flags & bit:
            values[bit], pos = _varint(payload, pos)
    return Goodbye(values.get(_GOODBYE_CLOUD), values.get(_GOODBYE_RESET),
                   values.get(_GOODBYE_SLEEP), values.get(_GOODBYE_NETWORK))


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def goodbye(mid: int, g: Goodbye, *, confirmable: bool = False) -> Message:
    """Device side: ``POST /x`` (NON adds an empty No-Response option, as Device OS does)."""
    flags = 0
    body = b""
    for bit, value in ((_GOODBYE_CLOUD, g.cloud_reason), (_GOODBYE_RESET, g.reset_reason),
                       (_GOODBYE_SLEEP, g.sleep_duration), (_GOODBYE_NETWORK, g.network_reason)):
        if value is not None:
            flags |= bit
            body += _put_varint(value)
    opts = _path(GOODBYE)
    if not confirmable:
        opts = (*opts, (NO_RESPONSE, b""))
    return Message(coap.CON if confirmable else coap.NON, coap.POST, mid, b"", opts,
                   _put_varint(flags) + body)


# -- OTA (legacy chunked transfer) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdateBegin:
    """UpdateBegin payload: flags u8 (bit 0 fast OTA), chunk_size u16, file_size u32,
    store u8, address u32."""

    file_size: int
    chunk_size: int = 512
    flags: int = 0
    store: int = 0
    address: int = 0

    @property
    def fast(self) -> bool:
        return bool(self.flags & UPDATE_FLAG_FAST)

    @property
    def chunk_count(self) -> int:
        return -(-self.file_size // self.chunk_size) if self.chunk_size else 0


def update_begin(mid: int, token: bytes, u: UpdateBegin) -> Message:
    """Server side: ``CON POST /u`` with the 12-byte payload (Device OS wants a 1-byte token)."""
    payload = struct.pack(">BHIBI", u.flags, u.chunk_size, u.file_size, u.store, u.address)
    return Message(coap.CON, coap.POST, mid, _token(token), _path(UPDATE), payload)


def parse_update_begin(payload: bytes) -> UpdateBegin:
    """Device side: the UpdateBegin parameters."""
    if len(payload) < 12:
        raise MessageError("UpdateBegin payload is shorter than 12 bytes")
    flags, chunk_size, file_size, store, address = struct.unpack_from(">BHIBI", payload)
    return UpdateBegin(file_size, chunk_size, flags, store, address)


def update_ready(mid: int, token: bytes, flags: int, *, confirmable: bool = False) -> Message:
    """Device side: UpdateReady, the separate ``NON 2.04`` with ``[flags]``."""
    return Message(coap.CON if confirmable else coap.NON, coap.CHANGED, mid, _token(token), (),
                   bytes((flags,)))


def chunk(mid: int, token: bytes, data: bytes, *, index: int | None = None,
          confirmable: bool = True) -> Message:
    """Server side: ``POST /c?<crc32 BE>[&<index u16 BE>]`` + the chunk bytes; the index
    option is for fast OTA only (sent NON). Device OS reads the CRC and index at fixed
    offsets that assume a 1-byte token, so ``token`` must be exactly one byte, in fast
    mode too: ``T b1 63 44 crc(4) [02 index(2)] ff data``."""
    if len(token) != 1:
        raise ValueError("an OTA chunk carries a 1-byte token (Device OS reads it at byte 4)")
    opts: tuple[tuple[int, bytes], ...] = (
        *_path(CHUNK), (coap.URI_QUERY, zlib.crc32(data).to_bytes(4, "big")))
    if index is not None:
        opts = (*opts, (coap.URI_QUERY, index.to_bytes(2, "big")))
    return Message(coap.CON if confirmable else coap.NON, coap.POST, mid, token, opts, data)


@dataclass(frozen=True, slots=True)
class Chunk:
    crc: int
    data: bytes
    index: int | None = None

    @property
    def crc_ok(self) -> bool:
        return zlib.crc32(self.data) == self.crc


def parse_chunk(m: Message) -> Chunk:
    """Device side: the CRC, the optional fast-OTA index and the data of a chunk."""
    queries = m.options_of(coap.URI_QUERY)
    if m.code != coap.POST or resource(m) != CHUNK or not queries or len(queries[0]) != 4:
        raise MessageError("not an OTA chunk (needs the CRC-32 option)")
    index = None
    if len(queries) > 1:
        if len(queries[1]) != 2:
            raise MessageError("chunk index option is not 2 bytes")
        index = int.from_bytes(queries[1], "big")
    return Chunk(int.from_bytes(queries[0], "big"), m.payload, index)


def chunk_received(mid: int, token: bytes, ok: bool = True, *, confirmable: bool = False) -> Message:
    """Device side: ChunkReceived, a separate ``NON 2.04`` (or 4.00 for a bad CRC)."""
    return Message(coap.CON if confirmable else coap.NON, CHUNK_OK if ok else CHUNK_BAD, mid,
                   _token(token))


def chunks_missed(mid: int, indexes: list[int]) -> Message:
    """Device side: ``CON GET /c`` with the missing chunk indexes, u16 big-endian each."""
    return Message(coap.CON, coap.GET, mid, b"", _path(CHUNK),
                   b"".join(i.to_bytes(2, "big") for i in indexes))


def parse_chunks_missed(payload: bytes) -> list[int]:
    """Server side: the chunk indexes a device asks for again."""
    if not payload or len(payload) % 2:
        raise MessageError("missed-chunks payload is not a list of u16")
    return [int.from_bytes(payload[i : i + 2], "big") for i in range(0, len(payload), 2)]


def update_done(mid: int, token: bytes) -> Message:
    """Server side: ``CON PUT /u``. The device answers ``ACK 2.04`` + ``{"r":0}`` when every
    chunk arrived (then applies the image), or ACK 4.00 and a missed-chunks request."""
    return Message(coap.CON, coap.PUT, mid, _token(token), _path(UPDATE))
