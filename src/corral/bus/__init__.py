"""The bus between corral's parts: one :class:`Bus` protocol, several implementations.

Domain code imports from here and never names an implementation; the server entry point
chooses one (``InProcessBus`` for a single node; a NATS bus for many).
"""

from corral.bus.base import (
    Bus,
    BusClosed,
    BusError,
    BusTimeout,
    Handler,
    Message,
    NoResponders,
    Payload,
    Subscription,
    encode_payload,
    matches,
    validate_pattern,
    validate_subject,
)
from corral.bus.inprocess import InProcessBus

__all__ = [
    "Bus",
    "BusClosed",
    "BusError",
    "BusTimeout",
    "Handler",
    "InProcessBus",
    "Message",
    "NoResponders",
    "Payload",
    "Subscription",
    "encode_payload",
    "matches",
    "validate_pattern",
    "validate_subject",
]
