"""MQTT reason codes corral sends: v3.1.1 CONNACK return codes and v5 reason codes, and
what a refused device publish becomes in an MQTT 5 PUBACK."""

from __future__ import annotations

from typing import Final

# v3.1.1 CONNACK return codes
V3_UNACCEPTABLE_PROTOCOL: Final = 1
V3_IDENTIFIER_REJECTED: Final = 2
V3_SERVER_UNAVAILABLE: Final = 3
V3_BAD_CREDENTIALS: Final = 4
V3_NOT_AUTHORIZED: Final = 5
# v5 reason codes
RC_NO_SUBSCRIPTION: Final = 0x11
RC_NORMAL_WITH_WILL: Final = 0x04
RC_UNSPECIFIED: Final = 0x80
RC_PROTOCOL_ERROR: Final = 0x82
RC_IMPLEMENTATION: Final = 0x83
RC_CLIENT_ID_INVALID: Final = 0x85
RC_BAD_CREDENTIALS: Final = 0x86
RC_NOT_AUTHORIZED: Final = 0x87
RC_SERVER_UNAVAILABLE: Final = 0x88
RC_SERVER_BUSY: Final = 0x89
RC_BAD_AUTH_METHOD: Final = 0x8C
RC_KEEP_ALIVE_TIMEOUT: Final = 0x8D
RC_SESSION_TAKEN_OVER: Final = 0x8E
RC_SHUTTING_DOWN: Final = 0x8B
RC_TOPIC_FILTER_INVALID: Final = 0x8F
RC_TOPIC_NAME_INVALID: Final = 0x90
RC_TOPIC_ALIAS_INVALID: Final = 0x94
RC_QUOTA_EXCEEDED: Final = 0x97
RC_ADMINISTRATIVE: Final = 0x98
RC_PAYLOAD_INVALID: Final = 0x99
RC_RETAIN_NOT_SUPPORTED: Final = 0x9A
RC_QOS_NOT_SUPPORTED: Final = 0x9B
RC_SHARED_NOT_SUPPORTED: Final = 0x9E
RC_SUB_IDS_NOT_SUPPORTED: Final = 0xA1

# What a refused device publish becomes in an MQTT 5 PUBACK.
PUBACK_CODES: Final[dict[str, int]] = {
    "rate_limited": RC_QUOTA_EXCEEDED,
    "paused": RC_QUOTA_EXCEEDED,
    "invalid": RC_PAYLOAD_INVALID,
    "too_large": RC_PAYLOAD_INVALID,
    "forbidden": RC_NOT_AUTHORIZED,
}
