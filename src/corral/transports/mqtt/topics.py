"""The MQTT topic contract (docs/mqtt.md): which topics a device may publish and subscribe to.

Pure functions over strings; the server maps the results to session calls. A device only
ever talks about itself: every topic starts with ``devices/{its id}/`` (the ID is compared
case-insensitively; corral writes it in lower case).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

DEVICE_ID_RE: Final = re.compile(r"^[0-9a-fA-F]{24}$")
ROOT: Final = "devices"

PublishKind = Literal["event", "describe", "reply", "claim", "ota_status", "diagnostics",
                      "ledger_applied", "ledger_set", "ledger_sync"]
SubscribeKind = Literal["requests", "inbox", "ota", "ledgers"]
LEDGER_NAME_RE: Final = re.compile(r"^[a-z0-9-]{1,32}$")


@dataclass(frozen=True, slots=True)
class PublishTarget:
    """What a device's PUBLISH topic means: ``kind`` and its argument (the event name for
    ``event``, the request id for ``reply``, the ledger's name for ``ledger_applied`` and
    ``ledger_set``, empty otherwise)."""

    kind: PublishKind
    arg: str = ""


@dataclass(frozen=True, slots=True)
class SubscribeTarget:
    """What a device's topic filter means: ``requests``, ``inbox`` (``arg`` is the event name
    prefix, empty for every event) or ``ota``."""

    kind: SubscribeKind
    arg: str = ""


def is_device_id(value: str) -> bool:
    return DEVICE_ID_RE.fullmatch(value) is not None


def _own_rest(device_id: str, topic: str) -> str | None:
    """``topic`` without its ``devices/{device_id}/`` head, or None if it is not the
    device's own."""
    parts = topic.split("/", 2)
    if len(parts) != 3 or parts[0] != ROOT or parts[1].lower() != device_id:
        return None
    return parts[2]


def request_topic(device_id: str, request_id: str) -> str:
    return f"{ROOT}/{device_id}/requests/{request_id}"


def inbox_topic(device_id: str, event_name: str) -> str:
    return f"{ROOT}/{device_id}/inbox/{event_name}"


def events_topic(device_id: str, event_name: str) -> str:
    return f"{ROOT}/{device_id}/events/{event_name}"


def ota_topic(device_id: str, sub: str) -> str:
    """``devices/{id}/ota/{sub}``: ``offer`` and ``pending`` go to the device, ``status``
    comes from it."""
    return f"{ROOT}/{device_id}/ota/{sub}"


def ledger_topic(device_id: str, name: str) -> str:
    """``devices/{id}/ledgers/{name}``: a cloud-to-device ledger's document."""
    return f"{ROOT}/{device_id}/ledgers/{name}"


def _ledger_publish(rest: str) -> PublishTarget | None:
    """``ledgers/sync``, ``ledgers/{name}/applied``, ``ledgers/{name}/set``."""
    if rest == "sync":
        return PublishTarget("ledger_sync")
    name, _, verb = rest.partition("/")
    if LEDGER_NAME_RE.fullmatch(name) is None:
        return None
    if verb == "applied":
        return PublishTarget("ledger_applied", name)
    if verb == "set":
        return PublishTarget("ledger_set", name)
    return None


def parse_publish(device_id: str, topic: str) -> PublishTarget | None:
    """The meaning of a PUBLISH from ``device_id`` (lower case) on ``topic``; None when the
    device may not publish there."""
    rest = _own_rest(device_id, topic)
    if rest is None:
        return None
    if rest.startswith("events/"):
        name = rest[len("events/"):]
        return PublishTarget("event", name) if name else None
    if rest == "describe":
        return PublishTarget("describe")
    if rest == "claim":
        return PublishTarget("claim")
    if rest == "diagnostics":
        return PublishTarget("diagnostics")
    if rest == "ota/status":
        return PublishTarget("ota_status")
    if rest.startswith("ledgers/"):
        return _ledger_publish(rest[len("ledgers/"):])
    if rest.startswith("replies/"):
        rid = rest[len("replies/"):]
        return PublishTarget("reply", rid) if rid and "/" not in rid else None
    return None


def parse_filter(device_id: str, topic_filter: str) -> SubscribeTarget | None:
    """The meaning of a SUBSCRIBE/UNSUBSCRIBE topic filter from ``device_id`` (lower case);
    None when the device may not subscribe to it.

    ``requests/+`` and ``requests/#`` receive requests; ``inbox/#`` every event in scope;
    ``inbox/{prefix}`` (no wildcard) events whose names start with ``prefix``; ``ota/#``
    is reserved for firmware updates, ``ledgers/#`` for cloud-to-device ledgers. Anything
    else is refused."""
    rest = _own_rest(device_id, topic_filter)
    if rest is None:
        return None
    if rest in ("requests/+", "requests/#"):
        return SubscribeTarget("requests")
    if rest == "ota/#":
        return SubscribeTarget("ota")
    if rest in ("ledgers/#", "ledgers/+"):
        return SubscribeTarget("ledgers")
    if rest == "inbox/#":
        return SubscribeTarget("inbox", "")
    if rest.startswith("inbox/"):
        prefix = rest[len("inbox/"):]
        if prefix and "+" not in prefix and "#" not in prefix:
            return SubscribeTarget("inbox", prefix)
    return None


__all__ = ["PublishTarget", "SubscribeTarget", "events_topic", "inbox_topic", "is_device_id",
           "ledger_topic", "ota_topic", "parse_filter", "parse_publish", "request_topic"]
