"""CoAP (RFC 7252) message codec as Particle uses it inside the lightssl session (sans-IO).

One decrypted frame holds exactly one message: the 4-byte header (version 1, type, token
length, code, message id), the token, the options (delta/length nibbles with the 13/14
extensions) and, after a 0xFF marker, the payload. ``decode`` raises :class:`CoapError`
(a :class:`~corral.transports.particle.errors.ParticleProtocolError`) for anything
malformed; ``encode`` raises ``ValueError`` for messages that cannot be put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from corral.transports.particle.errors import ParticleProtocolError

VERSION: Final = 1

# Message types.
CON: Final = 0
NON: Final = 1
ACK: Final = 2
RST: Final = 3
TYPE_NAMES: Final = ("CON", "NON", "ACK", "RST")

# Codes (class << 5 | detail).
EMPTY: Final = 0x00
GET: Final = 0x01
POST: Final = 0x02
PUT: Final = 0x03
DELETE: Final = 0x04
CREATED: Final = 0x41
DELETED: Final = 0x42
VALID: Final = 0x43
CHANGED: Final = 0x44
CONTENT: Final = 0x45
BAD_REQUEST: Final = 0x80
UNAUTHORIZED: Final = 0x81
BAD_OPTION: Final = 0x82
FORBIDDEN: Final = 0x83
NOT_FOUND: Final = 0x84
METHOD_NOT_ALLOWED: Final = 0x85
NOT_ACCEPTABLE: Final = 0x86
PRECONDITION_FAILED: Final = 0x8C
REQUEST_ENTITY_TOO_LARGE: Final = 0x8D
UNSUPPORTED_CONTENT_FORMAT: Final = 0x8F
INTERNAL: Final = 0xA0
NOT_IMPLEMENTED: Final = 0xA1
BAD_GATEWAY: Final = 0xA2
SERVICE_UNAVAILABLE: Final = 0xA3
GATEWAY_TIMEOUT: Final = 0xA4

# Option numbers.
IF_MATCH: Final = 1
URI_HOST: Final = 3
ETAG: Final = 4
IF_NONE_MATCH: Final = 5
OBSERVE: Final = 6
URI_PORT: Final = 7
LOCATION_PATH: Final = 8
URI_PATH: Final = 11
CONTENT_FORMAT: Final = 12
MAX_AGE: Final = 14
URI_QUERY: Final = 15
ACCEPT: Final = 17
LOCATION_QUERY: Final = 20
BLOCK2: Final = 23
BLOCK1: Final = 27
SIZE2: Final = 28
PROXY_URI: Final = 35
PROXY_SCHEME: Final = 39
SIZE1: Final = 60

MAX_TOKEN_LEN: Final = 8
MAX_OPTION_NUMBER: Final = 0xFFFF
MAX_OPTION_LEN: Final = 0xFFFF + 269
PAYLOAD_MARKER: Final = 0xFF


class CoapError(ParticleProtocolError):
    """A CoAP message is malformed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def code_class(code: int) -> int:
    """The class digit of a code: 0 request/empty, 2 success, 4 client error, 5 server error."""
    return code >> 5


