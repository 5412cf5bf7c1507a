"""The node registry: every node of a scaled-out corral registers, heartbeats, and is
declared dead by the others when it stops heartbeating.

Presence stays truthful with nodes coming and going:

* a device's row names the node holding its session (``devices.node_id``, set by the
  session's ``Online`` change in the writer's batch), so a node's start touches no device
  held by another node (the single-node mode's "every device offline at start" is not run);
* the node holding the ``node-reaper`` lease checks the registry every heartbeat interval:
  a node whose last heartbeat (database time) is older than ``node_dead_after_s`` is
  declared dead, and every device it still holds is marked offline with the reason
  :data:`DEAD_REASON` and a ``spark/status`` ``offline`` event. The bound from the kill to
  the offline mark is ``node_dead_after_s + node_heartbeat_s`` (plus the reaper's own lease
  failover, ``lease_ttl_s``, when the reaper itself died); defaults 15 + 5 (+ 15) s;
* devices come back online as they reconnect to another node (their new session's
  ``Online`` names that node);
* a node that was declared dead while it was only stalled (a long pause, a partition from
  the database) learns so at its next heartbeat and closes its sessions, so the devices
  reconnect and are marked online truthfully again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, case, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import corral
from corral.cluster.lease import Leases, db_now, singleton
from corral.cluster.models import Node
from corral.devices.models import Device
from corral.events.writer import EventWriter, NewEvent, WriterStopped
from corral.kit import clock
from corral.products.models import Product

log = logging.getLogger("corral.cluster")

DEAD_REASON = "The corral node holding the connection stopped responding"
ORPHAN_REASON = "No corral node holds the connection (the server restarted)"
REAPER = "node-reaper"
REAP_BATCH = 10_000  # devices marked offline per transaction


def new_node_id() -> str:
    """``<host>-<random>``: readable in logs and ``corral nodes``, unique per start."""
    host = socket.gethostname().split(".")[0][:24] or "node"
    return f"{host}-{secrets.token_hex(4)}"


class NodeRegistry:
    """This node's row in ``nodes``, its heartbeat, and (under a lease) the reaper."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], leases: Leases, *,
                 node_id: str, role: str, heartbeat_s: float, dead_after_s: float,
                 writer: EventWriter | None = None,
                 sessions: Callable[[], int] = lambda: 0,
                 declared_dead: Callable[[], Any] | None = None) -> None:
        self.sessionmaker = sessionmaker
        self.leases = leases
        self.id = node_id
        self.role = role
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.writer = writer
        self.sessions = sessions
        self.declared_dead = declared_dead
        self.reaped = 0  # devices this node marked offline for dead nodes
        self._tasks: list[asyncio.Task[None]] = []

    async def register(self) -> None:
        async with self.sessionmaker() as db:
            now = db_now(db)
            db.add(Node(id=self.id, role=self.role, host=socket.gethostname()[:255],
                        pid=os.getpid(), version=corral.__version__[:32], started_at=now,
                        heartbeat_at=now, sessions=0))
            await db.commit()
        log.info("node %s registered (role %s)", self.id, self.role)

    def start(self, *, reaper: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeats(), name="node-heartbeat"))
        if reaper:
            self._tasks.append(loop.create_task(
                singleton(self.leases, REAPER, self.reap, every_s=self.heartbeat_s),
                name="node-reaper"))

    async def stop(self, reason: str = "stopped") -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        try:
            async with self.sessionmaker() as db:
                await db.execute(update(Node).where(Node.id == self.id).values(
                    stopped_at=db_now(db), stop_reason=reason[:200], sessions=0))
                await db.commit()
        except Exception:
            log.warning("node %s: could not record its stop", self.id, exc_info=True)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.heartbeat()
            except Exception:
                log.exception("node %s: heartbeat failed", self.id)

    async def heartbeat(self) -> None:
        """Record that this node is alive. If another node declared it dead meanwhile, its
        sessions are no longer online in the database: close them (the devices reconnect)."""
        async with self.sessionmaker() as db:
            row = (await db.execute(
                update(Node).where(Node.id == self.id)
                .values(heartbeat_at=db_now(db), sessions=self.sessions())
                .returning(Node.stopped_at))).one_or_none()
            revived = row is not None and row[0] is not None
            if revived:
                await db.execute(update(Node).where(Node.id == self.id).values(
                    stopped_at=None, stop_reason=None))
            await db.commit()
        if row is None:  # the row is gone (pruned while we stalled): register again
            await self.register()
            revived = True
        if revived:
            log.error("node %s was declared dead while it was running (missed heartbeats); "
                      "closing its device sessions so they reconnect", self.id)
            if self.declared_dead is not None:
                result = self.declared_dead()
                if asyncio.iscoroutine(result):
                    await result

    async def reap(self) -> int:
        """Declare nodes that stopped heartbeating dead and mark every device still held by
        a dead node (or by no node) offline. Returns how many devices it marked."""
        async with self.sessionmaker() as db:
            now = db_now(db)
            cutoff = now - dt.timedelta(seconds=self.dead_after_s)
            dead = list((await db.execute(
                update(Node).where(Node.stopped_at.is_(None), Node.heartbeat_at < cutoff)
                .values(stopped_at=now, stop_reason="missed heartbeats")
                .returning(Node.id))).scalars())
            await db.commit()
        for node in dead:
            log.warning("node %s missed its heartbeats: declared dead; its devices go offline",
                        node)
        await self._prune()
        # devices whose holder is gone: dead or stopped nodes (a clean stop closes its
        # sessions first, so normally none), or no node at all (single-node history)
        marked = 0
        while True:
            n = await self._reap_batch()
            marked += n
            if n < REAP_BATCH:
                break
        self.reaped += marked
        return marked

    async def _prune(self) -> None:
        """Forget nodes stopped more than a week ago that hold no device."""
        async with self.sessionmaker() as db:
            old = db_now(db) - dt.timedelta(days=7)
            holding = select(Device.node_id).where(Device.online,
                                                  Device.node_id == Node.id).exists()
            await db.execute(delete(Node).where(Node.stopped_at < old, ~holding))
            await db.commit()

    async def _reap_batch(self) -> int:
        async with self.sessionmaker() as db:
            # index lookups per stopped node (ix_devices_node_online), never a scan of every
            # online device
            gone = select(Node.id).where(Node.stopped_at.is_not(None))
            held_by_gone = and_(Device.online,
                                or_(Device.node_id.in_(gone), Device.node_id.is_(None)))
            ids = list((await db.execute(
                select(Device.id).where(held_by_gone).order_by(Device.id).limit(REAP_BATCH)
                .with_for_update(skip_locked=True))).scalars())
            if not ids:
                return 0
            at = clock.now()
            rows = (await db.execute(
                update(Device).where(Device.id.in_(ids), held_by_gone)
                .values(online=False, last_disconnect_at=at, last_disconnect_reason=case(
                    (Device.node_id.is_(None), ORPHAN_REASON), else_=DEAD_REASON))
                .returning(Device.id, Device.node_id, Device.product_id, Device.owner_user_id,
                           Device.customer_id))).all()
            products = {r.product_id for r in rows if r.product_id is not None}
            orgs: dict[int, int] = {}
            if products:
                found = await db.execute(select(Product.id, Product.org_id).where(
                    Product.id.in_(products)))
                orgs = {int(pid): int(oid) for pid, oid in found.all()}
            await db.commit()
        for r in rows:
            reason = ORPHAN_REASON if r.node_id is None else DEAD_REASON
            log.info("device %s offline: %s (node %s)", r.id, reason, r.node_id)
        await self._emit_offline(rows, orgs, at)
        return len(ids)

    async def _emit_offline(self, rows: Any, orgs: dict[int, int], at: dt.datetime) -> None:
        """A ``spark/status`` ``offline`` event per device (stored, then streamed)."""
        if self.writer is None:
            return
        futures = []
        for r in rows:
            event = NewEvent(name="spark/status", data="offline", ttl=60, source="cloud",
                             device_id=r.id, product_id=r.product_id,
                             org_id=orgs.get(r.product_id) if r.product_id else None,
                             owner_user_id=r.owner_user_id, customer_id=r.customer_id,
                             private=True, published_at=at)
            try:
                futures.append(await self.writer.submit(event))
            except WriterStopped:
                return
        if futures:
            await asyncio.gather(*futures, return_exceptions=True)


__all__ = ["DEAD_REASON", "ORPHAN_REASON", "NodeRegistry", "new_node_id"]
