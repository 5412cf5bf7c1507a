"""The pure firmware modules: the Particle module header reader and Ed25519 signing (which
the device SDK imports without the server)."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
import zlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.firmware import signing
from corral.firmware.module import build_module, parse_module


def test_module_header_fields():
    data = build_module(b"\x00" * 1000, platform_id=13, product_id=4321, product_version=17)
    info = parse_module(data)
    assert info is not None and info.crc_ok and info.is_application
    assert (info.platform_id, info.product_id, info.product_version) == (13, 4321, 17)
    assert info.end_address - info.start_address + 4 == len(data)
    assert info.dependencies == ((4, 1, 6300),) and info.suffix_size == 40
    # the layout, read by hand: prefix fields at fixed offsets, suffix backwards, CRC last
    assert struct.unpack_from("<H", data, 12)[0] == 13 and data[14] == 5
    assert struct.unpack_from("<HH", data, len(data) - 44) == (4321, 17)
    assert int.from_bytes(data[-4:], "big") == zlib.crc32(data[:-4])


def test_not_modules_and_damaged_modules():
    assert parse_module(b"") is None
    assert parse_module(b"\x7fELF" + b"\x00" * 500) is None
    data = build_module(b"abc" * 100, platform_id=12, product_version=2)
    assert parse_module(data[:-1]) is None  # the size no longer matches the header
    damaged = bytearray(data)
    damaged[40] ^= 0xFF
    info = parse_module(bytes(damaged))
    assert info is not None and not info.crc_ok
    plain = parse_module(build_module(b"x" * 64, platform_id=12))
    assert plain is not None and plain.product_id is None and plain.product_version is None


def test_gen3_prefix_after_the_vector_table():
    """On Gen 3 the prefix sits at 0x200, after the interrupt vectors."""
    inner = build_module(b"y" * 2000, platform_id=12, product_id=1, product_version=3)
    prefix = inner[:24]
    start, end = struct.unpack_from("<II", prefix)
    body = bytearray(b"\xee" * 0x200 + inner[:-4])
    struct.pack_into("<II", body, 0x200, start, start + len(body))
    body[0:4] = b"\x00\x00\x00\x00"
    data = bytes(body) + zlib.crc32(body).to_bytes(4, "big")
    info = parse_module(data)
    assert info is not None and info.prefix_offset == 0x200 and info.crc_ok
    assert (info.product_id, info.product_version) == (1, 3)


def test_sign_and_verify_in_every_encoding():
    private, public = signing.generate_key()
    assert signing.public_key_of(private) == public
    binary = b"firmware image" * 100
    sig = signing.sign_firmware(binary, private)
    kid = signing.key_id(public)
    pem = Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for key in (public, signing.b64(public), public.hex(), pem):
        for s in (sig, signing.b64(sig), sig.hex(), base64.urlsafe_b64encode(sig).decode()):
            assert signing.verify_firmware(binary, s, [key]) == kid
    other_private, other_public = signing.generate_key()
    assert signing.verify_firmware(binary, sig, [other_public]) is None
    assert signing.verify_firmware(binary, sig, {"other": other_public, "mine": public}) == kid
    assert signing.verify_firmware(binary + b"!", sig, [public]) is None
    assert signing.verify_firmware(binary, "not a signature", [public]) is None
    assert signing.verify_firmware(binary, sig, ["junk", b"\x00" * 3]) is None
    # the message is domain-separated: a plain signature of the binary does not count
    plain = Ed25519PrivateKey.from_private_bytes(private).sign(binary)
    assert signing.verify_firmware(binary, plain, [public]) is None


def test_signing_imports_nothing_of_the_server():
    code = ("import sys, corral.firmware.signing, corral.firmware.module; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'fastapi') "
            "or m.startswith(('corral.db', 'corral.web', 'corral.settings'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
