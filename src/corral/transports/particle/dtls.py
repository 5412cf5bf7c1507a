"""DTLS 1.2 as Particle Device OS speaks it over UDP 5684 (Gen 3), sans-IO.

Only what Device OS uses (``shared/reference/particle-device-protocol-udp.md`` §2-3):

* one cipher suite, ``TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8`` (0xC0AE) on P-256;
* RFC 7250 raw public keys: the server sends **no** Certificate message (it signs its
  ServerKeyExchange with the key the device already holds from its server key file) and asks
  for the device's raw key with a CertificateRequest; the device proves it with
  CertificateVerify. The device id is not in the handshake: the gateway checks the key
  against the device named by the first CoAP Hello;
* the draft-05 Connection ID as mbedTLS 2.22 has it (extension 254, record type 25): the
  device asks for no CID of its own and the server gives it 8 bytes. Device records carry the
  CID, an inner content type and zero padding to a multiple of 16, and the draft-05
  additional data. Record type 253 is Particle's "moved session" marker, the same record
  with only its first byte changed (the additional data still uses 25);
* an optional stateless HelloVerifyRequest cookie (HMAC of the peer address and the client
  random), so a flood of ClientHellos costs the server no state;
* the anti-replay window, epochs 0 and 1, reassembly of fragmented handshake messages.

:class:`Session` is the epoch-1 state both sides keep once the handshake is done (the keys,
our next sequence number, the replay window); it serialises to a dict so that a gateway can
keep it across restarts: Device OS resumes a session with no handshake at all.

Everything a peer can send that does not fit raises :class:`DtlsError` and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

VERSION: Final = b"\xfe\xfd"  # DTLS 1.2

# record content types
CHANGE_CIPHER_SPEC: Final = 20
ALERT: Final = 21
HANDSHAKE: Final = 22
APPLICATION_DATA: Final = 23
TLS12_CID: Final = 25  # draft-05 CID record (mbedTLS 2.22)
MOVED_SESSION: Final = 253  # Particle: a CID record sent while resuming a session
RECORD_TYPES: Final = frozenset({CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA,
                                 TLS12_CID, MOVED_SESSION})

# handshake message types
CLIENT_HELLO: Final = 1
SERVER_HELLO: Final = 2
HELLO_VERIFY_REQUEST: Final = 3
CERTIFICATE: Final = 11
SERVER_KEY_EXCHANGE: Final = 12
CERTIFICATE_REQUEST: Final = 13
SERVER_HELLO_DONE: Final = 14
CERTIFICATE_VERIFY: Final = 15
CLIENT_KEY_EXCHANGE: Final = 16
FINISHED: Final = 20

SUITE: Final = 0xC0AE  # TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8
SCSV: Final = 0x00FF  # TLS_EMPTY_RENEGOTIATION_INFO_SCSV
SECP256R1: Final = 0x0017
ECDSA_SHA256: Final = b"\x04\x03"
EXT_SUPPORTED_GROUPS: Final = 10
EXT_POINT_FORMATS: Final = 11
EXT_SIGNATURE_ALGORITHMS: Final = 13
EXT_CLIENT_CERT_TYPE: Final = 19
EXT_SERVER_CERT_TYPE: Final = 20
EXT_CID: Final = 254  # draft-ietf-tls-dtls-connection-id-05 as in mbedTLS 2.22
RAW_PUBLIC_KEY: Final = 2

CID_LEN: Final = 8
RECORD_HEADER: Final = 13
CID_RECORD_HEADER: Final = RECORD_HEADER + CID_LEN  # 21
HANDSHAKE_HEADER: Final = 12
EXPLICIT_NONCE: Final = 8
TAG_LEN: Final = 8
CID_PADDING: Final = 16  # inner plaintext padded to a multiple of this
COOKIE_LEN: Final = 16
MAX_RECORD: Final = 16384 + 2048  # RFC 6347's bound on a record's fragment
MAX_HANDSHAKE_MESSAGE: Final = 4096  # Device OS's handshake messages are < 200 bytes
MAX_CONTENT: Final = 1152  # Device OS's MBEDTLS_SSL_MAX_CONTENT_LEN
WINDOW: Final = 64  # replay window (records)
SEQ_MAX: Final = (1 << 48) - 1
VERIFY_DATA_LEN: Final = 12

# alert descriptions used here
ALERT_FATAL: Final = 2
ALERT_HANDSHAKE_FAILURE: Final = 40
ALERT_DECRYPT_ERROR: Final = 51


class DtlsError(Exception):
    """A peer sent something this DTLS layer does not accept; ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- records -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One DTLS record. ``cid`` is set for types 25 and 253 only."""

    type: int
    epoch: int
    seq: int
    fragment: bytes
    cid: bytes = b""

    def encode(self) -> bytes:
        return encode_record(self.type, self.epoch, self.seq, self.fragment, self.cid)


def encode_record(rtype: int, epoch: int, seq: int, fragment: bytes, cid: bytes = b"") -> bytes:
    """A record on the wire: type, version, epoch, 48-bit sequence, [CID], length, fragment."""
    if rtype not in RECORD_TYPES:
        raise ValueError(f"unknown record type {rtype}")
    if bool(cid) != (rtype in (TLS12_CID, MOVED_SESSION)):
        raise ValueError("a CID goes with record types 25 and 253 only")
    if not 0 <= epoch <= 0xFFFF or not 0 <= seq <= SEQ_MAX or len(fragment) > MAX_RECORD:
        raise ValueError("record epoch, sequence number or length out of range")
    return (bytes((rtype,)) + VERSION + epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
            + cid + len(fragment).to_bytes(2, "big") + fragment)


def parse_records(data: bytes, cid_len: int = CID_LEN) -> list[Record]:
    """Every record in a datagram (DTLS packs several into one); DtlsError for anything that
    is not a sequence of whole, well-formed records."""
    out: list[Record] = []
    pos, end = 0, len(data)
    if not end:
        raise DtlsError("empty datagram")
    while pos < end:
        if end - pos < RECORD_HEADER:
            raise DtlsError("truncated record header")
        rtype = data[pos]
        if rtype not in RECORD_TYPES:
            raise DtlsError(f"unknown record type {rtype}")
        if data[pos + 1:pos + 3] != VERSION:
            raise DtlsError("not a DTLS 1.2 record")
        epoch = int.from_bytes(data[pos + 3:pos + 5], "big")
        seq = int.from_bytes(data[pos + 5:pos + 11], "big")
        at = pos + 11
        cid = b""
        if rtype in (TLS12_CID, MOVED_SESSION):
            if end - at < cid_len + 2:
                raise DtlsError("truncated CID record header")
            cid = bytes(data[at:at + cid_len])
            at += cid_len
        length = int.from_bytes(data[at:at + 2], "big")
        at += 2
        if length > MAX_RECORD:
            raise DtlsError("record longer than DTLS allows")
        if at + length > end:
            raise DtlsError("record runs past the end of the datagram")
        out.append(Record(rtype, epoch, seq, bytes(data[at:at + length]), cid))
        pos = at + length
    return out


# -- handshake messages --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeFragment:
    msg_type: int
    length: int
    message_seq: int
    frag_offset: int
    body: bytes

    @property
    def whole(self) -> bool:
        return self.frag_offset == 0 and len(self.body) == self.length


def handshake_message(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """A whole handshake message with its 12-byte DTLS header (also its transcript form)."""
    n = len(body).to_bytes(3, "big")
    return bytes((msg_type,)) + n + message_seq.to_bytes(2, "big") + b"\x00\x00\x00" + n + body


def parse_handshake(fragment: bytes) -> list[HandshakeFragment]:
    """The handshake fragments in one record's plaintext."""
    out = []
    pos, end = 0, len(fragment)
    if not end:
        raise DtlsError("empty handshake record")
    while pos < end:
        if end - pos < HANDSHAKE_HEADER:
            raise DtlsError("truncated handshake header")
        h = fragment[pos:pos + HANDSHAKE_HEADER]
        length = int.from_bytes(h[1:4], "big")
        seq = int.from_bytes(h[4:6], "big")
        offset = int.from_bytes(h[6:9], "big")
        flen = int.from_bytes(h[9:12], "big")
        if length > MAX_HANDSHAKE_MESSAGE:
            raise DtlsError("handshake message too long")
        if offset + flen > length:
            raise DtlsError("handshake fragment runs past its message")
        pos += HANDSHAKE_HEADER
        if pos + flen > end:
            raise DtlsError("handshake fragment runs past its record")
        out.append(HandshakeFragment(h[0], length, seq, offset, bytes(fragment[pos:pos + flen])))
        pos += flen
    return out


