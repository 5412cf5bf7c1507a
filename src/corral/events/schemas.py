"""Request and answer models of cloud publishes and stored event history."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from corral.kit.body import Flag, Int, RequestModel, Timestamp
from corral.kit.responses import Answer

PREFIX_MAX = 64  # event names are at most 64 characters
MAX_LIMIT = 1000


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters")
    return value


def _device_id(value: str) -> str:
    if len(value) != 24 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ValueError("must be 24 hexadecimal characters")
    return value.lower()


class EventPublish(RequestModel):
    """A cloud publish: ``name`` (required), ``data`` (text; numbers, booleans and JSON
    objects are stored as their JSON text), ``ttl`` (seconds), ``private`` (default true)."""

    name: str | None = Field(None, max_length=200, description="The event name (required)")
    data: str | int | float | bool | dict[str, Any] | list[Any] | None = None
    ttl: Int = Field(60, ge=0, le=2**31 - 1)
    private: Flag | None = None


class EventLogQuery(RequestModel):
    """Filters of an ``event_log``: ``name`` (a prefix), ``device_id``, ``since``/``until``
    (ISO 8601; no offset means UTC), ``before_id`` (paging), ``limit``."""

    name: Annotated[str, AfterValidator(_printable)] | None = Field(
        None, max_length=PREFIX_MAX, description="A name prefix")
    device_id: Annotated[str, AfterValidator(_device_id)] | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    limit: Int = Field(100, ge=1, le=MAX_LIMIT)
    before_id: Int | None = Field(None, ge=1, le=2**63 - 1)

    def filters(self) -> dict[str, Any]:
        return {"name_prefix": self.name, "device_id": self.device_id, "since": self.since,
                "until": self.until, "limit": self.limit, "before_id": self.before_id}


class StoredEvent(Answer):
    id: int
    name: str
    data: str | None
    ttl: int
    published_at: str | None
    coreid: str


class EventLogAnswer(Answer):
    events: list[StoredEvent]
    next_before_id: int | None
