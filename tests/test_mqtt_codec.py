"""The sans-IO MQTT codec: spec-derived byte vectors, round trips, chunking, malformed input.

Byte vectors are worked out by hand from the MQTT 3.1.1 and 5.0 packet layouts (the
comment above each one shows the derivation), not captured from another implementation.
"""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.transports.mqtt import (
    MQTT_5,
    MQTT_311,
    PROPERTY_TABLE,
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    decode_all,
    encode,
    valid_topic_filter,
)
from corral.transports.mqtt.codec import _varint
from corral.transports.mqtt.properties import (
    AUTH,
    BOOLEAN_BYTES,
    CONNACK,
    CONNECT,
    DISCONNECT,
    NONZERO,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    WILL,
    PropSpec,
    PropType,
)

H = bytes.fromhex
CONNECT_V4 = encode(Connect("c"), MQTT_311)
CONNECT_V5 = encode(Connect("c", protocol_level=5), MQTT_5)


def raw(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def s(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


# --------------------------------------------------------------------------- known answers


def test_remaining_length_boundaries_from_the_spec_table() -> None:
    # MQTT 3.1.1 §2.2.3 / 5.0 §1.5.5 table of variable byte integer sizes.
    assert _varint(0) == H("00")
    assert _varint(127) == H("7f")
    assert _varint(128) == H("8001")
    assert _varint(16_383) == H("ff7f")
    assert _varint(16_384) == H("808001")
    assert _varint(2_097_151) == H("ffff7f")
    assert _varint(2_097_152) == H("80808001")
    assert _varint(268_435_455) == H("ffffff7f")
    with pytest.raises(ValueError):
        _varint(268_435_456)


# CONNECT 3.1.1, will QoS 1 + retain, username and password.
# 10 20                      type 1, remaining length 32
# 00 04 4d 51 54 54 04       "MQTT", level 4
# ee                         flags: user 80 | pass 40 | will retain 20 | will QoS1 08 | will 04 | clean 02
# 00 3c                      keep-alive 60
# 00 04 64 65 76 31          client id "dev1"
# 00 03 77 2f 74             will topic "w/t"
# 00 03 62 79 65             will payload "bye"
# 00 01 75 / 00 01 70        username "u", password "p"
CONNECT_311_VECTOR = H(
    "1020 00044d51545404 ee 003c 000464657631 0003772f74 0003627965 000175 000170"
)
CONNECT_311 = Connect("dev1", True, 60, "u", b"p", Will("w/t", b"bye", 1, True))

# CONNECT 5.0, will with properties, connect properties, no credentials.
# 10 2c                      remaining length 44
# 00 04 4d 51 54 54 05 06    "MQTT", level 5, flags will 04 | clean 02
# 00 1e                      keep-alive 30
# 08 11 00000e10 21 0014     properties (8): session expiry 3600, receive maximum 20
# 00 04 64 65 76 31          client id "dev1"
# 0c 18 00000005 26 0001 6b 0001 76   will properties (12): will delay 5, user ("k","v")
# 00 01 77 / 00 01 78        will topic "w", will payload "x"
CONNECT_5_VECTOR = H(
    "102c 00044d51545405 06 001e 08 1100000e10 210014 000464657631 0c 1800000005 2600016b000176 000177 000178"
)
CONNECT_5 = Connect(
    "dev1",
    True,
    30,
    None,
    None,
    Will("w", b"x", 0, False, Properties(will_delay_interval=5, user_properties=(("k", "v"),))),
    Properties(session_expiry_interval=3600, receive_maximum=20),
    protocol_level=5,
)

# PUBLISH 5.0 QoS 1: 32 = type 3 | QoS1 02; remaining length 22.
# 00 03 61 2f 62             topic "a/b"
# 00 0a                      packet id 10
# 0c 01 01 23 0005 26 0001 78 0001 79   properties (12): format 1, topic alias 5, user ("x","y")
# 68 69                      payload "hi"
PUBLISH_5_VECTOR = H("3216 0003612f62 000a 0c 0101 230005 26000178000179 6869")
PUBLISH_5 = Publish(
    "a/b",
    b"hi",
    1,
    packet_id=10,
    properties=Properties(payload_format_indicator=1, topic_alias=5, user_properties=(("x", "y"),)),
)

# SUBSCRIBE 5.0: 82 (type 8, reserved flags 0010), remaining length 17.
# 00 01                      packet id 1
# 02 0b 07                   properties (2): subscription identifier 7
# 00 03 61 2f 2b 2d          "a/+", options: QoS1 01 | no-local 04 | retain-as-published 08 | RH 2 (20)
# 00 03 62 2f 23 02          "b/#", QoS 2
SUBSCRIBE_5_VECTOR = H("8211 0001 020b07 0003612f2b2d 0003622f2302")
SUBSCRIBE_5 = Subscribe(
    1,
    (Subscription("a/+", 1, True, True, 2), Subscription("b/#", 2)),
    Properties(subscription_identifiers=(7,)),
)

# DISCONNECT 5.0 reason 0x8e (session taken over) with reason string "bye":
# e0 08 | 8e | 06 1f 0003 62 79 65
DISCONNECT_5_VECTOR = H("e008 8e 06 1f0003627965")
DISCONNECT_5 = Disconnect(0x8E, Properties(reason_string="bye"))

VECTORS: list[tuple[Packet, int, bytes]] = [
    (CONNECT_311, MQTT_311, CONNECT_311_VECTOR),
    (CONNECT_5, MQTT_5, CONNECT_5_VECTOR),
    (PUBLISH_5, MQTT_5, PUBLISH_5_VECTOR),
    (SUBSCRIBE_5, MQTT_5, SUBSCRIBE_5_VECTOR),
    (DISCONNECT_5, MQTT_5, DISCONNECT_5_VECTOR),
    # 3.1.1 QoS 1 PUBLISH "t", id 0x0102, payload "x", retain: 33 06 0001 74 0102 78
    (Publish("t", b"x", 1, True, packet_id=0x0102), MQTT_311, H("3306000174010278")),
    # 3.1.1 SUBSCRIBE id 0x0102 "t" QoS 1: 82 06 0102 0001 74 01
    (Subscribe(0x0102, (Subscription("t", 1),)), MQTT_311, H("82060102000174 01")),
    # CONNACK 3.1.1 session present, accepted: 20 02 01 00
    (Connack(True, 0), MQTT_311, H("20020100")),
    # CONNACK 5.0 reason 0x87 not authorized, no properties: 20 03 00 87 00
    (Connack(False, 0x87), MQTT_5, H("2003008700")),
    # PUBACK 5.0 short forms: success without properties is 2 bytes; reason alone is 3.
    (Puback(10), MQTT_5, H("4002000a")),
    (Puback(10, 0x10), MQTT_5, H("4003000a10")),
    # PUBREL keeps flags 0010: 62 02 000a
    (Pubrel(10), MQTT_311, H("6202000a")),
    (Pubrec(10, 0, Properties(reason_string="r")), MQTT_5, H("5008000a00041f000172")),
    (Pubcomp(10, 0x92), MQTT_5, H("7003000a92")),
    # SUBACK 3.1.1 id 1, codes 01 80: 90 04 0001 01 80
    (Suback(1, (1, 0x80)), MQTT_311, H("9004000101 80")),
    # UNSUBSCRIBE 3.1.1 id 2 "a": a2 05 0002 0001 61
    (Unsubscribe(2, ("a",)), MQTT_311, H("a20500020001 61")),
    # UNSUBACK 3.1.1: b0 02 0002; 5.0 with one code 0x11 and no properties: b0 04 0002 00 11
    (Unsuback(2), MQTT_311, H("b0020002")),
    (Unsuback(2, (0x11,)), MQTT_5, H("b004000200 11")),
    (Pingreq(), MQTT_311, H("c000")),
    (Pingresp(), MQTT_5, H("d000")),
    (Disconnect(), MQTT_311, H("e000")),
    (Disconnect(), MQTT_5, H("e000")),
    # DISCONNECT 5.0 reason 0x04 (disconnect with will), short form: e0 01 04
    (Disconnect(0x04), MQTT_5, H("e00104")),
    # AUTH 5.0 continue (0x18), method "m": f0 06 18 04 15 0001 6d
    (Auth(0x18, Properties(authentication_method="m")), MQTT_5, H("f006 18 04 1500016d")),
]


@pytest.mark.parametrize(("packet", "version", "wire"), VECTORS)
def test_known_answer_vectors(packet: Packet, version: int, wire: bytes) -> None:
    assert encode(packet, version) == wire
    expected = [packet]
    if isinstance(packet, Connect):
        assert decode_all(wire) == expected
    else:
        assert decode_all(wire, version) == expected


def test_decoder_learns_version_from_connect() -> None:
    dec = Decoder()
    assert dec.feed(CONNECT_5_VECTOR + PUBLISH_5_VECTOR) == [CONNECT_5, PUBLISH_5]
    assert dec.version == MQTT_5
    dec4 = Decoder()
    # The same PUBLISH bytes after a 3.1.1 CONNECT: no property section, so the
    # property bytes are read as payload.
    out = dec4.feed(CONNECT_311_VECTOR + H("3306000174010278"))
    assert dec4.version == MQTT_311
    assert out[1] == Publish("t", b"x", 1, True, packet_id=0x0102)


def test_short_forms_decode_to_success() -> None:
    assert decode_all(H("4002000a"), 5) == [Puback(10)]
    assert decode_all(H("e000"), 5) == [Disconnect(0)]
    assert decode_all(H("f000"), 5) == [Auth(0)]
    # reason code present, property length omitted
    assert decode_all(H("e00181"), 5) == [Disconnect(0x81)]


def test_repr_of_properties_lists_only_what_is_set() -> None:
    assert repr(Properties(topic_alias=3)) == "Properties(topic_alias=3)"


def test_property_table_matches_the_spec() -> None:
    # Spot checks of identifiers and types against MQTT 5.0 §2.2.2.2.
    expect = {
        0x01: ("payload_format_indicator", PropType.BYTE),
        0x02: ("message_expiry_interval", PropType.FOUR_BYTE),
        0x0B: ("subscription_identifiers", PropType.VARINT),
        0x11: ("session_expiry_interval", PropType.FOUR_BYTE),
        0x13: ("server_keep_alive", PropType.TWO_BYTE),
        0x16: ("authentication_data", PropType.BINARY),
        0x23: ("topic_alias", PropType.TWO_BYTE),
        0x26: ("user_properties", PropType.UTF8_PAIR),
        0x27: ("maximum_packet_size", PropType.FOUR_BYTE),
        0x2A: ("shared_subscription_available", PropType.BYTE),
    }
    assert len(PROPERTY_TABLE) == 27
    for ident, (name, typ) in expect.items():
        assert (PROPERTY_TABLE[ident].name, PROPERTY_TABLE[ident].type) == (name, typ)
    assert PROPERTY_TABLE[0x18].packets == {WILL}
    assert PUBLISH in PROPERTY_TABLE[0x0B].repeatable_in
    assert SUBSCRIBE not in PROPERTY_TABLE[0x0B].repeatable_in


def test_valid_topic_filter() -> None:
    for good in ("a", "#", "+", "a/+/b", "a/#", "+/+", "/"):
        assert valid_topic_filter(good), good
    for bad in ("", "a#", "a/#/b", "a+", "a/b+/c", "#/a"):
        assert not valid_topic_filter(bad), bad


# --------------------------------------------------------------------------- strategies

text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    max_size=12,
)
topic_name = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00+#"),
    min_size=1,
    max_size=12,
)
topic_filter = text.filter(bool)
blob = st.binary(max_size=16)
pid = st.integers(1, 0xFFFF)
byte = st.integers(0, 255)


