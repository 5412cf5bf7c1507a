"""corral's Particle gateway for Gen 3 devices: Device OS's protocol over DTLS 1.2 / UDP 5684.

The DTLS layer is :mod:`.dtls`; the CoAP exchange and everything after the Hello is the TCP
gateway's (:class:`~.server.ParticleConnection`), with what UDP changes
(``shared/reference/particle-device-protocol-udp.md`` §4):

* every CON the device sends is ACKed (a missed ACK costs the device its session), repeated
  messages are recognised by message id and answered with the same ACK again;
* our CONs are sent again on Device OS's timers (4 s times 1 to 1.5, doubling, 3 retransmissions)
  until the device ACKs them; no server Hello (the device only waits for the Hello's ACK);
* the device id comes from the Hello (it is not in the handshake): the key the device proved
  in the handshake must be the one registered for that device (or, for a device corral has
  never seen, it is pinned when admitted, as over TCP), and the session is bound to that
  device from then on;
* sessions are routed by connection ID, not by address: a device whose address changed (NAT
  rebinding, sleep, a new source port) is followed once a record from it authenticates;
* a DTLS session outlives its device connection: Device OS resumes it with no handshake
  (records of type 253) and may skip its Hello, so the device id, its Hello and its
  subscriptions are kept with the session and a resumed session is admitted from them.

State is bounded: a ClientHello costs nothing until it echoes the cookie of a
HelloVerifyRequest; at most ``particle_udp_max_handshakes`` handshakes are held (of them at
most ``particle_udp_max_handshakes_per_address`` for one address), each for at most
``particle_handshake_timeout_s``; at most ``particle_udp_max_sessions`` sessions are kept,
the least recently heard forgotten first. Datagrams that do not parse or authenticate are
dropped, touching nothing but their own handshake.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import socket
import time
from typing import Any, Final, cast

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, select

from corral.kit import clock
from corral.sessions.core import SessionHub
from corral.sessions.link import DeviceError, Refused
from corral.settings import Settings
from corral.transports.listening import SHUTDOWN_REASON
from corral.transports.particle import coap, dtls, messages
from corral.transports.particle.coap import Message
from corral.transports.particle.keys import load_or_create_udp_server_key
from corral.transports.particle.models import ParticleUdpSession
from corral.transports.particle.server import ParticleConnection, _Close, connection_of

log = logging.getLogger("corral.particle.udp")

ACK_TIMEOUT_S: Final = 4.0  # Device OS coap_channel.h
ACK_RANDOM_FACTOR: Final = 1.5
MAX_RETRANSMIT: Final = 3
DEDUP_KEEP: Final = 256  # recent device message ids (Device OS keeps 45 s of them)
INBOX_MAX: Final = 256  # datagrams waiting for a connection's task
#: why a session ends -> whether it is forgotten (the device must do a full handshake)
RESTARTED: Final = "the device started over (a new Hello)"
KEEP_SESSION_REASONS: Final = ("goodbye", "keep-alive timeout", SHUTDOWN_REASON,
                                "the device could not be admitted in time", RESTARTED)
SEQ_RESERVE: Final = 4096  # our sequence numbers are stored this far ahead of use
FLUSH_S: Final = 1.0  # changed sessions are written in one transaction this often
LOOKUPS_MAX: Final = 8192  # unknown CIDs waiting to be looked up in the database
LOOKUP_BATCH: Final = 500  # CIDs looked up in one query (a storm of resumes after a restart)
LOOKUP_WAITING_MAX: Final = 8  # datagrams of one CID held while it is looked up
MISSES_KEEP: Final = 4096  # CIDs known to be unknown (a flood of them costs no queries)
MISS_TTL_S: Final = 30.0
IN_CHUNK: Final = 5_000  # IN lists stay under SQLite's bound-parameter limit
SEQ_CLOCK_EPOCH: Final = 1_735_689_600  # 2025-01-01: restored sequence numbers start past


class UdpChannel:
    """One DTLS session (by connection ID). It outlives the device's connection, for
    resumption: the bound device, its Hello and its subscriptions are kept with it."""

    __slots__ = ("addr", "cid", "conn", "device_id", "hello", "prefixes", "reserved_seq",
                 "session")

    def __init__(self, session: dtls.Session, addr: tuple[str, int]) -> None:
        self.cid = session.cid
        self.session = session
        self.addr = addr
        self.device_id = ""  # bound at the first Hello
        self.hello: messages.Hello | None = None
        self.prefixes: set[str] = set()
        self.conn: UdpConnection | None = None
        self.reserved_seq = session.out_seq  # stored: we may send up to here

    def state(self) -> dict[str, Any]:
        """What is stored (JSON): our sequence number is reserved ``SEQ_RESERVE`` ahead."""
        assert self.hello is not None
        self.reserved_seq = self.session.out_seq + SEQ_RESERVE
        state = self.session.to_state()
        state["out_seq"] = self.reserved_seq
        hello = dataclasses.asdict(self.hello)
        hello["device_id"] = self.hello.device_id.hex()
        state.update(device_id=self.device_id, hello=hello, prefixes=sorted(self.prefixes))
        return state

    @classmethod
    def restore(cls, state: dict[str, Any], addr: tuple[str, int]) -> UdpChannel:
        """A stored session. Our sequence number continues from the stored reservation, or
        from the clock (milliseconds since 2025 times 256) when that is further: a session
        restored again after a crash, before its new reservation was stored, still never
        sends a number twice (no session sends 256 records a millisecond)."""
        session = dtls.Session.from_state(state)
        floor = int((time.time() - SEQ_CLOCK_EPOCH) * 1000) << 8
        session.out_seq = min(dtls.SEQ_MAX, max(session.out_seq, floor))
        ch = cls(session, addr)
        ch.device_id = str(state["device_id"])
        hello = dict(state["hello"])
        hello["device_id"] = bytes.fromhex(hello["device_id"])
        ch.hello = messages.Hello(**hello)
        ch.prefixes = {str(p) for p in state.get("prefixes", [])}
        return ch


class UdpConnection(ParticleConnection):
    """A device on a DTLS session: the TCP connection's CoAP handling over datagrams."""

    transport = "particle-udp"

    def __init__(self, listener: ParticleUdpListener, channel: UdpChannel) -> None:
        self._init_state(listener, channel.addr[0])
        self.udp = channel
        self.inbox: collections.deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        self.seen: collections.OrderedDict[int, bytes | None] = collections.OrderedDict()
        self.forget = False  # the session ends with the connection
        self.resumed = False
        # no server Hello to race on UDP: the device resends its CON Hello for ~45 s
        self.admit_within_s = listener.settings.particle_handshake_timeout_s

    def __repr__(self) -> str:
        return f"<particle.UdpConnection {self.device_id or '?'} from {self.udp.addr}>"

    # -- input -------------------------------------------------------------------------------

    def feed(self, plaintext: bytes) -> None:
        """A decrypted datagram for this connection (from the listener)."""
        if len(self.inbox) >= INBOX_MAX:
            return  # the device retransmits what it needs answered
        self.inbox.append(plaintext)
        self.wake.set()

    async def _next(self, within: float, why: str) -> Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.inbox:
            if self.closing:
                raise _Close(self.end_reason or "closed")
            self.wake.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self.wake.wait()
            except TimeoutError:
                raise _Close(why) from None
        data = self.inbox.popleft()
        self.last_heard = loop.time()
        if self.session is not None:
            self.session.count_bytes(len(data) + dtls.CID_RECORD_HEADER + 16)
        try:
            return coap.decode(data)
        except coap.CoapError:
            self.forget = True
            raise

    async def _serve(self) -> None:
        ch = self.udp
        first = await self._next(self.listener.settings.particle_handshake_timeout_s,
                                 "no Hello from the device")
        if first.code == coap.POST and first.uri_path == messages.HELLO:
            await self._on_hello(first)
        elif ch.device_id and ch.hello is not None:  # resumed, Hello skipped
            await self._resume(ch)
            await self._handle(first)
        else:
            self.forget = True
            raise _Close(f"the first message is not a Hello ({first.summary()})")
        while not self.closing:
            await self._handle(await self._next(self.listener.keepalive_timeout_s,
                                                "keep-alive timeout"))

    async def _on_hello(self, m: Message) -> None:
        hello = messages.parse_hello(m.payload)
        ch = self.udp
        if len(hello.device_id) != 12:
            self.forget = True
            raise _Close("the Hello names no device")
        device_id = hello.device_id.hex()
        if ch.device_id and ch.device_id != device_id:
            self.forget = True
            raise _Close("the Hello names another device than the session's")
        self.device_id = device_id
        if not ch.device_id:
            key = dtls.load_spki(ch.session.peer_key)
            verdict = await self.hub.check_device_key(device_id, key)
            if verdict == "refused":
                self.forget = True
                raise _Close("the device's public key is not the one registered for it "
                             "(or none is registered)")
            self.sent_key = key
            self.first_time = verdict == "unknown"
        self.seen[m.message_id] = None
        try:
            await super()._on_hello(m)
        except _Close:
            if not self.session:
                self.forget = True
            raise
        ch.device_id = device_id
        ch.hello = hello
        self.listener.bound(ch)
        await self._restore_subscriptions()

    async def _resume(self, ch: UdpChannel) -> None:
        """A resumed session that skipped its Hello: admit the device it is bound to, and
        restore its subscriptions (Device OS does not send them again)."""
        assert ch.hello is not None
        self.device_id = ch.device_id
        self.hello = ch.hello
        self.resumed = True
        verdict = await self.hub.check_device_key(ch.device_id,
                                                  dtls.load_spki(ch.session.peer_key))
        if verdict != "registered":  # its key was changed or removed meanwhile
            self.forget = True
            raise _Close("the device's registered key is no longer the session's")
        self.next_mid = int.from_bytes(os.urandom(2), "big")
        await self._admit(ch.hello)
        await self._restore_subscriptions()

    async def _restore_subscriptions(self) -> None:
        """A resumed session's subscriptions (with or without a Hello, Device OS does not
        send again the ones the cloud acknowledged)."""
        session = self.session
        if session is None or session.closed:
            return
        for prefix in sorted(self.udp.prefixes):
            try:
                await session.subscribe(prefix)
            except Refused as exc:
                log.info("%r: subscription %r not restored: %s", self, prefix, exc.reason)

    async def _greet(self, m: Message) -> None:
        # over UDP the device waits for the Hello's ACK only (no server Hello)
        if m.type == coap.CON:
            self._send(Message(coap.ACK, coap.EMPTY, m.message_id))

    def _check_mid(self, m: Message) -> None:
        """Datagrams may be lost, repeated or reordered: no sequence check (see _handle)."""

    async def _handle(self, m: Message) -> None:
        if m.type in (coap.CON, coap.NON):
            if m.message_id in self.seen:  # a repeat: the same answer again
                cached = self.seen[m.message_id]
                if cached is not None and m.type == coap.CON and not self.closing:
                    self.listener.send(self.udp, cached)
                return
            self.seen[m.message_id] = None
            while len(self.seen) > DEDUP_KEEP:
                self.seen.popitem(last=False)
            if m.code == coap.POST and m.uri_path == messages.HELLO:
                # the device reset or resumed with changed state (new firmware, describes):
                # a new connection on the same session admits it with this Hello
                self._end(RESTARTED)
                self._abort()
                self.listener.start_over(self.udp, coap.encode(m))
                return
        await super()._handle(m)
        session = self.session
        if session is not None and session.prefixes != self.udp.prefixes:
            self.udp.prefixes = set(session.prefixes)
            self.listener.store.touch(self.udp)

    # -- output ------------------------------------------------------------------------------

    def _send(self, m: Message) -> bool:
        if self.closing:
            return False
        raw = coap.encode(m)
        if m.type == coap.ACK and m.message_id in self.seen:
            self.seen[m.message_id] = raw
        sent = self.listener.send(self.udp, raw)
        if self.session is not None:
            self.session.count_bytes(sent)
        if m.type == coap.CON:
            task = asyncio.get_running_loop().create_task(self._retransmit(m.message_id, raw))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return True

    async def _retransmit(self, mid: int, raw: bytes) -> None:
        """Send a CON again until its ACK comes (Device OS's timers)."""
        delay = self.listener.ack_timeout_s * (1 + random.random() * (ACK_RANDOM_FACTOR - 1))
        for _ in range(MAX_RETRANSMIT):
            await asyncio.sleep(delay)
            if self.closing or mid not in self.by_mid:
                return
            self.listener.send(self.udp, raw)
            delay *= 2
        await asyncio.sleep(delay)
        p = self.by_mid.get(mid)
        if p is not None and not p.future.done():
            p.future.set_exception(DeviceError("the device did not acknowledge the request"))

    async def _flush(self) -> None:
        return  # datagrams are never queued behind a slow reader

    def _abort(self) -> None:
        self.closing = True
        self.wake.set()

    async def _finish(self) -> None:
        session = self.session
        if session is not None:
            self.udp.prefixes = set(session.prefixes)
        reason = self.end_reason or ""
        if not reason.startswith(KEEP_SESSION_REASONS):
            self.forget = True
        await super()._finish()
        ch = self.udp
        self.listener.connections.discard(self)
        if ch.conn is not self and ch.conn is not None:
            return  # a newer connection carries the session on
        ch.conn = None
        if self.kicked or self.forget:
            # kicked (revoked, deleted, moved; or replaced by a newer session, which then
            # ignores this RST) or refused: Device OS discards its session on an RST and
            # does a full handshake, where the device is checked afresh
            self.listener.forget(ch, reset=True)
        else:
            self.listener.store.touch(ch)


