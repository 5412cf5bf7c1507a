"""The Particle gateway's server key pair and the ``server_key`` file a device needs.

The server has one RSA-2048 key pair, created on first use in
``settings.data_dir / "particle" / "server_key.pem"`` (PKCS#8 PEM, mode 0600) and loaded
afterwards. A Device OS device reads the server's public key and address from one file: the
public key as DER SubjectPublicKeyInfo (294 bytes) zero-padded to offset 384, then an address
TLV (type 0: IPv4, 4 bytes big-endian; type 1: a domain name, length + ASCII). The port is
not in the file: TCP devices always use 5683.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SERVER_KEY_BITS = 2048
SPKI_LEN = 294  # DER SubjectPublicKeyInfo of an RSA-2048 key with e=65537
ADDRESS_OFFSET = 384  # where Device OS reads the address TLV
TLV_IPV4 = 0
TLV_DOMAIN = 1
MAX_DOMAIN = 253


class KeyFileError(ValueError):
    """The server key or address cannot be used."""


def key_path(data_dir: Path) -> Path:
    """Where the server key lives in a data directory."""
    return data_dir / "particle" / "server_key.pem"


def load_or_create_server_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """The server's RSA-2048 private key: loaded, or created (mode 0600) on first use."""
    path = key_path(data_dir)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return _create(path)
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != SERVER_KEY_BITS:
        raise KeyFileError(f"{path} is not an RSA-{SERVER_KEY_BITS} private key")
    return key


def _create(path: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=SERVER_KEY_BITS)
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
            return load_or_create_server_key(path.parent.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def public_der(public_key: rsa.RSAPublicKey) -> bytes:
    """The public key as DER SubjectPublicKeyInfo (294 bytes for RSA-2048)."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(public_key: rsa.RSAPublicKey) -> str:
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


__all__ = ["ADDRESS_OFFSET", "KeyFileError", "address_tlv", "key_path",
           "load_or_create_server_key", "public_der", "public_pem", "server_key_file"]
