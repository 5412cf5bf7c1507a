"""Handshake slots shared fairly between peer addresses (domain-free, used by the Particle
listeners).

A device listener does its expensive handshake work (RSA or ECDHE, then admission) for at
most ``total`` peers at once, so that a reconnect storm is served in order instead of every
handshake timing out together. One peer address may hold at most ``per_address`` of those
slots: a single host (a misbehaving script, an attacker, a NAT with a stuck device farm)
can never take every slot and lock the other devices out. Waiters are served first come,
first served, except that a waiter whose address is at its cap is passed over until one of
that address's slots is released.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class AddressSlots:
    """``total`` slots, at most ``per_address`` of them held by one address.

    Waiters queue per address; addresses are served round-robin in the order they started
    waiting. Only addresses at their cap are passed over, and there are at most
    ``total // per_address`` of those, so a release costs O(1) however many wait."""

    def __init__(self, total: int, per_address: int) -> None:
        if total < 1 or per_address < 1:
            raise ValueError("slot counts must be at least 1")
        self.total = total
        self.per_address = min(per_address, total)
        self.held = 0
        self.by_address: dict[str, int] = {}
        self._queues: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = \
            collections.OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(1 for q in self._queues.values() for f in q if not f.done())

    def _free_for(self, address: str) -> bool:
        return self.held < self.total and self.by_address.get(address, 0) < self.per_address

    def _take(self, address: str) -> None:
        self.held += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1

    async def acquire(self, address: str) -> None:
        """Wait for a slot (cancel the wait to give up, e.g. with ``asyncio.timeout``)."""
        if address not in self._queues and self._free_for(address):
            self._take(address)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(address, collections.deque()).append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted as the wait was cancelled
                self.release(address)
            else:
                fut.cancel()
                self._prune(address)
            raise

    def _prune(self, address: str) -> None:
        q = self._queues.get(address)
        while q and q[0].done():
            q.popleft()
        if q is not None and not q:
            del self._queues[address]

    def release(self, address: str) -> None:
        self.held -= 1
        left = self.by_address.get(address, 1) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)
        self._wake()

    def _wake(self) -> None:
        skipped = 0
        while self.held < self.total and self._queues and skipped < len(self._queues):
            address, q = next(iter(self._queues.items()))
            self._queues.move_to_end(address)  # round-robin between addresses
            granted = False
            while q and self._free_for(address):
                fut = q.popleft()
                if not fut.done():
                    self._take(address)
                    fut.set_result(None)
                    granted = True
                    break
            if not q:
                del self._queues[address]
            skipped = 0 if granted else skipped + 1

    @contextlib.asynccontextmanager
    async def hold(self, address: str) -> AsyncIterator[None]:
        """``async with slots.hold(address):`` a slot for the block."""
        await self.acquire(address)
        try:
            yield
        finally:
            self.release(address)


__all__ = ["AddressSlots"]
