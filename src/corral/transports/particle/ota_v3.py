"""Device OS's v3 firmware-update protocol (Gen 3 hardware selects it with Hello flag 0x80),
both ends (``shared/reference/particle-device-protocol-udp.md`` §5.1).

* UpdateStart, server to device: ``CON POST /S`` with a token, FILE_SIZE, CHUNK_SIZE (512 to
  1136, a multiple of 4) and FILE_SHA256 (which lets the device resume). The device answers
  with an empty ACK, then a separate ``CON 2.01`` with the token, WINDOW_SIZE (in chunks) and
  FILE_SIZE = the bytes it already holds (the resume offset); the server ACKs it.
* UpdateChunk: ``NON POST /C`` **without a token**, CHUNK_INDEX = the chunk's 1-based index
  counted from the resume offset, the data as payload (every chunk full but the last).
* UpdateAck, device to server: ``NON POST /A``, CHUNK_INDEX = chunks received in order, the
  payload a bitmap (uint32 little-endian words; bit n = chunk CHUNK_INDEX + 1 + n received),
  trimmed after its last non-zero word. Sent after 2 chunks, 200 ms, a duplicate, a gap or
  the last chunk.
* UpdateFinish: ``CON POST /F`` with a token; empty ACK, then ``CON 2.04`` with the token and
  JSON statistics. The device applies the update only once the server ACKs that 2.04.

The option numbers need CoAP's extended delta (they are above 268). Integers are CoAP uints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Any, Final, Protocol

from corral.transports.particle import coap
from corral.transports.particle.coap import Message
from corral.transports.particle.messages import MessageError, option_uint

CHUNK_INDEX: Final = 2049
WINDOW_SIZE: Final = 2053
FILE_SIZE: Final = 2057
FILE_SHA256: Final = 2061
CHUNK_SIZE: Final = 2065
DISCARD_DATA: Final = 2069
CANCEL_UPDATE: Final = 2073
MODULE_FUNCTION: Final = 2077
START: Final = b"S"
CHUNK: Final = b"C"
ACK: Final = b"A"
FINISH: Final = b"F"
MIN_CHUNK: Final = 512
MAX_CHUNK: Final = 1136
WINDOW_BYTES: Final = 131072  # the device's window: this many bytes of chunks
RESEND_S: Final = 1.0  # chunks not acknowledged by then are sent again


def uint(value: int) -> bytes:
    """A CoAP uint: minimal big-endian bytes (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def chunk_size_for(wanted: int) -> int:
    """The chunk size to use: the device's (its Hello), clamped to 512-1136, a multiple of 4."""
    return max(MIN_CHUNK, min(MAX_CHUNK, wanted or MIN_CHUNK)) & ~3


def chunk_message(mid: int, index: int, data: bytes) -> Message:
    """UpdateChunk: NON, no token, the 1-based CHUNK_INDEX."""
    return Message(coap.NON, coap.POST, mid, b"",
                   ((coap.URI_PATH, CHUNK), (CHUNK_INDEX, uint(index))), data)


def ack_payload(received: set[int], in_order: int) -> bytes:
    """The UpdateAck bitmap: bit n of the little-endian uint32 words = chunk in_order+1+n."""
    bits = 0
    for i in received:
        if i > in_order:
            bits |= 1 << (i - in_order - 1)
    out = bytearray()
    while bits:
        out += (bits & 0xFFFFFFFF).to_bytes(4, "little")
        bits >>= 32
    return bytes(out)


def parse_ack(m: Message) -> tuple[int, set[int]]:
    """(chunks received in order, the further chunk indexes received) of an UpdateAck."""
    in_order = option_uint(m.option(CHUNK_INDEX))
    if in_order is None:
        raise MessageError("an UpdateAck without CHUNK_INDEX")
    if len(m.payload) % 4:
        raise MessageError("the UpdateAck bitmap is not whole uint32 words")
    got = set()
    for w in range(0, len(m.payload), 4):
        word = int.from_bytes(m.payload[w:w + 4], "little")
        for bit in range(32):
            if word >> bit & 1:
                got.add(in_order + 1 + w * 8 + bit)
    return in_order, got


# -- the server side ---------------------------------------------------------------------------


class Link(Protocol):
    """What the sender needs of a device connection (ParticleConnection has it)."""

    closing: bool

    async def request(self, kind: str, code: int, path: tuple[bytes, ...],
                      query: tuple[bytes, ...] = (), payload: bytes = b"", *,
                      within: float | None = None,
                      options: tuple[tuple[int, bytes], ...] = ()) -> Message: ...

    def _mid(self) -> int: ...

    def _send(self, m: Message) -> bool: ...


class Acks:
    """UpdateAcks as they arrive (the connection hands each /A message to :meth:`on_ack`)."""

    def __init__(self) -> None:
        self.in_order = 0
        self.received: set[int] = set()
        self.event = asyncio.Event()

    def on_ack(self, m: Message) -> None:
        in_order, got = parse_ack(m)
        self.in_order = max(self.in_order, in_order)
        self.received |= got
        self.received = {i for i in self.received if i > self.in_order}
        self.event.set()


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    ok: bool
    reason: str
    offset: int = 0  # bytes the device already held (resumed)
    chunks: int = 0
    resent: int = 0


async def send(link: Link, acks: Acks, image: bytes, *, chunk_size: int,
               progress: Any = None, step_timeout: float = 30.0) -> Sent:
    """Send ``image`` with the v3 protocol; never raises for device-side failures."""
    size = chunk_size_for(chunk_size)
    start = await link.request("ota", coap.POST, (START,), within=step_timeout, options=(
        (FILE_SIZE, uint(len(image))), (FILE_SHA256, hashlib.sha256(image).digest()),
        (CHUNK_SIZE, uint(size))))
    if start.code != coap.CREATED:
        return Sent(False, f"the device refused the update ({coap.code_str(start.code)}"
                           f"{': ' + start.payload.decode('utf-8', 'replace') if start.payload else ''})")
    window = max(1, option_uint(start.option(WINDOW_SIZE)) or 1)
    offset = option_uint(start.option(FILE_SIZE)) or 0
    if offset % size or offset > len(image):
        offset = 0  # an offset we cannot continue from: the device gets every chunk
    rest = image[offset:]
    chunks = [rest[i:i + size] for i in range(0, len(rest), size)]
    n = len(chunks)
    loop = asyncio.get_running_loop()
    sent_upto = resent = 0
    last_progress = loop.time()
    done = -1
    while acks.in_order < n:
        if link.closing:
            return Sent(False, "the device disconnected", offset, n, resent)
        while sent_upto < n and sent_upto < acks.in_order + window:
            sent_upto += 1
            link._send(chunk_message(link._mid(), sent_upto, chunks[sent_upto - 1]))
            if sent_upto % 16 == 0:
                await asyncio.sleep(0)
        acks.event.clear()
        try:
            async with asyncio.timeout(RESEND_S):
                await acks.event.wait()
        except TimeoutError:
            if loop.time() - last_progress > step_timeout:
                return Sent(False, "the device stopped acknowledging chunks", offset, n, resent)
            for index in range(acks.in_order + 1, sent_upto + 1):
                if index not in acks.received:
                    link._send(chunk_message(link._mid(), index, chunks[index - 1]))
                    resent += 1
            continue
        if acks.in_order != done:
            done = acks.in_order
            last_progress = loop.time()
            if progress is not None:
                progress(offset + min(len(rest), done * size), len(image))
    finish = await link.request("ota", coap.POST, (FINISH,), within=step_timeout)
    if finish.code != coap.CHANGED:
        return Sent(False, f"the device did not apply the update "
                           f"({coap.code_str(finish.code)})", offset, n, resent)
    return Sent(True, "updated", offset, n, resent)


# -- the device side ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Transfer:
    """An update the device receives (kept by its SHA-256, so that it can resume)."""

    size: int
    chunk_size: int
    sha: bytes
    image: bytearray
    have: set[int] = dataclasses.field(default_factory=set)  # absolute 0-based chunk numbers
    base: int = 0  # chunks held when this run started (the resume offset)
    recv: int = 0
    dup: int = 0
    ooo: int = 0
    acks_sent: int = 0
    since_ack: int = 0

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def contiguous(self) -> int:
        n = 0
        while n in self.have:
            n += 1
        return n

    def in_order(self) -> int:
        """Chunks received in order, counted from the resume offset (1-based indexes)."""
        return self.contiguous() - self.base

    def received(self) -> set[int]:
        return {i - self.base + 1 for i in self.have if i >= self.base}

    def stats(self) -> bytes:
        return json.dumps({"recv_chunks": self.recv, "dup_chunks": self.dup,
                           "ooo_chunks": self.ooo, "sent_acks": self.acks_sent,
                           "proc_time": 0}, separators=(",", ":")).encode()


def start_answer(transfers: dict[bytes, Transfer], m: Message
                 ) -> tuple[Transfer | None, tuple[tuple[int, bytes], ...], bytes]:
    """The device's handling of UpdateStart: (the transfer, the 2.01 options, an error text
    when refused)."""
    try:
        size = option_uint(m.option(FILE_SIZE)) or 0
        chunk_size = option_uint(m.option(CHUNK_SIZE)) or 0
    except MessageError:
        return None, (), b"bad option"
    sha = m.option(FILE_SHA256) or b""
    if not m.token or not size or not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size % 4:
        return None, (), b"invalid parameters"
    t = transfers.get(sha) if sha and m.option(DISCARD_DATA) is None else None
    if t is None or t.size != size or t.chunk_size != chunk_size:
        t = Transfer(size, chunk_size, sha, bytearray(size))
        if sha:
            transfers[sha] = t
    t.base = t.contiguous()
    t.have = {i for i in t.have if i < t.base}  # resume from the contiguous part only
    options = ((WINDOW_SIZE, uint(WINDOW_BYTES // chunk_size)),
               (FILE_SIZE, uint(min(size, t.base * chunk_size))))
    return t, options, b""


def take_chunk(t: Transfer, m: Message) -> bool:
    """Store an UpdateChunk; True when an UpdateAck is due now (a duplicate, a gap, every
    second chunk, the last chunk)."""
    index = option_uint(m.option(CHUNK_INDEX))
    if index is None or index < 1:
        return False
    absolute = t.base + index - 1
    if absolute >= t.count:
        return False
    if absolute in t.have:
        t.dup += 1
        return True
    expected = t.contiguous()
    start = absolute * t.chunk_size
    t.image[start:start + len(m.payload)] = m.payload
    t.have.add(absolute)
    t.recv += 1
    t.since_ack += 1
    if absolute != expected:
        t.ooo += 1
        return True
    return t.since_ack >= 2 or t.contiguous() >= t.count


def ack_message(t: Transfer, mid: int) -> Message:
    t.acks_sent += 1
    t.since_ack = 0
    return Message(coap.NON, coap.POST, mid, b"",
                   ((coap.URI_PATH, ACK), (CHUNK_INDEX, uint(t.in_order()))),
                   ack_payload(t.received(), t.in_order()))


def complete(t: Transfer) -> bool:
    return t.contiguous() >= t.count and (not t.sha
                                          or hashlib.sha256(t.image).digest() == t.sha)