class Reassembler:
    """Handshake messages in message_seq order from possibly fragmented, repeated pieces."""

    def __init__(self, next_seq: int) -> None:
        self.next_seq = next_seq
        self._partial: dict[int, tuple[int, int, bytearray, bytearray]] = {}

    def feed(self, frag: HandshakeFragment) -> list[tuple[int, int, bytes]]:
        """(msg_type, message_seq, body) of every message now complete, in order."""
        out: list[tuple[int, int, bytes]] = []
        if frag.message_seq < self.next_seq or frag.message_seq > self.next_seq + 8:
            return out  # a repeat of something done, or too far ahead
        entry = self._partial.get(frag.message_seq)
        if entry is None:
            entry = (frag.msg_type, frag.length, bytearray(frag.length), bytearray(frag.length))
            self._partial[frag.message_seq] = entry
        msg_type, length, body, have = entry
        if msg_type != frag.msg_type or length != frag.length:
            raise DtlsError("handshake fragments disagree about their message")
        body[frag.frag_offset:frag.frag_offset + len(frag.body)] = frag.body
        have[frag.frag_offset:frag.frag_offset + len(frag.body)] = b"\x01" * len(frag.body)
        while True:
            entry = self._partial.get(self.next_seq)
            if entry is None or (entry[1] and 0 in entry[3]):
                return out
            del self._partial[self.next_seq]
            out.append((entry[0], self.next_seq, bytes(entry[2])))
            self.next_seq += 1


