"""Sans-IO MQTT 3.1.1 / 5.0 packet codec.

``encode(packet, version)`` turns a packet dataclass into bytes. ``Decoder.feed(data)`` takes
bytes as they arrive (any chunking) and returns the packets completed so far; malformed
input raises ``ProtocolError(reason_code, message)`` and poisons the decoder (every later
``feed`` raises the same error), because MQTT has no resynchronisation: the connection
must be closed.

Versions are the protocol levels: 4 (MQTT 3.1.1) and 5 (MQTT 5.0). A server-side decoder
starts with ``version=None`` and learns it from the first packet, which must be CONNECT.

Encoding raises ``ValueError`` for packets that cannot be put on the wire (a packet id of
0, properties in 3.1.1, a wildcard in a PUBLISH topic, ...): those are programming errors,
not peer errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from corral.transports.mqtt.properties import (
    AUTH,
    BOOLEAN_BYTES,
    CONNACK,
    CONNECT,
    DISCONNECT,
    EMPTY,
    MALFORMED_PACKET,
    NONZERO,
    PACKET_TOO_LARGE,
    PINGREQ,
    PINGRESP,
    PROPERTY_TABLE,
    PROTOCOL_ERROR,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    TOPIC_ALIAS_INVALID,
    TOPIC_NAME_INVALID,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUPPORTED_PROTOCOL_VERSION,
    WILL,
    Properties,
    PropType,
    ProtocolError,
)

MQTT_311: Final = 4
MQTT_5: Final = 5
MAX_REMAINING_LENGTH: Final = 268_435_455
# Largest possible packet: 1 type byte + 4 length bytes + the largest remaining length.
MAX_PACKET_SIZE: Final = 1 + 4 + MAX_REMAINING_LENGTH
TOPIC_FILTER_INVALID: Final = 0x8F


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True, slots=True)
class Will:
    """The last will carried in CONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str = ""
    clean_start: bool = True  # "clean session" in 3.1.1
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = EMPTY
    protocol_level: int = MQTT_311  # 4 or 5; must match the version it is encoded with
    protocol_name: str = "MQTT"


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0  # the 3.1.1 return code, or the 5.0 reason code
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # required (1-65535) when qos > 0, absent for qos 0
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Pubrec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Pubrel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Pubcomp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options byte unpacked (MQTT 5 §3.8.3.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False  # 5.0 only
    retain_as_published: bool = False  # 5.0 only
    retain_handling: int = 0  # 5.0 only: 0 send, 1 send if new subscription, 2 don't send


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]  # granted QoS or failure code, one per subscription
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only; 3.1.1 UNSUBACK carries none
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0  # 5.0 only
    properties: Properties = EMPTY


@dataclass(frozen=True, slots=True)
class Auth:
    """5.0 only."""

    reason_code: int = 0
    properties: Properties = EMPTY


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)
AckPacket = Puback | Pubrec | Pubrel | Pubcomp

PACKET_TYPES: Final[dict[type, int]] = {
    Connect: CONNECT,
    Connack: CONNACK,
    Publish: PUBLISH,
    Puback: PUBACK,
    Pubrec: PUBREC,
    Pubrel: PUBREL,
    Pubcomp: PUBCOMP,
    Subscribe: SUBSCRIBE,
    Suback: SUBACK,
    Unsubscribe: UNSUBSCRIBE,
    Unsuback: UNSUBACK,
    Pingreq: PINGREQ,
    Pingresp: PINGRESP,
    Disconnect: DISCONNECT,
    Auth: AUTH,
}


