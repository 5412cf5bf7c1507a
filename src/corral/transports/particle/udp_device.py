"""A Gen 3 Particle device over DTLS 1.2 / UDP, in asyncio: corral's own device side.

It behaves as Device OS does on UDP (``shared/reference/particle-device-protocol-udp.md``),
not as corral's server expects: a ``connect()``ed UDP socket from a new source port per
connection attempt; the DTLS handshake of :mod:`.dtls` with the ClientHello resent on a
timer; a CON Hello carrying the 12-byte device id (no server Hello is awaited, only the
ACK); message ids from 1 after boot, kept across connections; events, subscriptions and the
separate answers to functions, variables and describes as CON, each resent on Device OS's
timers (4 s times 1 to 1.5, doubling, 3 retransmissions) until ACKed, and a CON never ACKed
wipes the session; server CONs de-duplicated by message id with the same ACK sent again;
1-byte datagrams ignored; a CoAP RST from the server discards the session.

:meth:`ParticleUdpDevice.resume` continues the saved epoch-1 session with no handshake from a
new source port: records are type 253 until anything from the server decrypts, and the Hello
may be skipped (a CON ping instead), as Device OS does when its saved state is unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from corral.transports.particle import coap, dtls, messages
from corral.transports.particle import ota_v3 as ota
from corral.transports.particle.coap import Message
from corral.transports.particle.device import HELLO_FLAGS, DeviceClosed, ParticleDevice
from corral.transports.particle.errors import ParticleProtocolError

MAX_RETRANSMIT = 3
DEDUP_KEEP = 256


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, device: ParticleUdpDevice) -> None:
        self.device = device

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.device._datagram(data)

    def error_received(self, exc: Exception) -> None:
        pass  # e.g. ICMP port unreachable while the server restarts: retransmissions go on


class ParticleUdpDevice(ParticleDevice):
    """One simulated Gen 3 device (P-256 key, DTLS over UDP)."""

    def __init__(self, device_id: str, device_key: ec.EllipticCurvePrivateKey,
                 server_key: ec.EllipticCurvePublicKey, *, platform_id: int = 12,
                 ack_timeout_s: float = 4.0, handshake_retransmit_s: float = 3.0,
                 ota_v3: bool = True, **kwargs: Any) -> None:
        super().__init__(device_id, device_key, server_key, platform_id=platform_id, **kwargs)
        self.udp_key = device_key
        self.udp_server_key = server_key
        self.unreliable = True
        self.mid = 1  # Device OS counts from 1 after boot
        self.ack_timeout_s = ack_timeout_s
        self.handshake_retransmit_s = handshake_retransmit_s
        # Gen 3 hardware selects the v3 update protocol (Hello flag 0x80)
        self.hello_flags = HELLO_FLAGS | (messages.HELLO_FLAG_OTA_PROTOCOL_V3 if ota_v3 else 0)
        self.transfers: dict[bytes, ota.Transfer] = {}  # v3 updates by SHA-256 (resumable)
        self.transfer: ota.Transfer | None = None
        self.tokened_chunks = 0  # v3 chunks that wrongly carried a token (ignored)
        self._ack_timer: asyncio.TimerHandle | None = None
        self.dtls: dtls.Session | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.full_handshakes = 0
        self.resets = 0
        self.resent = 0  # CoAP messages sent again (no ACK in time)
        self.handshake_resent = 0  # handshake flights sent again
        self.drop_incoming = 0  # tests: session datagrams to "lose" on the way in
        self._hs_inbox: asyncio.Queue[bytes] | None = None
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._unacked: dict[int, asyncio.Task[None]] = {}
        self._seen: collections.OrderedDict[int, bytes | None] = collections.OrderedDict()

    # -- connecting --------------------------------------------------------------------------

    async def _open_socket(self, host: str, port: int, local_host: str | None) -> None:
        if self.transport is not None:
            self.transport.close()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), remote_addr=(host, port),
            local_addr=(local_host, 0) if local_host else None)
        self.transport = transport

    def local_port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    async def handshake(self, host: str, port: int, *, within: float = 5.0,
                        nonce_override: bytes | None = None,
                        local_host: str | None = None) -> None:
        """A new socket (new source port) and a full DTLS handshake."""
        await self._open_socket(host, port, local_host)
        assert self.transport is not None
        hs = dtls.ClientHandshake(self.udp_key, self.udp_server_key)
        self._hs_inbox = asyncio.Queue()
        try:
            self.transport.sendto(hs.start())
            async with asyncio.timeout(within):
                while hs.session is None:
                    try:
                        async with asyncio.timeout(self.handshake_retransmit_s):
                            data = await self._hs_inbox.get()
                    except TimeoutError:
                        self.transport.sendto(hs.flight)
                        self.handshake_resent += 1
                        continue
                    try:
                        replies = hs.receive(data)
                    except dtls.DtlsError as exc:
                        raise DeviceClosed(f"handshake failed: {exc.reason}") from None
                    for reply in replies:
                        self.transport.sendto(reply)
        finally:
            self._hs_inbox = None
        self.dtls = hs.session
        self.full_handshakes += 1
        self._seen.clear()
        self._reset_closed()

    def _reset_closed(self) -> None:
        self.closed = asyncio.Event()
        self.close_reason = None
        self.hello_event = asyncio.Event()

    async def connect(self, host: str, port: int, *, within: float = 5.0,
                      local_host: str | None = None) -> None:
        """Full handshake, the CON Hello (answered by its ACK), then what Device OS sends
        after connecting (describes, time, update events, subscriptions)."""
        await self.handshake(host, port, within=within, local_host=local_host)
        self.start()
        await self._hello(within)
        await self._after_hello(within)

    async def resume(self, host: str, port: int, *, within: float = 5.0, hello: bool = False,
                     local_host: str | None = None) -> None:
        """Continue the saved session from a new source port with no handshake: a CON ping
        (or, with ``hello``, the Hello) in records of type 253."""
        if self.dtls is None:
            raise DeviceClosed("no session to resume")
        await self._stop_reading()
        await self._open_socket(host, port, local_host)
        self.dtls.moved = True
        self._reset_closed()
        self.start()
        if hello:
            await self._hello(within)
        else:
            await self.ping(within)
            self.hello_event.set()

    async def _hello(self, within: float) -> None:
        mid, fut = self._expect()
        payload = messages.hello_payload(messages.Hello(
            product_id=self.product_id, product_version=self.product_version,
            flags=self.hello_flags, platform_id=self.platform_id,
            system_version=self.system_version, max_message_size=1152,
            max_binary_size=self.max_binary_size, ota_chunk_size=self.ota_chunk_size,
            device_id=bytes.fromhex(self.device_id)))
        self.send(Message(coap.CON, coap.POST, mid, options=((coap.URI_PATH, b"h"),),
                          payload=payload))
        try:
            async with asyncio.timeout(within):
                reply = await fut
        except TimeoutError:
            raise DeviceClosed("the Hello was not acknowledged") from None
        if reply.type != coap.ACK:
            raise DeviceClosed("the server reset the session")
        self.hello_event.set()

    async def close(self) -> None:
        """Stop (no Goodbye). The session is kept: :meth:`resume` continues it."""
        await self._stop_reading()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        for t in list(self._work):
            t.cancel()
        self._closed("closed by the device")

    async def _stop_reading(self) -> None:
        for t in list(self._unacked.values()):
            t.cancel()
        self._unacked.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._inbox = asyncio.Queue()

    async def goodbye(self, within: float = 5.0) -> None:
        """A CON Goodbye (POST /x); waits for its ACK, then stops."""
        mid, fut = self._expect()
        self.send(Message(coap.CON, coap.POST, mid, options=((coap.URI_PATH, b"x"),),
                          payload=b"\x00"))
        with contextlib.suppress(TimeoutError, DeviceClosed):
            async with asyncio.timeout(within):
                await fut
        await self.close()

    # -- what changes on UDP -----------------------------------------------------------------

    def publish(self, name: str, data: str | bytes | None = None, *, ttl: int = 60) -> None:
        """A CON event (as Device OS on UDP): the server ACKs it."""
        self.send(self._event(coap.CON, self.next_mid(), name, data, ttl))

    def subscribe(self, prefix: str) -> None:
        options = ((coap.URI_PATH, b"e"),) + (((coap.URI_PATH, prefix.encode()),)
                                              if prefix else ())
        self.send(Message(coap.CON, coap.GET, self.next_mid(), options=options))

    def _answer(self, m: Message, code: int, payload: bytes = b"", *, con: bool = False
                ) -> None:
        super()._answer(m, code, payload, con=True)  # separate answers are CON on UDP

    def send(self, m: Message) -> None:
        raw = coap.encode(m)
        if m.type == coap.ACK and m.message_id in self._seen:
            self._seen[m.message_id] = raw
        self.send_plain(raw)
        if m.type == coap.CON:
            self._unacked[m.message_id] = asyncio.get_running_loop().create_task(
                self._retransmit(m.message_id, raw))

    def send_plain(self, plaintext: bytes) -> None:
        if self.dtls is None or self.transport is None:
            raise DeviceClosed("not connected")
        self.transport.sendto(self.dtls.seal(plaintext))

    def send_raw(self, data: bytes) -> None:
        if self.transport is None:
            raise DeviceClosed("not connected")
        self.transport.sendto(data)

    async def _retransmit(self, mid: int, raw: bytes) -> None:
        delay = self.ack_timeout_s * (1 + random.randint(0, 255) / 512)
        for _ in range(MAX_RETRANSMIT):
            await asyncio.sleep(delay)
            with contextlib.suppress(DeviceClosed):
                self.send_plain(raw)
                self.resent += 1
            delay *= 2
        await asyncio.sleep(delay)
        # never acknowledged: Device OS closes the channel and wipes the session
        self._unacked.pop(mid, None)
        self.dtls = None
        self._closed("a CON was never acknowledged")

    # -- input -------------------------------------------------------------------------------

    def _datagram(self, data: bytes) -> None:
        if len(data) <= 1:
            return  # Device OS ignores 1-byte datagrams (NAT keep-alives)
        if self._hs_inbox is not None:
            self._hs_inbox.put_nowait(data)
            return
        session = self.dtls
        if session is None:
            return
        if self.drop_incoming > 0:
            self.drop_incoming -= 1
            return
        try:
            records = dtls.parse_records(data)
        except dtls.DtlsError:
            return
        for rec in records:
            try:
                ctype, plain = session.open(rec)
            except dtls.DtlsError:
                continue  # epoch 0 or not ours: discarded
            if ctype == dtls.APPLICATION_DATA:
                self._inbox.put_nowait(plain)

    async def _read_loop(self) -> None:
        try:
            while True:
                raw = await self._inbox.get()
                if self.received is not None:
                    self.received.append(raw)
                await self._handle(coap.decode(raw), raw)
        except ParticleProtocolError as exc:
            self._closed(f"protocol error: {exc}")

    async def _handle(self, m: Message, raw: bytes) -> None:
        if m.type in (coap.ACK, coap.RST):
            task = self._unacked.pop(m.message_id, None)
            if task is not None:
                task.cancel()
            if m.type == coap.RST and m.message_id not in self.pending:
                self.resets += 1  # Device OS discards the session: a full handshake next
                self.dtls = None
                self._closed("the server reset the session")
                return
            await super()._handle(m, raw)
            return
        if m.message_id in self._seen:  # the server sent it again: the same ACK again
            cached = self._seen[m.message_id]
            if cached is not None and m.type == coap.CON:
                self.send_plain(cached)
            return
        self._seen[m.message_id] = None
        while len(self._seen) > DEDUP_KEEP:
            self._seen.popitem(last=False)
        if m.code == coap.EMPTY and m.type == coap.CON:  # the server's ping
            self.server_pings += 1
            self.send(Message(coap.ACK, coap.EMPTY, m.message_id))
            return
        resource = m.option(coap.URI_PATH)
        if m.code == coap.POST and resource in (ota.START, ota.CHUNK, ota.FINISH):
            self._update_v3(m, resource)
            return
        await super()._handle(m, raw)

    # -- OTA, v3 (firmware_update.cpp) -------------------------------------------------------

    def _update_v3(self, m: Message, resource: bytes) -> None:
        if resource == ota.START:
            self._empty_ack(m)
            t, options, error = ota.start_answer(self.transfers, m)
            if t is None:
                self.send(Message(coap.CON, coap.BAD_REQUEST, self.next_mid(), m.token,
                                  payload=error))
                return
            self.transfer = t
            self.send(Message(coap.CON, coap.CREATED, self.next_mid(), m.token, options))
        elif resource == ota.CHUNK:
            t = self.transfer
            if m.token:  # Device OS: a chunk with a token is an error
                self.tokened_chunks += 1
                return
            if t is None:
                return
            index = m.option(ota.CHUNK_INDEX)
            if index is not None and int.from_bytes(index, "big") in self.drop_chunks:
                self.drop_chunks.discard(int.from_bytes(index, "big"))  # lost on the way
                return
            if ota.take_chunk(t, m):
                self._send_update_ack()
            elif self._ack_timer is None:  # at the latest 200 ms after a chunk
                self._ack_timer = asyncio.get_running_loop().call_later(
                    0.2, self._send_update_ack)
        else:
            self._empty_ack(m)
            t = self.transfer
            if t is None or not ota.complete(t):
                self.send(Message(coap.CON, coap.BAD_REQUEST, self.next_mid(), m.token,
                                  payload=b"incomplete"))
                return
            # applied only once the server ACKs this 2.04
            mid, fut = self._expect()
            self.send(Message(coap.CON, coap.CHANGED, mid, m.token, payload=t.stats()))
            fut.add_done_callback(lambda f: self._apply_v3(t, f))

    def _send_update_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        t = self.transfer
        if t is not None and self.dtls is not None and self.transport is not None:
            self.send(ota.ack_message(t, self.next_mid()))

    def _apply_v3(self, t: ota.Transfer, f: asyncio.Future[Message]) -> None:
        if f.cancelled() or f.exception() is not None or f.result().type != coap.ACK:
            return
        self.transfer = None
        self.transfers.pop(t.sha, None)
        self.updates.append(bytes(t.image))
        if self.on_update is not None:
            self.on_update(bytes(t.image))


__all__ = ["ParticleUdpDevice"]
