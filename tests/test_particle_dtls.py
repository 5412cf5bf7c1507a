"""The DTLS 1.2 layer Gen 3 devices speak (transports/particle/dtls.py): known answers built
from the bytes shared/reference/particle-device-protocol-udp.md reports as observed on the
wire (§2.2-2.5, §3), the handshake between corral's server and device sides, the refusals
Device OS makes, the replay window, and hypothesis properties of the record layer."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.transports.particle import dtls
from corral.transports.particle.dtls import DtlsError


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


SERVER_KEY = ec.generate_private_key(ec.SECP256R1())
DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())


def handshake(*, cookie: bool = True, device_key: ec.EllipticCurvePrivateKey = DEVICE_KEY,
              server_key: ec.EllipticCurvePrivateKey = SERVER_KEY
              ) -> tuple[dtls.ClientHandshake, dtls.ServerHandshake, list[bytes]]:
    """A whole handshake; returns both sides and every datagram in order."""
    client = dtls.ClientHandshake(device_key, SERVER_KEY.public_key())
    wire = [client.start()]
    jar = dtls.CookieJar()
    rec, frag, ch = dtls.first_client_hello(wire[-1])
    if cookie:
        assert not jar.valid("10.0.0.1:4000", ch)
        wire.append(dtls.hello_verify_request(rec, frag, jar.cookie("10.0.0.1:4000", ch.random)))
        wire.append(client.receive(wire[-1])[0])
        rec, frag, ch = dtls.first_client_hello(wire[-1])
        assert jar.valid("10.0.0.1:4000", ch)
    server = dtls.ServerHandshake(server_key, rec, frag, ch)
    wire.append(server.flight)
    wire.append(client.receive(server.flight)[0])
    wire.extend(server.receive(wire[-1]))
    client.receive(wire[-1])
    return client, server, wire


# -- known answers from the reference ---------------------------------------------------------


def test_client_hello_is_the_116_bytes_device_os_sends() -> None:
    """§2.2: identical in every run except the random."""
    random = bytes(range(32))
    got = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key(), client_random=random).start()
    expected = (h("16 fefd 0000 000000000000 0067") + h("01 00005b 0000 000000 00005b")
                + h("fefd") + random + h("00 00 0004 c0ae 00ff 01 00 002d")
                + h("000d 000a 0008 0403 0401 0303 0301")   # signature_algorithms
                + h("000a 0004 0002 0017")                  # supported_groups
                + h("000b 0002 01 00")                      # ec_point_formats
                + h("00fe 0001 00")                         # connection_id (empty)
                + h("0013 0002 01 02")                      # client_certificate_type
                + h("0014 0002 01 02"))                     # server_certificate_type
    assert len(got) == 116
    assert got == expected


def test_server_flight_is_what_the_device_accepts() -> None:
    """§2.3: one datagram, 4 records, message_seq 1-4 after a HelloVerifyRequest; the minimal
    ServerHello extensions; no Certificate; the CertificateRequest bytes."""
    client, server, wire = handshake()
    hvr = dtls.parse_records(wire[1])[0]
    hvr_msg = dtls.parse_handshake(hvr.fragment)[0]
    assert (hvr_msg.msg_type, hvr_msg.message_seq) == (dtls.HELLO_VERIFY_REQUEST, 0)
    assert hvr_msg.body[:3] == h("fefd 10") and len(hvr_msg.body) == 3 + 16
    records = dtls.parse_records(server.flight)
    assert [r.type for r in records] == [22] * 4 and {r.epoch for r in records} == {0}
    msgs = [dtls.parse_handshake(r.fragment)[0] for r in records]
    assert [m.msg_type for m in msgs] == [2, 12, 13, 14]  # no Certificate (11)
    assert [m.message_seq for m in msgs] == [1, 2, 3, 4]
    sh = msgs[0].body
    assert sh[:2] == h("fefd") and sh[34:38] == h("00 c0ae 00")
    assert sh[38:] == h("0012 00fe 0009 08") + server.cid + h("0013 0001 02")
    ske = msgs[1].body
    assert ske[:4] == h("03 0017 41") and ske[4] == 0x04 and ske[69:71] == h("0403")
    sig = ske[73:]
    assert int.from_bytes(ske[71:73], "big") == len(sig)
    SERVER_KEY.public_key().verify(sig, client.client_random + server.server_random + ske[:69],
                                   ec.ECDSA(hashes.SHA256()))
    assert msgs[2].body == h("01 40 0002 0403 0000")
    assert msgs[3].body == b""


def test_device_flight_and_finished_cid_record() -> None:
    """§2.3: Certificate 00005b ‖ SPKI(91), ClientKeyExchange 41 04…, CertificateVerify 0403…,
    ChangeCipherSpec 01, then Finished in a CID record 19 fefd 0001 000000000000 ‖ cid ‖ 0030."""
    client, server, wire = handshake()
    records = dtls.parse_records(wire[4])
    assert [r.type for r in records] == [22, 22, 22, 20, 25]
    cert, cke, cv = (dtls.parse_handshake(r.fragment)[0] for r in records[:3])
    spki = dtls.spki(DEVICE_KEY.public_key())
    assert len(spki) == 91 and spki.startswith(h("3059 3013 0607 2a8648ce3d0201 0608 "
                                                 "2a8648ce3d030107 0342 0004"))
    assert cert.body == h("00005b") + spki
    assert cke.body[:2] == h("4104") and len(cke.body) == 66
    assert cv.body[:2] == h("0403")
    assert records[3].fragment == b"\x01"
    fin = records[4]
    assert fin.encode()[:21] == h("19 fefd 0001 000000000000") + server.cid + h("0030")
    assert server.session is not None and client.session is not None
    # the server answers ChangeCipherSpec (epoch 0) and Finished (epoch 1, plain type 22)
    answer = dtls.parse_records(wire[5])
    assert [(r.type, r.epoch) for r in answer] == [(20, 0), (22, 1)]
    assert server.session.peer_key == spki


def test_key_schedule_and_ccm_nonce() -> None:
    """§2.3: master = PRF(premaster, "master secret", cr‖sr); key block = client key 16 ‖
    server key 16 ‖ client IV 4 ‖ server IV 4; nonce = IV4 ‖ epoch‖seq, the 8-byte explicit
    part on the wire. Checked against an HMAC-SHA256 P_hash written out here."""
    def p_sha256(secret: bytes, seed: bytes, n: int) -> bytes:
        out, a = b"", seed
        while len(out) < n:
            a = hmac.new(secret, a, hashlib.sha256).digest()
            out += hmac.new(secret, a + seed, hashlib.sha256).digest()
        return out[:n]

    pre, cr, sr = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32
    master = dtls.master_secret(pre, cr, sr)
    assert master == p_sha256(pre, b"master secret" + cr + sr, 48)
    kb = p_sha256(master, b"key expansion" + sr + cr, 40)
    assert dtls.key_block(master, cr, sr) == dtls.Keys(kb[:16], kb[16:32], kb[32:36], kb[36:40])
    server = dtls.Session("server", b"C" * 8, master, cr, sr, out_seq=5)
    rec = dtls.parse_records(server.seal(b"hello"))[0]
    assert (rec.type, rec.epoch, rec.seq) == (23, 1, 5)
    explicit = rec.fragment[:8]
    assert explicit == h("0001 000000000005")
    aad = explicit + h("17 fefd 0005")
    assert AESCCM(kb[16:32], 8).decrypt(kb[36:40] + explicit, rec.fragment[8:], aad) == b"hello"


def test_cid_record_uses_draft05_aad_padding_and_253_marker() -> None:
    """§2.5 and §3: plaintext = content ‖ real type ‖ zeros to a multiple of 16; AAD = epoch‖seq
    ‖ 0x19 ‖ fefd ‖ cid8 ‖ 0x08 ‖ len16(padded); type 253 is the same record with only the
    first byte changed. The first resumed datagram was fd fefd 0001 00000000002e ‖ cid8 ‖
    0020 and decrypted to 40 00 0016 (a CON ping)."""
    cr, sr, master = b"\x01" * 32, b"\x02" * 32, b"\x03" * 48
    cid = h("a1a2a3a4a5a6a7a8")
    device = dtls.Session("client", cid, master, cr, sr, out_seq=0x2E, moved=True)
    server = dtls.Session("server", cid, master, cr, sr)
    wire = device.seal(h("40000016"))
    assert wire[:21] == h("fd fefd 0001 00000000002e") + cid + h("0020")
    assert len(wire) == 21 + 8 + 16 + 8
    keys = dtls.key_block(master, cr, sr)
    explicit = wire[21:29]
    aad = explicit + h("19 fefd") + cid + h("08 0010")
    inner = AESCCM(keys.client_key, 8).decrypt(keys.client_iv + explicit, wire[29:], aad)
    assert inner == h("40000016 17") + bytes(11)
    # the server routes by CID and takes 253 as 25
    rec = dtls.parse_records(wire)[0]
    assert (rec.type, rec.cid) == (253, cid)
    assert server.open(rec) == (23, h("40000016"))
    # once the device decrypts anything from the server it goes back to 25
    device.open(dtls.parse_records(server.seal(h("60000016")))[0])
    assert device.seal(b"x")[0] == 25


def test_application_data_both_ways_and_content_ending_in_zeros() -> None:
    client, server, _ = handshake(cookie=False)
    assert client.session is not None and server.session is not None
    for payload in (b"", b"\x00", b"a" * 15, b"b" * 16, b"c\x00\x00", bytes(1100)):
        rec = dtls.parse_records(client.session.seal(payload))[0]
        assert server.session.open(rec) == (23, payload)
        back = dtls.parse_records(server.session.seal(payload))[0]
        assert client.session.open(back) == (23, payload)


# -- refusals (as Device OS refuses) ---------------------------------------------------------


def test_device_refuses_a_flight_signed_with_another_key() -> None:
    client = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key())
    rec, frag, ch = dtls.first_client_hello(client.start())
    server = dtls.ServerHandshake(ec.generate_private_key(ec.SECP256R1()), rec, frag, ch)
    with pytest.raises(DtlsError, match="ServerKeyExchange signature"):
        client.receive(server.flight)


def test_device_refuses_a_server_certificate_and_a_missing_cid() -> None:
    client = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key())
    rec, frag, ch = dtls.first_client_hello(client.start())
    server = dtls.ServerHandshake(SERVER_KEY, rec, frag, ch)
    records = dtls.parse_records(server.flight)
    cert = dtls.encode_record(22, 0, 9, dtls.handshake_message(11, 1, h("000000")))
    with pytest.raises(DtlsError, match="must not be skipped"):
        dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key(),
                             client_random=ch.random).receive(records[0].encode() + cert)
    msg = dtls.parse_handshake(records[0].fragment)[0]
    no_cid = msg.body[:38] + h("0005 0013 0001 02")
    bad = dtls.encode_record(22, 0, 1, dtls.handshake_message(2, 0, no_cid))
    with pytest.raises(DtlsError, match="connection ID"):
        dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key()).receive(bad)


def test_server_refuses_a_wrong_certificate_verify_and_a_wrong_finished() -> None:
    client = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key())
    rec, frag, ch = dtls.first_client_hello(client.start())
    server = dtls.ServerHandshake(SERVER_KEY, rec, frag, ch)
    flight = client.receive(server.flight)[0]
    records = dtls.parse_records(flight)
    # another device's key in the Certificate: CertificateVerify no longer verifies
    other = dtls.spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    forged = dtls.encode_record(22, 0, records[0].seq,
                                dtls.handshake_message(11, 1, h("00005b") + other))
    with pytest.raises(DtlsError, match="CertificateVerify"):
        server.receive(forged + b"".join(r.encode() for r in records[1:]))
    # a Finished record with a flipped bit does not authenticate
    server = dtls.ServerHandshake(SERVER_KEY, rec, frag, ch)
    client = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key(), client_random=ch.random)
    client.start()
    flight = bytearray(client.receive(server.flight)[0])
    flight[-1] ^= 1
    with pytest.raises(DtlsError, match="authenticate"):
        server.receive(bytes(flight))
    assert server.session is None


def test_client_hello_checks() -> None:
    good = dtls.client_hello_body(bytes(32))
    dtls.check_client_hello(dtls.parse_client_hello(good))
    no_suite = good.replace(h("c0ae"), h("c02b"))
    with pytest.raises(DtlsError, match="CCM-8"):
        dtls.check_client_hello(dtls.parse_client_hello(no_suite))
    no_cid = good.replace(h("00fe 0001 00"), h("00ff 0001 00"))
    with pytest.raises(DtlsError, match="connection ID"):
        dtls.check_client_hello(dtls.parse_client_hello(no_cid))
    with pytest.raises(DtlsError):
        dtls.first_client_hello(h("17fefd0000000000000000000100"))


def test_retransmitted_flights_are_answered_again() -> None:
    client, server, wire = handshake(cookie=False)
    assert server.receive(wire[2]) == [wire[3]]  # our Finished was lost
    fresh = dtls.ServerHandshake(SERVER_KEY, *dtls.first_client_hello(wire[0]))
    assert fresh.receive(wire[0]) == [fresh.flight]  # our flight was lost


def test_fragmented_handshake_messages_are_reassembled() -> None:
    """After its second retransmission mbedTLS shrinks its MTU: flights may be fragmented."""
    client = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key())
    server = dtls.ServerHandshake(SERVER_KEY, *dtls.first_client_hello(client.start()))
    flight = client.receive(server.flight)[0]
    records = dtls.parse_records(flight)
    cert = dtls.parse_handshake(records[0].fragment)[0]
    pieces = []
    for start in range(0, cert.length, 40):
        body = cert.body[start:start + 40]
        pieces.append(dtls.encode_record(22, 0, 100 + start, bytes((11,)) + cert.length.to_bytes(
            3, "big") + cert.message_seq.to_bytes(2, "big") + start.to_bytes(3, "big")
            + len(body).to_bytes(3, "big") + body))
    rest = b"".join(r.encode() for r in records[1:])
    assert server.receive(pieces[2]) == []  # out of order: kept
    out = server.receive(b"".join(pieces[:2]) + rest)
    assert server.session is not None and len(out) == 1


# -- replay window and state -------------------------------------------------------------------


def test_replay_window() -> None:
    client, server, _ = handshake(cookie=False)
    assert client.session is not None and server.session is not None
    recs = [dtls.parse_records(client.session.seal(bytes((i,))))[0] for i in range(70)]
    server.session.open(recs[69])
    with pytest.raises(DtlsError, match="replayed"):
        server.session.open(recs[69])
    assert server.session.open(recs[10]) == (23, b"\x0a")  # late but inside the window
    with pytest.raises(DtlsError, match="replayed"):
        server.session.open(recs[10])
    with pytest.raises(DtlsError, match="replayed"):
        server.session.open(recs[2])  # older than the window
    with pytest.raises(DtlsError, match="epoch"):
        server.session.open(dtls.Record(25, 0, 200, recs[0].fragment, recs[0].cid))


def test_session_state_round_trip_keeps_sequence_numbers_moving() -> None:
    client, server, _ = handshake(cookie=False)
    assert client.session is not None and server.session is not None
    for i in range(3):
        server.session.open(dtls.parse_records(client.session.seal(bytes((i,))))[0])
        server.session.seal(b"x")
    state = server.session.to_state()
    again = dtls.Session.from_state(state, seq_margin=1000)
    assert again.out_seq == server.session.out_seq + 1000
    assert again.keys == server.session.keys and again.peer_key == server.session.peer_key
    rec = dtls.parse_records(client.session.seal(b"later"))[0]
    assert again.open(rec) == (23, b"later")
    with pytest.raises(DtlsError, match="replayed"):
        again.open(rec)


# -- hypothesis: the record layer --------------------------------------------------------------

record_types = st.sampled_from(sorted(dtls.RECORD_TYPES))


@st.composite
def records(draw: st.DrawFn) -> dtls.Record:
    rtype = draw(record_types)
    cid = draw(st.binary(min_size=8, max_size=8)) if rtype in (25, 253) else b""
    return dtls.Record(rtype, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, dtls.SEQ_MAX)),
                       draw(st.binary(max_size=300)), cid)


@given(st.lists(records(), min_size=1, max_size=5))
def test_records_round_trip(recs: list[dtls.Record]) -> None:
    assert dtls.parse_records(b"".join(r.encode() for r in recs)) == recs


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.binary(max_size=400))
def test_garbage_raises_only_the_layers_error(data: bytes) -> None:
    for parse in (dtls.parse_records, dtls.first_client_hello, dtls.parse_handshake,
                  dtls.parse_client_hello):
        try:
            parse(data)
        except DtlsError:
            pass


_client, _server, _wire = handshake(cookie=False)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.binary(max_size=300), st.integers(0, 0xFFFF), st.integers(0, 2 ** 48 - 1),
       st.sampled_from([22, 25, 253, 23, 20, 21]))
def test_garbage_records_into_sessions_and_handshakes(body: bytes, epoch: int, seq: int,
                                                      rtype: int) -> None:
    assert _server.session is not None and _client.session is not None
    cid = _server.cid if rtype in (25, 253) else b""
    wire = dtls.encode_record(rtype, epoch, seq, body, cid)
    rec = dtls.parse_records(wire)[0]
    for session in (_server.session, _client.session):
        with pytest.raises(DtlsError):
            session.open(rec)
    fresh = dtls.ServerHandshake(SERVER_KEY, *dtls.first_client_hello(_wire[0]))
    try:
        fresh.receive(wire)
    except DtlsError:
        pass
    device = dtls.ClientHandshake(DEVICE_KEY, SERVER_KEY.public_key())
    device.start()
    try:
        device.receive(wire)
    except DtlsError:
        pass