def valid_topic_filter(topic_filter: str) -> bool:
    """True if ``topic_filter`` places its wildcards legally (MQTT §4.7.1)."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


# --------------------------------------------------------------------------- encoding


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer {n} too large")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(s: str) -> bytes:
    if "\x00" in s:
        raise ValueError("MQTT strings must not contain U+0000")
    data = s.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)
    if len(data) > 0xFFFF:
        raise ValueError("MQTT string longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def _binary(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("MQTT binary data longer than 65535 bytes")
    return len(b).to_bytes(2, "big") + b


def _u16(n: int, what: str) -> bytes:
    if not 0 <= n <= 0xFFFF:
        raise ValueError(f"{what} {n} out of range")
    return n.to_bytes(2, "big")


def _packet_id(pid: int | None) -> bytes:
    if pid is None or not 1 <= pid <= 0xFFFF:
        raise ValueError(f"packet id must be 1-65535, not {pid}")
    return pid.to_bytes(2, "big")


def _byte(n: int, what: str) -> bytes:
    if not 0 <= n <= 0xFF:
        raise ValueError(f"{what} {n} out of range")
    return bytes((n,))


def _encode_props(props: Properties, ptype: int) -> bytes:
    if props is EMPTY:
        return b"\x00"
    body = bytearray()
    for spec, value in props.present():
        if ptype not in spec.packets:
            raise ValueError(f"property {spec.name} not allowed in packet type {ptype}")
        ident = bytes((spec.ident,))
        t = spec.type
        if t is PropType.UTF8_PAIR:
            for pair in value:  # type: ignore[attr-defined]
                k, v = pair
                body += ident + _utf8(k) + _utf8(v)
        elif t is PropType.VARINT:
            values: tuple[int, ...] = value  # type: ignore[assignment]
            if len(values) > 1 and ptype not in spec.repeatable_in:
                raise ValueError(f"property {spec.name} may appear only once here")
            for n in values:
                if not 1 <= n <= MAX_REMAINING_LENGTH:
                    raise ValueError(f"{spec.name} {n} out of range")
                body += ident + _varint(n)
        elif t is PropType.UTF8:
            body += ident + _utf8(value)  # type: ignore[arg-type]
        elif t is PropType.BINARY:
            body += ident + _binary(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, int)
            width = 1 if t is PropType.BYTE else 2 if t is PropType.TWO_BYTE else 4
            if not 0 <= value < 1 << (8 * width):
                raise ValueError(f"{spec.name} {value} out of range")
            body += ident + value.to_bytes(width, "big")
    return _varint(len(body)) + bytes(body)


def _no_props(props: Properties, version: int) -> None:
    if version == MQTT_311 and props != EMPTY:
        raise ValueError("MQTT 3.1.1 packets carry no properties")


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _check_publish_topic(topic: str, props: Properties, version: int) -> None:
    if "+" in topic or "#" in topic:
        raise ValueError("PUBLISH topic must not contain wildcards")
    if not topic and (version == MQTT_311 or props.topic_alias is None):
        raise ValueError("PUBLISH topic must not be empty (without a topic alias)")


def _enc_connect(p: Connect, version: int) -> bytes:
    if p.protocol_level != version:
        raise ValueError(f"CONNECT protocol_level {p.protocol_level} != version {version}")
    _no_props(p.properties, version)
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will QoS {will.qos}")
        _no_props(will.properties, version)
        _check_publish_topic(will.topic, EMPTY, MQTT_311)
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if version == MQTT_311 and p.username is None:
            raise ValueError("MQTT 3.1.1 needs a username to send a password")
        flags |= 0x40
    parts = [_utf8(p.protocol_name), bytes((version, flags)), _u16(p.keep_alive, "keep-alive")]
    if version == MQTT_5:
        parts.append(_encode_props(p.properties, CONNECT))
    parts.append(_utf8(p.client_id))
    if will is not None:
        if version == MQTT_5:
            parts.append(_encode_props(will.properties, WILL))
        parts.append(_utf8(will.topic))
        parts.append(_binary(will.payload))
    if p.username is not None:
        parts.append(_utf8(p.username))
    if p.password is not None:
        parts.append(_binary(p.password))
    return _frame(0x10, b"".join(parts))


def _enc_connack(p: Connack, version: int) -> bytes:
    _no_props(p.properties, version)
    body = bytes((1 if p.session_present else 0,)) + _byte(p.reason_code, "reason code")
    if version == MQTT_5:
        body += _encode_props(p.properties, CONNACK)
    return _frame(0x20, body)


def _enc_publish(p: Publish, version: int) -> bytes:
    qos = p.qos
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos}")
    if p.dup and not qos:
        raise ValueError("DUP must be 0 for QoS 0")
    props = p.properties
    topic = p.topic
    _check_publish_topic(topic, props, version)
    first = 0x30 | (qos << 1) | (0x08 if p.dup else 0) | (0x01 if p.retain else 0)
    head = _utf8(topic)
    if qos:
        head += _packet_id(p.packet_id)
    elif p.packet_id is not None:
        raise ValueError("QoS 0 PUBLISH has no packet id")
    if version == MQTT_5:
        head += _encode_props(props, PUBLISH)
    elif props is not EMPTY:
        _no_props(props, version)
    n = len(head) + len(p.payload)
    if n < 0x80:
        return bytes((first, n)) + head + p.payload
    return bytes((first,)) + _varint(n) + head + p.payload


def _enc_ack(p: AckPacket, version: int, first: int, ptype: int) -> bytes:
    pid = _packet_id(p.packet_id)
    if version == MQTT_311:
        if p.reason_code:
            raise ValueError("MQTT 3.1.1 acks carry no reason code")
        _no_props(p.properties, version)
        return bytes((first, 2)) + pid
    if p.properties is EMPTY or p.properties == EMPTY:
        if not p.reason_code:
            return bytes((first, 2)) + pid  # short form: success, no properties
        return bytes((first, 3)) + pid + _byte(p.reason_code, "reason code")
    return _frame(
        first, pid + _byte(p.reason_code, "reason code") + _encode_props(p.properties, ptype)
    )


def _enc_subscribe(p: Subscribe, version: int) -> bytes:
    _no_props(p.properties, version)
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription")
    parts = [_packet_id(p.packet_id)]
    if version == MQTT_5:
        parts.append(_encode_props(p.properties, SUBSCRIBE))
    for s in p.subscriptions:
        if not s.topic_filter:
            raise ValueError("empty topic filter")
        if s.qos not in (0, 1, 2) or s.retain_handling not in (0, 1, 2):
            raise ValueError(f"bad subscription options {s}")
        opts = s.qos
        if version == MQTT_5:
            opts |= (
                (0x04 if s.no_local else 0)
                | (0x08 if s.retain_as_published else 0)
                | (s.retain_handling << 4)
            )
        elif s.no_local or s.retain_as_published or s.retain_handling:
            raise ValueError("MQTT 3.1.1 subscriptions have only a QoS")
        parts.append(_utf8(s.topic_filter) + bytes((opts,)))
    return _frame(0x82, b"".join(parts))


def _enc_suback(p: Suback, version: int) -> bytes:
    _no_props(p.properties, version)
    body = _packet_id(p.packet_id)
    if version == MQTT_5:
        body += _encode_props(p.properties, SUBACK)
    return _frame(0x90, body + bytes(p.reason_codes))


def _enc_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    _no_props(p.properties, version)
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_packet_id(p.packet_id)]
    if version == MQTT_5:
        parts.append(_encode_props(p.properties, UNSUBSCRIBE))
    for f in p.topic_filters:
        if not f:
            raise ValueError("empty topic filter")
        parts.append(_utf8(f))
    return _frame(0xA2, b"".join(parts))


def _enc_unsuback(p: Unsuback, version: int) -> bytes:
    body = _packet_id(p.packet_id)
    if version == MQTT_311:
        _no_props(p.properties, version)
        if p.reason_codes:
            raise ValueError("MQTT 3.1.1 UNSUBACK carries no reason codes")
        return _frame(0xB0, body)
    return _frame(0xB0, body + _encode_props(p.properties, UNSUBACK) + bytes(p.reason_codes))


def _enc_disconnect_or_auth(p: Disconnect | Auth, version: int, first: int, ptype: int) -> bytes:
    if version == MQTT_311:
        if ptype == AUTH:
            raise ValueError("AUTH is MQTT 5 only")
        if p.reason_code:
            raise ValueError("MQTT 3.1.1 DISCONNECT carries no reason code")
        _no_props(p.properties, version)
        return bytes((first, 0))
    if p.properties == EMPTY:
        if not p.reason_code:
            return bytes((first, 0))
        return bytes((first, 1)) + _byte(p.reason_code, "reason code")
    return _frame(first, _byte(p.reason_code, "reason code") + _encode_props(p.properties, ptype))


def encode(packet: Packet, version: int) -> bytes:
    """The wire bytes of ``packet`` for protocol level ``version`` (4 = 3.1.1, 5 = 5.0)."""
    if version not in (MQTT_311, MQTT_5):
        raise ValueError(f"unsupported MQTT version {version}")
    if isinstance(packet, Publish):
        return _enc_publish(packet, version)
    if isinstance(packet, Puback):
        return _enc_ack(packet, version, 0x40, PUBACK)
    if isinstance(packet, Pubrec):
        return _enc_ack(packet, version, 0x50, PUBREC)
    if isinstance(packet, Pubrel):
        return _enc_ack(packet, version, 0x62, PUBREL)
    if isinstance(packet, Pubcomp):
        return _enc_ack(packet, version, 0x70, PUBCOMP)
    if isinstance(packet, Connect):
        return _enc_connect(packet, version)
    if isinstance(packet, Connack):
        return _enc_connack(packet, version)
    if isinstance(packet, Subscribe):
        return _enc_subscribe(packet, version)
    if isinstance(packet, Suback):
        return _enc_suback(packet, version)
    if isinstance(packet, Unsubscribe):
        return _enc_unsubscribe(packet, version)
    if isinstance(packet, Unsuback):
        return _enc_unsuback(packet, version)
    if isinstance(packet, Pingreq):
        return b"\xc0\x00"
    if isinstance(packet, Pingresp):
        return b"\xd0\x00"
    if isinstance(packet, Disconnect):
        return _enc_disconnect_or_auth(packet, version, 0xE0, DISCONNECT)
    if isinstance(packet, Auth):
        return _enc_disconnect_or_auth(packet, version, 0xF0, AUTH)
    raise TypeError(f"not an MQTT packet: {packet!r}")


# --------------------------------------------------------------------------- decoding


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(MALFORMED_PACKET, message)


def _protocol(message: str) -> ProtocolError:
    return ProtocolError(PROTOCOL_ERROR, message)


class _Reader:
    """Reads fields from ``buf[pos:end]``; running past ``end`` is a malformed packet."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytearray, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def left(self) -> int:
        return self.end - self.pos

    def u8(self, what: str) -> int:
        pos = self.pos
        if pos >= self.end:
            raise _malformed(f"truncated {what}")
        self.pos = pos + 1
        return self.buf[pos]

    def u16(self, what: str) -> int:
        pos = self.pos
        if pos + 2 > self.end:
            raise _malformed(f"truncated {what}")
        self.pos = pos + 2
        buf = self.buf
        return (buf[pos] << 8) | buf[pos + 1]

    def u32(self, what: str) -> int:
        pos = self.pos
        if pos + 4 > self.end:
            raise _malformed(f"truncated {what}")
        self.pos = pos + 4
        return int.from_bytes(self.buf[pos : pos + 4], "big")

    def varint(self, what: str) -> int:
        value = 0
        shift = 0
        for _ in range(4):
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise _malformed(f"{what}: variable byte integer longer than 4 bytes")

    def binary(self, what: str) -> bytes:
        n = self.u16(what)
        pos = self.pos
        if pos + n > self.end:
            raise _malformed(f"truncated {what}")
        self.pos = pos + n
        return bytes(self.buf[pos : pos + n])

    def utf8(self, what: str) -> str:
        n = self.u16(what)
        pos = self.pos
        end = pos + n
        if end > self.end:
            raise _malformed(f"truncated {what}")
        self.pos = end
        try:
            s = self.buf[pos:end].decode("utf-8")  # strict: rejects surrogates, overlongs
        except UnicodeDecodeError:
            raise _malformed(f"{what} is not valid UTF-8") from None
        if "\x00" in s:
            raise _malformed(f"{what} contains U+0000")
        return s

    def rest(self) -> bytes:
        pos = self.pos
        self.pos = self.end
        return bytes(self.buf[pos : self.end])

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise _malformed(f"{self.end - self.pos} unexpected bytes at the end of {what}")


