"""corral's Particle gateway: the server side of Device OS's TCP protocol ("lightssl", port 5683).

Per connection: the RSA handshake (:mod:`.crypto`), then an AES-128-CBC session carrying CoAP
(:mod:`.coap`). The device's Hello opens a core :class:`DeviceSession` (admission, presence);
CoAP requests from the device become session calls (describe, publish, subscribe, time,
ping, goodbye) and the core's link calls become CoAP requests to the device (functions,
variables, event deliveries, describe requests, and OTA through :meth:`ParticleConnection.
send_firmware`).

Keys: a known device's handshake is accepted only when its public key equals the one
registered for it (``POST /v1/provisioning/:deviceId``); a known device without a registered
key is refused. A device corral has never seen completes the handshake with the key it sent,
and the core's admission (on the Hello's product id) decides: quarantined, or approved when
the product auto-approves unknown devices. Either way its key is pinned (trust on first use),
so later connections must present the same key.

Anything malformed (wrong nonce, truncated or garbage handshake, bad length prefix, bad
padding, malformed CoAP, an unknown CoAP code, a message-id gap), keep-alive silence, and a
peer that stops reading end that one connection; others are never affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from corral.devices.credentials import PublicKey
from corral.kit import clock
from corral.kit.text import bounded_loads
from corral.sessions.core import SessionHub
from corral.sessions.link import (
    DeviceError,
    FirmwareImage,
    FirmwareProgress,
    Hello,
    Refused,
    TransferResult,
    UpdateNotice,
)
from corral.sessions.session import DeviceSession
from corral.settings import Settings
from corral.transports.listening import close_server
from corral.transports.particle import coap, crypto, messages, ota_v3
from corral.transports.particle.coap import Message
from corral.transports.particle.errors import ParticleProtocolError
from corral.transports.particle.keys import load_or_create_server_key
from corral.transports.slots import AddressSlots

log = logging.getLogger("corral.particle")

READ_SIZE: Final = 65_536
MAX_FRAME: Final = 8192  # ciphertext bytes of one device message
WRITE_BUFFER_HIGH: Final = 64 * 1024  # above this, writers wait for the device to read
WRITE_BUFFER_MAX: Final = 1024 * 1024  # above this, the device is dropped at once
HELLO_WINDOW_S: Final = 4.0  # Device OS gives up without a server Hello within this
MAX_PENDING: Final = 255  # Device OS tokens are one byte

# Variable types in the app describe (Device OS CloudVariableType) -> corral's type names.
VARIABLE_TYPES: Final[dict[int, str]] = {1: "bool", 2: "int32", 4: "string", 9: "double"}
DESCRIBE_SYSTEM: Final = 1
DESCRIBE_APP: Final = 2
DESCRIBE_METRICS: Final = 4
UPDATES_ENABLED_EVENT: Final = "particle/device/updates/enabled"  # from the device
UPDATES_EVENT_PREFIX: Final = "particle/device/updates/"  # + pending | forced, to the device
# known CoAP codes: empty, the four methods, and success/error responses
_KNOWN_CODES: Final = frozenset([coap.EMPTY, coap.GET, coap.POST, coap.PUT, coap.DELETE,
                                 *range(0x41, 0x46), *range(0x80, 0x90), *range(0xA0, 0xA6)])


class _Close(Exception):
    """End this connection with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(slots=True)
class _Pending:
    """A request we sent that waits for its answer (by message id, then by token)."""

    kind: str
    mid: int
    token: bytes
    future: asyncio.Future[Message]
    acked: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class OtaResult:
    """How a firmware transfer ended."""

    ok: bool
    reason: str
    bytes_sent: int = 0
    chunks: int = 0
    resent: int = 0


ProgressFn = Callable[[int, int], Any]  # (bytes sent, total)


def system_version_text(number: int) -> str:
    """Device OS's system module version as text: 6200 -> "6.2.0" (since 3.0.0 the number is
    major*1000 + minor*100 + patch); older numbers are given as they are."""
    if number >= 3000:
        return f"{number // 1000}.{number // 100 % 10}.{number % 100}"
    return str(number)


def product_id_of(hello: messages.Hello) -> int | None:
    """The product the Hello names, or None for a developer device (Device OS sends its
    platform id, or 0/0xFFFF, when the firmware sets no product)."""
    pid = hello.product_id
    if pid in (0, 0xFFFF) or pid == hello.platform_id:
        return None
    return pid


def app_describe(payload: bytes) -> tuple[list[str] | None, dict[str, str] | None]:
    """Functions and variables from an application describe (``{"f": [...], "v": {...}}``)."""
    try:
        doc = bounded_loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused("invalid", "the describe is not JSON") from None
    if not isinstance(doc, dict):
        raise Refused("invalid", "the describe is not a JSON object")
    functions = doc.get("f")
    variables = doc.get("v")
    fns = [str(f) for f in functions] if isinstance(functions, list) else None
    vs: dict[str, str] | None = None
    if isinstance(variables, dict):
        vs = {}
        for name, vtype in variables.items():
            t = VARIABLE_TYPES.get(vtype) if isinstance(vtype, int) else None
            if t is None:
                log.info("variable %r of unknown type %r ignored", name, vtype)
                continue
            vs[str(name)] = t
    return fns, vs


