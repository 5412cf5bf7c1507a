"""A Particle device over TCP ("lightssl"), in asyncio: corral's own device side of the protocol.

Used by the test suite and the simulator against corral's gateway (or any Particle TCP
server): handshake, Hello, describes (app JSON and a minimal system describe), publish,
subscribe and receive, functions and variables, time, pings both ways, Goodbye, and OTA
(legacy and fast: CRC-32 per chunk, missing-chunk requests, the image is kept).

It behaves like Device OS where that matters to a server (the reference is
``shared/reference/particle-device-protocol*.md``, not corral's server): message ids go up by
one for every message the device originates, the ACK to a server ping carries the device's
own next message id, answers to functions/variables come as an empty ACK and then a separate
NON response with the request's token, and answers to describe requests as a separate CON
response. After the Hello it sends what Device OS sends, in its order: the system describe,
a time request, ``particle/device/updates/enabled`` and ``.../forced``, the application
describe, the ``particle`` and ``spark`` subscriptions. OTA messages are read byte by byte as
Device OS's ``chunked_transfer.cpp`` reads them: UpdateBegin only with exactly a 1-byte token,
chunk CRC and index at fixed offsets (:func:`read_chunk`), fast OTA taken when offered,
missing chunks named only after UpdateDone (ACK 4.00, then ``CON GET /c``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from corral.transports.particle import coap, crypto, messages
from corral.transports.particle.coap import Message
from corral.transports.particle.errors import ParticleProtocolError

log = logging.getLogger("corral.particle.device")

FunctionFn = Callable[[str], "int | Awaitable[int]"]
VariableFn = Callable[[], Any]
TYPE_NUMBERS = {"bool": 1, "int32": 2, "int": 2, "string": 4, "double": 9}
HELLO_FLAGS = 0x36  # diagnostics, immediate updates, goodbye, device-initiated describe
FAST_OTA = 0x01
MAX_CHUNKS = 65535  # Device OS protocol_defs.h
MISSED_CHUNKS_TO_SEND = 40  # indexes in one ChunkMissed request
MINIMUM_CHUNK_INCREASE = 2
UPDATES_ENABLED_EVENT = "particle/device/updates/enabled"
UPDATES_FORCED_EVENT = "particle/device/updates/forced"


class DeviceClosed(Exception):
    """The connection ended (``reason`` says why, as far as the device knows)."""


@dataclasses.dataclass(slots=True)
class Update:
    """An OTA transfer the device received."""

    size: int
    chunk_size: int
    fast: bool
    image: bytearray
    received: set[int] = dataclasses.field(default_factory=set)
    next_index: int = 0
    bad_crc: int = 0
    chunk_messages: int = 0  # since the last ChunkMissed request

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


class ParticleDevice:
    """One simulated Device OS device (TCP protocol)."""

    def __init__(self, device_id: str, device_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                 server_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, *,
                 product_id: int | None = None,
                 product_version: int = 1, platform_id: int = 6, system_version: int = 6200,
                 functions: dict[str, FunctionFn] | None = None,
                 variables: dict[str, tuple[str, VariableFn]] | None = None,
                 ota_chunk_size: int = 512, max_binary_size: int = 10 * 1024 * 1024,
                 fast_ota: bool = True, describe_on_connect: bool = True,
                 system_subscriptions: bool = True, updates_enabled: bool = True,
                 iccid: str | None = None) -> None:
        self.device_id = device_id.lower()
        self.iccid = iccid  # a cellular device's SIM, sent in its system describe
        self.device_key = device_key
        self.server_key = server_key
        self.product_id = product_id if product_id is not None else platform_id
        self.product_version = product_version
        self.platform_id = platform_id
        self.system_version = system_version
        self.functions: dict[str, FunctionFn] = dict(functions or {})
        self.variables: dict[str, tuple[str, VariableFn]] = dict(variables or {})
        self.ota_chunk_size = ota_chunk_size
        self.max_binary_size = max_binary_size
        self.fast_ota = fast_ota  # False: Device OS's fast-OTA override turns it down
        self.updates_enabled = updates_enabled  # System.enableUpdates()/disableUpdates()
        self.updates_forced = False
        self.unreliable = False  # TCP: separate answers are NON (UDP: CON)
        self.describe_on_connect = describe_on_connect
        # what the metrics describe reports: a dict, or a callable returning one
        self.vitals: dict[str, Any] | Callable[[], dict[str, Any]] | None = None
        self.started_at = time.monotonic()
        self.system_subscriptions = system_subscriptions
        self.events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # delivered to us
        self.updates: list[bytes] = []  # completed OTA images
        self.update: Update | None = None
        self.drop_chunks: set[int] = set()  # tests: fast-OTA chunks to "lose" once
        self.corrupt_chunks: set[int] = set()  # tests: chunks damaged in transit, every time
        # called with each completed image (a simulator applies it: reboot on a new version)
        self.on_update: Callable[[bytes], None] | None = None
        self.server_pings = 0
        self.received: list[bytes] | None = None  # tests: a list to keep every plaintext in
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.channel: crypto.Session | None = None
        self.frames = crypto.FrameReader(65_535)
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.token = 0
        self.pending: dict[int, asyncio.Future[Message]] = {}  # by our message id
        self.by_token: dict[bytes, asyncio.Future[Message]] = {}
        self.hello_event = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[Any]] = set()

    # -- connecting --------------------------------------------------------------------------

    async def handshake(self, host: str, port: int, *, within: float = 5.0,
                        nonce_override: bytes | None = None,
                        local_host: str | None = None) -> None:
        """TCP connect and the RSA handshake (no Hello yet). ``nonce_override`` (tests) echoes
        another nonce than the server's; ``local_host`` picks the source address."""
        assert isinstance(self.device_key, rsa.RSAPrivateKey)
        assert isinstance(self.server_key, rsa.RSAPublicKey)
        async with asyncio.timeout(within):
            self.reader, self.writer = await asyncio.open_connection(
                host, port, local_addr=(local_host, 0) if local_host else None)
            nonce = await self.reader.readexactly(crypto.NONCE_LEN)
            blob = crypto.device_blob(self.server_key, nonce_override or nonce, self.device_id,
                                      self.device_key)
            self.writer.write(blob)
            await self.writer.drain()
            reply = await self.reader.readexactly(crypto.SERVER_REPLY_LEN)
        creds = crypto.open_server_reply(self.device_key, self.server_key, reply)
        self.channel = crypto.Session.from_creds(creds)

    async def connect(self, host: str, port: int, *, within: float = 15.0,
                      local_host: str | None = None) -> None:
        """Handshake, Hello, wait for the server Hello, then what Device OS sends after
        connecting (the capture's order): the system describe, a time request, the events
        ``particle/device/updates/enabled`` and ``.../forced``, the application describe,
        and the system subscriptions ``particle`` and ``spark``."""
        await self.handshake(host, port, within=within, local_host=local_host)
        self.start()
        self.send_hello()
        try:
            async with asyncio.timeout(within):
                hello = asyncio.ensure_future(self.hello_event.wait())
                closed = asyncio.ensure_future(self.closed.wait())
                await asyncio.wait([hello, closed], return_when=asyncio.FIRST_COMPLETED)
                hello.cancel()
                closed.cancel()
        except TimeoutError:
            await self.close()
            raise DeviceClosed("no server Hello") from None
        if not self.hello_event.is_set():
            raise DeviceClosed(self.close_reason or "the server closed the connection")
        await self._after_hello(within)

    async def _after_hello(self, within: float) -> None:
        """What Device OS sends once its Hello is answered (see :meth:`connect`)."""
        answers: list[asyncio.Future[Message]] = []
        if self.describe_on_connect:
            answers.append(self.send_request(coap.POST, (b"d",), (bytes((1,)),),
                                             self.system_describe(), content_format=42))
        answers.append(self.send_request(coap.GET, (b"t",)))
        self.publish(UPDATES_ENABLED_EVENT, "true" if self.updates_enabled else "false")
        self.publish(UPDATES_FORCED_EVENT, "true" if self.updates_forced else "false")
        if self.describe_on_connect:
            answers.append(self.send_request(coap.POST, (b"d",), (bytes((2,)),),
                                             self.app_describe()))
        async with asyncio.timeout(within):
            await asyncio.gather(*answers)
        if self.system_subscriptions:
            self.subscribe("particle")
            self.subscribe("spark")

    def start(self) -> None:
        """Start reading (after :meth:`handshake`)."""
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    def send_hello(self) -> None:
        payload = messages.hello_payload(messages.Hello(
            product_id=self.product_id, product_version=self.product_version,
            flags=HELLO_FLAGS, platform_id=self.platform_id,
            system_version=self.system_version, max_message_size=1152,
            max_binary_size=self.max_binary_size, ota_chunk_size=self.ota_chunk_size))
        self.send(Message(coap.NON, coap.POST, self.next_mid(), options=((coap.URI_PATH, b"h"),),
                          payload=payload))

    async def close(self) -> None:
        """Drop the connection (no Goodbye)."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.transport.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for t in list(self._work):
            t.cancel()
        self._closed("closed by the device")

    async def goodbye(self) -> None:
        """Say Goodbye (POST /x), then close."""
        self.send(Message(coap.NON, coap.POST, self.next_mid(), options=((coap.URI_PATH, b"x"),),
                          payload=b"\x00"))
        if self.writer is not None:
            with contextlib.suppress(Exception):
                await self.writer.drain()
        await self.close()

    async def wait_closed(self, within: float = 5.0) -> str | None:
        async with asyncio.timeout(within):
            await self.closed.wait()
        return self.close_reason

    # -- what a device does ------------------------------------------------------------------

    def app_describe(self) -> bytes:
        return json.dumps({"f": list(self.functions),
                           "v": {n: TYPE_NUMBERS[t] for n, (t, _) in self.variables.items()}},
                          separators=(",", ":")).encode()

    def vitals_payload(self) -> bytes:
        """This device's vitals as JSON (what corral stores from ``spark/device/diagnostics/
        update``); ``self.vitals`` (a dict) overrides the defaults."""
        uptime = int(time.monotonic() - self.started_at)
        doc = self.vitals() if callable(self.vitals) else self.vitals
        doc = doc if doc is not None else {
            "device": {"network": {"signal": {"rssi": -60, "strength": 75, "quality": 80}},
                       "cloud": {"connection": {"status": "connected"},
                                 "coap": {"transmit": 0, "retransmit": 0, "unack": 0,
                                          "round_trip": 120},
                                 "publish": {"rate_limited": 0}, "disconnects": 0},
                       "system": {"uptime": uptime, "memory": {"used": 40_000,
                                                               "total": 160_000}}},
            "service": {"device": {"status": "ok"}}}
        return json.dumps(doc, separators=(",", ":")).encode()

    def publish_vitals(self) -> asyncio.Future[Message]:
        """Send the vitals unasked (Device OS's ``Particle.publishVitals()``: a metrics
        describe, ``POST /d?4``); the future of the server's answer."""
        return self.send_request(coap.POST, (b"d",), (bytes((4,)),), self.vitals_payload())

    def system_describe(self) -> bytes:
        """A minimal protobuf ``SystemDescribe``: no modules; a cellular device's ``iccid``
        (field 3, a string) when it has a SIM."""
        if not self.iccid:
            return b""
        raw = self.iccid.encode("ascii")
        return bytes((3 << 3 | 2, len(raw))) + raw

    def publish(self, name: str, data: str | bytes | None = None, *, ttl: int = 60) -> None:
        """A NON event (as Device OS over TCP): no answer."""
        self.send(self._event(coap.NON, self.next_mid(), name, data, ttl))

    async def publish_confirmed(self, name: str, data: str | bytes | None = None, *,
                                ttl: int = 60, within: float = 5.0) -> int:
        """A CON event; the code of the server's ACK (2.04 stored)."""
        mid, fut = self._expect()
        self.send(self._event(coap.CON, mid, name, data, ttl, token=self._token()))
        async with asyncio.timeout(within):
            return (await fut).code

    def _event(self, kind: int, mid: int, name: str, data: str | bytes | None, ttl: int,
               token: bytes = b"") -> Message:
        options: list[tuple[int, bytes]] = [(coap.URI_PATH, b"E"),
                                            (coap.URI_PATH, name.encode())]
        if ttl != 60:
            options.append((coap.MAX_AGE, ttl.to_bytes(4, "big").lstrip(b"\x00")))
        payload = data.encode() if isinstance(data, str) else (data or b"")
        return Message(kind, coap.POST, mid, token, tuple(options), payload)

    def subscribe(self, prefix: str) -> None:
        options = ((coap.URI_PATH, b"e"),) + (((coap.URI_PATH, prefix.encode()),)
                                              if prefix else ())
        self.send(Message(coap.NON, coap.GET, self.next_mid(), options=options))

    async def time(self, within: float = 5.0) -> int:
        """Ask the server for the time (unix seconds)."""
        reply = await self.request(coap.GET, (b"t",), within=within)
        return int.from_bytes(reply.payload, "big")

    async def ping(self, within: float = 5.0) -> None:
        """A keep-alive ping (empty CON); returns when the server ACKs it."""
        mid, fut = self._expect()
        self.send(Message(coap.CON, coap.EMPTY, mid))
        async with asyncio.timeout(within):
            await fut

    async def request(self, code: int, path: tuple[bytes, ...], query: tuple[bytes, ...] = (),
                      payload: bytes = b"", *, content_format: int | None = None,
                      within: float = 5.0) -> Message:
        """A CON request; the server's piggy-backed answer."""
        fut = self.send_request(code, path, query, payload, content_format=content_format)
        async with asyncio.timeout(within):
            return await fut

    def send_request(self, code: int, path: tuple[bytes, ...], query: tuple[bytes, ...] = (),
                     payload: bytes = b"", *, content_format: int | None = None
                     ) -> asyncio.Future[Message]:
        """Send a CON request now; the future of the server's piggy-backed answer."""
        mid, fut = self._expect()
        options = [(coap.URI_PATH, s) for s in path]
        if content_format is not None:
            options.append((coap.CONTENT_FORMAT, bytes((content_format,))))
        options += [(coap.URI_QUERY, q) for q in query]
        self.send(Message(coap.CON, code, mid, self._token(), tuple(options), payload))
        return fut

    # -- low level (also for tests that misbehave on purpose) --------------------------------

    def next_mid(self) -> int:
        mid = self.mid
        self.mid = (mid + 1) & 0xFFFF
        return mid

    def _token(self) -> bytes:
        self.token = self.token % 255 + 1
        return bytes((self.token,))

    def _expect(self) -> tuple[int, asyncio.Future[Message]]:
        mid = self.next_mid()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.pending[mid] = fut
        return mid, fut

    def send(self, m: Message) -> None:
        self.send_plain(coap.encode(m))

    def send_plain(self, plaintext: bytes) -> None:
        """Encrypt and frame any plaintext (a CoAP message, or anything at all)."""
        if self.channel is None or self.writer is None:
            raise DeviceClosed("not connected")
        self.writer.write(self.channel.seal(plaintext))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are, on the wire."""
        if self.writer is None:
            raise DeviceClosed("not connected")
        self.writer.write(data)

    def _closed(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        for fut in [*self.pending.values(), *self.by_token.values()]:
            if not fut.done():
                fut.set_exception(DeviceClosed(reason))
        self.pending.clear()
        self.by_token.clear()
        self.closed.set()

    # -- input -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self.reader is not None and self.channel is not None
        try:
            while True:
                data = await self.reader.read(65_536)
                if not data:
                    self._closed("the server closed the connection")
                    return
                for ciphertext in self.frames.feed(data):
                    raw = self.channel.open(ciphertext)
                    if self.received is not None:
                        self.received.append(raw)
                    await self._handle(coap.decode(raw), raw)
        except ParticleProtocolError as exc:
            self._closed(f"protocol error: {exc}")
        except (ConnectionError, OSError) as exc:
            self._closed(f"connection lost: {exc!r}")

    async def _handle(self, m: Message, raw: bytes) -> None:
        if m.type in (coap.ACK, coap.RST):
            fut = self.pending.pop(m.message_id, None)
            if fut is not None and not fut.done():
                fut.set_result(m)
            return
        if m.is_response:  # a separate answer to one of our requests
            fut = self.by_token.pop(m.token, None)
            if fut is not None and not fut.done():
                fut.set_result(m)
            if m.type == coap.CON:
                self.send(Message(coap.ACK, coap.EMPTY, m.message_id))
            return
        if m.code == coap.EMPTY:
            if m.type == coap.CON:  # the server's ping: Device OS ACKs with its own next id
                self.server_pings += 1
                self.send(Message(coap.ACK, coap.EMPTY, self.next_mid()))
            return
        segments = m.options_of(coap.URI_PATH)
        resource = segments[0] if segments else b""
        name = "/".join(s.decode("utf-8", "replace") for s in segments[1:])
        if resource == b"h":
            self.hello_event.set()
        elif resource == b"e" and m.code == coap.POST:
            self.events.put_nowait((name, m.payload.decode("utf-8", "replace")))
        elif resource == b"f":
            self._later(self._answer_function(m, name))
        elif resource == b"v":
            self._later(self._answer_variable(m, name))
        elif resource == b"d":
            self._later(self._answer_describe(m))
        elif resource == b"u" and m.code == coap.POST:
            self._update_begin(m, raw)
        elif resource == b"c" and m.code == coap.POST:
            self._chunk(m, raw)
        elif resource == b"u" and m.code == coap.PUT:
            self._update_done(m)
        elif m.type == coap.CON:
            self.send(Message(coap.ACK, coap.NOT_FOUND, m.message_id, m.token))

    def _later(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    def _empty_ack(self, m: Message) -> None:
        if m.type == coap.CON:
            self.send(Message(coap.ACK, coap.EMPTY, m.message_id))

    def _answer(self, m: Message, code: int, payload: bytes = b"", *, con: bool = False
                ) -> None:
        self.send(Message(coap.CON if con else coap.NON, code, self.next_mid(), m.token,
                          payload=payload))

    async def _answer_function(self, m: Message, name: str) -> None:
        self._empty_ack(m)
        fn = self.functions.get(name)
        if fn is None:
            self._answer(m, coap.NOT_FOUND)
            return
        query = m.options_of(coap.URI_QUERY)
        arg = b"&".join(query).decode("utf-8", "replace")
        result = fn(arg)
        if inspect.isawaitable(result):
            result = await result
        self._answer(m, coap.CHANGED, int(result).to_bytes(4, "big", signed=True))

    async def _answer_variable(self, m: Message, name: str) -> None:
        self._empty_ack(m)
        var = self.variables.get(name)
        if var is None:
            self._answer(m, coap.NOT_FOUND)
            return
        vtype, getter = var
        value = getter()
        if inspect.isawaitable(value):
            value = await value
        if vtype == "bool":
            payload = b"\x01" if value else b"\x00"
        elif vtype in ("int32", "int"):
            payload = int(value).to_bytes(4, "big", signed=True)
        elif vtype == "double":
            payload = struct.pack("<d", float(value))
        else:
            payload = str(value).encode("utf-8")
        self._answer(m, coap.CONTENT, payload)

    async def _answer_describe(self, m: Message) -> None:
        self._empty_ack(m)
        query = m.options_of(coap.URI_QUERY)
        kind = query[0][0] if query and len(query[0]) == 1 else 0
        if kind == 2:
            self._answer(m, coap.CONTENT, self.app_describe(), con=True)
        elif kind == 1:
            self._answer(m, coap.CONTENT, self.system_describe(), con=True)
        elif kind == 4:  # metrics: corral's device answers with its vitals as JSON
            self._answer(m, coap.CONTENT, self.vitals_payload(), con=True)
        else:  # Device OS: one type per request, anything else is an error
            self._answer(m, coap.BAD_REQUEST, con=True)

    # -- OTA (legacy and fast, as Device OS's chunked_transfer.cpp reads the bytes) --------------

    def _update_begin(self, m: Message, raw: bytes) -> None:
        # Device OS parses the payload only when the message is at least 20 bytes and byte
        # 7 is the payload marker: exactly a 1-byte token and the single option b1 75
        params = None
        if len(raw) >= 20 and raw[7] == coap.PAYLOAD_MARKER:
            params = struct.unpack(">BHIBI", raw[8:20])
        ok = params is not None
        if params is not None:
            flags, chunk_size, size, _store, _address = params
            ok = 0 < size <= self.max_binary_size and chunk_size > 0 \
                and -(-size // chunk_size) < MAX_CHUNKS
        if not ok:  # the parameters are refused: a coded ACK (5.03)
            self.send(Message(coap.ACK, coap.SERVICE_UNAVAILABLE, m.message_id, m.token))
            return
        self._empty_ack(m)
        fast = bool(flags & FAST_OTA) and self.fast_ota
        self.update = Update(size, chunk_size, fast, bytearray(size))
        self._answer(m, coap.CHANGED, bytes((FAST_OTA if fast else 0,)),
                     con=self.unreliable)

    def _chunk(self, m: Message, raw: bytes) -> None:
        up = self.update
        if up is None:  # not updating: ignored
            self._empty_ack(m)
            return
        chunk = read_chunk(raw)
        fast = chunk is not None and chunk.fast
        if not fast:
            self._empty_ack(m)
        if chunk is None:
            return
        index = up.next_index if chunk.index is None else chunk.index
        up.chunk_messages += 1
        payload = chunk.data
        if index in self.corrupt_chunks and payload:  # a bit flipped on the way
            payload = bytes((payload[0] ^ 0x01,)) + payload[1:]
        good = zlib.crc32(payload) == chunk.crc and index < up.chunks
        if fast and index in self.drop_chunks:
            self.drop_chunks.discard(index)
            good = False
        if good:
            start = index * up.chunk_size
            up.image[start:start + len(payload)] = payload
            up.received.add(index)
            up.next_index = index + 1
        else:
            up.bad_crc += 1
        if not fast:
            self._answer(m, coap.CHANGED if good else coap.BAD_REQUEST, con=self.unreliable)
        # fast OTA: no answer per chunk; what is missing is asked for after UpdateDone

    def _update_done(self, m: Message) -> None:
        up = self.update
        missing = [] if up is None else [i for i in range(up.chunks) if i not in up.received]
        if up is None or missing:
            self.send(Message(coap.ACK, coap.BAD_REQUEST, m.message_id, m.token))
            if up is None or not missing:
                return
            # then ChunkMissed: CON GET /c with the first missing indexes (u16 each)
            count = min(up.chunk_messages + max(int(up.chunk_messages * 0.2),
                                                MINIMUM_CHUNK_INCREASE), MISSED_CHUNKS_TO_SEND)
            up.chunk_messages = 0
            mid, fut = self._expect()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.send(Message(coap.CON, coap.GET, mid, options=((coap.URI_PATH, b"c"),),
                              payload=b"".join(i.to_bytes(2, "big") for i in missing[:count])))
            return
        self.update = None
        self.updates.append(bytes(up.image))
        self.send(Message(coap.ACK, coap.CHANGED, m.message_id, m.token, payload=b'{"r":0}'))
        if self.on_update is not None:  # quick; a reboot runs in the caller's own task
            self.on_update(bytes(up.image))


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkView:
    """A legacy OTA chunk as Device OS reads it (see :func:`read_chunk`)."""

    crc: int
    index: int | None  # None: a normal chunk (the device counts); set: fast OTA
    data: bytes

    @property
    def fast(self) -> bool:
        return self.index is not None


def read_chunk(raw: bytes) -> ChunkView | None:
    """A chunk's CRC-32, fast-OTA index and data as Device OS finds them
    (chunked_transfer.cpp ``handle_chunk``): from the FIXED byte 7 (a 4-byte header, a
    1-byte token and ``b1 63``), each byte up to the 0xFF payload marker is taken as a
    one-byte option header whose value follows it; the first such "option" is the CRC (4
    bytes), a second one is the index (2 bytes) and makes it a fast-OTA chunk. Option
    numbers are never checked and the offset is a ``uint8_t``. So a chunk sent without a
    token has its CRC misread (and may turn "fast" with a bogus index): it fails here as it
    does on a real device. None when no payload marker is found."""
    pos = 7
    crc = 0
    index: int | None = None
    for option in range(256):  # Device OS would spin forever on a marker-less message
        if pos >= len(raw):
            return None
        header = raw[pos]
        if header == coap.PAYLOAD_MARKER:
            return ChunkView(crc, index, bytes(raw[pos + 1:]))
        if option == 0:
            crc = int.from_bytes(raw[pos + 1:pos + 5].ljust(4, b"\x00"), "big")
        elif option == 1:
            index = int.from_bytes(raw[pos + 1:pos + 3].ljust(2, b"\x00"), "big")
        pos = (pos + (header & 0x0F) + 1) & 0xFF
    return None


__all__ = ["DeviceClosed", "ParticleDevice", "Update"]