def _read_props(r: _Reader, ptype: int) -> Properties:
    length = r.varint("property length")
    if not length:
        return EMPTY
    end = r.pos + length
    if end > r.end:
        raise _malformed("property length exceeds the packet")
    outer_end = r.end
    r.end = end
    values: dict[str, object] = {}
    while r.pos < end:
        ident = r.varint("property identifier")
        spec = PROPERTY_TABLE.get(ident)
        if spec is None:
            raise _malformed(f"unknown property identifier 0x{ident:02X}")
        if ptype not in spec.packets:
            raise _protocol(f"property {spec.name} not allowed in this packet")
        t = spec.type
        repeatable = ptype in spec.repeatable_in
        if spec.name in values and not repeatable:
            raise _protocol(f"duplicate property {spec.name}")
        value: object
        if t is PropType.BYTE:
            value = r.u8(spec.name)
            if ident in BOOLEAN_BYTES and value > 1:
                raise _protocol(f"{spec.name} must be 0 or 1")
        elif t is PropType.TWO_BYTE:
            value = r.u16(spec.name)
            if not value:
                if ident == 0x23:
                    raise ProtocolError(TOPIC_ALIAS_INVALID, "topic alias 0")
                if ident in NONZERO:
                    raise _protocol(f"{spec.name} must not be 0")
        elif t is PropType.FOUR_BYTE:
            value = r.u32(spec.name)
            if not value and ident in NONZERO:
                raise _protocol(f"{spec.name} must not be 0")
        elif t is PropType.VARINT:
            value = r.varint(spec.name)
            if not value:
                raise _protocol(f"{spec.name} must not be 0")
        elif t is PropType.UTF8:
            value = r.utf8(spec.name)
        elif t is PropType.BINARY:
            value = r.binary(spec.name)
        else:
            value = (r.utf8("user property name"), r.utf8("user property value"))
        if spec.name in ("user_properties", "subscription_identifiers"):
            existing = values.get(spec.name, ())
            assert isinstance(existing, tuple)
            values[spec.name] = (*existing, value)
        else:
            values[spec.name] = value
    r.end = outer_end
    return Properties(**values)  # type: ignore[arg-type]