class ParticleUdpListener(asyncio.DatagramProtocol):
    """The Gen 3 gateway's UDP socket. ``port`` is the bound port."""

    def __init__(self, hub: SessionHub, settings: Settings,
                 server_key: ec.EllipticCurvePrivateKey) -> None:
        self.hub = hub
        self.settings = settings
        self.server_key = server_key
        self.host = ""
        self.port = 0
        self.connections: set[UdpConnection] = set()
        self.channels: collections.OrderedDict[bytes, UdpChannel] = collections.OrderedDict()
        self.by_device: dict[str, bytes] = {}  # the session each device is bound to
        self.handshakes: collections.OrderedDict[tuple[str, int],
                                                 tuple[float, dtls.ServerHandshake]] = \
            collections.OrderedDict()
        self.per_address: collections.Counter[str] = collections.Counter()
        self.cookies = dtls.CookieJar()
        self.keepalive_timeout_s = settings.particle_udp_keepalive_timeout_s
        self.ping_interval_s = settings.particle_ping_interval_s
        self.request_timeout_s = 10.0
        self.ack_timeout_s = ACK_TIMEOUT_S
        self.dropped: collections.Counter[str] = collections.Counter()
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.store = SessionStore(self)
        self.lookups: dict[bytes, list[tuple[bytes, tuple[str, int]]]] = {}
        self.lookup_queue: collections.deque[bytes] = collections.deque()
        self.lookup_wake = asyncio.Event()
        self.misses: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._datagram(data, (addr[0], addr[1]))
        except dtls.DtlsError as exc:
            self.dropped[exc.reason] += 1
            log.debug("UDP datagram from %s dropped: %s", addr, exc.reason)
        except Exception:  # never let one datagram stop the listener
            self.dropped["internal error"] += 1
            log.exception("UDP datagram from %s failed", addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error: %r", exc)

    # -- datagrams -------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < dtls.RECORD_HEADER:
            raise dtls.DtlsError("runt datagram")
        kind = data[0]
        if kind in (dtls.TLS12_CID, dtls.MOVED_SESSION):
            self._session_datagram(data, addr)
        elif kind in (dtls.HANDSHAKE, dtls.CHANGE_CIPHER_SPEC, dtls.ALERT):
            self._handshake_datagram(data, addr)
        else:
            raise dtls.DtlsError(f"unexpected record type {kind}")

    def _handshake_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        loop_now = asyncio.get_running_loop().time()
        self._expire(loop_now)
        held = self.handshakes.get(addr)
        if held is not None and not (data[0] == dtls.HANDSHAKE and _is_new_hello(data, held[1])):
            hs = held[1]
            done_before = hs.session is not None
            # a datagram that does not fit is dropped, the handshake kept until its time is
            # up: a forged one (a spoofed address) must not end a device's handshake
            replies = hs.receive(data)
            for reply in replies:
                self._sendto(reply, addr)
            if hs.session is not None and not done_before:
                self._new_channel(hs.session, addr)
            return
        rec, frag, hello = dtls.first_client_hello(data)
        key = f"{addr[0]}:{addr[1]}"
        if not self.cookies.valid(key, hello):
            self._sendto(dtls.hello_verify_request(rec, frag, self.cookies.cookie(key,
                                                                                  hello.random)),
                         addr)
            return
        if held is not None:
            self._drop_handshake(addr)
        if self.per_address[addr[0]] >= self.settings.particle_udp_max_handshakes_per_address:
            raise dtls.DtlsError("too many handshakes from this address")
        while len(self.handshakes) >= self.settings.particle_udp_max_handshakes:
            self._drop_handshake(next(iter(self.handshakes)))
        cid = os.urandom(dtls.CID_LEN)
        while cid in self.channels:
            cid = os.urandom(dtls.CID_LEN)
        hs = dtls.ServerHandshake(self.server_key, rec, frag, hello, cid=cid)
        self.handshakes[addr] = (loop_now, hs)
        self.per_address[addr[0]] += 1
        self._sendto(hs.flight, addr)

    def _expire(self, now: float) -> None:
        limit = now - self.settings.particle_handshake_timeout_s
        while self.handshakes:
            addr, (started, _hs) = next(iter(self.handshakes.items()))
            if started > limit:
                return
            self._drop_handshake(addr)

    def _drop_handshake(self, addr: tuple[str, int]) -> None:
        if self.handshakes.pop(addr, None) is not None:
            self.per_address[addr[0]] -= 1
            if self.per_address[addr[0]] <= 0:
                del self.per_address[addr[0]]

    def _new_channel(self, session: dtls.Session, addr: tuple[str, int]) -> UdpChannel:
        ch = UdpChannel(session, addr)
        self._add_channel(ch)
        return ch

    def _add_channel(self, ch: UdpChannel) -> None:
        self.channels[ch.cid] = ch
        if ch.device_id:
            self.by_device.setdefault(ch.device_id, ch.cid)
        while len(self.channels) > self.settings.particle_udp_max_sessions:
            old = next(iter(self.channels.values()))
            self.forget(old, reset=False)

    def _session_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        cid = data[11:11 + dtls.CID_LEN]
        ch = self.channels.get(cid)
        if ch is None:  # maybe stored (before a restart, or by another node)
            self._look_up(cid, data, addr)
            return
        for rec in dtls.parse_records(data):
            if rec.cid != cid:
                raise dtls.DtlsError("records of several sessions in one datagram")
            ctype, plain = ch.session.open(rec)
            if ch.addr != addr:  # authenticated: follow the device to its new address
                ch.addr = addr
            self.channels.move_to_end(cid)
            held = self.handshakes.get(addr)
            if held is not None and held[1].session is ch.session:
                self._drop_handshake(addr)  # our Finished arrived: the handshake is done
            if ctype == dtls.ALERT:
                self.forget(ch, reset=False)
                return
            if ctype != dtls.APPLICATION_DATA:
                continue
            conn = ch.conn
            if conn is None or conn.closing:
                conn = self._connect(ch)
            conn.feed(plain)

    def _connect(self, ch: UdpChannel) -> UdpConnection:
        conn = UdpConnection(self, ch)
        ch.conn = conn
        task = asyncio.get_running_loop().create_task(conn.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    def start_over(self, ch: UdpChannel, hello: bytes) -> None:
        """A new Hello on a session with an open connection: a new connection takes it."""
        if ch.cid in self.channels:
            self._connect(ch).feed(hello)

    # -- output and bookkeeping ----------------------------------------------------------------

    def _look_up(self, cid: bytes, data: bytes, addr: tuple[str, int]) -> None:
        now = asyncio.get_running_loop().time()
        expires = self.misses.get(cid)
        if expires is not None and expires > now:
            raise dtls.DtlsError("unknown connection ID")  # nothing to answer with
        waiting = self.lookups.get(cid)
        if waiting is not None:
            if len(waiting) < LOOKUP_WAITING_MAX:
                waiting.append((data, addr))
            return
        if len(self.lookups) >= LOOKUPS_MAX:
            raise dtls.DtlsError("too many session lookups at once")
        self.lookups[cid] = [(data, addr)]
        self.lookup_queue.append(cid)
        self.lookup_wake.set()

    async def _look_up_loop(self) -> None:
        """Look the queued CIDs up, many per query."""
        while True:
            await self.lookup_wake.wait()
            self.lookup_wake.clear()
            while self.lookup_queue:
                batch = [self.lookup_queue.popleft()
                         for _ in range(min(LOOKUP_BATCH, len(self.lookup_queue)))]
                try:
                    states = await self.store.load_many(batch)
                except Exception:
                    log.exception("stored DTLS sessions could not be read")
                    states = {}
                for cid in batch:
                    self._restored(cid, states.get(cid))

    def _restored(self, cid: bytes, state: dict[str, Any] | None) -> None:
        waiting = self.lookups.pop(cid, [])
        if state is not None and cid not in self.channels and waiting:
            try:
                ch = UdpChannel.restore(state, waiting[0][1])
            except Exception:
                log.exception("the stored DTLS session %s could not be restored", cid.hex())
            else:
                self._add_channel(ch)
                self.store.touch(ch)  # a new reservation, in the next batch
        if cid not in self.channels:
            self.misses[cid] = asyncio.get_running_loop().time() + MISS_TTL_S
            self.misses.move_to_end(cid)
            while len(self.misses) > MISSES_KEEP:
                self.misses.popitem(last=False)
            self.dropped["unknown connection ID"] += len(waiting)
            return
        for data, from_addr in waiting:
            self.datagram_received(data, from_addr)

    def _sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def send(self, ch: UdpChannel, plaintext: bytes) -> int:
        """Encrypt one CoAP message for a session's device; the bytes sent."""
        if ch.cid not in self.channels:
            return 0
        record = ch.session.seal(plaintext)
        self._sendto(record, ch.addr)
        if ch.session.out_seq >= ch.reserved_seq - SEQ_RESERVE // 2:
            self.store.touch(ch)  # store a new reservation before this one runs out
        return len(record)

    def bound(self, ch: UdpChannel) -> None:
        """A session's device is now known (its first Hello): the session is stored, and an
        older session of the same device is over (Device OS keeps one)."""
        old = self.by_device.get(ch.device_id)
        if old is not None and old != ch.cid and (previous := self.channels.get(old)):
            self.forget(previous, reset=False)
        self.by_device[ch.device_id] = ch.cid
        self.store.touch(ch)

    def forget(self, ch: UdpChannel, *, reset: bool) -> None:
        """Drop a session; with ``reset``, tell the device first (a CoAP RST makes Device OS
        discard its session and do a full handshake)."""
        if reset and ch.cid in self.channels:
            with contextlib.suppress(Exception):
                self.send(ch, coap.encode(Message(coap.RST, coap.EMPTY,
                                                  int.from_bytes(os.urandom(2), "big"))))
        if self.channels.pop(ch.cid, None) is not None and ch.device_id:
            self.store.drop(ch.cid)
        if self.by_device.get(ch.device_id) == ch.cid:
            del self.by_device[ch.device_id]
        conn = ch.conn
        if conn is not None and not conn.closing:
            conn._end("the session was forgotten")
            conn._abort()

    def connection(self, device_id: str) -> UdpConnection | None:
        """The open connection of a device (tests, OTA)."""
        return connection_of(self.connections, device_id)

    async def stop(self) -> None:
        """End every connection (reason: shutdown) and close the socket."""
        transport, self.transport = self.transport, None
        await asyncio.gather(*(c.shutdown(SHUTDOWN_REASON) for c in list(self.connections)),
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await self.store.stop()
        if transport is not None:
            transport.close()


class SessionStore:
    """Writes the listener's changed sessions to the database in batches (every
    ``FLUSH_S``, one transaction), reads one back by CID."""

    def __init__(self, listener: ParticleUdpListener) -> None:
        self.listener = listener
        self.dirty: set[bytes] = set()
        self.gone: set[bytes] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def touch(self, ch: UdpChannel) -> None:
        if ch.device_id and ch.hello is not None:
            self.dirty.add(ch.cid)
            self.gone.discard(ch.cid)
            self.wake.set()

    def drop(self, cid: bytes) -> None:
        self.dirty.discard(cid)
        self.gone.add(cid)
        self.wake.set()

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(FLUSH_S)
            self.wake.clear()
            await self.flush()

    async def flush(self) -> None:
        dirty, self.dirty = self.dirty, set()
        gone, self.gone = self.gone, set()
        channels = self.listener.channels
        rows = [ParticleUdpSession(cid=ch.cid.hex(), device_id=ch.device_id, state=ch.state(),
                                   updated_at=clock.now())
                for cid in dirty if (ch := channels.get(cid)) is not None and ch.hello]
        if not rows and not gone:
            return
        try:
            await self._write(rows, [c.hex() for c in gone])
        except Exception:
            log.exception("DTLS sessions could not be stored (retried)")
            self.dirty |= dirty
            self.gone |= gone
            self.wake.set()

    async def _write(self, rows: list[ParticleUdpSession], gone: list[str]) -> None:
        cids = [*gone, *(r.cid for r in rows)]
        devices = [r.device_id for r in rows]  # a device's older sessions go: it has one
        async with self.listener.hub.sessionmaker() as db:
            for i in range(0, len(cids), IN_CHUNK):
                await db.execute(delete(ParticleUdpSession).where(
                    ParticleUdpSession.cid.in_(cids[i:i + IN_CHUNK])))
            for i in range(0, len(devices), IN_CHUNK):
                await db.execute(delete(ParticleUdpSession).where(
                    ParticleUdpSession.device_id.in_(devices[i:i + IN_CHUNK])))
            db.add_all(rows)
            await db.commit()

    async def load_many(self, cids: list[bytes]) -> dict[bytes, dict[str, Any]]:
        """The stored sessions of these CIDs (the ones found)."""
        async with self.listener.hub.sessionmaker() as db:
            rows = (await db.execute(select(ParticleUdpSession.cid, ParticleUdpSession.state)
                                     .where(ParticleUdpSession.cid.in_(
                                         [c.hex() for c in cids])))).all()
        return {bytes.fromhex(cid): dict(state) for cid, state in rows}

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        await self.flush()


def _is_new_hello(data: bytes, hs: dtls.ServerHandshake) -> bool:
    """A ClientHello that is not the one this handshake answers (a new attempt)."""
    try:
        _rec, _frag, hello = dtls.first_client_hello(data)
    except dtls.DtlsError:
        return False
    return hello.random != hs.client_random


async def start_particle_udp_listener(hub: SessionHub, settings: Settings, *,
                                      host: str | None = None, port: int | None = None
                                      ) -> ParticleUdpListener:
    """Listen for Gen 3 devices on UDP ``port`` (default ``settings.particle_udp_port``; 0: a
    free port). The P-256 server key is created in the data directory on first start."""
    key = await asyncio.to_thread(load_or_create_udp_server_key, settings.data_dir)
    listener = ParticleUdpListener(hub, settings, key)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: listener, local_addr=(host or settings.host,
                                      settings.particle_udp_port if port is None else port),
        reuse_port=settings.listen_reuse_port or None)
    listener.transport = transport
    sock = transport.get_extra_info("socket")
    if sock is not None:  # one socket takes every device's datagrams: a storm bursts
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option,
                                settings.particle_udp_socket_buffer_bytes)
    listener.store.start()
    task = asyncio.get_running_loop().create_task(listener._look_up_loop())
    listener._tasks.add(task)
    sock = transport.get_extra_info("sockname")
    listener.host, listener.port = sock[0], sock[1]
    log.info("Particle Gen 3 devices: listening on UDP %s:%d", listener.host, listener.port)
    return listener


__all__ = ["ParticleUdpListener", "UdpChannel", "UdpConnection",
           "start_particle_udp_listener"]
