"""One MQTT connection of a :class:`~corral.device.client.Device`: its socket, packet
identifiers, waiters and tasks. A reconnect makes a new one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from corral.device.errors import NotConnected
from corral.transports.mqtt.codec import Decoder, Packet, encode


@dataclass(eq=False)
class Connection:
    """One MQTT connection's state; a reconnect makes a new one."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    version: int
    keepalive: int
    receive_maximum: int
    decoder: Decoder
    last_tx: float
    last_rx: float
    pending: dict[int, asyncio.Future[Packet]] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the connection is dead
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # ... and cleaned up
    ready: bool = False  # subscribed and described
    reason: str = ""
    pong: asyncio.Future[None] | None = None
    next_pid: int = 0
    inflight: asyncio.Semaphore | None = None
    opened_at: float = 0.0

    def send(self, packet: Packet) -> None:
        if self.done.is_set():
            raise NotConnected(f"the connection is closed ({self.reason})")
        self.writer.write(encode(packet, self.version))
        self.last_tx = asyncio.get_running_loop().time()

    def new_pid(self) -> int:
        for _ in range(0xFFFF):
            self.next_pid = self.next_pid % 0xFFFF + 1
            if self.next_pid not in self.pending:
                return self.next_pid
        raise NotConnected("no free packet identifier")

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def lose(self, reason: str) -> None:
        """Mark the connection dead (idempotent): fail waiters, drop the socket."""
        if self.done.is_set():
            return
        self.reason = self.reason or reason
        self.done.set()
        # a waiter may be cancelled before it wakes up: mark the exceptions as retrieved so
        # asyncio does not log "Future exception was never retrieved" for them
        waiters: list[asyncio.Future[Any]] = [*self.pending.values()]
        if self.pong is not None:
            waiters.append(self.pong)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(NotConnected(f"the connection ended: {self.reason}"))
                fut.exception()
        self.pending.clear()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()