def _check_topic_name(topic: str, what: str) -> None:
    if "+" in topic or "#" in topic:
        raise ProtocolError(TOPIC_NAME_INVALID, f"{what} contains a wildcard")


def _dec_connect(r: _Reader) -> Connect:
    name = r.utf8("protocol name")
    level = r.u8("protocol level")
    if name != "MQTT" or level not in (MQTT_311, MQTT_5):
        raise ProtocolError(
            UNSUPPORTED_PROTOCOL_VERSION, f"unsupported protocol {name!r} level {level}"
        )
    flags = r.u8("connect flags")
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise _malformed("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise _malformed("will QoS/retain set without a will")
    has_user = bool(flags & 0x80)
    has_pass = bool(flags & 0x40)
    if level == MQTT_311 and has_pass and not has_user:
        raise _protocol("password without username")
    keep_alive = r.u16("keep-alive")
    props = _read_props(r, CONNECT) if level == MQTT_5 else EMPTY
    client_id = r.utf8("client id")
    will = None
    if will_flag:
        will_props = _read_props(r, WILL) if level == MQTT_5 else EMPTY
        will_topic = r.utf8("will topic")
        if not will_topic:
            raise _protocol("empty will topic")
        _check_topic_name(will_topic, "will topic")
        will = Will(will_topic, r.binary("will payload"), will_qos, will_retain, will_props)
    username = r.utf8("username") if has_user else None
    password = r.binary("password") if has_pass else None
    r.done("CONNECT")
    return Connect(
        client_id, bool(flags & 0x02), keep_alive, username, password, will, props, level, name
    )


def _dec_connack(r: _Reader, version: int) -> Connack:
    flags = r.u8("acknowledge flags")
    if flags & 0xFE:
        raise _malformed("CONNACK reserved flags set")
    code = r.u8("reason code")
    props = _read_props(r, CONNACK) if version == MQTT_5 else EMPTY
    r.done("CONNACK")
    return Connack(bool(flags), code, props)


def _packet_id_of(r: _Reader) -> int:
    pid = r.u16("packet id")
    if not pid:
        raise _protocol("packet id 0")
    return pid


def _dec_publish(r: _Reader, flags: int, version: int) -> Publish:
    qos = (flags >> 1) & 0x03
    buf = r.buf
    pos = r.pos
    # Fast path for the hot packet: topic, packet id and an empty property section read
    # in place; anything unusual falls back to the checked reader.
    if pos + 2 <= r.end:
        start = pos + 2
        tend = start + ((buf[pos] << 8) | buf[pos + 1])
        after = tend + (2 if qos else 0) + (1 if version == MQTT_5 else 0)
        if after <= r.end and (version != MQTT_5 or buf[after - 1] == 0):
            try:
                topic = buf[start:tend].decode("utf-8")
            except UnicodeDecodeError:
                raise _malformed("topic is not valid UTF-8") from None
            if "\x00" in topic:
                raise _malformed("topic contains U+0000")
            pid = None
            if qos:
                pid = (buf[tend] << 8) | buf[tend + 1]
                if not pid:
                    raise _protocol("packet id 0")
            if not topic:
                raise _protocol("empty topic without a topic alias")
            if "+" in topic or "#" in topic:
                raise ProtocolError(TOPIC_NAME_INVALID, "topic contains a wildcard")
            return Publish(
                topic,
                bytes(buf[after : r.end]),
                qos,
                bool(flags & 0x01),
                bool(flags & 0x08),
                pid,
                EMPTY,
            )
    topic = r.utf8("topic")
    pid = _packet_id_of(r) if qos else None
    props = _read_props(r, PUBLISH) if version == MQTT_5 else EMPTY
    if not topic:
        if props.topic_alias is None:
            raise _protocol("empty topic without a topic alias")
    else:
        _check_topic_name(topic, "topic")
    return Publish(topic, r.rest(), qos, bool(flags & 0x01), bool(flags & 0x08), pid, props)


def _dec_ack(r: _Reader, ptype: int, version: int) -> AckPacket:
    pid = _packet_id_of(r)
    code = 0
    props = EMPTY
    if version == MQTT_5:
        if r.left():
            code = r.u8("reason code")
            if r.left():
                props = _read_props(r, ptype)
    r.done("acknowledgement")
    cls = _ACK_CLASSES[ptype]
    return cls(pid, code, props)


_ACK_CLASSES: Final[dict[int, type[Puback] | type[Pubrec] | type[Pubrel] | type[Pubcomp]]] = {
    PUBACK: Puback,
    PUBREC: Pubrec,
    PUBREL: Pubrel,
    PUBCOMP: Pubcomp,
}


def _topic_filter(r: _Reader) -> str:
    f = r.utf8("topic filter")
    if not f:
        raise ProtocolError(TOPIC_FILTER_INVALID, "empty topic filter")
    return f


def _dec_subscribe(r: _Reader, version: int) -> Subscribe:
    pid = _packet_id_of(r)
    props = _read_props(r, SUBSCRIBE) if version == MQTT_5 else EMPTY
    subs: list[Subscription] = []
    while r.left():
        f = _topic_filter(r)
        opts = r.u8("subscription options")
        if opts & (0xC0 if version == MQTT_5 else 0xFC):
            raise _malformed("subscription options reserved bits set")
        qos = opts & 0x03
        if qos == 3:
            raise _malformed("subscription QoS 3")
        retain_handling = (opts >> 4) & 0x03
        if retain_handling == 3:
            raise _protocol("retain handling 3")
        subs.append(Subscription(f, qos, bool(opts & 0x04), bool(opts & 0x08), retain_handling))
    if not subs:
        raise _protocol("SUBSCRIBE without subscriptions")
    return Subscribe(pid, tuple(subs), props)


def _dec_suback(r: _Reader, version: int) -> Suback:
    pid = _packet_id_of(r)
    props = _read_props(r, SUBACK) if version == MQTT_5 else EMPTY
    return Suback(pid, tuple(r.rest()), props)


def _dec_unsubscribe(r: _Reader, version: int) -> Unsubscribe:
    pid = _packet_id_of(r)
    props = _read_props(r, UNSUBSCRIBE) if version == MQTT_5 else EMPTY
    filters: list[str] = []
    while r.left():
        filters.append(_topic_filter(r))
    if not filters:
        raise _protocol("UNSUBSCRIBE without topic filters")
    return Unsubscribe(pid, tuple(filters), props)


def _dec_unsuback(r: _Reader, version: int) -> Unsuback:
    pid = _packet_id_of(r)
    if version == MQTT_311:
        r.done("UNSUBACK")
        return Unsuback(pid)
    props = _read_props(r, UNSUBACK)
    return Unsuback(pid, tuple(r.rest()), props)


def _dec_reason_and_props(r: _Reader, ptype: int, version: int) -> tuple[int, Properties]:
    code = 0
    props = EMPTY
    if version == MQTT_5 and r.left():
        code = r.u8("reason code")
        if r.left():
            props = _read_props(r, ptype)
    r.done("DISCONNECT" if ptype == DISCONNECT else "AUTH")
    return code, props


# Required fixed-header flags (low nibble) per packet type; PUBLISH is checked separately.
_FLAGS: Final = {
    CONNECT: 0,
    CONNACK: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    SUBACK: 0,
    UNSUBSCRIBE: 2,
    UNSUBACK: 0,
    PINGREQ: 0,
    PINGRESP: 0,
    DISCONNECT: 0,
    AUTH: 0,
}


@dataclass
class Decoder:
    """Incremental MQTT decoder for one connection.

    ``version`` is 4 or 5 when known (client side); ``None`` means "learn it from CONNECT",
    which must then be the first packet. ``max_packet_size`` bounds the whole packet
    (fixed header included, as MQTT 5's Maximum Packet Size does); it is checked as soon as
    the fixed header has arrived, before the body is waited for.
    """

    version: int | None = None
    max_packet_size: int = MAX_PACKET_SIZE
    _buf: bytearray = field(default_factory=bytearray, repr=False)
    _error: ProtocolError | None = field(default=None, repr=False)
    _learned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.version not in (None, MQTT_311, MQTT_5):
            raise ValueError(f"unsupported MQTT version {self.version}")

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete packet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        """Add received bytes; return the packets they complete, in order."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[Packet] = []
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                first = buf[pos]
                # Remaining length: a variable byte integer of at most 4 bytes.
                i = pos + 1
                length = 0
                shift = 0
                while True:
                    if i >= n:
                        length = -1
                        break
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        break
                    shift += 7
                    if shift == 28:
                        raise _malformed("remaining length longer than 4 bytes")
                self._check_header(first)
                if length < 0:
                    break
                total = i - pos + length
                if total > self.max_packet_size:
                    raise ProtocolError(
                        PACKET_TOO_LARGE, f"packet of {total} bytes exceeds {self.max_packet_size}"
                    )
                end = i + length
                if end > n:
                    break
                out.append(self._decode(first, _Reader(buf, i, end)))
                pos = end
        except ProtocolError as err:
            err.decoded = list(out)
            self._error = err
            self._buf = bytearray()
            raise
        if pos:
            del buf[:pos]
        return out

    def _check_header(self, first: int) -> None:
        ptype = first >> 4
        flags = first & 0x0F
        version = self.version
        if ptype == 0 or (ptype == AUTH and version == MQTT_311):
            raise _malformed(f"unknown packet type {ptype}")
        if version is None:
            if ptype != CONNECT:
                raise _protocol("the first packet must be CONNECT")
        elif ptype == CONNECT and self._learned:
            raise _protocol("second CONNECT")
        if ptype == PUBLISH:
            qos = (flags >> 1) & 0x03
            if qos == 3:
                raise _malformed("PUBLISH QoS 3")
            if not qos and flags & 0x08:
                raise _malformed("DUP set on a QoS 0 PUBLISH")
        elif flags != _FLAGS[ptype]:
            raise _malformed(f"reserved flags 0x{flags:X} wrong for packet type {ptype}")

    def _decode(self, first: int, r: _Reader) -> Packet:
        ptype = first >> 4
        if ptype == PUBLISH:
            assert self.version is not None
            return _dec_publish(r, first & 0x0F, self.version)
        if ptype == CONNECT:
            connect = _dec_connect(r)
            if self.version is None:
                self.version = connect.protocol_level
                self._learned = True
            return connect
        version = self.version
        assert version is not None
        if PUBACK <= ptype <= PUBCOMP:
            return _dec_ack(r, ptype, version)
        if ptype == CONNACK:
            return _dec_connack(r, version)
        if ptype == SUBSCRIBE:
            return _dec_subscribe(r, version)
        if ptype == SUBACK:
            return _dec_suback(r, version)
        if ptype == UNSUBSCRIBE:
            return _dec_unsubscribe(r, version)
        if ptype == UNSUBACK:
            return _dec_unsuback(r, version)
        if ptype == PINGREQ or ptype == PINGRESP:
            r.done("PING")
            return Pingreq() if ptype == PINGREQ else Pingresp()
        code, props = _dec_reason_and_props(r, ptype, version)
        return Disconnect(code, props) if ptype == DISCONNECT else Auth(code, props)


def decode_all(data: bytes, version: int | None = None) -> list[Packet]:
    """Decode ``data`` that holds whole packets only (a convenience for tests and tools)."""
    dec = Decoder(version)
    packets = dec.feed(data)
    if dec.buffered:
        raise _malformed(f"{dec.buffered} bytes of an incomplete packet")
    return packets
