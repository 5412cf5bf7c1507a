"""The single-node bus: subjects, queue groups and request/reply inside one event loop.

Design:

* Subscriptions live in a token trie (one node per pattern token; ``*`` and ``>`` are
  ordinary child keys because no literal token can spell them). A publish walks at most
  the branches its tokens can match, so cost does not grow with the number of unrelated
  subscriptions (for example one ``device.<id>.call`` subscription per connected device).
* Each subscription owns a bounded FIFO and one worker task that awaits the handler for
  one message at a time. Publishing only appends to those FIFOs, so a slow or failing
  handler delays nobody but its own subscription, and every subscription sees messages
  in publish order.
* Overflow policy: when a subscription already holds ``max_pending`` undelivered
  messages, the oldest is discarded to make room and counted in ``Subscription.dropped``
  (fresh state beats stale state for presence and telemetry; lossless traffic goes
  through the database, never the bus alone).
* Queue groups are keyed by (pattern, queue name), like NATS; each message goes to the
  next member in round-robin order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from corral.bus.base import (
    Bus,
    BusClosed,
    BusTimeout,
    Handler,
    Message,
    NoResponders,
    Payload,
    encode_payload,
    validate_pattern,
    validate_subject,
)

__all__ = ["DEFAULT_MAX_PENDING", "InProcessBus", "InProcessSubscription", "SubjectIndex",
           "SubscriptionOwner", "close_all"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 65_536
"""Undelivered messages one subscription may hold before the oldest are dropped."""

QUEUE_RE = re.compile(r"[A-Za-z0-9_-]+")
_INBOX_PREFIX = "_INBOX."


class SubscriptionOwner(Protocol):
    """The bus a local subscription belongs to (it is told when the subscription ends)."""

    def _remove(self, sub: InProcessSubscription) -> None: ...


class InProcessSubscription:
    """A subscription of :class:`InProcessBus` (and the local end of one of
    :class:`corral.bus.nats.NatsBus`): a bounded FIFO, drained by one worker task
    that exists only while messages are pending (most device subscriptions - requests,
    control - are idle nearly always, and a reconnect storm creates thousands of them)."""

    __slots__ = (
        "_bus",
        "_closed",
        "_dropped",
        "_handler",
        "_max_pending",
        "_pending",
        "_worker",
        "pattern",
        "queue",
    )

    def __init__(
        self,
        bus: SubscriptionOwner,
        pattern: str,
        handler: Handler,
        queue: str | None,
        max_pending: int,
    ) -> None:
        self._bus = bus
        self.pattern = pattern
        self.queue = queue
        self._handler = handler
        self._max_pending = max_pending
        self._pending: deque[Message] = deque()
        self._dropped = 0
        self._closed = False
        self._worker: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> int:
        """Messages discarded (oldest first) because ``max_pending`` was exceeded."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Messages queued and not yet handed to the handler."""
        return len(self._pending)

    def _deliver(self, msg: Message) -> None:
        if self._closed:
            return
        pending = self._pending
        if len(pending) >= self._max_pending:
            pending.popleft()
            self._dropped += 1
        pending.append(msg)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name=f"bus-sub:{self.pattern}")

    async def _run(self) -> None:
        pending = self._pending
        try:
            while pending and not self._closed:
                msg = pending.popleft()
                try:
                    await self._handler(msg)
                except Exception:
                    log.exception("bus handler for %r failed on %r", self.pattern, msg.subject)
        finally:
            # nothing pending (or closed): the next delivery starts a new worker; no await
            # between the last check and this, so no message can slip in unseen
            if self._worker is asyncio.current_task():
                self._worker = None

    async def unsubscribe(self) -> None:
        """Stop delivery now; pending undelivered messages are discarded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._bus._remove(self)
        worker = self._worker
        if worker is None or worker is asyncio.current_task():
            # idle, or called from our own handler: the loop ends when the handler returns
            return
        worker.cancel()
        # asyncio.wait never raises the worker's CancelledError into us, but our own
        # cancellation still propagates.
        await asyncio.wait([worker])

    def __repr__(self) -> str:
        return f"<InProcessSubscription {self.pattern!r} queue={self.queue!r}>"


@dataclass(slots=True)
class _Group:
    members: list[InProcessSubscription] = field(default_factory=list)
    next: int = 0

    def pick(self) -> InProcessSubscription:
        i = self.next % len(self.members)
        self.next = i + 1
        return self.members[i]


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    plain: list[InProcessSubscription] = field(default_factory=list)
    groups: dict[str, _Group] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.children or self.plain or self.groups)


class SubjectIndex:
    """Token trie from subscription patterns to subscriptions (no asyncio inside)."""

    __slots__ = ("_root", "count")

    def __init__(self) -> None:
        self._root = _Node()
        self.count = 0

    def add(self, sub: InProcessSubscription) -> None:
        node = self._root
        for tok in sub.pattern.split("."):
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node()
            node = child
        if sub.queue is None:
            node.plain.append(sub)
        else:
            group = node.groups.get(sub.queue)
            if group is None:
                group = node.groups[sub.queue] = _Group()
            group.members.append(sub)
        self.count += 1

    def remove(self, sub: InProcessSubscription) -> bool:
        """Remove ``sub``; prune nodes left empty. Returns whether it was present."""
        path: list[tuple[_Node, str]] = []
        node = self._root
        for tok in sub.pattern.split("."):
            child = node.children.get(tok)
            if child is None:
                return False
            path.append((node, tok))
            node = child
        if sub.queue is None:
            if sub not in node.plain:
                return False
            node.plain.remove(sub)
        else:
            group = node.groups.get(sub.queue)
            if group is None or sub not in group.members:
                return False
            group.members.remove(sub)
            if not group.members:
                del node.groups[sub.queue]
        self.count -= 1
        for parent, tok in reversed(path):
            if not parent.children[tok].empty():
                break
            del parent.children[tok]
        return True

    def match(self, subject: str) -> list[InProcessSubscription]:
        """The subscriptions that receive ``subject``: all plain ones, one per queue group."""
        out: list[InProcessSubscription] = []
        tokens = subject.split(".")
        last = len(tokens)
        # Iterative walk: (node, index of the next token to match).
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == last:
                _collect(node, out)
                continue
            children = node.children
            if not children:
                continue
            rest = children.get(">")
            if rest is not None:
                _collect(rest, out)
            child = children.get(tokens[i])
            if child is not None:
                stack.append((child, i + 1))
            child = children.get("*")
            if child is not None:
                stack.append((child, i + 1))
        return out

    def patterns(self) -> list[str]:
        """Every pattern with at least one subscription (for diagnostics and tests)."""
        out: list[str] = []

        def walk(node: _Node, prefix: list[str]) -> None:
            if node.plain or node.groups:
                out.append(".".join(prefix))
            for tok, child in node.children.items():
                walk(child, [*prefix, tok])

        walk(self._root, [])
        return out


async def close_all(replies: dict[str, asyncio.Future[Message]],
                    subs: set[InProcessSubscription]) -> None:
    """A closing bus fails its pending requests and stops its local subscriptions (their
    workers are cancelled; pending messages are discarded). Empties both collections."""
    for fut in replies.values():
        if not fut.done():
            fut.set_exception(BusClosed("bus closed while waiting for a reply"))
    replies.clear()
    workers = []
    for sub in subs:
        sub._closed = True
        sub._pending.clear()
        worker = sub._worker
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
            workers.append(worker)
    subs.clear()
    if workers:
        await asyncio.wait(workers)


def _collect(node: _Node, out: list[InProcessSubscription]) -> None:
    if node.plain:
        out.extend(node.plain)
    if node.groups:
        for group in node.groups.values():
            out.append(group.pick())


class InProcessBus:
    """:class:`corral.bus.base.Bus` for one process and one event loop.

    ``max_pending`` bounds each subscription's backlog (see the module docstring for the
    drop-oldest policy). Create, use and close it inside one running event loop.
    """

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._max_pending = max_pending
        self._index = SubjectIndex()
        self._subs: set[InProcessSubscription] = set()
        self._replies: dict[str, asyncio.Future[Message]] = {}
        self._inbox_ids = itertools.count(1)
        self._inbox_base = f"{_INBOX_PREFIX}{id(self):x}."
        self._closed = False

    @property
    def subscription_count(self) -> int:
        """Live subscriptions (for metrics and tests)."""
        return self._index.count

    def interested(self, subject: str) -> bool:
        """Whether a publish on ``subject`` would reach any subscription now (lets a hot
        publisher skip building a payload nobody receives; NATS cannot answer this)."""
        return bool(self._index.match(subject))

    async def publish(self, subject: str, payload: Payload) -> None:
        """Fan ``payload`` out to matching subscriptions without waiting for handlers."""
        self._publish(subject, payload, None)

    def _publish(self, subject: str, payload: Payload, reply: str | None) -> int:
        if self._closed:
            raise BusClosed("bus is closed")
        validate_subject(subject)
        fut = None
        if self._replies and subject.startswith(_INBOX_PREFIX):
            fut = self._replies.get(subject)
        subs = self._index.match(subject)
        if fut is None and not subs:
            if not isinstance(payload, (bytes, dict)):  # reject what no bus could carry
                raise TypeError(f"bus payload must be bytes or dict, not {type(payload).__name__}")
            return 0  # nobody listens: skip the encoding
        msg = Message(subject, encode_payload(payload), reply, self)
        receivers = 0
        if fut is not None:
            if not fut.done():
                fut.set_result(msg)
            receivers += 1
        for sub in subs:
            sub._deliver(msg)
            receivers += 1
        return receivers

    async def subscribe(
        self, pattern: str, handler: Handler, *, queue: str | None = None
    ) -> InProcessSubscription:
        """Subscribe ``handler`` to ``pattern`` (optionally in queue group ``queue``)."""
        if self._closed:
            raise BusClosed("bus is closed")
        validate_pattern(pattern)
        if queue is not None and QUEUE_RE.fullmatch(queue) is None:
            raise ValueError(f"invalid bus queue group name: {queue!r}")
        sub = InProcessSubscription(self, pattern, handler, queue, self._max_pending)
        self._index.add(sub)
        self._subs.add(sub)
        return sub

    def _remove(self, sub: InProcessSubscription) -> None:
        self._index.remove(sub)
        self._subs.discard(sub)

    async def request(self, subject: str, payload: Payload, *, timeout: float) -> Message:  # noqa: ASYNC109 (NATS-style API)
        """Publish with a fresh inbox as reply subject; return the first reply."""
        if self._closed:
            raise BusClosed("bus is closed")
        validate_subject(subject)
        inbox = f"{self._inbox_base}{next(self._inbox_ids)}"
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[inbox] = fut
        try:
            if self._publish(subject, payload, inbox) == 0:
                raise NoResponders(f"no responders for {subject!r}")
            try:
                # close() fails the future with BusClosed, which propagates as is.
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise BusTimeout(f"no reply for {subject!r} within {timeout}s") from None
        finally:
            self._replies.pop(inbox, None)

    async def close(self) -> None:
        """Cancel every subscription worker and fail pending requests. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subs:
            self._index.remove(sub)
        await close_all(self._replies, self._subs)

    async def __aenter__(self) -> InProcessBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


if TYPE_CHECKING:  # the type checker proves InProcessBus satisfies the Bus protocol
    _proof: Bus = InProcessBus()
