"""MQTT 5 properties: the identifier table (MQTT 5.0 §2.2.2.2) and the typed container.

Each property has an identifier, a wire type, and the set of packets that may carry it.
``Properties`` holds them with one attribute each; the two repeatable ones (User Property,
Subscription Identifier in PUBLISH) are tuples. An absent property is ``None`` (or ``()``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Final

from corral.kit.errors import CorralError

# Packet type numbers (MQTT §2.1.2). WILL is a pseudo type for the will properties in CONNECT.
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15
WILL: Final = 16

# MQTT 5 reason codes the codec raises (§2.4). The gateway maps them to a close.
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
TOPIC_NAME_INVALID: Final = 0x90
PACKET_TOO_LARGE: Final = 0x95
TOPIC_ALIAS_INVALID: Final = 0x94


class ProtocolError(CorralError):
    """Malformed or forbidden MQTT input; the connection must be closed.

    ``reason_code`` is an MQTT 5 reason code (0x81 malformed, 0x82 protocol error, ...);
    for an MQTT 5 peer the gateway sends DISCONNECT with it, for 3.1.1 it just closes.
    ``decoded`` holds packets completed earlier in the same ``feed`` call, if any.
    """

    status = 400
    code = "mqtt_protocol_error"

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
        self.decoded: list[object] = []

    def __repr__(self) -> str:
        return f"ProtocolError(0x{self.reason_code:02X}, {self.message!r})"


class PropType(Enum):
    BYTE = "byte"
    TWO_BYTE = "two-byte int"
    FOUR_BYTE = "four-byte int"
    VARINT = "varint"
    UTF8 = "utf8"
    BINARY = "binary"
    UTF8_PAIR = "utf8 pair"


@dataclass(frozen=True, slots=True)
class PropSpec:
    ident: int
    name: str  # attribute name on Properties
    type: PropType
    packets: frozenset[int]  # packet types (or WILL) that may carry it
    repeatable_in: frozenset[int] = frozenset()  # where it may appear more than once


_ACKS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP})
_ALL_USER = frozenset(
    {
        CONNECT,
        CONNACK,
        PUBLISH,
        WILL,
        PUBACK,
        PUBREC,
        PUBREL,
        PUBCOMP,
        SUBSCRIBE,
        SUBACK,
        UNSUBSCRIBE,
        UNSUBACK,
        DISCONNECT,
        AUTH,
    }
)


def _p(*types: int) -> frozenset[int]:
    return frozenset(types)


PROPERTY_TABLE: Final[dict[int, PropSpec]] = {
    s.ident: s
    for s in (
        PropSpec(0x01, "payload_format_indicator", PropType.BYTE, _p(PUBLISH, WILL)),
        PropSpec(0x02, "message_expiry_interval", PropType.FOUR_BYTE, _p(PUBLISH, WILL)),
        PropSpec(0x03, "content_type", PropType.UTF8, _p(PUBLISH, WILL)),
        PropSpec(0x08, "response_topic", PropType.UTF8, _p(PUBLISH, WILL)),
        PropSpec(0x09, "correlation_data", PropType.BINARY, _p(PUBLISH, WILL)),
        PropSpec(
            0x0B,
            "subscription_identifiers",
            PropType.VARINT,
            _p(PUBLISH, SUBSCRIBE),
            repeatable_in=_p(PUBLISH),
        ),
        PropSpec(
            0x11, "session_expiry_interval", PropType.FOUR_BYTE, _p(CONNECT, CONNACK, DISCONNECT)
        ),
        PropSpec(0x12, "assigned_client_identifier", PropType.UTF8, _p(CONNACK)),
        PropSpec(0x13, "server_keep_alive", PropType.TWO_BYTE, _p(CONNACK)),
        PropSpec(0x15, "authentication_method", PropType.UTF8, _p(CONNECT, CONNACK, AUTH)),
        PropSpec(0x16, "authentication_data", PropType.BINARY, _p(CONNECT, CONNACK, AUTH)),
        PropSpec(0x17, "request_problem_information", PropType.BYTE, _p(CONNECT)),
        PropSpec(0x18, "will_delay_interval", PropType.FOUR_BYTE, _p(WILL)),
        PropSpec(0x19, "request_response_information", PropType.BYTE, _p(CONNECT)),
        PropSpec(0x1A, "response_information", PropType.UTF8, _p(CONNACK)),
        PropSpec(0x1C, "server_reference", PropType.UTF8, _p(CONNACK, DISCONNECT)),
        PropSpec(
            0x1F,
            "reason_string",
            PropType.UTF8,
            _ACKS | _p(CONNACK, SUBACK, UNSUBACK, DISCONNECT, AUTH),
        ),
        PropSpec(0x21, "receive_maximum", PropType.TWO_BYTE, _p(CONNECT, CONNACK)),
        PropSpec(0x22, "topic_alias_maximum", PropType.TWO_BYTE, _p(CONNECT, CONNACK)),
        PropSpec(0x23, "topic_alias", PropType.TWO_BYTE, _p(PUBLISH)),
        PropSpec(0x24, "maximum_qos", PropType.BYTE, _p(CONNACK)),
        PropSpec(0x25, "retain_available", PropType.BYTE, _p(CONNACK)),
        PropSpec(0x26, "user_properties", PropType.UTF8_PAIR, _ALL_USER, repeatable_in=_ALL_USER),
        PropSpec(0x27, "maximum_packet_size", PropType.FOUR_BYTE, _p(CONNECT, CONNACK)),
        PropSpec(0x28, "wildcard_subscription_available", PropType.BYTE, _p(CONNACK)),
        PropSpec(0x29, "subscription_identifier_available", PropType.BYTE, _p(CONNACK)),
        PropSpec(0x2A, "shared_subscription_available", PropType.BYTE, _p(CONNACK)),
    )
}
PROPERTY_BY_NAME: Final[dict[str, PropSpec]] = {s.name: s for s in PROPERTY_TABLE.values()}

# Byte properties whose only legal values are 0 and 1 (a 2 is a protocol error).
BOOLEAN_BYTES: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
# Integer properties for which 0 is a protocol error.
NONZERO: Final = frozenset({0x0B, 0x21, 0x27})


@dataclass(frozen=True, slots=True, repr=False)
class Properties:
    """MQTT 5 properties of one packet (or of a will). All optional."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def __repr__(self) -> str:
        inner = ", ".join(f"{spec.name}={value!r}" for spec, value in self.present())
        return f"Properties({inner})"

    def present(self) -> list[tuple[PropSpec, object]]:
        """The properties that are set, in identifier order."""
        out: list[tuple[PropSpec, object]] = []
        for spec in PROPERTY_TABLE.values():
            value = getattr(self, spec.name)
            if value is not None and value != ():
                out.append((spec, value))
        return out


EMPTY: Final = Properties()

# Keep the table and the dataclass in step (checked at import, cheap).
assert {f.name for f in fields(Properties)} == set(PROPERTY_BY_NAME)