class _Reader:
    """Bounds-checked reads from a handshake body; DtlsError when it runs short."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DtlsError(f"truncated {self.what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def _extensions(data: bytes) -> dict[int, bytes]:
    r = _Reader(data, "extensions")
    out: dict[int, bytes] = {}
    while not r.done:
        num = r.u16()
        out[num] = r.vec16()
    return out


def _ext(num: int, body: bytes) -> bytes:
    return num.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


@dataclasses.dataclass(frozen=True, slots=True)
class ClientHello:
    random: bytes
    session_id: bytes
    cookie: bytes
    suites: tuple[int, ...]
    extensions: dict[int, bytes]


def parse_client_hello(body: bytes) -> ClientHello:
    r = _Reader(body, "ClientHello")
    if r.take(2) != VERSION:
        raise DtlsError("the ClientHello is not DTLS 1.2")
    random = r.take(32)
    session_id = r.vec8()
    cookie = r.vec8()
    raw = r.vec16()
    if len(raw) % 2:
        raise DtlsError("odd cipher suite list")
    suites = tuple(int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2))
    r.vec8()  # compression methods
    exts = _extensions(r.vec16()) if not r.done else {}
    return ClientHello(random, session_id, cookie, suites, exts)


def client_hello_body(random: bytes, cookie: bytes = b"") -> bytes:
    """The ClientHello body Device OS sends (reference §2.2): one suite and the SCSV, no
    session id, and signature_algorithms, supported_groups, ec_point_formats, an empty CID,
    client and server certificate type RawPublicKey, in that order."""
    exts = (_ext(EXT_SIGNATURE_ALGORITHMS, bytes.fromhex("000804030401 03030301"))
            + _ext(EXT_SUPPORTED_GROUPS, bytes.fromhex("00020017"))
            + _ext(EXT_POINT_FORMATS, b"\x01\x00")
            + _ext(EXT_CID, b"\x00")
            + _ext(EXT_CLIENT_CERT_TYPE, b"\x01\x02")
            + _ext(EXT_SERVER_CERT_TYPE, b"\x01\x02"))
    return (VERSION + random + b"\x00" + bytes((len(cookie),)) + cookie
            + b"\x00\x04" + SUITE.to_bytes(2, "big") + SCSV.to_bytes(2, "big") + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts)


def check_client_hello(ch: ClientHello) -> None:
    """Refuse a ClientHello Device OS would never send in a way this server can serve."""
    if SUITE not in ch.suites:
        raise DtlsError("the client does not offer ECDHE-ECDSA-AES128-CCM-8")
    groups = ch.extensions.get(EXT_SUPPORTED_GROUPS)
    if groups is not None and SECP256R1.to_bytes(2, "big") not in [
            groups[i:i + 2] for i in range(2, len(groups) - 1, 2)]:
        raise DtlsError("the client does not offer P-256")
    if EXT_CID not in ch.extensions:
        raise DtlsError("the client does not use a connection ID")
    types = ch.extensions.get(EXT_CLIENT_CERT_TYPE)
    if types is None or RAW_PUBLIC_KEY not in types[1:]:
        raise DtlsError("the client does not offer a raw public key")


# -- key schedule ------------------------------------------------------------------------------


def prf(secret: bytes, label: bytes, seed: bytes, n: int) -> bytes:
    """The TLS 1.2 PRF with SHA-256 (RFC 5246 §5)."""
    seed = label + seed
    out = b""
    a = seed
    while len(out) < n:
        a = hmac.digest(secret, a, "sha256")
        out += hmac.digest(secret, a + seed, "sha256")
    return out[:n]


@dataclasses.dataclass(frozen=True, slots=True)
class Keys:
    client_key: bytes
    server_key: bytes
    client_iv: bytes
    server_iv: bytes


def master_secret(premaster: bytes, client_random: bytes, server_random: bytes) -> bytes:
    return prf(premaster, b"master secret", client_random + server_random, 48)


def key_block(master: bytes, client_random: bytes, server_random: bytes) -> Keys:
    """client key 16 ‖ server key 16 ‖ client IV 4 ‖ server IV 4 (AES-128-CCM-8)."""
    kb = prf(master, b"key expansion", server_random + client_random, 40)
    return Keys(kb[0:16], kb[16:32], kb[32:36], kb[36:40])


def verify_data(master: bytes, label: bytes, transcript: bytes) -> bytes:
    return prf(master, label, hashlib.sha256(transcript).digest(), VERIFY_DATA_LEN)


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def load_point(data: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise DtlsError("not a P-256 point") from None


def load_spki(data: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        raise DtlsError("the raw public key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise DtlsError("the raw public key is not a P-256 key")
    return key


def _verify(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, what: str) -> None:
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise DtlsError(f"the {what} signature does not verify") from None


# -- the epoch-1 session ---------------------------------------------------------------------


class ReplayWindow:
    """RFC 6347 §4.1.2.6: the highest sequence number seen and a 64-record bitmap below it."""

    __slots__ = ("bits", "top")

    def __init__(self, top: int = -1, bits: int = 0) -> None:
        self.top = top
        self.bits = bits

    def fresh(self, seq: int) -> bool:
        if seq > self.top:
            return True
        behind = self.top - seq
        return behind < WINDOW and not self.bits >> behind & 1

    def accept(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = seq
        else:
            self.bits |= 1 << (self.top - seq)


@dataclasses.dataclass(slots=True)
class Session:
    """Epoch-1 state of one DTLS session, on either side.

    ``role`` is "server" or "client"; ``cid`` is the server's connection ID (the one the
    device's records carry). ``out_seq`` is our next record sequence number; it must never
    repeat within the session, across resumptions too. A client sets ``moved`` while it
    resumes: its records are type 253 until it decrypts anything from the server."""

    role: str
    cid: bytes
    master: bytes
    client_random: bytes
    server_random: bytes
    out_seq: int = 0
    window: ReplayWindow = dataclasses.field(default_factory=ReplayWindow)
    moved: bool = False
    peer_key: bytes = b""  # the device's SPKI DER (server side)
    _keys: Keys | None = None
    _seal: AESCCM | None = None
    _open: AESCCM | None = None

    def __post_init__(self) -> None:
        keys = key_block(self.master, self.client_random, self.server_random)
        self._keys = keys
        server = self.role == "server"
        self._seal = AESCCM(keys.server_key if server else keys.client_key, TAG_LEN)
        self._open = AESCCM(keys.client_key if server else keys.server_key, TAG_LEN)

    @property
    def keys(self) -> Keys:
        assert self._keys is not None
        return self._keys

    def _next_seq(self) -> int:
        seq = self.out_seq
        if seq > SEQ_MAX:
            raise DtlsError("the session's sequence numbers are used up")
        self.out_seq = seq + 1
        return seq

    def seal(self, content: bytes, content_type: int = APPLICATION_DATA, epoch: int = 1) -> bytes:
        """One record of ours: plain type 23/22 from the server, a CID record (25, or 253
        while ``moved``) from the client."""
        assert self._seal is not None
        seq = self._next_seq()
        explicit = epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
        if self.role == "server":
            iv = self.keys.server_iv
            aad = explicit + bytes((content_type,)) + VERSION + len(content).to_bytes(2, "big")
            body = explicit + self._seal.encrypt(iv + explicit, content, aad)
            return encode_record(content_type, epoch, seq, body)
        inner = content + bytes((content_type,))
        inner += b"\x00" * (-len(inner) % CID_PADDING)
        aad = (explicit + bytes((TLS12_CID,)) + VERSION + self.cid + bytes((len(self.cid),))
               + len(inner).to_bytes(2, "big"))
        body = explicit + self._seal.encrypt(self.keys.client_iv + explicit, inner, aad)
        return encode_record(MOVED_SESSION if self.moved else TLS12_CID, epoch, seq, body,
                             self.cid)

    def open(self, record: Record) -> tuple[int, bytes]:
        """(content type, plaintext) of a peer's epoch-1 record; DtlsError for a replay, a
        wrong CID or epoch, or a record that does not authenticate (nothing changes then)."""
        assert self._open is not None
        if record.epoch != 1:
            raise DtlsError(f"a record of epoch {record.epoch} in epoch 1")
        if not self.window.fresh(record.seq):
            raise DtlsError("replayed record")
        frag = record.fragment
        if len(frag) < EXPLICIT_NONCE + TAG_LEN:
            raise DtlsError("encrypted record too short")
        explicit, sealed = frag[:EXPLICIT_NONCE], frag[EXPLICIT_NONCE:]
        plain_len = len(sealed) - TAG_LEN
        if self.role == "server":
            if record.type not in (TLS12_CID, MOVED_SESSION) or record.cid != self.cid:
                raise DtlsError("a device record without this session's CID")
            aad = (record.epoch.to_bytes(2, "big") + record.seq.to_bytes(6, "big")
                   + bytes((TLS12_CID,)) + VERSION + record.cid + bytes((len(record.cid),))
                   + plain_len.to_bytes(2, "big"))
            iv = self.keys.client_iv
        else:
            if record.type not in (APPLICATION_DATA, HANDSHAKE, ALERT):
                raise DtlsError(f"record type {record.type} from the server")
            aad = (record.epoch.to_bytes(2, "big") + record.seq.to_bytes(6, "big")
                   + bytes((record.type,)) + VERSION + plain_len.to_bytes(2, "big"))
            iv = self.keys.server_iv
        try:
            plain = self._open.decrypt(iv + explicit, sealed, aad)
        except InvalidTag:
            raise DtlsError("the record does not authenticate") from None
        if self.role == "server":
            stripped = plain.rstrip(b"\x00")
            if not stripped:
                raise DtlsError("a CID record without its inner content type")
            content_type, plain = stripped[-1], stripped[:-1]
        else:
            content_type = record.type
        self.window.accept(record.seq)
        self.moved = False
        return content_type, plain

    def to_state(self) -> dict[str, Any]:
        """What survives a restart (JSON-ready)."""
        return {"role": self.role, "cid": self.cid.hex(), "master": self.master.hex(),
                "client_random": self.client_random.hex(),
                "server_random": self.server_random.hex(), "out_seq": self.out_seq,
                "window_top": self.window.top, "window_bits": self.window.bits,
                "peer_key": self.peer_key.hex()}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, seq_margin: int = 0) -> Session:
        """A session back from :meth:`to_state`. ``seq_margin`` is added to our sequence
        number: a gateway persists it now and then, and must never reuse one it sent."""
        s = cls(str(state["role"]), bytes.fromhex(state["cid"]), bytes.fromhex(state["master"]),
                bytes.fromhex(state["client_random"]), bytes.fromhex(state["server_random"]),
                int(state["out_seq"]) + seq_margin,
                ReplayWindow(int(state["window_top"]), int(state["window_bits"])),
                peer_key=bytes.fromhex(state.get("peer_key", "")))
        return s


# -- server handshake ------------------------------------------------------------------------


class CookieJar:
    """Stateless HelloVerifyRequest cookies: HMAC(secret, address ‖ client random), so a
    ClientHello that does not echo one costs only an answer, never state."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or os.urandom(32)

    def cookie(self, address: str, client_random: bytes) -> bytes:
        return hmac.digest(self.secret, address.encode() + b"|" + client_random,
                           "sha256")[:COOKIE_LEN]

    def valid(self, address: str, ch: ClientHello) -> bool:
        return hmac.compare_digest(ch.cookie, self.cookie(address, ch.random))