def system_iccid(payload: bytes, *, protobuf: bool) -> str | None:
    """The SIM ICCID a cellular device reports in its system describe: protobuf
    ``particle.cloud.SystemDescribe`` field 3 (Content-Format 42), or the ``iccid`` key of
    the older JSON system describe. None when there is none or the describe is unreadable
    (logged: a describe corral cannot read does not end the session)."""
    if not payload:
        return None
    try:
        if protobuf or payload[:1] != b"{":
            iccid = messages.parse_system_describe(payload).iccid
        else:
            doc = bounded_loads(payload.decode("utf-8"))
            iccid = doc.get("iccid") if isinstance(doc, dict) else None
    except (messages.MessageError, UnicodeDecodeError, ValueError):
        log.info("a system describe of %d bytes could not be read", len(payload))
        return None
    if not isinstance(iccid, str) or not iccid.strip():
        return None
    return iccid.strip()


def decode_variable(payload: bytes, vtype: str) -> Any:
    """A variable's value as the device sends it (int32 big-endian, bool 1 byte, double
    little-endian, string raw)."""
    if vtype == "int32":
        if len(payload) != 4:
            raise DeviceError(f"an int32 is 4 bytes, not {len(payload)}")
        return int.from_bytes(payload, "big", signed=True)
    if vtype == "bool":
        if len(payload) != 1:
            raise DeviceError(f"a bool is 1 byte, not {len(payload)}")
        return payload != b"\x00"
    if vtype == "double":
        if len(payload) != 8:
            raise DeviceError(f"a double is 8 bytes, not {len(payload)}")
        return struct.unpack("<d", payload)[0]
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DeviceError("the string is not UTF-8") from None


def _uint(value: bytes) -> int:
    return int.from_bytes(value, "big") if value else 0


