"""Presence changes written in batches, in order, through the event writer.

A connection storm must not become thousands of small write transactions (on SQLite they
queue on the database's single write lock). The device-session core hands each change to
the event writer together with its ``spark/status`` event; the writer applies a batch's
changes in one transaction, in arrival order, so a device that connects and disconnects
within one batch ends offline, and an offline change of an older session never overrides
a newer session (it applies only while ``last_handshake_at`` is still that session's).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Table, and_, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.models import Device

DEVICES: Table = Device.__table__  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True, slots=True)
class Online:
    """A session was accepted at ``at`` (its handshake time identifies it)."""

    device_id: str
    at: dt.datetime
    ip: str | None = None
    transport: str | None = None
    firmware_version: int | None = None
    system_version: str | None = None
    node: str | None = None  # the node holding the session (scaled out; None: single node)


@dataclasses.dataclass(frozen=True, slots=True)
class Offline:
    """The session that was accepted at ``handshake_at`` ended at ``at``."""

    device_id: str
    at: dt.datetime
    handshake_at: dt.datetime
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Described:
    """The device described itself; ``None`` keeps a field as it was."""

    device_id: str
    functions: list[str] | None = None
    variables: dict[str, str] | None = None
    firmware_version: int | None = None
    system_version: str | None = None
    updates_enabled: bool | None = None


Change = Online | Offline | Described

_ONLINE = (
    update(DEVICES).where(DEVICES.c.id == bindparam("did")).values(
        online=True, last_heard=bindparam("at"), last_handshake_at=bindparam("at"),
        node_id=bindparam("node"),
        first_online_at=func.coalesce(DEVICES.c.first_online_at, bindparam("at")),
        last_ip_address=func.coalesce(bindparam("ip"), DEVICES.c.last_ip_address),
        transport=func.coalesce(bindparam("transport"), DEVICES.c.transport),
        firmware_version=func.coalesce(bindparam("fw"), DEVICES.c.firmware_version),
        system_firmware_version=func.coalesce(bindparam("sv"),
                                              DEVICES.c.system_firmware_version),
    )
)
_OFFLINE = (
    update(DEVICES)
    .where(and_(DEVICES.c.id == bindparam("did"),
                DEVICES.c.last_handshake_at == bindparam("handshake")))
    .values(online=False, last_heard=bindparam("at"), last_disconnect_at=bindparam("at"),
            last_disconnect_reason=bindparam("reason"))
)


# A describe that leaves functions or variables out (None) must bind SQL NULL, so that
# coalesce keeps the stored value: the columns' plain JSON type binds None as the JSON
# text 'null', which coalesce would keep instead (Device OS's updates/enabled event at every
# connect wiped the device's functions and variables that way).
_JSON_OR_NULL = JSON(none_as_null=True)
_DESCRIBED = (
    update(DEVICES).where(DEVICES.c.id == bindparam("did")).values(
        functions=func.coalesce(bindparam("functions", type_=_JSON_OR_NULL),
                                DEVICES.c.functions),
        variables=func.coalesce(bindparam("variables", type_=_JSON_OR_NULL),
                                DEVICES.c.variables),
        firmware_version=func.coalesce(bindparam("fw"), DEVICES.c.firmware_version),
        system_firmware_version=func.coalesce(bindparam("sv"),
                                              DEVICES.c.system_firmware_version),
        firmware_updates_enabled=func.coalesce(
            bindparam("updates", type_=DEVICES.c.firmware_updates_enabled.type),
            DEVICES.c.firmware_updates_enabled),
    )
)
_STATEMENTS: dict[type, Any] = {}


def _params(c: Change) -> dict[str, Any]:
    if isinstance(c, Described):
        return {"did": c.device_id, "functions": c.functions, "variables": c.variables,
                "fw": c.firmware_version, "sv": c.system_version, "updates": c.updates_enabled}
    if isinstance(c, Online):
        return {"did": c.device_id, "at": c.at, "ip": c.ip[:64] if c.ip else None,
                "transport": c.transport, "fw": c.firmware_version, "node": c.node,
                "sv": c.system_version[:32] if c.system_version else None}
    return {"did": c.device_id, "at": c.at, "handshake": c.handshake_at,
            "reason": c.reason[:200]}


async def apply(db: AsyncSession, changes: Sequence[Change]) -> None:
    """Apply ``changes`` in order in the session's transaction: consecutive changes of one
    kind for distinct devices go out as one executemany.

    On PostgreSQL the rows are first locked in device-id order, the order every other
    multi-row device update (``touch_each``) takes them in: statements applied in arrival
    order would otherwise lock B before A while another transaction holds A and waits for B
    (a deadlock, seen in a connection burst of three devices)."""
    if not changes:
        return
    if db.get_bind().dialect.name == "postgresql":
        ids = sorted({c.device_id for c in changes})
        await db.execute(select(Device.id).where(Device.id.in_(ids)).order_by(Device.id)
                         .with_for_update())
    run: list[Change] = []
    seen: set[str] = set()

    async def flush() -> None:
        if run:
            stmt = _STATEMENTS[type(run[0])]
            await db.execute(stmt.execution_options(synchronize_session=False),
                             [_params(c) for c in run])
            run.clear()
            seen.clear()

    for c in changes:
        if run and (type(c) is not type(run[0]) or c.device_id in seen):
            await flush()
        run.append(c)
        seen.add(c.device_id)
    await flush()


_STATEMENTS.update({Online: _ONLINE, Offline: _OFFLINE, Described: _DESCRIBED})

__all__ = ["Change", "Described", "Offline", "Online", "apply"]