def first_client_hello(datagram: bytes) -> tuple[Record, HandshakeFragment, ClientHello]:
    """The ClientHello that opens a handshake: one whole, unfragmented message in an epoch-0
    handshake record (Device OS's is 116 bytes)."""
    records = parse_records(datagram)
    rec = records[0]
    if rec.type != HANDSHAKE or rec.epoch != 0:
        raise DtlsError("not a ClientHello")
    frag = parse_handshake(rec.fragment)[0]
    if frag.msg_type != CLIENT_HELLO or not frag.whole:
        raise DtlsError("not a whole ClientHello")
    ch = parse_client_hello(frag.body)
    check_client_hello(ch)
    return rec, frag, ch


def hello_verify_request(rec: Record, frag: HandshakeFragment, cookie: bytes) -> bytes:
    """The HelloVerifyRequest datagram (record and message sequence mirror the ClientHello)."""
    body = VERSION + bytes((len(cookie),)) + cookie
    return encode_record(HANDSHAKE, 0, rec.seq,
                         handshake_message(HELLO_VERIFY_REQUEST, frag.message_seq, body))


def alert(description: int) -> bytes:
    return encode_record(ALERT, 0, 0, bytes((ALERT_FATAL, description)))


class _Epoch0:
    """Our epoch-0 records, numbered in order."""

    record_seq = 0

    def _record(self, rtype: int, fragment: bytes) -> bytes:
        seq = self.record_seq
        self.record_seq += 1
        return encode_record(rtype, 0, seq, fragment)