def code_str(code: int) -> str:
    """A code as RFC 7252 writes it, e.g. ``2.05``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


@dataclass(frozen=True, slots=True)
class Message:
    """One CoAP message. ``options`` are ``(number, value)`` pairs in ascending number order."""

    type: int
    code: int
    message_id: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        """The value of the first option ``number``, or None."""
        for num, value in self.options:
            if num == number:
                return value
        return None

    def options_of(self, number: int) -> list[bytes]:
        """The values of every option ``number``, in order."""
        return [value for num, value in self.options if num == number]

    @property
    def path_segments(self) -> list[str]:
        """Uri-Path options as text (one segment may itself contain ``/``)."""
        return [v.decode("utf-8", "replace") for v in self.options_of(URI_PATH)]

    @property
    def uri_path(self) -> str:
        """Uri-Path options joined with ``/``, without a leading slash: ``"f/echo"``."""
        return "/".join(self.path_segments)

    @property
    def uri_query(self) -> list[str]:
        """Uri-Query options as text (Particle's describe query is a raw byte: ``"\\x01"``)."""
        return [v.decode("utf-8", "replace") for v in self.options_of(URI_QUERY)]

    @property
    def is_empty(self) -> bool:
        """An empty message (code 0.00): ping, empty ACK, RST."""
        return self.code == EMPTY

    @property
    def is_request(self) -> bool:
        """Code class 0 with a method (GET/POST/PUT/DELETE...)."""
        return self.code != EMPTY and self.code >> 5 == 0

    @property
    def is_response(self) -> bool:
        """Code class 2, 4 or 5."""
        return self.code >> 5 in (2, 4, 5)

    def summary(self) -> str:
        """One line for logs: ``CON POST /f/echo?hello mid=4101 tok=13 payload=4B``."""
        kind = TYPE_NAMES[self.type] if 0 <= self.type < 4 else str(self.type)
        methods = {GET: "GET", POST: "POST", PUT: "PUT", DELETE: "DELETE"}
        parts = [kind, methods.get(self.code, code_str(self.code))]
        if self.options_of(URI_PATH):
            path = "/" + self.uri_path
            query = self.options_of(URI_QUERY)
            if query:
                path += "?" + "&".join(
                    q.decode() if q.isascii() and q.decode().isprintable() else "0x" + q.hex()
                    for q in query
                )
            parts.append(path)
        parts.append(f"mid={self.message_id}")
        if self.token:
            parts.append(f"tok={self.token.hex()}")
        if self.payload:
            parts.append(f"payload={len(self.payload)}B")
        return " ".join(parts)


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def encode(m: Message) -> bytes:
    """Serialise ``m``. Options are written in ascending number order (stable for repeats)."""
    if not 0 <= m.type <= 3:
        raise ValueError(f"bad CoAP type {m.type}")
    if not 0 <= m.code <= 0xFF:
        raise ValueError(f"bad CoAP code {m.code}")
    if not 0 <= m.message_id <= 0xFFFF:
        raise ValueError(f"bad CoAP message id {m.message_id}")
    if len(m.token) > MAX_TOKEN_LEN:
        raise ValueError("CoAP token longer than 8 bytes")
    if m.code == EMPTY and (m.token or m.options or m.payload):
        raise ValueError("an empty CoAP message (0.00) carries no token, options or payload")
    out = bytearray(
        (VERSION << 6 | m.type << 4 | len(m.token), m.code, m.message_id >> 8, m.message_id & 0xFF)
    )
    out += m.token
    last = 0
    for number, value in sorted(m.options, key=lambda o: o[0]):
        if not 0 <= number <= MAX_OPTION_NUMBER:
            raise ValueError(f"bad CoAP option number {number}")
        if len(value) > MAX_OPTION_LEN:
            raise ValueError(f"CoAP option {number} value too long")
        delta, delta_ext = _nibble(number - last)
        length, length_ext = _nibble(len(value))
        out.append(delta << 4 | length)
        out += delta_ext
        out += length_ext
        out += value
        last = number
    if m.payload:
        out.append(PAYLOAD_MARKER)
        out += m.payload
    return bytes(out)


def _extended(nibble: int, data: bytes, pos: int, what: str) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        if pos + 1 > len(data):
            raise CoapError(f"truncated option {what} extension")
        return data[pos] + 13, pos + 1
    if nibble == 14:
        if pos + 2 > len(data):
            raise CoapError(f"truncated option {what} extension")
        return ((data[pos] << 8) | data[pos + 1]) + 269, pos + 2
    raise CoapError(f"reserved option {what} nibble 15")


def decode(data: bytes) -> Message:
    """Parse one message; ``CoapError`` with a reason for anything malformed."""
    if len(data) < 4:
        raise CoapError(f"message of {len(data)} bytes is shorter than the 4-byte header")
    first = data[0]
    if first >> 6 != VERSION:
        raise CoapError(f"unsupported CoAP version {first >> 6}")
    mtype = (first >> 4) & 0x3
    tkl = first & 0xF
    if tkl > MAX_TOKEN_LEN:
        raise CoapError(f"token length {tkl} is reserved (at most 8)")
    code = data[1]
    message_id = (data[2] << 8) | data[3]
    pos = 4 + tkl
    if pos > len(data):
        raise CoapError("message ends inside the token")
    token = bytes(data[4:pos])
    options: list[tuple[int, bytes]] = []
    payload = b""
    number = 0
    end = len(data)
    while pos < end:
        byte = data[pos]
        pos += 1
        if byte == PAYLOAD_MARKER:
            if pos == end:
                raise CoapError("payload marker with no payload")
            payload = bytes(data[pos:])
            break
        delta, pos = _extended(byte >> 4, data, pos, "delta")
        length, pos = _extended(byte & 0xF, data, pos, "length")
        number += delta
        if number > MAX_OPTION_NUMBER:
            raise CoapError(f"option number {number} out of range")
        if pos + length > end:
            raise CoapError(f"option {number} value runs past the end of the message")
        options.append((number, bytes(data[pos : pos + length])))
        pos += length
    if code == EMPTY and (token or options or payload):
        raise CoapError("an empty message (0.00) carries a token, options or payload")
    return Message(mtype, code, message_id, token, tuple(options), payload)
