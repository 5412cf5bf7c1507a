"""The Particle gateways' server key pairs and the ``server_key`` file a device needs.

TCP ("lightssl"): one RSA-2048 key pair, created on first use in
``settings.data_dir / "particle" / "server_key.pem"`` (PKCS#8 PEM, mode 0600) and loaded
afterwards. A Device OS device reads the server's public key and address from one file: the
public key as DER SubjectPublicKeyInfo (294 bytes) zero-padded to offset 384, then an address
TLV (type 0: IPv4, 4 bytes big-endian; type 1: a domain name, length + ASCII). The port is
not in that file: TCP devices use 5683. :func:`particle_server_key_file` writes the same facts
in Particle's own 512-byte layout (the DCT's server key slot, as ``particle keys server``
writes it: 0xFF fill, the address at 384, the port at 450; layout read from particle-cli
3.43.1's key segment table and ``keys server``/``keys address`` commands).

UDP (DTLS, Gen 3): one P-256 key pair in ``.../particle/server_key_udp.pem``. The device's
file (and a real device's DCT ``alt_server_public_key`` + ``alt_server_address``) holds the
public key as DER SubjectPublicKeyInfo (91 bytes) padded with 0xFF to offset 192, then the
address block: type u8, length u8, the value at 194, and the port (u16 big-endian) at 258.
Device OS uses 5684 in practice whatever the file says (only M-SoM's connection manager
honours another port); corral writes the port it listens on.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SERVER_KEY_BITS = 2048
SPKI_LEN = 294  # DER SubjectPublicKeyInfo of an RSA-2048 key with e=65537
ADDRESS_OFFSET = 384  # where Device OS reads the address TLV
DCT_SERVER_KEY_SIZE = 512  # the DCT's TCP server key slot (particle keys server's file)
DCT_PORT_OFFSET = 450  # its port, u16 big-endian (0xFFFF: the default, 5683)
TLV_IPV4 = 0
TLV_DOMAIN = 1
MAX_DOMAIN = 253
EC_SPKI_LEN = 91  # DER SubjectPublicKeyInfo of a P-256 key
UDP_ADDRESS_OFFSET = 192  # DCT alt_server_public_key is 192 bytes; the address block follows
UDP_PORT_OFFSET = UDP_ADDRESS_OFFSET + 66  # 258: ServerAddress.port, big-endian
UDP_ADDRESS_BLOCK = 128  # DCT alt_server_address
UDP_PORT = 5684


class KeyFileError(ValueError):
    """The server key or address cannot be used."""


def key_path(data_dir: Path) -> Path:
    """Where the server key lives in a data directory."""
    return data_dir / "particle" / "server_key.pem"


def load_or_create_server_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """The server's RSA-2048 private key (TCP): loaded, or created (mode 0600) on first use."""
    path = key_path(data_dir)
    key = _load_or_create(path, lambda: rsa.generate_private_key(public_exponent=65537,
                                                                 key_size=SERVER_KEY_BITS))
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != SERVER_KEY_BITS:
        raise KeyFileError(f"{path} is not an RSA-{SERVER_KEY_BITS} private key")
    return key


def udp_key_path(data_dir: Path) -> Path:
    """Where the UDP (DTLS) server key lives in a data directory."""
    return data_dir / "particle" / "server_key_udp.pem"


def load_or_create_udp_server_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The server's P-256 private key (UDP/DTLS): loaded, or created (mode 0600)."""
    path = udp_key_path(data_dir)
    key = _load_or_create(path, lambda: ec.generate_private_key(ec.SECP256R1()))
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                          ec.SECP256R1):
        raise KeyFileError(f"{path} is not a P-256 private key")
    return key


def _load_or_create(path: Path, generate: Callable[[], Any]) -> Any:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return _create(path, generate)
    return serialization.load_pem_private_key(pem, password=None)


