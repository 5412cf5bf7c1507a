"""The bus of many nodes: the :class:`~corral.bus.base.Bus` contract on a NATS server
(nats-py), chosen with ``CORRAL_BUS_URL=nats://host:4222``.

Design:

* **One NATS subscription per (pattern, queue group) per process.** Local subscriptions on
  the same pattern share it and are fed through the same bounded, drop-oldest FIFOs as the
  in-process bus (:class:`~corral.bus.inprocess.InProcessSubscription`), so a thousand SSE
  streams on one product cost one copy of each event per node on the wire, not a thousand,
  and the delivery semantics (ordering per subscription, isolation of slow handlers,
  ``dropped``, unsubscribing from one's own handler) are the in-process bus's exactly.
  A queue group is one NATS queue subscription per process (the server picks the process),
  then round-robin among the process's local members: each message still reaches one member
  of the group cluster-wide.
* **A subscription is live when ``subscribe`` returns**: the SUB is followed by a PING/PONG
  round trip (coalesced across concurrent subscribers), so a message any node publishes
  after that reaches it (an SSE stream sends ``:ok`` only then; a device session is
  callable from every node once it is described).
* **Request/reply** uses one wildcard inbox subscription per process and NATS's "no
  responders" status (the server answers at once when nobody listens): that is
  :class:`~corral.bus.base.NoResponders`, which the API maps to "Device is not connected".
* **A namespace** (``CORRAL_BUS_NAMESPACE``, default ``corral``) prefixes every subject on the
  wire, so several corral clusters (or test runs) can share one NATS server without hearing
  each other; handlers see the subjects without it.
* The connection reconnects forever once established (subscriptions are restored by
  nats-py); the first connection fails fast with :class:`~corral.bus.base.BusError` when the
  server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError

from corral.bus.base import (
    Bus,
    BusClosed,
    BusError,
    BusTimeout,
    Handler,
    Message,
    NoResponders,
    Payload,
    encode_payload,
    validate_pattern,
    validate_subject,
)
from corral.bus.inprocess import DEFAULT_MAX_PENDING, QUEUE_RE, InProcessSubscription, close_all

__all__ = ["NatsBus"]

log = logging.getLogger(__name__)

_NO_RESPONDERS = "503"
_SYNC_TIMEOUT_S = 10.0
# what the NATS client may hold for one subscription before the server-side copy is dropped;
# our handler only moves each message into the local FIFOs, so this never fills in practice
_NATS_PENDING_MSGS = 1_000_000
_NATS_PENDING_BYTES = 512 * 1024 * 1024


def _wire_queue(pattern: str, queue: str | None) -> str:
    """The queue group's name on the wire. NATS groups queue subscribers by name alone (one
    member per name among all matching subscriptions); the contract groups them by pattern
    and name, so the pattern is folded into the name."""
    if queue is None:
        return ""
    return f"{queue}-{hashlib.blake2s(pattern.encode(), digest_size=8).hexdigest()}"


class _Remote:
    """One NATS subscription and the local subscriptions it feeds."""

    __slots__ = ("bus", "key", "local", "next", "nsub", "ready")

    def __init__(self, bus: NatsBus, key: tuple[str, str | None]) -> None:
        self.bus = bus
        self.key = key
        self.local: list[InProcessSubscription] = []
        self.next = 0
        self.nsub: Any = None  # nats.aio.subscription.Subscription once subscribed
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_msg(self, m: Msg) -> None:
        local = self.local
        if not local:
            return
        msg = Message(m.subject[self.bus._strip:], m.data, m.reply or None, self.bus)
        if self.key[1] is None:
            for sub in local:
                sub._deliver(msg)
        else:
            i = self.next % len(local)
            self.next = i + 1
            local[i]._deliver(msg)


class NatsBus:
    """:class:`corral.bus.base.Bus` over a NATS server. Create with :meth:`connect`."""

    def __init__(self, url: str, *, namespace: str = "corral", name: str | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, connect_timeout: float = 5.0) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        validate_subject(namespace)
        self.url = url
        self.namespace = namespace
        self._prefix = namespace + "."
        self._strip = len(self._prefix)
        self.name = name or "corral"
        self._max_pending = max_pending
        self._connect_timeout = connect_timeout
        self._nc: Client | None = None
        self._remotes: dict[tuple[str, str | None], _Remote] = {}
        self._subs: set[InProcessSubscription] = set()
        self._replies: dict[str, asyncio.Future[Message]] = {}
        self._inbox_ids = itertools.count(1)
        self._inbox_base = f"_INBOX.{secrets.token_hex(11)}."
        self._sync_next: asyncio.Future[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> NatsBus:
        """Connect to the NATS server at ``url`` (raises :class:`BusError` if it cannot)."""
        bus = cls(url, **kw)
        await bus.start()
        return bus

    async def start(self) -> None:
        try:
            self._nc = await nats.connect(
                self.url, name=self.name, connect_timeout=self._connect_timeout,
                allow_reconnect=True, max_reconnect_attempts=2, reconnect_time_wait=0.5,
                skip_subject_validation=True,  # validated here, once
                error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected)
        except Exception as exc:
            raise BusError(f"cannot connect to NATS at {self.url}: {exc!r}") from exc
        # connected: from now on ride out server restarts instead of giving up
        self._nc.options["max_reconnect_attempts"] = -1
        await self._nc.subscribe(self._inbox_base + "*", cb=self._on_reply,
                                 pending_msgs_limit=_NATS_PENDING_MSGS,
                                 pending_bytes_limit=_NATS_PENDING_BYTES)
        await self._sync()

    # -- nats-py callbacks ---------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("NATS: disconnected from %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("NATS: reconnected to %s", self.url)

    async def _on_reply(self, m: Msg) -> None:
        fut = self._replies.get(m.subject)
        if fut is None or fut.done():
            return
        if not m.data and m.headers and m.headers.get("Status") == _NO_RESPONDERS:
            fut.set_exception(NoResponders("no responders"))
        else:
            fut.set_result(Message(m.subject, m.data, m.reply or None, self))

    # -- the contract --------------------------------------------------------------------------

    def _client(self) -> Client:
        if self._closed or self._nc is None:
            raise BusClosed("bus is closed")
        return self._nc

    async def publish(self, subject: str, payload: Payload) -> None:
        """Send ``payload`` to every matching subscription on every node."""
        nc = self._client()
        validate_subject(subject)
        data = encode_payload(payload)
        if not subject.startswith("_INBOX."):  # replies go to the requester's raw inbox
            subject = self._prefix + subject
        try:
            await nc.publish(subject, data)
        except ConnectionClosedError:
            raise BusClosed("bus is closed") from None
        except NatsError as exc:
            raise BusError(f"publish on {subject!r} failed: {exc}") from exc

    async def subscribe(self, pattern: str, handler: Handler, *,
                        queue: str | None = None) -> InProcessSubscription:
        """Subscribe ``handler`` to ``pattern`` on every node (optionally in ``queue``)."""
        nc = self._client()
        validate_pattern(pattern)
        if queue is not None and QUEUE_RE.fullmatch(queue) is None:
            raise ValueError(f"invalid bus queue group name: {queue!r}")
        sub = InProcessSubscription(self, pattern, handler, queue, self._max_pending)
        key = (pattern, queue)
        remote = self._remotes.get(key)
        self._subs.add(sub)
        if remote is None:
            remote = self._remotes[key] = _Remote(self, key)
            remote.local.append(sub)
            try:
                remote.nsub = await nc.subscribe(
                    self._prefix + pattern, queue=_wire_queue(pattern, queue), cb=remote.on_msg,
                    pending_msgs_limit=_NATS_PENDING_MSGS, pending_bytes_limit=_NATS_PENDING_BYTES)
            except BaseException as exc:
                if self._remotes.get(key) is remote:
                    del self._remotes[key]
                self._subs.discard(sub)
                remote.ready.set_exception(BusError(f"subscribe to {pattern!r} failed"))
                remote.ready.exception()  # retrieved: later waiters re-raise it
                if isinstance(exc, ConnectionClosedError):
                    raise BusClosed("bus is closed") from None
                if isinstance(exc, NatsError):
                    raise BusError(f"subscribe to {pattern!r} failed: {exc}") from exc
                raise
            remote.ready.set_result(None)
            if not remote.local:  # everyone left while the SUB was being sent
                self._drop_remote(remote)
        else:
            remote.local.append(sub)
            await asyncio.shield(remote.ready)
        await self._sync()
        return sub

    def _remove(self, sub: InProcessSubscription) -> None:
        """A local subscription ended; the last one of a pattern ends its NATS subscription."""
        self._subs.discard(sub)
        remote = self._remotes.get((sub.pattern, sub.queue))
        if remote is None or sub not in remote.local:
            return
        remote.local.remove(sub)
        if not remote.local and remote.nsub is not None:
            self._drop_remote(remote)

    def _drop_remote(self, remote: _Remote) -> None:
        if self._remotes.get(remote.key) is remote:
            del self._remotes[remote.key]
        nsub, remote.nsub = remote.nsub, None
        if nsub is None or self._closed:
            return

        async def unsub() -> None:
            with contextlib.suppress(Exception):
                await nsub.unsubscribe()

        self._spawn(unsub())

    async def request(self, subject: str, payload: Payload, *, timeout: float) -> Message:  # noqa: ASYNC109 (NATS-style API)
        """Publish with a reply inbox and return the first reply from any node."""
        nc = self._client()
        validate_subject(subject)
        data = encode_payload(payload)
        inbox = f"{self._inbox_base}{next(self._inbox_ids)}"
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[inbox] = fut
        try:
            try:
                await nc.publish(self._prefix + subject, data, reply=inbox)
            except ConnectionClosedError:
                raise BusClosed("bus is closed") from None
            except NatsError as exc:
                raise BusError(f"request on {subject!r} failed: {exc}") from exc
            try:
                return await asyncio.wait_for(fut, timeout)
            except NoResponders:
                raise NoResponders(f"no responders for {subject!r}") from None
            except TimeoutError:
                raise BusTimeout(f"no reply for {subject!r} within {timeout}s") from None
        finally:
            self._replies.pop(inbox, None)

    async def close(self) -> None:
        """Stop every subscription, fail pending requests, close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._remotes.clear()
        await close_all(self._replies, self._subs)
        for task in list(self._tasks):
            task.cancel()
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def __aenter__(self) -> NatsBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- helpers -------------------------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Live local subscriptions (for metrics and tests)."""
        return len(self._subs)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def flush(self) -> None:
        """Wait until the server has processed everything this node sent so far, and every
        message it sent back before that is in the local FIFOs and handled (tests)."""
        await self._sync()
        while any(s._worker is not None and not s._worker.done() for s in list(self._subs)):  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    async def _sync(self) -> None:
        """One PING/PONG round trip that starts after this call (shared by concurrent
        callers): the server has then seen every SUB and PUB this node sent before it."""
        fut = self._sync_next
        if fut is None:
            fut = self._sync_next = asyncio.get_running_loop().create_future()
            if self._sync_task is None or self._sync_task.done():
                self._sync_task = asyncio.get_running_loop().create_task(
                    self._sync_loop(), name="nats-sync")
        await asyncio.shield(fut)

    async def _sync_loop(self) -> None:
        while self._sync_next is not None:
            fut, self._sync_next = self._sync_next, None
            try:
                await self._client().flush(timeout=_SYNC_TIMEOUT_S)  # type: ignore[arg-type]
            except BusClosed as exc:
                fut.set_exception(exc)
            except Exception as exc:
                fut.set_exception(BusError(f"NATS did not answer a PING: {exc!r}"))
            else:
                fut.set_result(None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # marked retrieved; waiters re-raise it

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


if TYPE_CHECKING:  # the type checker proves NatsBus satisfies the Bus protocol
    _proof: Bus = NatsBus("nats://127.0.0.1:4222")