class ParticleConnection:
    """One device connection; the session core's link to the device."""

    transport = "particle"
    admit_within_s = HELLO_WINDOW_S  # Device OS over TCP gives up without a server Hello

    def __init__(self, listener: ParticleListener, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self._init_state(listener, peer[0] if isinstance(peer, tuple) and peer else None)

    def _init_state(self, listener: Any, peer_ip: str | None) -> None:
        """What every Particle connection keeps, whatever carries it (TCP here, UDP in
        :mod:`.udp`)."""
        self.listener = listener
        self.hub: SessionHub = listener.hub
        self.peer_ip = peer_ip
        self.device_id = ""
        self._early: list[Message] = []  # messages that came with the Hello
        self.sent_key: PublicKey | None = None
        self.first_time = False
        self.hello: messages.Hello | None = None
        self.session: DeviceSession | None = None
        self.channel: crypto.Session | None = None
        self.frames = crypto.FrameReader(MAX_FRAME)
        self.next_mid = 0  # ours
        self.expected_mid: int | None = None  # the device's next message id
        self.next_token = 0
        self.by_mid: dict[int, _Pending] = {}
        self.by_token: dict[bytes, _Pending] = {}
        self.pings: list[_Pending] = []
        self.missing_chunks: list[int] = []
        self.missing_event = asyncio.Event()
        self.closing = False
        self.kicked = False
        self.end_reason: str | None = None
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ota_lock = asyncio.Lock()
        self.v3_acks: ota_v3.Acks | None = None
        self.done = asyncio.Event()

    def __repr__(self) -> str:
        return f"<particle.Connection {self.device_id or '?'} from {self.peer_ip}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.listener.connections.add(self)
        try:
            try:
                await self._serve()
            except _Close as exc:
                self._end(exc.reason)
            except ParticleProtocolError as exc:
                self._end(f"protocol error: {exc}")
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                self._end("connection lost")
            except Exception:
                log.exception("Particle connection %r failed", self)
                self._end("internal error")
            finally:
                await self._finish()
        finally:
            self._abort()
            self.listener.connections.discard(self)
            self.done.set()

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason

    async def shutdown(self, reason: str) -> None:
        """Close from the server side (listener stopping) and wait for the cleanup."""
        self._end(reason)
        self._abort()
        try:
            async with asyncio.timeout(10.0):
                await self.done.wait()
        except TimeoutError:
            pass

    async def _finish(self) -> None:
        self.closing = True
        for t in list(self.tasks):
            t.cancel()
        for p in [*self.by_mid.values(), *self.by_token.values(), *self.pings]:
            if not p.future.done():
                p.future.set_exception(DeviceError("the device disconnected"))
        self.by_mid.clear()
        self.by_token.clear()
        self.pings.clear()
        # let the callers' request handlers answer before the core session closes
        for _ in range(5):
            await asyncio.sleep(0)
        session = self.session
        reason = self.end_reason or "connection lost"
        if session is not None:
            log.info("Particle device %s disconnected: %s", self.device_id, reason)
            await session.close(reason)
        elif self.device_id:
            log.info("Particle device %s not admitted: %s", self.device_id, reason)
        else:
            log.info("Particle connection from %s ended in the handshake: %s", self.peer_ip,
                     reason)

    def _abort(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    # -- handshake and the read loop ---------------------------------------------------------

    async def _serve(self) -> None:
        await self._handshake_and_hello()
        for m in self._early:
            await self._handle(m)
        self._early = []
        await self._loop()

    async def _handshake_and_hello(self) -> None:
        # The nonce goes out at once and the device's 256 bytes are awaited without a
        # handshake slot: a connection that never answers costs a socket until its timeout,
        # never a slot. Admission control: at most `max_handshakes` connections do the RSA
        # work, the Hello and admission at once (a reconnect storm is served in order instead
        # of all timing out together), and one address holds at most
        # `max_handshakes_per_address` of them, so one host can never lock the others out.
        within = self.listener.settings.particle_handshake_timeout_s
        nonce = crypto.new_nonce()
        self.writer.write(nonce)
        try:
            async with asyncio.timeout(within):
                await self.writer.drain()
                blob = await self.reader.readexactly(crypto.DEVICE_BLOB_LEN)
        except TimeoutError:
            raise _Close("handshake timeout") from None
        except asyncio.IncompleteReadError as exc:
            raise _Close(f"truncated handshake ({len(exc.partial)} of "
                         f"{crypto.DEVICE_BLOB_LEN} bytes)") from None
        slots = self.listener.handshakes
        address = self.peer_ip or ""
        try:
            async with asyncio.timeout(within):  # the device gives up after this, too
                await slots.acquire(address)
        except TimeoutError:
            raise _Close("no handshake slot in time (the server is busy)") from None
        try:
            await self._key_exchange_and_hello(nonce, blob, within)
        finally:
            slots.release(address)

    async def _key_exchange_and_hello(self, nonce: bytes, blob: bytes, within: float) -> None:
        loop = asyncio.get_running_loop()
        server_key = self.listener.server_key
        device_id, der = crypto.open_device_blob(server_key, nonce, blob)
        self.device_id = device_id
        sent_key = crypto.load_device_public_key(der)
        verdict = await self.hub.check_device_key(device_id, sent_key)
        if verdict == "refused":
            raise _Close("the device's public key is not the one registered for it "
                         "(or none is registered)")
        self.sent_key = sent_key
        self.first_time = verdict == "unknown"  # its key is pinned once admitted
        creds = crypto.new_session_creds()
        self.channel = crypto.Session.from_creds(creds)
        self.writer.write(crypto.server_reply(server_key, sent_key, creds))
        self.last_heard = loop.time()
        # the device's Hello
        try:
            async with asyncio.timeout(within):
                await self.writer.drain()
                first: Message | None = None
                early: list[Message] = []
                while first is None:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        raise _Close("connection lost before the Hello")
                    got = self._decode(data)
                    if got:  # the Hello, and whatever came with it
                        first, early = got[0], got[1:]
        except TimeoutError:
            raise _Close("no Hello from the device") from None
        await self._on_hello(first)
        self._early = early

    def _decode(self, data: bytes) -> list[Message]:
        assert self.channel is not None
        out = []
        for ciphertext in self.frames.feed(data):
            out.append(coap.decode(self.channel.open(ciphertext)))
        return out

    async def _on_hello(self, m: Message) -> None:
        if m.code != coap.POST or m.uri_path != "h" or m.type not in (coap.CON, coap.NON):
            raise _Close(f"the first message is not a Hello ({m.summary()})")
        hello = messages.parse_hello(m.payload)
        self.hello = hello
        self.expected_mid = (m.message_id + 1) & 0xFFFF
        self.next_mid = int.from_bytes(crypto.new_nonce()[:2], "big")
        await self._admit(hello)
        if self.closing:  # kicked meanwhile
            return
        await self._greet(m)

    async def _admit(self, hello: messages.Hello) -> None:
        """Open the core session for the device this Hello describes (admission, presence);
        ``_Close`` when it is refused. A device seen for the first time has its key pinned."""
        core_hello = Hello(self.device_id, product_id=product_id_of(hello),
                           platform_id=hello.platform_id or None,
                           firmware_version=hello.product_version,
                           system_version=system_version_text(hello.system_version),
                           remote=self.peer_ip)
        try:
            async with asyncio.timeout(self.admit_within_s):
                self.session = await self.hub.open(core_hello, self)
        except Refused as exc:
            if exc.code == "quarantined" and self.first_time and self.sent_key is not None:
                await self.hub.pin_device_key(self.device_id, self.sent_key)
            raise _Close(f"refused: {exc.reason}") from None
        except TimeoutError:
            raise _Close("the device could not be admitted in time") from None
        if self.first_time and self.sent_key is not None:
            await self.hub.pin_device_key(self.device_id, self.sent_key)

    async def _greet(self, m: Message) -> None:
        """Answer an admitted device's Hello: the ACK of a CON Hello and the server Hello
        (Device OS over TCP gives up without one within 4 s)."""
        if m.type == coap.CON:
            self._send(Message(coap.ACK, coap.EMPTY, m.message_id))
        self._send(Message(coap.NON, coap.POST, self._mid(), options=((coap.URI_PATH, b"h"),)))
        await self._flush()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        ping_every = self.listener.ping_interval_s
        silence = self.listener.keepalive_timeout_s
        while not self.closing:
            now = loop.time()
            quiet = now - self.last_heard
            if quiet >= silence:
                raise _Close("keep-alive timeout")
            wait = min(silence - quiet, max(0.01, ping_every - quiet) if quiet < ping_every
                       else ping_every)
            try:
                async with asyncio.timeout(wait):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                if loop.time() - self.last_heard >= ping_every and not self.pings:
                    self._ping()
                    await self._flush()
                continue
            if not data:
                raise _Close("connection lost")
            if self.session is not None:
                self.session.count_bytes(len(data))
            self.last_heard = loop.time()
            for m in self._decode(data):
                await self._handle(m)

    # -- output ------------------------------------------------------------------------------

    def _mid(self) -> int:
        mid = self.next_mid
        self.next_mid = (mid + 1) & 0xFFFF
        return mid

    def _token(self) -> bytes:
        for _ in range(MAX_PENDING):
            self.next_token = self.next_token % MAX_PENDING + 1
            token = bytes((self.next_token,))
            if token not in self.by_token:
                return token
        raise DeviceError("too many requests in flight to the device")

    def _send(self, m: Message) -> bool:
        if self.closing or self.channel is None:
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() > WRITE_BUFFER_MAX:
            self._end("the device does not read what it is sent")
            self._abort()
            return False
        sealed = self.channel.seal(coap.encode(m))
        self.writer.write(sealed)
        if self.session is not None:
            self.session.count_bytes(len(sealed))
        return True

    async def _flush(self) -> None:
        """Wait while the device is slow to read; drop it when it does not read at all."""
        if self.closing or self.writer.transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH:
            return
        try:
            async with asyncio.timeout(self.listener.drain_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            self._end("the device does not read what it is sent")
            self._abort()
        except (ConnectionError, OSError):
            self._end("connection lost")
            self._abort()

    def _ping(self) -> None:
        mid = self._mid()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        p = _Pending("ping", mid, b"", fut)
        self.by_mid[mid] = p
        self.pings.append(p)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._send(Message(coap.CON, coap.EMPTY, mid))

    async def request(self, kind: str, code: int, path: tuple[bytes, ...],
                      query: tuple[bytes, ...] = (), payload: bytes = b"",
                      *, within: float | None = None,
                      options: tuple[tuple[int, bytes], ...] = ()) -> Message:
        """Send a CON request and wait for its answer (piggy-backed or separate);
        ``options`` go with the path and query."""
        if self.closing or self.session is None:
            raise DeviceError("the device is not connected")
        token = self._token()
        mid = self._mid()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        p = _Pending(kind, mid, token, fut)
        self.by_mid[mid] = p
        self.by_token[token] = p
        options = tuple((coap.URI_PATH, s) for s in path) + tuple(
            (coap.URI_QUERY, q) for q in query) + options
        try:
            self._send(Message(coap.CON, code, mid, token, options, payload))
            await self._flush()
            if self.closing:
                raise DeviceError("the device is not connected")
            if within is None:
                return await fut
            async with asyncio.timeout(within):
                return await fut
        finally:
            if self.by_mid.get(mid) is p:
                del self.by_mid[mid]
            if self.by_token.get(token) is p:
                del self.by_token[token]

    # -- input -------------------------------------------------------------------------------

    async def _handle(self, m: Message) -> None:
        if m.code not in _KNOWN_CODES:
            raise _Close(f"unknown CoAP code {coap.code_str(m.code)}")
        session = self.session
        if session is None or self.closing:
            return
        session.heard()
        if m.type in (coap.ACK, coap.RST):
            self._on_ack(m)
            return
        self._check_mid(m)
        if m.is_response:
            self._on_response(m)
        elif m.code == coap.EMPTY:
            if m.type == coap.CON:  # the device's keep-alive ping
                self._send(Message(coap.ACK, coap.EMPTY, m.message_id))
        else:
            try:
                await self._on_request(session, m)
            except (_Close, ParticleProtocolError):
                raise
            except Exception:  # e.g. the database failed: this request fails, not the session
                log.exception("%r: %s failed", self, m.summary())
                self._reply(m, coap.INTERNAL)
        await self._flush()

    def _check_mid(self, m: Message) -> None:
        if m.message_id != self.expected_mid:
            raise _Close(f"message id gap (expected {self.expected_mid}, got {m.message_id})")
        self.expected_mid = (m.message_id + 1) & 0xFFFF

    def _on_ack(self, m: Message) -> None:
        p = self.by_mid.pop(m.message_id, None)
        if p is None:
            # Device OS answers our ping with an ACK carrying its own next message id
            if m.message_id == self.expected_mid and m.code == coap.EMPTY:
                self.expected_mid = (m.message_id + 1) & 0xFFFF
                p = self.pings.pop(0) if self.pings else None
                if p is not None:
                    self.by_mid.pop(p.mid, None)
                    if not p.future.done():
                        p.future.set_result(m)
            return
        if p.kind == "ping":
            if p in self.pings:
                self.pings.remove(p)
            if not p.future.done():
                p.future.set_result(m)
            return
        if m.type == coap.RST:
            self.by_token.pop(p.token, None)
            if not p.future.done():
                p.future.set_exception(DeviceError("the device rejected the request"))
            return
        if m.code == coap.EMPTY:
            p.acked = True  # the answer follows separately
            return
        self.by_token.pop(p.token, None)
        if not p.future.done():
            p.future.set_result(m)

    def _on_response(self, m: Message) -> None:
        if m.type == coap.CON:
            self._send(Message(coap.ACK, coap.EMPTY, m.message_id))
        p = self.by_token.pop(m.token, None)
        if p is None:
            log.debug("%r: response to nothing pending: %s", self, m.summary())
            return
        self.by_mid.pop(p.mid, None)
        if not p.future.done():
            p.future.set_result(m)

    def _reply(self, m: Message, code: int, payload: bytes = b"") -> None:
        """Answer a device request: piggy-backed on the ACK of a CON; nothing for a NON."""
        if m.type == coap.CON:
            self._send(Message(coap.ACK, code, m.message_id, m.token, payload=payload))

    async def _on_request(self, session: DeviceSession, m: Message) -> None:
        segments = m.options_of(coap.URI_PATH)
        if not segments:
            self._reply(m, coap.NOT_FOUND)
            return
        resource = segments[0]
        rest = "/".join(s.decode("utf-8", "replace") for s in segments[1:])
        if resource in (b"E", b"e") and m.code == coap.POST:
            self._on_publish(session, m, rest, private=resource == b"E")
        elif resource == b"e" and m.code == coap.GET:
            try:
                await session.subscribe(rest)
                self._reply(m, coap.CONTENT)
            except Refused as exc:
                log.info("%r: subscription %r refused: %s", self, rest, exc.reason)
                self._reply(m, coap.BAD_REQUEST)
        elif resource == b"d" and m.code == coap.POST:
            await self._on_describe(session, m)
        elif resource == b"t" and m.code == coap.GET:
            now = int(clock.now().timestamp())
            if m.type == coap.CON:
                self._reply(m, coap.CONTENT, (now & 0xFFFFFFFF).to_bytes(4, "big"))
            else:
                self._send(Message(coap.NON, coap.CONTENT, self._mid(), m.token,
                                   payload=(now & 0xFFFFFFFF).to_bytes(4, "big")))
        elif resource == b"h" and m.code == coap.POST:
            self._reply(m, coap.CHANGED)  # a repeated Hello: nothing new to do
        elif resource == b"x" and m.code == coap.POST:
            self._reply(m, coap.CHANGED)
            raise _Close("goodbye")
        elif resource == ota_v3.ACK and m.code == coap.POST:  # v3 OTA: UpdateAck
            self._reply(m, coap.CHANGED)
            if self.v3_acks is not None:
                self.v3_acks.on_ack(m)
        elif resource == b"c" and m.code == coap.GET:  # OTA: chunks the device is missing
            self._reply(m, coap.CHANGED)
            payload = m.payload
            for i in range(0, len(payload) - 1, 2):
                self.missing_chunks.append(int.from_bytes(payload[i:i + 2], "big"))
            self.missing_event.set()
        else:
            log.info("%r: unsupported request %s", self, m.summary())
            self._reply(m, coap.NOT_FOUND)

    def _on_publish(self, session: DeviceSession, m: Message, name: str, *,
                    private: bool) -> None:
        max_age = m.option(coap.MAX_AGE)
        ttl = _uint(max_age) if max_age is not None else 60
        system = name.lower().startswith(("spark", "particle"))
        if name == UPDATES_ENABLED_EVENT:  # Device OS says whether it accepts updates
            enabled = (m.payload or b"").strip().lower() in (b"true", b"1")
            task = asyncio.get_running_loop().create_task(
                session.describe(updates_enabled=enabled))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(_consume)
        try:
            fut = session.publish_nowait(name, m.payload or None, ttl=ttl, private=private,
                                         system=system)
        except Refused as exc:
            log.debug("%r: event %r refused: %s", self, name, exc.reason)
            self._reply(m, coap.BAD_REQUEST)
            return
        if m.type != coap.CON:
            fut.add_done_callback(_consume)
            return
        mid, token = m.message_id, m.token

        def acknowledge(f: asyncio.Future[int]) -> None:
            ok = not f.cancelled() and f.exception() is None
            self._send(Message(coap.ACK, coap.CHANGED if ok else coap.SERVICE_UNAVAILABLE,
                               mid, token))

        fut.add_done_callback(acknowledge)

    async def _on_describe(self, session: DeviceSession, m: Message) -> None:
        query = m.options_of(coap.URI_QUERY)
        kind = query[0][0] if query and len(query[0]) == 1 else 0
        try:
            await self._apply_describe(session, kind, m.payload,
                                       m.option(coap.CONTENT_FORMAT))
        except Refused as exc:
            log.info("%r: describe refused: %s", self, exc.reason)
            self._reply(m, coap.BAD_REQUEST)
            return
        self._reply(m, coap.CHANGED)

    async def _apply_describe(self, session: DeviceSession, kind: int, payload: bytes,
                              content_format: bytes | None) -> None:
        if kind == DESCRIBE_METRICS:
            await self._apply_metrics(session, payload)
            return
        protobuf = content_format is not None and _uint(content_format) == 42
        if kind == DESCRIBE_SYSTEM or protobuf:
            # what corral uses of the system describe: a cellular device's ICCID
            iccid = system_iccid(payload, protobuf=protobuf)
            if iccid is not None:
                await session.describe(iccid=iccid)
            return
        if not payload or kind not in (0, DESCRIBE_APP):
            return
        functions, variables = app_describe(payload)
        await session.describe(functions=functions, variables=variables)

    async def _apply_metrics(self, session: DeviceSession, payload: bytes) -> None:
        """A metrics describe (``GET``/``POST /d?4``): vitals as a JSON object are stored;
        Device OS's binary diagnostics encoding is not decoded (logged and dropped)."""
        if payload[:1] != b"{":
            log.info("%r: a binary metrics describe of %d bytes is not decoded", self,
                     len(payload))
            return
        await session.vitals(payload)

    # -- DeviceLink --------------------------------------------------------------------------

    async def call_function(self, name: str, arg: str) -> int:
        query = (arg.encode("utf-8"),) if arg else ()
        reply = await self.request("function", coap.POST, (b"f", name.encode("utf-8")), query)
        if reply.code != coap.CHANGED:
            raise DeviceError(f"the device answered {coap.code_str(reply.code)}")
        if len(reply.payload) != 4:
            raise DeviceError(f"the result is {len(reply.payload)} bytes, not an int32")
        return int.from_bytes(reply.payload, "big", signed=True)

    async def read_variable(self, name: str) -> Any:
        session = self.session
        vtype = session.variables.get(name, "string") if session is not None else "string"
        reply = await self.request("variable", coap.GET, (b"v", name.encode("utf-8")))
        if reply.code != coap.CONTENT:
            raise DeviceError(f"the device answered {coap.code_str(reply.code)}")
        return decode_variable(reply.payload, vtype)

    async def deliver_event(self, name: str, data: str | None, *, published_at: str,
                            ttl: int, coreid: str) -> None:
        if self.closing:
            return
        options: tuple[tuple[int, bytes], ...] = ((coap.URI_PATH, b"e"),
                                                  (coap.URI_PATH, name.encode("utf-8")))
        self._send(Message(coap.NON, coap.POST, self._mid(), options=options,
                           payload=(data or "").encode("utf-8")))
        await self._flush()

    async def request_describe(self) -> None:
        """Ask for the application describe, then the system describe (one type per
        request: Device OS drops the connection for a combined one)."""
        if self.closing or self.session is None:
            return
        task = asyncio.get_running_loop().create_task(self._describe_again())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _describe_again(self) -> None:
        for kind in (DESCRIBE_APP, DESCRIBE_SYSTEM):
            try:
                reply = await self.request("describe", coap.GET, (b"d",), (bytes((kind,)),),
                                           within=self.listener.request_timeout_s)
            except (DeviceError, TimeoutError) as exc:
                log.info("%r: describe %d not answered: %r", self, kind, exc)
                return
            session = self.session
            if session is None or reply.code != coap.CONTENT:
                return
            try:
                await self._apply_describe(session, kind, reply.payload,
                                           reply.option(coap.CONTENT_FORMAT))
            except Refused as exc:
                log.info("%r: describe refused: %s", self, exc.reason)

    async def request_vitals(self) -> None:
        """Ask for the metrics describe (``GET /d?4``); its answer is stored as vitals."""
        if self.closing or self.session is None:
            return
        task = asyncio.get_running_loop().create_task(self._vitals_now())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _vitals_now(self) -> None:
        try:
            reply = await self.request("describe", coap.GET, (b"d",),
                                       (bytes((DESCRIBE_METRICS,)),),
                                       within=self.listener.request_timeout_s)
        except (DeviceError, TimeoutError) as exc:
            log.info("%r: metrics describe not answered: %r", self, exc)
            return
        session = self.session
        if session is None or reply.code != coap.CONTENT or not reply.payload:
            return
        try:
            await self._apply_metrics(session, reply.payload)
        except Refused as exc:
            log.info("%r: vitals refused: %s", self, exc.reason)

    async def disconnect(self, reason: str) -> None:
        self.kicked = True
        self._end(reason)
        self._abort()

    # -- OTA ---------------------------------------------------------------------------------

    async def deliver_firmware(self, image: FirmwareImage, *,
                               progress: FirmwareProgress | None = None) -> TransferResult:
        """The DeviceLink seam: OTA of the file at ``image.path`` (fast OTA when the device
        offers it); ok once the device accepted UpdateDone (it then reboots)."""
        try:
            data = await asyncio.to_thread(image.path.read_bytes)
        except OSError as exc:
            return TransferResult(False, f"the firmware binary cannot be read ({exc.strerror})")
        # fast OTA is asked for; the device's UpdateBegin answer says whether it takes it
        result = await self.send_firmware(data, fast=True, progress=progress)
        return TransferResult(result.ok, result.reason, result.bytes_sent,
                              dropped=not result.ok and (self.closing or self.session is None
                                                         or self.session.closed))

    async def update_notice(self, kind: UpdateNotice, value: bool) -> None:
        # Device OS's system events: particle/device/updates/pending and .../forced
        await self.deliver_event(f"{UPDATES_EVENT_PREFIX}{kind}", "true" if value else "false",
                                 published_at=clock.iso(clock.now()) or "", ttl=60, coreid="")

    async def deliver_ledger(self, name: str, document: dict[str, Any]) -> bool:
        # Device OS 6 syncs ledgers with CoAP messages that ../shared/reference does not
        # document; corral does not guess them (docs/particle-udp.md, "Ledgers")
        return False

    async def send_firmware(self, image: bytes, *, chunk_size: int | None = None,
                            fast: bool = False, progress: ProgressFn | None = None,
                            step_timeout: float = 30.0) -> OtaResult:
        """Send a firmware binary (legacy OTA: UpdateBegin, Chunks with CRC-32, UpdateDone).

        ``fast`` asks for fast OTA: chunks carry their index and are not answered one by
        one; UpdateDone is answered 4.00 while chunks are missing, and the device then asks
        for them (``GET /c``), which are sent again before the next UpdateDone.
        ``progress(sent, total)`` is called after each chunk. Never raises for device-side
        failures: the result says what happened."""
        hello = self.hello
        if self.closing or self.session is None or hello is None:
            return OtaResult(False, "the device is not connected")
        if hello.max_binary_size and len(image) > hello.max_binary_size:
            return OtaResult(False, f"the binary is larger than the device accepts "
                                    f"({hello.max_binary_size} bytes)")
        size = chunk_size or hello.ota_chunk_size or 512
        chunks = [image[i:i + size] for i in range(0, len(image), size)] or [b""]
        async with self.ota_lock:
            if hello.has(messages.HELLO_FLAG_OTA_PROTOCOL_V3):  # Gen 3 hardware
                return await self._send_firmware_v3(image, size, progress, step_timeout)
            try:
                return await self._send_firmware(image, chunks, size, fast, progress,
                                                 step_timeout)
            except DeviceError as exc:
                return OtaResult(False, exc.text)
            except TimeoutError:
                return OtaResult(False, "the device did not answer in time")

    async def _send_firmware(self, image: bytes, chunks: list[bytes], size: int, fast: bool,
                             progress: ProgressFn | None, step_timeout: float) -> OtaResult:
        begin = struct.pack(">BHIBI", messages.UPDATE_FLAG_FAST if fast else 0, size,
                            len(image), 0, 0)
        reply = await self.request("ota", coap.POST, (b"u",), payload=begin,
                                   within=step_timeout)
        if reply.code != coap.CHANGED:
            return OtaResult(False, f"the device refused the update "
                                    f"({coap.code_str(reply.code)})")
        fast = fast and bool(reply.payload) and bool(reply.payload[0] & 1)
        token = self._token()  # fast chunks are not answered: one token for all of them
        sent = resent = 0
        for index, chunk in enumerate(chunks):
            if fast:
                self._send(messages.chunk(self._mid(), token, chunk, index=index,
                                          confirmable=False))
                await self._flush()
            else:
                for _attempt in range(3):
                    reply = await self._chunk_request(chunk, step_timeout)
                    if reply.code == coap.CHANGED:
                        break
                    resent += 1
                else:
                    return OtaResult(False, f"chunk {index} was refused "
                                            f"({coap.code_str(reply.code)})", sent, index, resent)
            sent += len(chunk)
            if progress is not None:
                progress(sent, len(image))
        # UpdateDone; in fast mode a 4.00 means chunks are missing: the device names them
        # (up to 40 a time) in a GET /c after the ACK; they go again, then UpdateDone again
        for _round in range(len(chunks) + 2):
            self.missing_chunks.clear()
            self.missing_event.clear()
            reply = await self.request("ota", coap.PUT, (b"u",), within=step_timeout)
            if reply.code == coap.CHANGED or not fast or reply.code != coap.BAD_REQUEST:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step_timeout):
                    await self.missing_event.wait()
            missing = [i for i in dict.fromkeys(self.missing_chunks) if 0 <= i < len(chunks)]
            if not missing:
                break
            if _round == len(chunks) + 1:
                return OtaResult(False, f"the device still misses chunk(s) "
                                        f"{', '.join(map(str, missing[:5]))} after {_round} "
                                        f"rounds", sent, len(chunks), resent)
            for index in missing:
                self._send(messages.chunk(self._mid(), token, chunks[index], index=index,
                                          confirmable=False))
                resent += 1
                await self._flush()
        if reply.code != coap.CHANGED:
            return OtaResult(False, f"the device did not apply the update "
                                    f"({coap.code_str(reply.code)})", sent, len(chunks), resent)
        result = 0
        if reply.payload:
            try:
                result = int(json.loads(reply.payload).get("r", 0))
            except (ValueError, AttributeError, TypeError):
                result = -1
        if result != 0:
            return OtaResult(False, f"the device reported update result {result}", sent,
                             len(chunks), resent)
        return OtaResult(True, "updated", sent, len(chunks), resent)

    async def _send_firmware_v3(self, image: bytes, size: int, progress: ProgressFn | None,
                                step_timeout: float) -> OtaResult:
        """The v3 protocol (:mod:`.ota_v3`): a window of NON chunks without a token,
        UpdateAck bitmaps, resumption from the offset the device reports."""
        self.v3_acks = ota_v3.Acks()
        try:
            sent = await ota_v3.send(self, self.v3_acks, image, chunk_size=size,
                                     progress=progress, step_timeout=step_timeout)
        except DeviceError as exc:
            return OtaResult(False, exc.text)
        except TimeoutError:
            return OtaResult(False, "the device did not answer in time")
        finally:
            self.v3_acks = None
        return OtaResult(sent.ok, sent.reason, len(image) - sent.offset, sent.chunks,
                         sent.resent)

    async def _chunk_request(self, chunk: bytes, within: float) -> Message:
        """A legacy chunk: CON with a token, answered by an empty ACK and ChunkReceived."""
        return await self.request("ota", coap.POST, (b"c",),
                                  (zlib.crc32(chunk).to_bytes(4, "big"),), chunk, within=within)


_C = TypeVar("_C", bound=ParticleConnection)


def connection_of(connections: Iterable[_C], device_id: str) -> _C | None:
    """The open, admitted connection of a device among ``connections``."""
    for c in connections:
        if c.device_id == device_id.lower() and c.session is not None and not c.closing:
            return c
    return None


def _consume(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


class ParticleListener:
    """The Particle gateway's listening socket. ``port`` is the bound port."""

    def __init__(self, hub: SessionHub, settings: Settings, server_key: rsa.RSAPrivateKey
                 ) -> None:
        self.hub = hub
        self.settings = settings
        self.server_key = server_key
        self.connections: set[ParticleConnection] = set()
        self.host = ""
        self.port = 0
        self.ping_interval_s = settings.particle_ping_interval_s
        self.keepalive_timeout_s = max(settings.particle_keepalive_timeout_s,
                                       settings.particle_ping_interval_s)
        self.drain_timeout_s = 10.0  # a device that reads nothing for this long is dropped
        self.request_timeout_s = 10.0  # describe requests
        self.handshakes = AddressSlots(settings.particle_max_handshakes,
                                       settings.particle_max_handshakes_per_address)
        self._server: asyncio.Server | None = None

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_client, host, port, limit=READ_SIZE, reuse_address=True,
            reuse_port=self.settings.listen_reuse_port or None,
            backlog=self.settings.device_listen_backlog)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        log.info("Particle devices: listening on %s:%d", self.host, self.port)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        await ParticleConnection(self, reader, writer).run()

    def connection(self, device_id: str) -> ParticleConnection | None:
        """The open connection of a device (tests, OTA)."""
        return connection_of(self.connections, device_id)

    async def stop(self) -> None:
        """Stop accepting, end every connection (reason: shutdown)."""
        if self._server is None:
            return
        srv, self._server = self._server, None
        await close_server(srv, self.connections)


async def start_particle_listener(hub: SessionHub, settings: Settings, *,
                                  host: str | None = None, port: int | None = None
                                  ) -> ParticleListener:
    """Listen for Particle devices on ``port`` (default ``settings.particle_port``; 0: a free
    port). The server key is created in the data directory on first start."""
    key = await asyncio.to_thread(load_or_create_server_key, settings.data_dir)
    listener = ParticleListener(hub, settings, key)
    await listener._start(host or settings.host,
                          settings.particle_port if port is None else port)
    return listener


__all__ = ["OtaResult", "ParticleConnection", "ParticleListener", "app_describe",
           "decode_variable", "product_id_of", "start_particle_listener",
           "system_version_text"]
