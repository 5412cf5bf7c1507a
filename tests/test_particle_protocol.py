"""Particle TCP ("lightssl") protocol layer: known answers from a real captured session
(tests/data/particle/session-capture.json), device-side round trips, and
hypothesis properties for the framing and the CoAP codec."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.transports.particle import coap, crypto, messages
from corral.transports.particle.coap import CoapError, Message
from corral.transports.particle.crypto import FrameReader, FramingError, HandshakeError, Session
from corral.transports.particle.errors import ParticleProtocolError

# A copy of shared/reference/particle-vectors/session-capture.json (throwaway keys only).
VECTORS = Path(__file__).resolve().parent / "data/particle/session-capture.json"


@cache
def capture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def h(s: str) -> bytes:
    return bytes.fromhex(s)


@cache
def server_key() -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(capture()["server_private_key_pem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@cache
def device_key() -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(capture()["device_private_key_pem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def creds() -> bytes:
    return h(capture()["session_creds_hex"])


def frames(direction: str | None = None) -> list[dict[str, Any]]:
    return [f for f in capture()["frames"] if direction is None or f["dir"] == direction]


def frame(n: int) -> dict[str, Any]:
    f: dict[str, Any] = capture()["frames"][n]
    assert f["n"] == n
    return f


def plain(n: int) -> bytes:
    return h(frame(n)["plaintext_coap_hex"])


def msg(n: int) -> Message:
    return coap.decode(plain(n))


# -- handshake known answers -----------------------------------------------------------------


def test_public_key_ders_match_the_capture():
    c = capture()
    assert crypto.device_public_key_der(device_key().public_key()) == h(c["device_public_key_der_hex"])
    assert len(h(c["device_public_key_der_hex"])) == 162
    # Our hand-built SPKI is byte-identical to what cryptography serialises.
    assert device_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == h(c["device_public_key_der_hex"])
    assert server_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == h(c["server_public_key_der_hex"])


def test_open_device_blob_known_answer():
    c = capture()
    hs = c["handshake"]
    assert hs["nonce_s2d_hex"] == c["nonce_hex"]
    device_id, der = crypto.open_device_blob(server_key(), h(c["nonce_hex"]), h(hs["device_256_hex"]))
    assert device_id == c["device_id"]
    assert der == h(c["device_public_key_der_hex"])
    plaintext = h(hs["device_256_plaintext_hex"])
    assert plaintext == h(c["nonce_hex"]) + h(c["device_id"]) + der
    key = crypto.load_device_public_key(der)
    assert key.public_numbers() == device_key().public_key().public_numbers()


def test_open_device_blob_refuses_wrong_nonce_and_bad_lengths():
    c = capture()
    blob = h(c["handshake"]["device_256_hex"])
    wrong = bytes(40)
    with pytest.raises(HandshakeError, match="nonce"):
        crypto.open_device_blob(server_key(), wrong, blob)
    with pytest.raises(HandshakeError, match="256"):
        crypto.open_device_blob(server_key(), h(c["nonce_hex"]), blob[:-1])
    with pytest.raises(HandshakeError):
        crypto.open_device_blob(server_key(), h(c["nonce_hex"]), bytes(256))
    tampered = bytes([blob[0] ^ 0x40]) + blob[1:]
    with pytest.raises(HandshakeError):
        crypto.open_device_blob(server_key(), h(c["nonce_hex"]), tampered)
    with pytest.raises(ValueError):
        crypto.open_device_blob(server_key(), b"short", blob)


def test_server_reply_reproduces_the_capture_exactly():
    c = capture()
    parts = c["handshake"]["server_384_parts"]
    device_pub = crypto.load_device_public_key(h(c["device_public_key_der_hex"]))
    pad = h(parts["encrypted_creds_pkcs1_type2_padding_hex"])
    assert len(pad) == crypto.CREDS_PADDING_LEN == 85
    reply = crypto.server_reply(server_key(), device_pub, creds(), padding=pad)
    assert len(reply) == crypto.SERVER_REPLY_LEN
    assert reply == h(c["handshake"]["server_384_hex"])
    assert reply[:128] == h(parts["encrypted_creds_hex"])
    assert reply[128:] == h(parts["signature_hex"])
    assert crypto.creds_hmac(creds(), reply[:128]) == h(parts["hmac_sha1_hex"])
    # The fallback for cryptography < 47 (raw CRT modexp) gives the same signature.
    assert crypto.sign_raw_modexp(server_key(), h(parts["hmac_sha1_hex"])) == h(parts["signature_hex"])


def test_device_opens_the_captured_server_reply():
    reply = h(capture()["handshake"]["server_384_hex"])
    assert crypto.open_server_reply(device_key(), server_key().public_key(), reply) == creds()


def test_random_server_reply_opens_on_the_device_and_tampering_is_refused():
    device_pub = device_key().public_key()
    fresh = crypto.new_session_creds()
    assert len(fresh) == crypto.CREDS_LEN
    reply = crypto.server_reply(server_key(), device_pub, fresh)
    assert reply[:128] != crypto.server_reply(server_key(), device_pub, fresh)[:128]  # random pad
    assert crypto.open_server_reply(device_key(), server_key().public_key(), reply) == fresh
    bad_sig = reply[:-1] + bytes([reply[-1] ^ 1])
    with pytest.raises(HandshakeError, match="signature"):
        crypto.open_server_reply(device_key(), server_key().public_key(), bad_sig)
    bad_c = bytes([reply[0] ^ 1]) + reply[1:]
    with pytest.raises(HandshakeError):
        crypto.open_server_reply(device_key(), server_key().public_key(), bad_c)
    with pytest.raises(HandshakeError, match="384"):
        crypto.open_server_reply(device_key(), server_key().public_key(), reply[:383])
    other_server = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(HandshakeError, match="signature"):
        crypto.open_server_reply(device_key(), other_server.public_key(), reply)


def test_device_blob_round_trip_and_wrong_server_key():
    nonce = crypto.new_nonce()
    assert len(nonce) == crypto.NONCE_LEN
    blob = crypto.device_blob(server_key().public_key(), nonce, "00aabbccddeeff0011223344", device_key())
    assert len(blob) == crypto.DEVICE_BLOB_LEN
    device_id, der = crypto.open_device_blob(server_key(), nonce, blob)
    assert device_id == "00aabbccddeeff0011223344"
    assert der == crypto.device_public_key_der(device_key().public_key())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(HandshakeError):
        crypto.open_device_blob(other, nonce, blob)
    with pytest.raises(ValueError):
        crypto.device_blob(server_key().public_key(), nonce, "nothex", device_key())
    with pytest.raises(ValueError):
        crypto.device_blob(server_key().public_key(), nonce, "00aa", device_key())


def test_load_device_public_key_refuses_other_keys():
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = big.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(HandshakeError, match="RSA-2048"):
        crypto.load_device_public_key(der)
    with pytest.raises(HandshakeError, match="DER"):
        crypto.load_device_public_key(b"\x30\x03garbage")
    with pytest.raises(ValueError):
        crypto.device_public_key_der(big)


def test_server_reply_argument_checks():
    device_pub = device_key().public_key()
    with pytest.raises(ValueError):
        crypto.server_reply(server_key(), device_pub, b"short")
    with pytest.raises(ValueError):
        crypto.server_reply(server_key(), device_pub, creds(), padding=b"\x01" * 84)
    with pytest.raises(ValueError):
        crypto.server_reply(server_key(), device_pub, creds(), padding=b"\x00" * 85)


# -- framing known answers ---------------------------------------------------------------------


def test_every_frame_decrypts_and_encrypts_with_the_iv_chain():
    server = Session.from_creds(creds())
    device = Session.from_creds(creds())
    split = capture()["session_creds_split"]
    assert server.send.iv == h(split["iv_hex"])
    for f in frames():
        wire, plaintext = h(f["wire_hex"]), h(f["plaintext_coap_hex"])
        assert int.from_bytes(wire[:2], "big") == len(wire) - 2
        if f["dir"] == "d2s":
            assert server.recv.iv == h(f["iv_hex"]), f["n"]
            assert server.open(wire[2:]) == plaintext, f["n"]
            assert device.seal(plaintext) == wire, f["n"]  # the device's own chain
        else:
            assert server.send.iv == h(f["iv_hex"]), f["n"]
            assert server.seal(plaintext) == wire, f["n"]
            assert device.open(wire[2:]) == plaintext, f["n"]
    assert len(frames("d2s")) + len(frames("s2d")) == len(frames()) == 60


def test_iv_chain_is_the_first_ciphertext_block():
    cipher = crypto.Cipher(b"k" * 16, b"i" * 16)
    ct = cipher.encrypt(b"x" * 40)
    assert len(ct) == 48
    assert cipher.iv == ct[:16] != ct[-16:]


def test_wire_totals_and_frame_reader_on_the_whole_stream():
    c = capture()
    hs = c["handshake"]
    s2d = h(hs["nonce_s2d_hex"]) + h(hs["server_384_hex"]) + b"".join(h(f["wire_hex"]) for f in frames("s2d"))
    d2s = h(hs["device_256_hex"]) + b"".join(h(f["wire_hex"]) for f in frames("d2s"))
    totals = c["wire_totals"]
    assert len(s2d) == totals["s2d_bytes"] and hashlib.sha256(s2d).hexdigest() == totals["s2d_sha256"]
    assert len(d2s) == totals["d2s_bytes"] and hashlib.sha256(d2s).hexdigest() == totals["d2s_sha256"]
    # The whole device stream after the handshake, fed 7 bytes at a time.
    stream = d2s[crypto.DEVICE_BLOB_LEN :]
    reader = FrameReader()
    server = Session.from_creds(creds())
    got: list[bytes] = []
    for i in range(0, len(stream), 7):
        got += [server.open(ct) for ct in reader.feed(stream[i : i + 7])]
    assert got == [h(f["plaintext_coap_hex"]) for f in frames("d2s")]
    assert reader.buffered == 0


@pytest.mark.parametrize("prefix", [b"\x00\x00", b"\x00\x11", b"\x20\x10", b"\xff\xf0"])
def test_frame_reader_refuses_bad_lengths_and_stays_poisoned(prefix: bytes):
    reader = FrameReader(max_len=8192)
    with pytest.raises(FramingError, match="frame length"):
        reader.feed(prefix + bytes(32))
    with pytest.raises(FramingError):
        reader.feed(b"\x00\x10" + bytes(16))


def test_cipher_refuses_bad_ciphertext():
    session = Session.from_creds(creds())
    with pytest.raises(FramingError, match="blocks"):
        session.open(bytes(15))
    with pytest.raises(FramingError, match="blocks"):
        session.open(b"")
    # A block whose plaintext ends in 0x00 (never valid PKCS#7), built with raw AES-CBC.
    key, iv = creds()[:16], creds()[16:32]
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    bad = enc.update(b"x" * 15 + b"\x00") + enc.finalize()
    with pytest.raises(FramingError, match="padding"):
        session.open(bad)
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    bad = enc.update(b"x" * 14 + b"\x01\x02") + enc.finalize()
    with pytest.raises(FramingError, match="padding"):
        Session.from_creds(creds()).open(bad)
    good = Session.from_creds(creds()).seal(b"x" * 14)[2:]
    assert Session.from_creds(creds()).open(good) == b"x" * 14
    assert isinstance(FramingError("x"), ParticleProtocolError)
    assert isinstance(HandshakeError("x"), ParticleProtocolError)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages_=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
    key=st.binary(min_size=40, max_size=40),
)
def test_seal_open_round_trip_under_any_chunking(messages_: list[bytes], cuts: list[int], key: bytes):
    sender = Session.from_creds(key)
    receiver = Session.from_creds(key)
    stream = b"".join(sender.seal(m) for m in messages_)
    reader = FrameReader()
    out: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += [receiver.open(ct) for ct in reader.feed(stream[pos : pos + step])]
        pos += step
        i += 1
    assert out == messages_
    assert reader.buffered == 0


@settings(max_examples=300)
@given(data=st.binary(max_size=200), max_len=st.integers(min_value=16, max_value=4096))
def test_frame_reader_on_garbage_returns_frames_or_raises_framing_error(data: bytes, max_len: int):
    reader = FrameReader(max_len=max_len)
    try:
        out = reader.feed(data)
    except FramingError:
        return
    for ct in out:
        assert ct and len(ct) % 16 == 0 and len(ct) <= max_len
    session = Session.from_creds(bytes(range(40)))
    for ct in out:
        try:
            session.open(ct)
        except FramingError:
            break


# -- CoAP known answers ------------------------------------------------------------------------

_TYPES = {"CON": coap.CON, "NON": coap.NON, "ACK": coap.ACK, "RST": coap.RST}


@pytest.mark.parametrize("n", range(60))
def test_every_captured_message_decodes_and_reencodes(n: int):
    f = frame(n)
    raw = plain(n)
    m = coap.decode(raw)
    exp = f["coap"]
    assert m.type == _TYPES[exp["type"]]
    assert coap.code_str(m.code) == exp["code"]
    assert m.message_id == exp["mid"]
    assert m.token == h(exp["token_hex"])
    assert [[num, v.hex()] for num, v in m.options] == exp["options"]
    assert m.payload == h(exp["payload_hex"])
    assert coap.encode(m) == raw


def test_message_helpers_on_captured_messages():
    event = msg(6)
    assert event.path_segments == ["E", "particle/device/updates/enabled"]
    assert event.uri_path == "E/particle/device/updates/enabled"
    call = msg(24)
    assert call.uri_path == "f/echo" and call.uri_query == ["hello-vectors"]
    assert call.option(coap.URI_QUERY) == b"hello-vectors"
    assert call.option(coap.CONTENT_FORMAT) is None
    assert call.is_request and not call.is_response
    assert msg(2).option(coap.CONTENT_FORMAT) == b"\x2a"
    assert msg(2).uri_query == ["\x01"]
    assert msg(14).is_empty and msg(27).is_response
    assert call.summary() == "CON POST /f/echo?hello-vectors mid=4101 tok=13"
    assert msg(46).summary().startswith("CON POST /c?0x7649e563 mid=4106 tok=17")


def test_coap_option_extensions_and_ordering():
    long_name = b"n" * 300
    m = Message(coap.CON, coap.POST, 7, b"\x01", ((coap.URI_QUERY, b"q"), (coap.URI_PATH, b"E"),
                                                  (coap.URI_PATH, long_name), (1000, b"x" * 20)))
    raw = coap.encode(m)
    back = coap.decode(raw)
    # Encoded in ascending number order; repeats keep their order.
    assert back.options == ((coap.URI_PATH, b"E"), (coap.URI_PATH, long_name), (coap.URI_QUERY, b"q"),
                            (1000, b"x" * 20))
    # 300-byte value: length nibble 14 (2-byte extension); delta 985: nibble 14 as well.
    assert raw[raw.index(b"E") + 1] == 0x0E
    mid = Message(coap.NON, coap.GET, 1, options=((20, b"a"),))
    assert coap.encode(mid)[4] == 0xD1 and coap.encode(mid)[5] == 7  # delta 20 = 13 + 7


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x40\x00", "shorter"),
        (b"\x80\x00\x00\x01", "version"),
        (b"\x49\x01\x00\x01" + bytes(9), "token length"),
        (b"\x44\x01\x00\x01\xaa", "token"),
        (b"\x40\x01\x00\x01\xff", "payload marker"),
        (b"\x40\x01\x00\x01\xb5ab", "past the end"),
        (b"\x40\x01\x00\x01\xd1", "extension"),
        (b"\x40\x01\x00\x01\xe1\x00", "extension"),
        (b"\x40\x01\x00\x01\xf1a", "reserved"),
        (b"\x40\x01\x00\x01\x1fa", "reserved"),
        (b"\x41\x00\x00\x01\xaa", "empty message"),
        (b"\x60\x00\x00\x01\xff\x00", "empty message"),
        (b"\x40\x01\x00\x01\xe0\xff\xff\xe0\xff\xff", "out of range"),
    ],
)
def test_coap_decode_refuses_malformed(raw: bytes, reason: str):
    with pytest.raises(CoapError, match=reason) as info:
        coap.decode(raw)
    assert info.value.reason


def test_coap_encode_refuses_impossible_messages():
    for bad in (
        Message(4, coap.GET, 1),
        Message(coap.CON, 256, 1),
        Message(coap.CON, coap.GET, 70000),
        Message(coap.CON, coap.GET, 1, token=bytes(9)),
        Message(coap.CON, coap.EMPTY, 1, token=b"x"),
        Message(coap.CON, coap.GET, 1, options=((70000, b""),)),
    ):
        with pytest.raises(ValueError):
            coap.encode(bad)


_options = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2000), st.binary(max_size=300)), max_size=6
).map(lambda opts: tuple(sorted(opts, key=lambda o: o[0])))


@st.composite
def coap_messages(draw: st.DrawFn) -> Message:
    code = draw(st.integers(min_value=0, max_value=255))
    if code == coap.EMPTY:
        return Message(draw(st.integers(0, 3)), code, draw(st.integers(0, 0xFFFF)))
    return Message(
        draw(st.integers(0, 3)),
        code,
        draw(st.integers(0, 0xFFFF)),
        draw(st.binary(max_size=8)),
        draw(_options),
        draw(st.binary(max_size=400)),
    )


@settings(max_examples=500)
@given(coap_messages())
def test_coap_round_trip(m: Message):
    raw = coap.encode(m)
    assert coap.decode(raw) == m
    assert coap.encode(coap.decode(raw)) == raw


@settings(max_examples=2000)
@given(st.binary(max_size=120))
def test_coap_decode_random_bytes_returns_a_message_or_coap_error(data: bytes):
    try:
        m = coap.decode(data)
    except CoapError:
        return
    # Anything accepted re-encodes to the same bytes (canonical except for option order,
    # which decode preserves and which is always ascending on the wire).
    assert coap.encode(m) == data


@settings(max_examples=500)
@given(coap_messages(), st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_coap_decode_mutated_messages_never_crash(m: Message, where: int, byte: int):
    raw = bytearray(coap.encode(m))
    if raw:
        raw[where % len(raw)] = byte
    try:
        coap.decode(bytes(raw))
    except CoapError:
        pass
    try:
        coap.decode(bytes(raw[: where % (len(raw) + 1)]))
    except CoapError:
        pass


# -- Particle messages -------------------------------------------------------------------------


def test_parse_hello_from_the_capture_and_round_trip():
    m = msg(0)
    assert messages.resource(m) == messages.HELLO
    hello = messages.parse_hello(m.payload)
    assert hello == messages.Hello(
        product_id=3, product_version=65535, flags=0x36, platform_id=3, system_version=6200,
        max_message_size=1152, max_binary_size=10 * 1024 * 1024, ota_chunk_size=512,
    )
    assert hello.has(messages.HELLO_FLAG_DEVICE_INITIATED_DESCRIBE)
    assert hello.has(messages.HELLO_FLAG_GOODBYE_SUPPORT)
    assert not hello.has(messages.HELLO_FLAG_OTA_UPGRADE_SUCCESSFUL)
    assert messages.hello_payload(hello) == m.payload
    assert coap.encode(messages.device_hello(41377, hello)) == plain(0)
    assert coap.encode(messages.server_hello(4097)) == plain(1)


def test_parse_hello_legacy_and_bad_payloads():
    assert messages.parse_hello(b"") == messages.Hello(0, 0, 0, 0)
    assert messages.parse_hello(bytes.fromhex("0006000a")) == messages.Hello(6, 10, 0, 0)
    old = bytes.fromhex("0006000a" "0001" "0006")
    assert messages.parse_hello(old) == messages.Hello(6, 10, 1, 6)
    # Older layout: reserved, device_id_len, device id, max_content_len.
    legacy = bytes.fromhex("0006000a00010006" "00" "02" "abcd" "0480")
    assert messages.parse_hello(legacy) == messages.Hello(
        6, 10, 1, 6, max_message_size=1152, device_id=b"\xab\xcd")
    with pytest.raises(messages.MessageError):
        messages.parse_hello(b"\x00")
    with pytest.raises(messages.MessageError, match="device id"):
        messages.parse_hello(bytes.fromhex("0006000a00010006" "00" "09" "ab"))


def test_describe_messages_match_the_capture():
    assert coap.encode(messages.describe_request(4098, b"\x11", messages.DESCRIBE_APPLICATION)) == plain(13)
    assert coap.encode(messages.describe_request(4099, b"\x12", messages.DESCRIBE_SYSTEM)) == plain(17)
    with pytest.raises(ValueError):
        messages.describe_request(1, b"\x01", 3)
    assert messages.describe_kind(msg(2)) == 1 and messages.describe_kind(msg(8)) == 2
    assert messages.describe_kind(msg(13)) == 2
    assert messages.describe_kind(msg(24)) is None  # a function argument is not a kind
    # Device side builders reproduce the device's bytes.
    assert coap.encode(messages.describe_post(41378, b"\xc3", 1, msg(2).payload)) == plain(2)
    assert coap.encode(messages.describe_post(41382, b"\xc5", 2, msg(8).payload)) == plain(8)
    assert coap.encode(messages.describe_response(41386, b"\x11", 2, msg(15).payload)) == plain(15)
    assert coap.encode(messages.describe_response(41387, b"\x12", 1, msg(19).payload)) == plain(19)
    # Server answers: piggy-backed ACK 2.04 with the token, and empty ACKs.
    assert coap.encode(messages.ack(41378, coap.CHANGED, b"\xc3")) == plain(3)
    assert coap.encode(messages.ack(41386)) == plain(16)


def test_app_describe():
    for n in (8, 15):
        d = messages.parse_app_describe(msg(n).payload)
        assert d.functions == ["echo"]
        assert d.variables == {"counter": "int32", "lastArg": "string"}
        assert d.unknown == {}
    assert messages.app_describe_payload(["echo"], {"counter": "int32", "lastArg": "string"}) == msg(8).payload
    d = messages.parse_app_describe(b'{"v":{"b":1,"d":9,"n":5}}')
    assert d.functions == [] and d.variables == {"b": "bool", "d": "double"} and d.unknown == {"n": 5}
    assert messages.parse_app_describe(b"{}") == messages.AppDescribe([], {})
    for bad in (b"not json", b"[]", b'{"f":"echo"}', b'{"f":[1]}', b'{"v":[]}', b'{"v":{"x":"int"}}',
                b'{"v":{"x":true}}', b"\xff",
                b"[" * 5_000 + b"]" * 5_000,  # too deep to parse: RecursionError before
                b'{"f":[], "x":' + b'{"a":' * 65 + b"1" + b"}" * 66):  # past MAX_JSON_DEPTH
        with pytest.raises(messages.MessageError):
            messages.parse_app_describe(bad)


def test_system_describe_protobuf():
    for n in (2, 19):
        sd = messages.parse_system_describe(msg(n).payload)
        assert [(m.type, m.index, m.version) for m in sd.modules] == [(2, 0, 1000), (3, 0, 6200)]
        mono = sd.modules[1]
        assert mono.dependencies == (messages.ModuleDependency(2, 0, 1000),)
        assert mono.checked_flags == mono.passed_flags == 0x1E
        assert (mono.max_size, mono.size, mono.store) == (10485760, 10485764, 0)
        assert sd.system_version == 6200
        assert sd.imei is None
    with pytest.raises(messages.MessageError):
        messages.parse_system_describe(b"\x0a\x05\x08")  # truncated
    with pytest.raises(messages.MessageError):
        messages.parse_system_describe(b"\x0b")  # wire type 3 (groups) is not used
    assert messages.parse_system_describe(b"") == messages.SystemDescribe()
    sd = messages.parse_system_describe(b"\x12\x03123\x1a\x02ab")
    assert sd.imei == "123" and sd.iccid == "ab" and sd.system_version is None


def test_time_messages():
    assert coap.encode(messages.time_request(41379, b"\xc4")) == plain(4)
    reply = messages.time_response(41379, b"\xc4", 1795237909)
    assert coap.encode(reply) == plain(5)
    assert messages.parse_time(reply.payload) == 1795237909
    with pytest.raises(messages.MessageError):
        messages.parse_time(b"\x00")


def test_events_both_directions():
    e = messages.parse_event(msg(6))
    assert e == messages.Event("particle/device/updates/enabled", b"true", 60, None)
    assert messages.parse_event(msg(23)).data == b"ping=from-cloud"
    assert coap.encode(messages.publish(41380, "particle/device/updates/enabled", "true")) == plain(6)
    assert coap.encode(messages.publish(41388, "tick", "1")) == plain(21)
    assert coap.encode(messages.event(4100, "ping", "from-cloud")) == plain(22)
    assert messages.parse_event(msg(22)) == messages.Event("ping", b"from-cloud")
    # TTL and content format as Device OS encodes them (Max-Age 3 bytes is accepted too).
    dev = Message(coap.NON, coap.POST, 9, b"", ((11, b"E"), (11, b"t"), (14, b"\x00\x01\x2c")), b"x")
    assert messages.parse_event(dev).ttl == 300
    ours = messages.publish(9, "t", b"\x00\x01", ttl=300, content_format=42)
    back = messages.parse_event(coap.decode(coap.encode(ours)))
    assert (back.ttl, back.content_format, back.data) == (300, 42, b"\x00\x01")
    with pytest.raises(messages.MessageError):
        messages.parse_event(msg(10))  # a subscription (GET) is not an event
    with pytest.raises(messages.MessageError):
        messages.parse_event(Message(coap.NON, coap.POST, 1, options=((11, b"E"),)))
    with pytest.raises(messages.MessageError):
        messages.parse_event(Message(coap.NON, coap.POST, 1, options=((11, b"E"), (11, b"\xff"))))
    with pytest.raises(messages.MessageError):
        messages.parse_event(Message(coap.NON, coap.POST, 1, options=((11, b"E"), (11, b"a"), (14, bytes(5)))))


def test_subscriptions():
    assert [messages.parse_subscribe(msg(n)).prefix for n in (10, 11, 12)] == ["particle", "spark", "ping"]
    assert coap.encode(messages.subscribe(41385, "ping")) == plain(12)
    cbor = Message(coap.NON, coap.GET, 1, options=((11, b"e"), (11, b"x"), (15, b"c")))
    assert messages.parse_subscribe(cbor) == messages.Subscribe("x", ("c",))
    with pytest.raises(messages.MessageError):
        messages.parse_subscribe(msg(28))


def test_function_call_and_result():
    call = messages.function_call(4101, b"\x13", "echo", "hello-vectors")
    assert coap.encode(call) == plain(24)
    assert messages.parse_function_call(msg(24)) == ("echo", "hello-vectors")
    assert messages.parse_function_call(messages.function_call(1, b"\x01", "f", "")) == ("f", "")
    assert messages.function_call(1, b"\x01", "f", "").option(coap.URI_QUERY) is None
    assert messages.parse_function_result(msg(27).payload) == 13
    assert coap.encode(messages.function_result(41391, b"\x13", 13)) == plain(27)
    assert messages.parse_function_result(b"\xff\xff\xff\xff") == -1
    with pytest.raises(messages.MessageError):
        messages.parse_function_result(b"\x00")
    with pytest.raises(messages.MessageError):
        messages.parse_function_call(msg(28))


def test_variables():
    assert coap.encode(messages.variable_request(4102, b"\x14", "counter")) == plain(28)
    assert coap.encode(messages.variable_request(4103, b"\x15", "lastArg")) == plain(31)
    assert messages.resource_name(msg(31)) == "lastArg"
    assert messages.decode_variable("int32", msg(30).payload) == 1
    assert messages.decode_variable(messages.VAR_STRING, msg(33).payload) == "hello-vectors"
    assert coap.encode(messages.variable_value(41392, b"\x14", messages.encode_variable("int32", 1))) == plain(30)
    assert messages.decode_variable("bool", b"\x01") is True
    assert messages.decode_variable(1, b"\x00") is False
    assert messages.decode_variable("double", struct.pack("<d", 2.5)) == 2.5
    assert messages.decode_variable("int32", b"\x80\x00\x00\x00") == -(2**31)
    for vtype, value in (("int32", -7), ("bool", True), ("double", -0.125), ("string", "ü")):
        assert messages.decode_variable(vtype, messages.encode_variable(vtype, value)) == value
    for vtype, payload in (("int32", b"\x00"), ("bool", b""), ("double", bytes(4)),
                           ("double", struct.pack("<d", float("nan"))), ("string", b"\xff"),
                           ("null", b""), (5, b"")):
        with pytest.raises(messages.MessageError):
            messages.decode_variable(vtype, payload)
    with pytest.raises(ValueError):
        messages.encode_variable("nope", 1)


def test_ping_and_acks():
    assert coap.encode(messages.ping(4104)) == plain(34)
    assert coap.encode(messages.ack(41400)) == plain(42)
    assert coap.encode(messages.ack(4110, coap.CHANGED, b"\x1b", b'{"r":0}')) == plain(59)
    assert coap.encode(messages.reset(5)) == b"\x70\x00\x00\x05"


def test_goodbye():
    g = messages.Goodbye(cloud_reason=2, reset_reason=None, sleep_duration=300, network_reason=None)
    m = messages.goodbye(7, g)
    raw = coap.encode(m)
    # NON POST /x with the empty No-Response option (258) encoded as Device OS does.
    assert raw[:8] == bytes.fromhex("50020007b178d0ea")
    back = coap.decode(raw)
    assert messages.resource(back) == messages.GOODBYE
    assert messages.parse_goodbye(back.payload) == g
    assert messages.parse_goodbye(b"") == messages.Goodbye()
    assert messages.parse_goodbye(b"\x00") == messages.Goodbye()
    with pytest.raises(messages.MessageError):
        messages.parse_goodbye(b"\x01")  # flagged value missing
    assert messages.goodbye(1, messages.Goodbye(), confirmable=True).option(messages.NO_RESPONSE) is None


def test_ota_messages_match_the_capture():
    image = h(capture()["ota_image_hex"])
    begin = messages.UpdateBegin(file_size=len(image), chunk_size=512)
    assert begin.chunk_count == 4 and not begin.fast
    assert coap.encode(messages.update_begin(4105, b"\x16", begin)) == plain(43)
    assert messages.parse_update_begin(msg(43).payload) == begin
    assert coap.encode(messages.update_ready(41401, b"\x16", 0)) == plain(45)
    data = b""
    for i, n in enumerate((46, 49, 52, 55)):
        piece = image[i * 512 : (i + 1) * 512]
        assert coap.encode(messages.chunk(4106 + i, bytes((0x17 + i,)), piece)) == plain(n)
        parsed = messages.parse_chunk(msg(n))
        assert parsed.crc_ok and parsed.index is None and parsed.crc == zlib.crc32(piece)
        data += parsed.data
        assert coap.encode(messages.chunk_received(41402 + i, bytes((0x17 + i,)))) == plain(n + 2)
    assert data == image
    assert coap.encode(messages.update_done(4110, b"\x1b")) == plain(58)
    # Fast OTA: a second Uri-Query with the chunk index (u16), read by Device OS as option 2.
    fast = messages.chunk(1, b"\x01", b"abc", index=300)
    raw = coap.encode(fast)
    assert raw[raw.index(b"c") + 6 :][:3] == b"\x02\x01\x2c"
    assert messages.parse_chunk(coap.decode(raw)) == messages.Chunk(zlib.crc32(b"abc"), b"abc", 300)
    bad = messages.Chunk(0, b"abc")
    assert not bad.crc_ok
    assert messages.chunk_received(1, b"\x01", ok=False).code == coap.BAD_REQUEST
    missed = messages.chunks_missed(3, [1, 258])
    assert coap.encode(missed) == bytes.fromhex("40010003b163ff00010102")
    assert messages.parse_chunks_missed(missed.payload) == [1, 258]
    for bad_payload in (b"", b"\x01"):
        with pytest.raises(messages.MessageError):
            messages.parse_chunks_missed(bad_payload)
    with pytest.raises(messages.MessageError):
        messages.parse_update_begin(b"\x00" * 11)
    with pytest.raises(messages.MessageError):
        messages.parse_chunk(msg(43))
    fast_flags = messages.UpdateBegin(file_size=10, chunk_size=0, flags=messages.UPDATE_FLAG_FAST)
    assert fast_flags.fast and fast_flags.chunk_count == 0


def test_resource_helpers():
    assert messages.resource(msg(34)) is None
    assert messages.resource_name(msg(4)) is None
    assert messages.resource(msg(24)) == messages.FUNCTION
    with pytest.raises(ValueError):
        messages.variable_request(1, bytes(9), "x")  # tokens are at most 8 bytes