class ServerHandshake(_Epoch0):
    """The server side of one handshake, from the (cookie-checked) ClientHello to Finished.

    :meth:`receive` takes each datagram of the device's and returns the datagrams to send;
    ``session`` is set once the device's Finished verified. A repeated ClientHello gets the
    same flight again, a repeated final flight the same CCS + Finished again."""

    def __init__(self, server_key: ec.EllipticCurvePrivateKey, rec: Record,
                 frag: HandshakeFragment, ch: ClientHello, *, cid: bytes | None = None,
                 server_random: bytes | None = None,
                 ephemeral: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.server_key = server_key
        self.client_random = ch.random
        self.server_random = server_random or os.urandom(32)
        self.cid = cid or os.urandom(CID_LEN)
        self.ephemeral = ephemeral or ec.generate_private_key(ec.SECP256R1())
        self.ch_seq = frag.message_seq
        self.transcript = bytearray(handshake_message(CLIENT_HELLO, frag.message_seq, frag.body))
        self.reassembler = Reassembler(frag.message_seq + 1)
        self.record_seq = rec.seq + 1
        self.flight = self._first_flight()
        self.final_flight: bytes | None = None
        self.peer_key: ec.EllipticCurvePublicKey | None = None
        self.pending: Session | None = None
        self.session: Session | None = None
        self._ccs = False
        self._cke = False
        self._verified = False

    def _first_flight(self) -> bytes:
        seq = self.ch_seq
        exts = _ext(EXT_CID, bytes((CID_LEN,)) + self.cid) + _ext(EXT_CLIENT_CERT_TYPE,
                                                                   bytes((RAW_PUBLIC_KEY,)))
        server_hello = (VERSION + self.server_random + b"\x00" + SUITE.to_bytes(2, "big")
                        + b"\x00" + len(exts).to_bytes(2, "big") + exts)
        params = b"\x03" + SECP256R1.to_bytes(2, "big") + b"\x41" + point(
            self.ephemeral.public_key())
        signature = self.server_key.sign(self.client_random + self.server_random + params,
                                         ec.ECDSA(hashes.SHA256()))
        ske = params + ECDSA_SHA256 + len(signature).to_bytes(2, "big") + signature
        cert_request = b"\x01\x40" + b"\x00\x02" + ECDSA_SHA256 + b"\x00\x00"
        out = bytearray()
        for i, (mtype, body) in enumerate(((SERVER_HELLO, server_hello),
                                           (SERVER_KEY_EXCHANGE, ske),
                                           (CERTIFICATE_REQUEST, cert_request),
                                           (SERVER_HELLO_DONE, b""))):
            msg = handshake_message(mtype, seq + i, body)
            self.transcript += msg
            out += self._record(HANDSHAKE, msg)
        self.out_msg_seq = seq + 4
        return bytes(out)

    def receive(self, datagram: bytes) -> list[bytes]:
        """The answer to one datagram of the device's (maybe nothing)."""
        if self.session is not None:  # our Finished was lost: the device sends its flight again
            return [self.final_flight] if self.final_flight else []
        out: list[bytes] = []
        for rec in parse_records(datagram):
            if rec.type == ALERT and rec.epoch == 0:
                raise DtlsError("the device sent an alert")
            if rec.type == HANDSHAKE and rec.epoch == 0:
                for frag in parse_handshake(rec.fragment):
                    if frag.msg_type == CLIENT_HELLO:
                        if frag.message_seq == self.ch_seq and not out:
                            out.append(self.flight)  # our flight was lost
                        continue
                    for mtype, mseq, body in self.reassembler.feed(frag):
                        self._message(mtype, mseq, body)
            elif rec.type == CHANGE_CIPHER_SPEC and rec.epoch == 0:
                if rec.fragment != b"\x01" or self.pending is None:
                    raise DtlsError("unexpected ChangeCipherSpec")
                self._ccs = True
            elif rec.type in (TLS12_CID, MOVED_SESSION) and rec.epoch == 1:
                if not self._ccs or self.pending is None:
                    raise DtlsError("an encrypted record before ChangeCipherSpec")
                ctype, plain = self.pending.open(rec)
                if ctype != HANDSHAKE:
                    raise DtlsError("the first encrypted record is not Finished")
                for frag in parse_handshake(plain):
                    for mtype, mseq, body in self.reassembler.feed(frag):
                        self._message(mtype, mseq, body)
                        if mtype == FINISHED:
                            out = [self._finish()]
            else:
                raise DtlsError(f"unexpected record type {rec.type} in the handshake")
        return out

    def _message(self, mtype: int, mseq: int, body: bytes) -> None:
        wire = handshake_message(mtype, mseq, body)
        if mtype == CERTIFICATE:
            if self.peer_key is not None:
                raise DtlsError("a second Certificate")
            r = _Reader(body, "Certificate")
            raw = r.take(r.u24())
            if not r.done:
                raise DtlsError("trailing bytes after the raw public key")
            if not raw:
                raise DtlsError("the device sent no raw public key")
            self.peer_key = load_spki(raw)
        elif mtype == CLIENT_KEY_EXCHANGE:
            if self.peer_key is None or self._cke:
                raise DtlsError("ClientKeyExchange out of order")
            r = _Reader(body, "ClientKeyExchange")
            peer = load_point(r.vec8())
            premaster = self.ephemeral.exchange(ec.ECDH(), peer)
            master = master_secret(premaster, self.client_random, self.server_random)
            self.pending = Session("server", self.cid, master, self.client_random,
                                   self.server_random, peer_key=spki(self.peer_key))
            self._cke = True
        elif mtype == CERTIFICATE_VERIFY:
            if not self._cke or self.peer_key is None:
                raise DtlsError("CertificateVerify out of order")
            r = _Reader(body, "CertificateVerify")
            if r.take(2) != ECDSA_SHA256:
                raise DtlsError("CertificateVerify is not ecdsa_secp256r1_sha256")
            _verify(self.peer_key, r.vec16(), bytes(self.transcript), "CertificateVerify")
            self._verified = True
        elif mtype == FINISHED:
            if self.pending is None or not self._verified:
                raise DtlsError("Finished out of order")
            expected = verify_data(self.pending.master, b"client finished",
                                   bytes(self.transcript))
            if not hmac.compare_digest(body, expected):
                raise DtlsError("the device's Finished does not verify")
        else:
            raise DtlsError(f"unexpected handshake message {mtype}")
        self.transcript += wire

    def _finish(self) -> bytes:
        assert self.pending is not None
        data = verify_data(self.pending.master, b"server finished", bytes(self.transcript))
        msg = handshake_message(FINISHED, self.out_msg_seq, data)
        ccs = self._record(CHANGE_CIPHER_SPEC, b"\x01")
        self.final_flight = ccs + self.pending.seal(msg, HANDSHAKE)
        self.session = self.pending
        return self.final_flight


# -- client (device) handshake ---------------------------------------------------------------


class ClientHandshake(_Epoch0):
    """The device side, as Device OS does it: :meth:`start` gives the ClientHello; each
    server datagram goes to :meth:`receive`, which returns what to send; ``session`` is set
    when the server's Finished verified. ``flight`` is the last flight (to resend when the
    server stays silent)."""

    def __init__(self, device_key: ec.EllipticCurvePrivateKey,
                 server_public_key: ec.EllipticCurvePublicKey, *,
                 client_random: bytes | None = None) -> None:
        self.device_key = device_key
        self.server_public_key = server_public_key
        self.client_random = client_random if client_random is not None else os.urandom(32)
        self.record_seq = 0
        self.msg_seq = 0
        self.transcript = bytearray()
        self.flight = b""
        self.reassembler = Reassembler(0)
        self.server_random = b""
        self.cid = b""
        self.pending: Session | None = None
        self.session: Session | None = None
        self._server_params: bytes | None = None
        self._cert_requested = False
        self._ccs = False

    def start(self, cookie: bytes = b"") -> bytes:
        msg = handshake_message(CLIENT_HELLO, self.msg_seq, client_hello_body(self.client_random,
                                                                               cookie))
        self.transcript = bytearray(msg)
        self.msg_seq += 1
        self.reassembler = Reassembler(self.msg_seq - 1)
        self.flight = self._record(HANDSHAKE, msg)
        return self.flight

    def receive(self, datagram: bytes) -> list[bytes]:
        out: list[bytes] = []
        for rec in parse_records(datagram):
            if rec.type == ALERT and rec.epoch == 0:
                raise DtlsError("the server sent an alert")
            if rec.type == HANDSHAKE and rec.epoch == 0:
                for frag in parse_handshake(rec.fragment):
                    if frag.msg_type == HELLO_VERIFY_REQUEST:
                        r = _Reader(frag.body, "HelloVerifyRequest")
                        r.take(2)
                        return [self.start(r.vec8())]
                    for mtype, mseq, body in self.reassembler.feed(frag):
                        reply = self._message(mtype, mseq, body)
                        if reply:
                            out.append(reply)
            elif rec.type == CHANGE_CIPHER_SPEC and rec.epoch == 0:
                if self.pending is None:
                    raise DtlsError("unexpected ChangeCipherSpec")
                self._ccs = True
            elif rec.type == HANDSHAKE and rec.epoch == 1:
                if not self._ccs or self.pending is None:
                    raise DtlsError("an encrypted record before ChangeCipherSpec")
                _ctype, plain = self.pending.open(rec)
                for frag in parse_handshake(plain):
                    for mtype, _mseq, body in self.reassembler.feed(frag):
                        if mtype != FINISHED:
                            raise DtlsError("expected the server's Finished")
                        expected = verify_data(self.pending.master, b"server finished",
                                               bytes(self.transcript))
                        if not hmac.compare_digest(body, expected):
                            raise DtlsError("the server's Finished does not verify")
                        self.session = self.pending
            else:
                raise DtlsError(f"unexpected record type {rec.type} in the handshake")
        return out

    def _message(self, mtype: int, mseq: int, body: bytes) -> bytes | None:
        self.transcript += handshake_message(mtype, mseq, body)
        if mtype == SERVER_HELLO:
            r = _Reader(body, "ServerHello")
            if r.take(2) != VERSION:
                raise DtlsError("the ServerHello is not DTLS 1.2")
            self.server_random = r.take(32)
            r.vec8()
            if r.u16() != SUITE:
                raise DtlsError("the server chose another cipher suite")
            r.u8()
            exts = _extensions(r.vec16()) if not r.done else {}
            cid = exts.get(EXT_CID, b"")
            if len(cid) != 1 + CID_LEN or cid[0] != CID_LEN:
                raise DtlsError("Unable to get connection ID")  # Device OS's words
            self.cid = cid[1:]
            if exts.get(EXT_CLIENT_CERT_TYPE) != bytes((RAW_PUBLIC_KEY,)):
                raise DtlsError("the server does not take a raw public key")
        elif mtype == CERTIFICATE:
            raise DtlsError("server key exchange message must not be skipped")
        elif mtype == SERVER_KEY_EXCHANGE:
            r = _Reader(body, "ServerKeyExchange")
            params = r.take(4)
            if params[:3] != b"\x03" + SECP256R1.to_bytes(2, "big") or params[3] != 65:
                raise DtlsError("the ServerKeyExchange is not named-curve P-256")
            raw = r.take(65)
            if r.take(2) != ECDSA_SHA256:
                raise DtlsError("the ServerKeyExchange is not signed with ECDSA-SHA256")
            _verify(self.server_public_key, r.vec16(),
                    self.client_random + self.server_random + params + raw, "ServerKeyExchange")
            self._server_params = raw
        elif mtype == CERTIFICATE_REQUEST:
            self._cert_requested = True
        elif mtype == SERVER_HELLO_DONE:
            if self._server_params is None or not self.cid:
                raise DtlsError("ServerHelloDone before the server's key")
            return self._second_flight()
        else:
            raise DtlsError(f"unexpected handshake message {mtype}")
        return None

    def _second_flight(self) -> bytes:
        assert self._server_params is not None
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        premaster = ephemeral.exchange(ec.ECDH(), load_point(self._server_params))
        master = master_secret(premaster, self.client_random, self.server_random)
        self.pending = Session("client", self.cid, master, self.client_random,
                               self.server_random)
        out = bytearray()
        msgs = []
        if self._cert_requested:
            raw = spki(self.device_key.public_key())
            msgs.append((CERTIFICATE, len(raw).to_bytes(3, "big") + raw))
        msgs.append((CLIENT_KEY_EXCHANGE, b"\x41" + point(ephemeral.public_key())))
        for mtype, body in msgs:
            msg = handshake_message(mtype, self.msg_seq, body)
            self.msg_seq += 1
            self.transcript += msg
            out += self._record(HANDSHAKE, msg)
        if self._cert_requested:
            sig = self.device_key.sign(bytes(self.transcript), ec.ECDSA(hashes.SHA256()))
            msg = handshake_message(CERTIFICATE_VERIFY, self.msg_seq,
                                    ECDSA_SHA256 + len(sig).to_bytes(2, "big") + sig)
            self.msg_seq += 1
            self.transcript += msg
            out += self._record(HANDSHAKE, msg)
        out += self._record(CHANGE_CIPHER_SPEC, b"\x01")
        fin = handshake_message(FINISHED, self.msg_seq,
                                verify_data(master, b"client finished", bytes(self.transcript)))
        self.msg_seq += 1
        self.transcript += fin
        out += self.pending.seal(fin, HANDSHAKE)
        self.reassembler = Reassembler(self.reassembler.next_seq)
        self.flight = bytes(out)
        return self.flight


def records_of(datagrams: Iterable[bytes]) -> list[Record]:
    """Every record of several datagrams (tests, logs)."""
    return [r for d in datagrams for r in parse_records(d)]
