"""What the device SDK raises, and the names of MQTT's reason codes."""

from __future__ import annotations

from typing import Final

# MQTT 3.1.1 CONNACK return codes (§3.2.2.3).
CONNACK_311: Final[dict[int, str]] = {
    1: "Unacceptable protocol version",
    2: "Identifier rejected",
    3: "Server unavailable",
    4: "Bad user name or password",
    5: "Not authorized",
}

# MQTT 5 reason codes (§2.4) a device can receive.
REASONS_5: Final[dict[int, str]] = {
    0x00: "Success",
    0x04: "Disconnect with will message",
    0x10: "No matching subscribers",
    0x80: "Unspecified error",
    0x81: "Malformed packet",
    0x82: "Protocol error",
    0x83: "Implementation specific error",
    0x84: "Unsupported protocol version",
    0x85: "Client identifier not valid",
    0x86: "Bad user name or password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic filter invalid",
    0x90: "Topic name invalid",
    0x91: "Packet identifier in use",
    0x93: "Receive maximum exceeded",
    0x94: "Topic alias invalid",
    0x95: "Packet too large",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription identifiers not supported",
    0xA2: "Wildcard subscriptions not supported",
}

# Refusals that retrying with the same settings cannot cure: wrong secret, an ID the server
# will never accept, a protocol it does not speak. ("Not authorized" is not among them: a
# quarantined device may be approved later.)
PERMANENT_311: Final = frozenset({1, 2, 4})
PERMANENT_5: Final = frozenset({0x84, 0x85, 0x86, 0x8A, 0x8C})


def reason_name(code: int, protocol: int = 5) -> str:
    """A readable name for a reason code (a CONNACK return code with ``protocol=4``)."""
    table = CONNACK_311 if protocol == 4 else REASONS_5
    return table.get(code, f"reason 0x{code:02X}")


class DeviceSDKError(Exception):
    """Base class of everything :mod:`corral.device` raises on purpose."""


class ConnectError(DeviceSDKError):
    """A connection attempt failed: the server refused it (``reason_code`` set, as sent in
    CONNACK) or it could not be made (``reason_code`` is ``None``: network, TLS, timeout).

    ``permanent`` is true when trying again with the same settings cannot succeed (a wrong
    secret, say); :meth:`Device.run_forever` gives up on those and raises.
    """

    def __init__(self, reason: str, *, reason_code: int | None = None, protocol: int = 5,
                 server_reason: str | None = None) -> None:
        self.reason = reason
        self.reason_code = reason_code
        self.server_reason = server_reason
        permanent = PERMANENT_311 if protocol == 4 else PERMANENT_5
        self.permanent = reason_code is not None and reason_code in permanent
        text = reason
        if reason_code is not None:
            text = f"connection refused: {reason} (code 0x{reason_code:02X})"
            if server_reason:
                text += f": {server_reason}"
        super().__init__(text)


class PublishRefused(DeviceSDKError):
    """The server refused a QoS 1 publish (MQTT 5 PUBACK with a reason code >= 0x80), for
    example ``0x97`` "Quota exceeded" for a rate-limited event or ``0x87`` "Not authorized"."""

    def __init__(self, topic: str, reason_code: int, server_reason: str | None = None) -> None:
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason_name(reason_code)
        self.server_reason = server_reason
        text = f"publish to {topic} refused: {self.reason} (code 0x{reason_code:02X})"
        if server_reason:
            text += f": {server_reason}"
        super().__init__(text)


class SubscribeRefused(DeviceSDKError):
    """The server refused a subscription (SUBACK code >= 0x80)."""

    def __init__(self, topic_filter: str, reason_code: int) -> None:
        self.topic_filter = topic_filter
        self.reason_code = reason_code
        super().__init__(f"subscription to {topic_filter} refused: "
                         f"{reason_name(reason_code)} (code 0x{reason_code:02X})")


class NotConnected(DeviceSDKError):
    """There is no connection (yet, or any more) to do this over; for a QoS 1 publish: the
    connection ended before the server acknowledged it, so it may or may not be stored."""


__all__ = ["CONNACK_311", "REASONS_5", "ConnectError", "DeviceSDKError", "NotConnected",
           "PublishRefused", "SubscribeRefused", "reason_name"]