def _create(path: Path, generate: Callable[[], Any]) -> Any:
    key = generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:  # another process may have created it meanwhile: keep the first one
            os.link(tmp, path)
        except FileExistsError:
            return serialization.load_pem_private_key(path.read_bytes(), password=None)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def public_der(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    """The public key as DER SubjectPublicKeyInfo (294 bytes for RSA-2048, 91 for P-256)."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The public key as PEM SubjectPublicKeyInfo."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def address_tlv(host: str) -> bytes:
    """The address TLV for ``host``: an IPv4 address or a domain name."""
    host = host.strip()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes([TLV_IPV4, 4]) + ip.packed
    if ip is not None:
        raise KeyFileError("Device OS takes an IPv4 address or a domain name, not IPv6")
    name = host.rstrip(".")
    if not name or len(name) > MAX_DOMAIN or not name.isascii() or any(
            not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label)
            for label in name.split(".")):
        raise KeyFileError(f"{host!r} is not an IPv4 address or a domain name")
    return bytes([TLV_DOMAIN, len(name)]) + name.encode("ascii")


def server_key_file(public_key: rsa.RSAPublicKey, host: str) -> bytes:
    """A device's ``server_key`` file: SPKI DER padded with zeros to 384, then the address."""
    der = public_der(public_key)
    if len(der) != SPKI_LEN:
        raise KeyFileError(f"the server key must be RSA-{SERVER_KEY_BITS} (SPKI of {SPKI_LEN} "
                           f"bytes), not {len(der)} bytes")
    return der.ljust(ADDRESS_OFFSET, b"\x00") + address_tlv(host)


def particle_server_key_file(public_key: rsa.RSAPublicKey, host: str,
                             port: int | None = None) -> bytes:
    """The TCP server key in Particle's DCT layout, as ``particle keys server`` writes it for
    Photon/P1/Electron-era devices (the DCT's 512-byte server key slot): SPKI DER, 0xFF up
    to 512 bytes, the address TLV at 384 (at most 64 characters of domain name: the slot's
    address field is 66 bytes) and the port u16 big-endian at 450; a port left 0xFFFF
    means 5683."""
    der = public_der(public_key)
    if len(der) != SPKI_LEN:
        raise KeyFileError(f"the server key must be RSA-{SERVER_KEY_BITS} (SPKI of {SPKI_LEN} "
                           f"bytes), not {len(der)} bytes")
    tlv = address_tlv(host)
    if len(tlv) > DCT_PORT_OFFSET - ADDRESS_OFFSET:
        raise KeyFileError("the domain name is too long for the device's server address "
                           "(at most 64 characters)")
    out = bytearray(der.ljust(DCT_SERVER_KEY_SIZE, b"\xff"))
    out[ADDRESS_OFFSET:ADDRESS_OFFSET + len(tlv)] = tlv
    if port is not None:
        if not 0 < port < 0xFFFF:
            raise KeyFileError(f"{port} is not a port")
        out[DCT_PORT_OFFSET:DCT_PORT_OFFSET + 2] = port.to_bytes(2, "big")
    return bytes(out)


def udp_server_key_file(public_key: ec.EllipticCurvePublicKey, host: str,
                        port: int = UDP_PORT) -> bytes:
    """A Gen 3 device's server key (DCT ``alt_server_public_key`` + ``alt_server_address``,
    gcc ``--server_key`` with ``-p udp``): SPKI DER padded with 0xFF to 192, the address
    block (type, length, value) with the port u16 big-endian at 258; 320 bytes."""
    der = public_der(public_key)
    if len(der) != EC_SPKI_LEN:
        raise KeyFileError(f"the UDP server key must be P-256 (SPKI of {EC_SPKI_LEN} bytes), "
                           f"not {len(der)} bytes")
    if not 1 <= port <= 0xFFFF:
        raise KeyFileError(f"port {port} is not a UDP port")
    tlv = address_tlv(host)
    if len(tlv) > UDP_PORT_OFFSET - UDP_ADDRESS_OFFSET:
        raise KeyFileError("the domain name is too long for a Gen 3 device (at most 64 "
                           "characters)")
    block = bytearray(UDP_ADDRESS_BLOCK)
    block[:len(tlv)] = tlv
    block[66:68] = port.to_bytes(2, "big")
    return der.ljust(UDP_ADDRESS_OFFSET, b"\xff") + bytes(block)


__all__ = ["ADDRESS_OFFSET", "DCT_PORT_OFFSET", "DCT_SERVER_KEY_SIZE", "UDP_ADDRESS_OFFSET", "UDP_PORT", "UDP_PORT_OFFSET",
           "KeyFileError", "address_tlv", "key_path", "load_or_create_server_key",
           "load_or_create_udp_server_key", "particle_server_key_file", "public_der", "public_pem", "server_key_file",
           "udp_key_path", "udp_server_key_file"]