def _value(spec: PropSpec, ptype: int) -> st.SearchStrategy[object]:
    t = spec.type
    if t is PropType.BYTE:
        return st.integers(0, 1) if spec.ident in BOOLEAN_BYTES else byte
    low = 1 if spec.ident in NONZERO or spec.ident == 0x23 else 0
    if t is PropType.TWO_BYTE:
        return st.integers(low, 0xFFFF)
    if t is PropType.FOUR_BYTE:
        return st.integers(low, 0xFFFF_FFFF)
    if t is PropType.VARINT:
        most = 3 if ptype in spec.repeatable_in else 1
        return st.lists(st.integers(1, 268_435_455), min_size=1, max_size=most).map(tuple)
    if t is PropType.UTF8:
        return text
    if t is PropType.BINARY:
        return blob
    return st.lists(st.tuples(text, text), min_size=1, max_size=3).map(tuple)


def props(ptype: int, version: int) -> st.SearchStrategy[Properties]:
    if version == MQTT_311:
        return st.just(Properties())
    allowed = {s.name: _value(s, ptype) for s in PROPERTY_TABLE.values() if ptype in s.packets}
    return st.fixed_dictionaries({}, optional=allowed).map(lambda d: Properties(**d))  # type: ignore[arg-type]


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    username = draw(st.none() | text)
    if version == MQTT_311 and username is None:
        password = None
    else:
        password = draw(st.none() | blob)
    will = draw(
        st.none()
        | st.builds(Will, topic_name, blob, st.integers(0, 2), st.booleans(), props(WILL, version))
    )
    return Connect(
        draw(text),
        draw(st.booleans()),
        draw(st.integers(0, 0xFFFF)),
        username,
        password,
        will,
        draw(props(CONNECT, version)),
        version,
    )


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    p = draw(props(PUBLISH, version))
    topic = draw(topic_name) if p.topic_alias is None else draw(st.just("") | topic_name)
    return Publish(
        topic,
        draw(st.binary(max_size=300)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(pid) if qos else None,
        p,
    )


def subscriptions(version: int) -> st.SearchStrategy[Subscription]:
    if version == MQTT_311:
        return st.builds(Subscription, topic_filter, st.integers(0, 2))
    return st.builds(
        Subscription,
        topic_filter,
        st.integers(0, 2),
        st.booleans(),
        st.booleans(),
        st.integers(0, 2),
    )


def reason(version: int) -> st.SearchStrategy[int]:
    return byte if version == MQTT_5 else st.just(0)


def packet_kinds(version: int) -> dict[str, st.SearchStrategy[Packet]]:
    v = version
    kinds: dict[str, st.SearchStrategy[Packet]] = {
        "connack": st.builds(Connack, st.booleans(), byte, props(CONNACK, v)),
        "publish": publishes(v),
        "puback": st.builds(Puback, pid, reason(v), props(PUBACK, v)),
        "pubrec": st.builds(Pubrec, pid, reason(v), props(PUBREC, v)),
        "pubrel": st.builds(Pubrel, pid, reason(v), props(PUBREL, v)),
        "pubcomp": st.builds(Pubcomp, pid, reason(v), props(PUBCOMP, v)),
        "subscribe": st.builds(
            Subscribe,
            pid,
            st.lists(subscriptions(v), min_size=1, max_size=4).map(tuple),
            props(SUBSCRIBE, v),
        ),
        "suback": st.builds(
            Suback, pid, st.lists(byte, min_size=1, max_size=4).map(tuple), props(SUBACK, v)
        ),
        "unsubscribe": st.builds(
            Unsubscribe,
            pid,
            st.lists(topic_filter, min_size=1, max_size=4).map(tuple),
            props(UNSUBSCRIBE, v),
        ),
        "unsuback": st.builds(
            Unsuback,
            pid,
            st.lists(byte, max_size=4).map(tuple) if v == MQTT_5 else st.just(()),
            props(UNSUBACK, v),
        ),
        "pingreq": st.just(Pingreq()),
        "pingresp": st.just(Pingresp()),
        "disconnect": st.builds(Disconnect, reason(v), props(DISCONNECT, v)),
    }
    if v == MQTT_5:
        kinds["auth"] = st.builds(Auth, byte, props(AUTH, v))
    return kinds


def packets(version: int) -> st.SearchStrategy[Packet]:
    return st.one_of(list(packet_kinds(version).values()))


versions = st.sampled_from([MQTT_311, MQTT_5])
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- round trips

# One round-trip test per packet type and version, so a failure names the packet.
PACKET_KINDS = [
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
@fast
@given(data=st.data())
def test_connect_round_trip(version: int, data: st.DataObject) -> None:
    packet = data.draw(connects(version))
    wire = encode(packet, version)
    assert decode_all(wire) == [packet]
    assert Decoder().feed(wire)[0].protocol_level == version  # type: ignore[union-attr]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
@pytest.mark.parametrize("kind", PACKET_KINDS)
@fast
@given(data=st.data())
def test_round_trip_every_packet_type(kind: str, version: int, data: st.DataObject) -> None:
    if kind == "auth" and version == MQTT_311:
        with pytest.raises(ValueError):
            encode(Auth(), MQTT_311)
        return
    packet = data.draw(packet_kinds(version)[kind])
    assert type(packet).__name__.lower() == kind
    wire = encode(packet, version)
    assert decode_all(wire, version) == [packet]
    # Encoding is a function of the packet: decoding then re-encoding gives the same bytes.
    assert encode(decode_all(wire, version)[0], version) == wire


# --------------------------------------------------------------------------- chunking


@st.composite
def sessions(draw: st.DrawFn) -> tuple[int, list[Packet], bytes]:
    version = draw(versions)
    first = draw(connects(version))
    rest = draw(st.lists(packets(version), max_size=12))
    stream = [first, *rest]
    return version, stream, b"".join(encode(p, version) for p in stream)


@fast
@given(session=sessions(), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_random_splits_give_the_same_packets(
    session: tuple[int, list[Packet], bytes], cuts: list[int]
) -> None:
    version, stream, wire = session
    points = sorted({c % (len(wire) + 1) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    dec = Decoder()
    out: list[Packet] = []
    for chunk in chunks:
        out += dec.feed(chunk)
    assert out == stream
    assert dec.version == version
    assert dec.buffered == 0


@settings(max_examples=40, deadline=None)
@given(session=sessions())
def test_byte_by_byte_gives_the_same_packets(session: tuple[int, list[Packet], bytes]) -> None:
    _, stream, wire = session
    dec = Decoder()
    out: list[Packet] = []
    for i in range(len(wire)):
        out += dec.feed(wire[i : i + 1])
    assert out == stream


def test_all_at_once_and_partial_tail() -> None:
    wire = CONNECT_5_VECTOR + PUBLISH_5_VECTOR + SUBSCRIBE_5_VECTOR
    dec = Decoder()
    assert dec.feed(wire[:-3]) == [CONNECT_5, PUBLISH_5]
    assert dec.buffered == len(SUBSCRIBE_5_VECTOR) - 3
    assert dec.feed(b"") == []
    assert dec.feed(wire[-3:]) == [SUBSCRIBE_5]


def test_large_packet_with_multi_byte_length_in_chunks() -> None:
    packet = Publish("big", bytes(range(256)) * 400, 1, packet_id=9)  # 102,400-byte payload
    wire = encode(packet, MQTT_311)
    assert wire[1] & 0x80 and wire[2] & 0x80  # a 3-byte remaining length
    dec = Decoder(MQTT_311)
    out: list[Packet] = []
    for i in range(0, len(wire), 1000):
        out += dec.feed(wire[i : i + 1000])
    assert out == [packet]


# --------------------------------------------------------------------------- malformed input


def fails(data: bytes, version: int | None, code: int) -> ProtocolError:
    dec = Decoder(version)
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
    assert info.value.reason_code == code, info.value
    # The decoder is poisoned: MQTT cannot resynchronise after a bad packet.
    with pytest.raises(ProtocolError):
        dec.feed(b"")
    return info.value


def test_remaining_length_over_four_bytes() -> None:
    fails(H("30ffffffff01"), 4, 0x81)
    # detected as soon as the 4th continuation byte arrives, before any 5th byte
    fails(H("30ffffffff"), 4, 0x81)


@pytest.mark.parametrize(
    "first",
    [0x11, 0x21, 0x41, 0x58, 0x60, 0x72, 0x80, 0x83, 0x91, 0xA0, 0xB4, 0xC1, 0xD2, 0xE8, 0xF1],
)
def test_reserved_flag_bits_wrong(first: int) -> None:
    version = None if first >> 4 == CONNECT else 5
    fails(bytes((first, 0)), version, 0x81)


def test_publish_qos3_and_dup_on_qos0() -> None:
    fails(raw(0x36, s("t") + H("0001")), 4, 0x81)
    fails(raw(0x38, s("t")), 4, 0x81)


def test_packet_over_max_size_is_refused_from_the_header() -> None:
    dec = Decoder(4, max_packet_size=100)
    with pytest.raises(ProtocolError) as info:
        dec.feed(H("308001"))  # header says 3 + 128 bytes; no body sent yet
    assert info.value.reason_code == 0x95
    # exactly at the limit is fine
    packet = Publish("t", bytes(100 - 2 - 3), 0)
    wire = encode(packet, 4)
    assert len(wire) == 100
    assert Decoder(4, max_packet_size=100).feed(wire) == [packet]
    fails(encode(Publish("t", bytes(96)), 4), None, 0x82)  # (first packet must be CONNECT)
    over = Decoder(4, max_packet_size=100)
    with pytest.raises(ProtocolError) as info:
        over.feed(encode(Publish("t", bytes(96)), 4))
    assert info.value.reason_code == 0x95


@pytest.mark.parametrize(
    "topic",
    [b"\xff", b"a\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"a\x00b"],
    ids=["invalid-byte", "truncated-sequence", "overlong-nul", "surrogate", "nul"],
)
@pytest.mark.parametrize("version", [4, 5])
def test_invalid_utf8_or_nul_in_strings(topic: bytes, version: int) -> None:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00" if version == 5 else b"")
    fails(raw(0x30, body), version, 0x81)


def test_invalid_utf8_in_client_id_user_property_and_filter() -> None:
    bad = H("0001ff")
    fails(raw(0x10, s("MQTT") + H("04020000") + bad), None, 0x81)
    fails(raw(0x30, s("t") + H("05") + H("26") + bad + s("v")), 5, 0x81)
    fails(raw(0x82, H("0001") + bad + H("00")), 4, 0x81)


@pytest.mark.parametrize("topic", ["a/+", "#", "a/#", "+", "x+y"])
def test_wildcards_in_publish_topic(topic: str) -> None:
    fails(raw(0x30, s(topic)), 4, 0x90)
    fails(raw(0x30, s(topic) + H("00")), 5, 0x90)


def test_wildcard_in_will_topic() -> None:
    connect = s("MQTT") + H("04") + H("06") + H("003c") + s("c") + s("w/#") + s("x")
    fails(raw(0x10, connect), None, 0x90)


def test_empty_topic() -> None:
    fails(raw(0x30, s("")), 4, 0x82)
    fails(raw(0x30, s("") + H("00")), 5, 0x82)
    # 5.0 allows an empty topic when a topic alias is given
    assert decode_all(raw(0x30, s("") + H("03230007")), 5) == [
        Publish("", properties=Properties(topic_alias=7))
    ]
    fails(raw(0x30, s("") + H("03230000")), 5, 0x94)  # alias 0 is invalid


def test_qos3_in_will_and_subscription() -> None:
    fails(raw(0x10, s("MQTT") + H("041c003c") + s("c") + s("w") + s("x")), None, 0x81)
    fails(raw(0x82, H("0001") + s("t") + H("03")), 4, 0x81)


def test_missing_or_zero_packet_id() -> None:
    fails(raw(0x32, s("t")), 4, 0x81)  # QoS 1 PUBLISH ends after the topic
    fails(raw(0x32, s("t") + H("00")), 4, 0x81)  # half a packet id
    fails(raw(0x32, s("t") + H("0000")), 4, 0x82)
    fails(raw(0x40, H("00")), 4, 0x81)
    fails(raw(0x40, b""), 5, 0x81)
    fails(raw(0x40, H("0000")), 5, 0x82)
    fails(raw(0x82, b""), 5, 0x81)
    fails(raw(0xA2, H("0000") + s("t")), 4, 0x82)


@pytest.mark.parametrize(
    ("data", "version"),
    [
        (H("0000"), 5),
        (H("0000"), None),
        (H("f000"), 4),
    ],
)
def test_unknown_packet_type(data: bytes, version: int | None) -> None:
    fails(data, version, 0x81)


def test_first_packet_must_be_connect_and_only_once() -> None:
    fails(H("c000"), None, 0x82)
    dec = Decoder()
    dec.feed(CONNECT_V4)
    with pytest.raises(ProtocolError) as info:
        dec.feed(CONNECT_V4)
    assert info.value.reason_code == 0x82


def test_unsupported_protocol() -> None:
    fails(raw(0x10, s("MQIsdp") + H("03020000") + s("c")), None, 0x84)
    fails(raw(0x10, s("MQTT") + H("06020000") + s("c")), None, 0x84)
    fails(raw(0x10, s("MQTX") + H("04020000") + s("c")), None, 0x84)


def test_connect_flag_rules() -> None:
    fails(raw(0x10, s("MQTT") + H("04030000") + s("c")), None, 0x81)  # reserved bit 0
    fails(raw(0x10, s("MQTT") + H("04220000") + s("c")), None, 0x81)  # will retain, no will
    fails(raw(0x10, s("MQTT") + H("04420000") + s("c") + s("p")), None, 0x82)  # pass w/o user
    # 5.0 allows a password without a username
    [c] = decode_all(raw(0x10, s("MQTT") + H("0542000000") + s("c") + s("p")))
    assert c == Connect("c", True, 0, None, b"p", protocol_level=5)


def test_duplicate_property() -> None:
    fails(raw(0x30, s("t") + H("06") + H("230001") + H("230002")), 5, 0x82)
    fails(raw(0x82, H("0001") + H("04") + H("0b01") + H("0b02") + s("t") + H("00")), 5, 0x82)
    fails(raw(0x20, H("0000") + H("04") + H("2401") + H("2400")), 5, 0x82)
    # user properties and (in PUBLISH) subscription identifiers may repeat
    [p] = decode_all(raw(0x30, s("t") + H("04") + H("0b01") + H("0b02")), 5)
    assert p.properties.subscription_identifiers == (1, 2)  # type: ignore[union-attr]


def test_property_not_allowed_for_the_packet() -> None:
    fails(raw(0x30, s("t") + H("05") + H("1100000001")), 5, 0x82)  # session expiry in PUBLISH
    fails(raw(0x40, H("000100") + H("03") + H("230001")), 5, 0x82)  # topic alias in PUBACK
    will_delay_in_connect = H("05") + H("1800000001")
    fails(raw(0x10, s("MQTT") + H("05020000") + will_delay_in_connect + s("c")), None, 0x82)


def test_unknown_property_and_bad_property_values() -> None:
    fails(raw(0x30, s("t") + H("02") + H("7f00")), 5, 0x81)
    fails(raw(0x30, s("t") + H("02") + H("0102")), 5, 0x82)  # payload format 2
    fails(raw(0x30, s("t") + H("02") + H("0b00")), 5, 0x82)  # subscription id 0
    fails(raw(0x10, s("MQTT") + H("05020000") + H("03210000") + s("c")), None, 0x82)


def test_truncated_fields() -> None:
    fails(raw(0x10, s("MQTT") + H("0402")), None, 0x81)  # no keep-alive
    fails(raw(0x10, s("MQTT") + H("04020000") + H("0005") + b"ab"), None, 0x81)  # client id
    fails(raw(0x30, s("t") + H("05") + H("2300")), 5, 0x81)  # property length past the end
    fails(raw(0x30, s("t") + H("03") + H("2300")), 5, 0x81)  # property value cut short
    fails(raw(0x30, H("0005") + b"ab"), 4, 0x81)  # topic length past the end
    fails(raw(0x30, s("t") + H("80808080")), 5, 0x81)  # property length varint too long
    will = s("MQTT") + H("04060000") + s("c") + s("w") + H("0004") + b"x"
    fails(raw(0x10, will), None, 0x81)


def test_trailing_bytes() -> None:
    fails(raw(0xC0, H("00")), 4, 0x81)
    fails(raw(0x40, H("000100")), 4, 0x81)  # 3.1.1 PUBACK is exactly 2 bytes
    fails(raw(0xE0, H("00")), 4, 0x81)
    fails(raw(0x10, s("MQTT") + H("04020000") + s("c") + H("00")), None, 0x81)
    fails(raw(0x20, H("0000") + H("0000")), 5, 0x81)


def test_subscribe_rules() -> None:
    fails(raw(0x82, H("0001")), 4, 0x82)  # no subscriptions
    fails(raw(0x82, H("000100")), 5, 0x82)
    fails(raw(0x82, H("0001") + s("") + H("00")), 4, 0x8F)  # empty filter
    fails(raw(0x82, H("0001") + s("t") + H("04")), 4, 0x81)  # no-local bit in 3.1.1
    fails(raw(0x82, H("000100") + s("t") + H("40")), 5, 0x81)  # reserved bit 6
    fails(raw(0x82, H("000100") + s("t") + H("30")), 5, 0x82)  # retain handling 3
    fails(raw(0xA2, H("0001")), 4, 0x82)  # UNSUBSCRIBE without filters
    fails(raw(0xA2, H("0001") + s("")), 4, 0x8F)


def test_error_keeps_packets_decoded_before_it() -> None:
    err = fails(CONNECT_V4 + H("c000") + H("c100"), None, 0x81)
    assert err.decoded == [Connect("c"), Pingreq()]


# --------------------------------------------------------------------------- encoder guards


@pytest.mark.parametrize(
    ("packet", "version"),
    [
        (Publish("a/+", b""), 4),
        (Publish("", b""), 5),
        (Publish("t", qos=1), 4),  # no packet id
        (Publish("t", qos=0, packet_id=3), 4),
        (Publish("t", qos=3, packet_id=3), 4),
        (Publish("t", dup=True), 4),
        (Publish("t", properties=Properties(topic_alias=1)), 4),
        (Publish("t\x00", b""), 4),
        (Publish("t", properties=Properties(session_expiry_interval=1)), 5),
        (Puback(0), 5),
        (Puback(1, 0x80), 4),
        (Subscribe(1, ()), 4),
        (Subscribe(1, (Subscription("t", no_local=True),)), 4),
        (Subscribe(1, (Subscription("t"),), Properties(subscription_identifiers=(1, 2))), 5),
        (Unsuback(1, (0,)), 4),
        (Disconnect(0x8E), 4),
        (Auth(), 4),
        (Connect("c", protocol_level=5), 4),
        (Connect("c", password=b"p"), 4),
        (Connack(reason_code=256), 4),
    ],
)
def test_encoder_refuses_packets_that_cannot_be_sent(packet: Packet, version: int) -> None:
    with pytest.raises(ValueError):
        encode(packet, version)


def test_encoder_refuses_unknown_version_and_objects() -> None:
    with pytest.raises(ValueError):
        encode(Pingreq(), 3)
    with pytest.raises(TypeError):
        encode("PINGREQ", 4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a real client


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_paho_client_bytes_decode_and_our_replies_satisfy_it(version: int) -> None:
    """paho-mqtt over loopback: we decode what it sends and it accepts what we encode."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    protocol = mqtt.MQTTv5 if version == MQTT_5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=protocol)
    client.username_pw_set("dev-1", "s3cret")
    client.will_set("devices/dev-1/status", b"gone", qos=1, retain=True)
    events: dict[str, object] = {}
    connected = threading.Event()
    subscribed = threading.Event()
    published = threading.Event()

    def on_connect(c: object, u: object, f: object, rc: object, p: object) -> None:
        events["rc"] = rc
        connected.set()

    def on_subscribe(c: object, u: object, mid: object, rcs: object, p: object) -> None:
        events["sub"] = rcs
        subscribed.set()

    def on_publish(c: object, u: object, mid: object, rc: object, p: object) -> None:
        published.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish

    client.connect_async("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        conn, _ = listener.accept()
        conn.settimeout(5)
        dec = Decoder()

        def read_one() -> Packet:
            while True:
                out = dec.feed(conn.recv(4096))
                if out:
                    assert len(out) == 1
                    return out[0]

        connect = read_one()
        assert isinstance(connect, Connect)
        assert dec.version == version
        assert (connect.client_id, connect.username, connect.password) == (
            "dev-1",
            "dev-1",
            b"s3cret",
        )
        assert connect.keep_alive == 30
        assert connect.will == Will("devices/dev-1/status", b"gone", 1, True)
        conn.sendall(encode(Connack(False, 0), version))
        assert connected.wait(5)

        props = None
        if version == MQTT_5:
            props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = ("k", "v")
            props.MessageExpiryInterval = 60
        info = client.publish("devices/dev-1/events/temp", b"21.5", qos=1, properties=props)
        publish = read_one()
        assert isinstance(publish, Publish)
        assert (publish.topic, publish.payload, publish.qos) == (
            "devices/dev-1/events/temp",
            b"21.5",
            1,
        )
        assert publish.packet_id == info.mid
        if version == MQTT_5:
            assert publish.properties == Properties(
                message_expiry_interval=60, user_properties=(("k", "v"),)
            )
        conn.sendall(encode(Puback(info.mid), version))
        assert published.wait(5)

        _, mid = client.subscribe([("devices/dev-1/cmd/#", 1), ("devices/dev-1/fn/+", 0)])
        subscribe = read_one()
        assert isinstance(subscribe, Subscribe)
        assert subscribe.packet_id == mid
        assert [(x.topic_filter, x.qos) for x in subscribe.subscriptions] == [
            ("devices/dev-1/cmd/#", 1),
            ("devices/dev-1/fn/+", 0),
        ]
        conn.sendall(encode(Suback(mid, (1, 0)), version))
        assert subscribed.wait(5)
        assert [int(getattr(rc, "value", rc)) for rc in events["sub"]] == [1, 0]  # type: ignore[attr-defined]

        client.disconnect()
        assert isinstance(read_one(), Disconnect)
        conn.close()
    finally:
        client.loop_stop()
        listener.close()
