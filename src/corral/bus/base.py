"""The bus contract every part of corral talks through.

Domain code, the session core and transports depend only on :class:`Bus`; which
implementation runs (in-process for one node, NATS for many) is a deployment choice.
The contract deliberately stays inside what core NATS offers: subjects with ``*`` and
``>`` wildcards, queue groups, request/reply with a "no responders" signal, at-most-once
delivery, and no persistence. Anything that must not be lost goes through the database.

Subjects are ``.``-separated tokens of ``[A-Za-z0-9_-]`` (for example
``device.0123abcd.call``). Free text such as Particle event names (which may contain
``/``) belongs in the payload, not in the subject.
"""

from __future__ import annotations

import json as _json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Bus",
    "BusClosed",
    "BusError",
    "BusTimeout",
    "Handler",
    "Message",
    "NoResponders",
    "Payload",
    "Subscription",
    "encode_payload",
    "matches",
    "validate_pattern",
    "validate_subject",
]

Payload = bytes | dict[str, Any]
"""What may be published: raw bytes, or a dict sent as compact UTF-8 JSON."""

_TOKEN = r"[A-Za-z0-9_-]+"
_SUBJECT_RE = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_PATTERN_RE = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>")


class BusError(Exception):
    """Base class of all bus errors."""


class NoResponders(BusError):
    """A request was published and no subscription was there to receive it."""


class BusTimeout(BusError, TimeoutError):
    """A request got no reply within its timeout."""


class BusClosed(BusError):
    """The bus was closed; it accepts no more publishes, subscriptions or requests."""


def validate_subject(subject: str) -> str:
    """Return ``subject`` if it is a concrete subject (no wildcards), else raise ``ValueError``."""
    if not isinstance(subject, str) or _SUBJECT_RE.fullmatch(subject) is None:
        raise ValueError(f"invalid bus subject: {subject!r}")
    return subject


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise ``ValueError``.

    A pattern is a subject whose tokens may also be ``*`` (exactly one token); its last
    token may be ``>`` (one or more remaining tokens).
    """
    if not isinstance(pattern, str) or _PATTERN_RE.fullmatch(pattern) is None:
        raise ValueError(f"invalid bus subscription pattern: {pattern!r}")
    return pattern


def matches(pattern: str, subject: str) -> bool:
    """Whether the concrete ``subject`` matches the subscription ``pattern`` (NATS rules).

    Both arguments are assumed valid (see :func:`validate_pattern`, :func:`validate_subject`).
    """
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(p) == len(s)


def encode_payload(payload: Payload) -> bytes:
    """Bytes as given; a dict as compact UTF-8 JSON. Anything else is a ``TypeError``."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, dict):
        return _json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raise TypeError(f"bus payload must be bytes or dict, not {type(payload).__name__}")


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message.

    ``reply`` is set when the sender used :meth:`Bus.request`; answer with
    :meth:`respond`. Messages are built by the bus implementation, which passes itself
    as ``bus`` so that :meth:`respond` can publish the reply.
    """

    subject: str
    data: bytes
    reply: str | None = None
    bus: Bus | None = field(default=None, repr=False, compare=False)

    def json(self) -> Any:
        """The payload decoded as JSON (raises ``ValueError`` if it is not JSON)."""
        return _json.loads(self.data)

    async def respond(self, payload: Payload) -> None:
        """Reply to a request. Raises ``ValueError`` if this message expects no reply."""
        if self.reply is None:
            raise ValueError("message has no reply subject; it was not sent with request()")
        if self.bus is None:
            raise ValueError("message is not bound to a bus")
        await self.bus.publish(self.reply, payload)


Handler = Callable[[Message], Awaitable[None]]
"""A subscription callback. Exceptions it raises are logged by the bus, never propagated."""


@runtime_checkable
class Subscription(Protocol):
    """A live subscription returned by :meth:`Bus.subscribe`."""

    @property
    def pattern(self) -> str:
        """The subject pattern subscribed to."""
        ...

    @property
    def queue(self) -> str | None:
        """The queue group name, or ``None`` for a plain subscription."""
        ...

    @property
    def dropped(self) -> int:
        """Messages discarded because this subscriber fell too far behind.

        Each implementation bounds the messages pending for one subscription; which message
        is discarded on overflow is implementation-defined (in-process: the oldest).
        """
        ...

    async def unsubscribe(self) -> None:
        """Stop delivery now; pending undelivered messages are discarded. Idempotent.

        Safe to call from inside this subscription's own handler.
        """
        ...


@runtime_checkable
class Bus(Protocol):
    """Subject-based messaging between corral's parts (at-most-once, unordered across
    subscriptions, ordered within one subscription for messages from one publisher)."""

    async def publish(self, subject: str, payload: Payload) -> None:
        """Send ``payload`` to every matching subscription (fire and forget).

        Plain subscriptions each get a copy; each queue group (same pattern, same queue
        name) gets one copy, delivered to one of its members. Returns without waiting for
        any handler. Invalid subject: ``ValueError``; after :meth:`close`: ``BusClosed``.
        """
        ...

    async def subscribe(
        self, pattern: str, handler: Handler, *, queue: str | None = None
    ) -> Subscription:
        """Call ``handler`` for each message whose subject matches ``pattern``.

        ``*`` matches exactly one token, a final ``>`` one or more. With ``queue``, the
        subscription joins that queue group: each message goes to one member only. Calls
        for one subscription run one at a time, in delivery order; a slow or failing
        handler never blocks the publisher or other subscriptions.
        Invalid pattern or queue name: ``ValueError``.
        """
        ...

    async def request(self, subject: str, payload: Payload, *, timeout: float) -> Message:  # noqa: ASYNC109 (NATS-style API)
        """Publish with a reply subject and return the first reply.

        The responder answers with ``await msg.respond(...)``. Raises ``NoResponders`` if
        no subscription received the request, ``BusTimeout`` if no reply came within
        ``timeout`` seconds.
        """
        ...

    async def close(self) -> None:
        """Stop all subscriptions and fail pending requests with ``BusClosed``. Idempotent."""
        ...
