"""Ed25519 firmware signatures. Pure functions: the device SDK imports this module without
the server (it needs only ``cryptography``).

What is signed is not the binary itself but a short, domain-separated message::

    b"corral-firmware-v1:" + SHA-256(binary)        (19 + 32 bytes)

so a verifier can hash a large image while it streams in and never hold it whole, and a
signature made for firmware can never be mistaken for one over anything else. Signatures are
64 bytes; public keys are the raw 32 bytes. On the wire both travel as base64 (hex is
accepted on input). A key's id is the first 16 hex characters of SHA-256(public key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"corral-firmware-v1:"
SIGNATURE_SIZE = 64
KEY_SIZE = 32


class SigningError(ValueError):
    """A key or signature that cannot be read."""


def signing_message(sha256_digest: bytes) -> bytes:
    """The bytes an Ed25519 firmware signature covers."""
    if len(sha256_digest) != 32:
        raise SigningError("a SHA-256 digest is 32 bytes")
    return DOMAIN + sha256_digest


def key_id(public_key: bytes) -> str:
    """A short, stable name for a public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def generate_key() -> tuple[bytes, bytes]:
    """A new key pair: ``(private key raw 32 bytes, public key raw 32 bytes)``."""
    private = Ed25519PrivateKey.generate()
    return (private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption()),
            private.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw))


def public_key_of(private_key: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_digest(sha256_digest: bytes, private_key: bytes) -> bytes:
    """Sign a binary known by its SHA-256 digest."""
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(signing_message(sha256_digest))


def sign_firmware(binary: bytes, private_key: bytes) -> bytes:
    return sign_digest(hashlib.sha256(binary).digest(), private_key)


def _decode(value: str | bytes, size: int, what: str) -> bytes:
    """Raw bytes of ``size``, or base64 / hex text of them."""
    if isinstance(value, bytes | bytearray):
        if len(value) == size:
            return bytes(value)
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError as exc:
            raise SigningError(f"{what} must be {size} bytes") from exc
    text = value.strip()
    if len(text) == size * 2:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_"
                               if ("-" in text or "_" in text) else None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningError(f"{what} must be base64 or hex") from exc
    if len(raw) != size:
        raise SigningError(f"{what} must be {size} bytes (got {len(raw)})")
    return raw


def decode_signature(value: str | bytes) -> bytes:
    return _decode(value, SIGNATURE_SIZE, "signature")


def parse_public_key(value: str | bytes) -> bytes:
    """A public key from raw bytes, base64, hex, or PEM (SubjectPublicKeyInfo)."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes | bytearray) else value
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise SigningError("public_key is not a valid PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError("public_key must be an Ed25519 key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = _decode(value, KEY_SIZE, "public_key")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SigningError("public_key is not an Ed25519 public key") from exc
    return raw


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def verify_digest(sha256_digest: bytes, signature: str | bytes,
                  public_keys: Mapping[str, str | bytes] | Iterable[str | bytes]) -> str | None:
    """The id of the first key in ``public_keys`` whose signature ``signature`` is over the
    binary with this SHA-256 digest; None when none matches (or the signature is unreadable).

    ``public_keys``: raw/base64/hex keys, or a mapping of key id -> key (the ids are then
    only labels: the returned id is always computed from the key)."""
    try:
        sig = decode_signature(signature)
        message = signing_message(sha256_digest)
    except SigningError:
        return None
    keys = public_keys.values() if isinstance(public_keys, Mapping) else public_keys
    for key in keys:
        try:
            raw = parse_public_key(key)
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
        except (SigningError, ValueError, InvalidSignature):
            continue
        return key_id(raw)
    return None


def verify_firmware(binary: bytes, signature: str | bytes,
                    public_keys: Mapping[str, str | bytes] | Iterable[str | bytes]) -> str | None:
    """Is ``signature`` a valid signature of ``binary`` by one of ``public_keys``? Returns
    that key's id, or None. Never raises for bad input: an unreadable key or signature
    simply does not verify."""
    return verify_digest(hashlib.sha256(binary).digest(), signature, public_keys)
