"""The lightssl handshake, the AES-128-CBC session and the length-prefixed framing (sans-IO).

Handshake (server speaks first; sizes fixed):

1. S->D ``nonce`` (40 random bytes, :func:`new_nonce`).
2. D->S 256 bytes: RSA-2048 PKCS#1 v1.5 encryption with the server public key of
   ``nonce(40) ‖ device_id(12) ‖ device public key DER SPKI(162)`` (:func:`device_blob`,
   opened by :func:`open_device_blob`).
3. S->D 384 bytes: ``C = RSA-1024 PKCS#1 v1.5 encrypt(device key, creds40)`` ‖ a raw
   PKCS#1 v1.5 type-1 signature (no DigestInfo) with the server key over
   ``HMAC-SHA1(key=creds40, msg=C)`` (:func:`server_reply`, opened by
   :func:`open_server_reply`).

``creds40 = AES key(16) ‖ IV(16) ‖ salt(8)``. Both directions start with that key and IV; after
every message the next IV in that direction is the FIRST 16 bytes of the ciphertext just
sent or received (:class:`Cipher`). On the wire each message is ``len(2, big-endian) ‖
ciphertext`` (:class:`Session`, :class:`FrameReader`).

Errors a peer can cause raise :class:`HandshakeError` or :class:`FramingError` (both
:class:`~corral.transports.particle.errors.ParticleProtocolError`); arguments that only our
own code can get wrong raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher as _AesCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes

from corral.transports.particle.errors import ParticleProtocolError

try:  # cryptography >= 47: PKCS#1 v1.5 signatures without DigestInfo, done by OpenSSL.
    from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo

    _NO_DIGEST_INFO: Any = NoDigestInfo()
except ImportError:  # pragma: no cover - older cryptography: raw modular exponentiation
    _NO_DIGEST_INFO = None

NONCE_LEN: Final = 40
DEVICE_ID_LEN: Final = 12
DEVICE_KEY_DER_LEN: Final = 162
DEVICE_BLOB_LEN: Final = 256
DEVICE_BLOB_PLAINTEXT_LEN: Final = NONCE_LEN + DEVICE_ID_LEN + DEVICE_KEY_DER_LEN  # 214
SERVER_REPLY_LEN: Final = 384
CREDS_LEN: Final = 40
SERVER_KEY_BITS: Final = 2048
DEVICE_KEY_BITS: Final = 1024
RSA_E: Final = 65537
BLOCK: Final = 16
# PKCS#1 v1.5 type-2 padding string length for 40 bytes in a 128-byte modulus: 128 - 3 - 40.
CREDS_PADDING_LEN: Final = DEVICE_KEY_BITS // 8 - 3 - CREDS_LEN

# DER SubjectPublicKeyInfo header of a 1024-bit RSA key, up to the modulus' leading 0x00.
_SPKI_1024_HEADER: Final = bytes.fromhex(
    "30819f300d06092a864886f70d010101050003818d0030818902818100"
)
_SPKI_E65537: Final = bytes.fromhex("0203010001")


class HandshakeError(ParticleProtocolError):
    """The handshake cannot go on (wrong nonce, bad length, bad padding, bad signature...)."""


class FramingError(ParticleProtocolError):
    """A session frame is malformed (bad length prefix, ciphertext length or padding)."""


def new_nonce() -> bytes:
    """40 random bytes for step 1."""
    return os.urandom(NONCE_LEN)


def new_session_creds() -> bytes:
    """Random session credentials: AES key(16) ‖ IV(16) ‖ salt(8)."""
    return os.urandom(CREDS_LEN)


# -- keys ----------------------------------------------------------------------------------


def device_public_key_der(key: rsa.RSAPublicKey) -> bytes:
    """The exact 162-byte DER SubjectPublicKeyInfo a device sends for its RSA-1024 key."""
    numbers = key.public_numbers()
    if key.key_size != DEVICE_KEY_BITS or numbers.e != RSA_E:
        raise ValueError("a Particle TCP device key is RSA-1024 with e=65537")
    return _SPKI_1024_HEADER + numbers.n.to_bytes(128, "big") + _SPKI_E65537


def load_device_public_key(der: bytes) -> rsa.RSAPublicKey:
    """Parse a device public key (DER SubjectPublicKeyInfo); it must be RSA-1024, e=65537."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError) as exc:
        raise HandshakeError(f"device public key is not valid DER ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise HandshakeError("device public key is not an RSA key")
    if key.key_size != DEVICE_KEY_BITS:
        raise HandshakeError(f"device public key is RSA-{key.key_size}, expected RSA-1024")
    if key.public_numbers().e != RSA_E:
        raise HandshakeError("device public key exponent is not 65537")
    return key


def _require_bits(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, bits: int, what: str) -> None:
    if key.key_size != bits:
        raise ValueError(f"{what} must be RSA-{bits}, got RSA-{key.key_size}")


def _type1_block(digest: bytes, size: int) -> bytes:
    """``00 01 FF..FF 00 ‖ digest`` filling ``size`` bytes (no DigestInfo)."""
    return b"\x00\x01" + b"\xff" * (size - 3 - len(digest)) + b"\x00" + digest


def _sign_raw(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """PKCS#1 v1.5 type-1 signature of ``digest`` as is (no DigestInfo)."""
    if _NO_DIGEST_INFO is not None:
        signature: bytes = key.sign(digest, asym_padding.PKCS1v15(), _NO_DIGEST_INFO)
        return signature
    return sign_raw_modexp(key, digest)  # pragma: no cover


def sign_raw_modexp(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """Fallback of :func:`_sign_raw` for cryptography < 47: the RSA private operation (CRT)."""
    priv = key.private_numbers()
    size = key.key_size // 8
    m = int.from_bytes(_type1_block(digest, size), "big")
    m1 = pow(m, priv.dmp1, priv.p)
    m2 = pow(m, priv.dmq1, priv.q)
    h = (priv.iqmp * (m1 - m2)) % priv.p
    return (m2 + h * priv.q).to_bytes(size, "big")


def _verify_raw(key: rsa.RSAPublicKey, signature: bytes, digest: bytes) -> bool:
    if _NO_DIGEST_INFO is not None:
        try:
            key.verify(signature, digest, asym_padding.PKCS1v15(), _NO_DIGEST_INFO)
        except InvalidSignature:
            return False
        return True
    nums = key.public_numbers()  # pragma: no cover
    size = key.key_size // 8  # pragma: no cover
    s = int.from_bytes(signature, "big")  # pragma: no cover
    if s >= nums.n:  # pragma: no cover
        return False
    em = pow(s, nums.e, nums.n).to_bytes(size, "big")  # pragma: no cover
    return hmac.compare_digest(em, _type1_block(digest, size))  # pragma: no cover


# -- server side ---------------------------------------------------------------------------


def open_device_blob(
    server_key: rsa.RSAPrivateKey, nonce: bytes, blob: bytes
) -> tuple[str, bytes]:
    """Step 2, server side: (device id as 24 lowercase hex, device public key DER SPKI)."""
    _require_bits(server_key, SERVER_KEY_BITS, "the server key")
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    if len(blob) != DEVICE_BLOB_LEN:
        raise HandshakeError(f"device handshake is {len(blob)} bytes, expected {DEVICE_BLOB_LEN}")
    try:
        plain = server_key.decrypt(blob, asym_padding.PKCS1v15())
    except ValueError:
        raise HandshakeError(
            "device handshake does not decrypt (bad padding or another server key)"
        ) from None
    # OpenSSL's implicit rejection may turn bad padding into random bytes: the length and
    # the nonce below catch that.
    if len(plain) != DEVICE_BLOB_PLAINTEXT_LEN:
        raise HandshakeError(
            f"device handshake holds {len(plain)} bytes, expected {DEVICE_BLOB_PLAINTEXT_LEN}"
        )
    if not hmac.compare_digest(plain[:NONCE_LEN], nonce):
        raise HandshakeError("device handshake echoes the wrong nonce")
    device_id = plain[NONCE_LEN : NONCE_LEN + DEVICE_ID_LEN].hex()
    der = plain[NONCE_LEN + DEVICE_ID_LEN :]
    load_device_public_key(der)
    return device_id, der


def encrypt_creds(
    device_key: rsa.RSAPublicKey, creds: bytes, *, padding: bytes | None = None
) -> bytes:
    """RSA-1024 PKCS#1 v1.5 type-2 encryption of ``creds``; ``padding`` fixes the random string."""
    _require_bits(device_key, DEVICE_KEY_BITS, "the device key")
    if len(creds) != CREDS_LEN:
        raise ValueError(f"session creds must be {CREDS_LEN} bytes")
    if padding is None:
        return device_key.encrypt(creds, asym_padding.PKCS1v15())
    if len(padding) != CREDS_PADDING_LEN or 0 in padding:
        raise ValueError(f"padding must be {CREDS_PADDING_LEN} non-zero bytes")
    nums = device_key.public_numbers()
    em = int.from_bytes(b"\x00\x02" + padding + b"\x00" + creds, "big")
    return pow(em, nums.e, nums.n).to_bytes(DEVICE_KEY_BITS // 8, "big")


def creds_hmac(creds: bytes, encrypted_creds: bytes) -> bytes:
    """HMAC-SHA1(key=creds, msg=encrypted creds): the 20 bytes the server signs."""
    return hmac.new(creds, encrypted_creds, hashlib.sha1).digest()


def server_reply(
    server_key: rsa.RSAPrivateKey,
    device_key: rsa.RSAPublicKey,
    creds: bytes,
    *,
    padding: bytes | None = None,
) -> bytes:
    """Step 3, server side: 384 bytes = encrypted creds(128) ‖ raw signature(256)."""
    _require_bits(server_key, SERVER_KEY_BITS, "the server key")
    encrypted = encrypt_creds(device_key, creds, padding=padding)
    return encrypted + _sign_raw(server_key, creds_hmac(creds, encrypted))


# -- device side ---------------------------------------------------------------------------


def device_blob(
    server_pub: rsa.RSAPublicKey, nonce: bytes, device_id: str, device_key: rsa.RSAPrivateKey
) -> bytes:
    """Step 2, device side: the 256 bytes answering ``nonce``."""
    _require_bits(server_pub, SERVER_KEY_BITS, "the server key")
    if len(nonce) != NONCE_LEN:
        raise HandshakeError(f"nonce is {len(nonce)} bytes, expected {NONCE_LEN}")
    try:
        raw_id = bytes.fromhex(device_id)
    except ValueError:
        raise ValueError("device id must be 24 hex characters") from None
    if len(raw_id) != DEVICE_ID_LEN:
        raise ValueError("device id must be 24 hex characters")
    plain = nonce + raw_id + device_public_key_der(device_key.public_key())
    return server_pub.encrypt(plain, asym_padding.PKCS1v15())


def open_server_reply(
    device_key: rsa.RSAPrivateKey, server_pub: rsa.RSAPublicKey, reply: bytes
) -> bytes:
    """Step 3, device side: check the server's signature and return the 40-byte creds."""
    _require_bits(device_key, DEVICE_KEY_BITS, "the device key")
    _require_bits(server_pub, SERVER_KEY_BITS, "the server key")
    if len(reply) != SERVER_REPLY_LEN:
        raise HandshakeError(f"server handshake is {len(reply)} bytes, expected {SERVER_REPLY_LEN}")
    encrypted, signature = reply[:128], reply[128:]
    try:
        creds = device_key.decrypt(encrypted, asym_padding.PKCS1v15())
    except ValueError:
        raise HandshakeError("session creds do not decrypt with the device key") from None
    if len(creds) != CREDS_LEN:
        raise HandshakeError(f"session creds are {len(creds)} bytes, expected {CREDS_LEN}")
    if not _verify_raw(server_pub, signature, creds_hmac(creds, encrypted)):
        raise HandshakeError("server signature does not verify (wrong server key?)")
    return creds


# -- session -------------------------------------------------------------------------------


class Cipher:
    """One direction's AES-128-CBC with Particle's chaining: next IV = first ciphertext block."""

    __slots__ = ("_algorithm", "iv")

    def __init__(self, key: bytes, iv: bytes) -> None:
        if len(key) != BLOCK or len(iv) != BLOCK:
            raise ValueError("AES-128 key and IV are 16 bytes each")
        self._algorithm = algorithms.AES(key)
        self.iv = bytes(iv)

    def encrypt(self, plaintext: bytes) -> bytes:
        """PKCS#7-pad and encrypt one message; advance the IV."""
        pad = BLOCK - len(plaintext) % BLOCK
        enc = _AesCipher(self._algorithm, modes.CBC(self.iv)).encryptor()
        ciphertext = enc.update(plaintext + bytes((pad,)) * pad) + enc.finalize()
        self.iv = ciphertext[:BLOCK]
        return ciphertext

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt one message and strip PKCS#7; advance the IV. ``FramingError`` if malformed.

        After an error the chain is out of step with the peer: close the session.
        """
        if not ciphertext or len(ciphertext) % BLOCK:
            raise FramingError(f"ciphertext of {len(ciphertext)} bytes is not whole AES blocks")
        dec = _AesCipher(self._algorithm, modes.CBC(self.iv)).decryptor()
        padded = dec.update(ciphertext) + dec.finalize()
        self.iv = bytes(ciphertext[:BLOCK])
        pad = padded[-1]
        if not 1 <= pad <= BLOCK or padded[-pad:] != bytes((pad,)) * pad:
            raise FramingError("bad PKCS#7 padding (wrong key or IV, or a corrupted frame)")
        return padded[:-pad]


@dataclass(slots=True)
class Session:
    """Both directions of an established session: ``seal`` outgoing, ``open`` incoming."""

    send: Cipher
    recv: Cipher

    @classmethod
    def from_creds(cls, creds: bytes) -> Session:
        """Key = creds[0:16]; both directions start with IV = creds[16:32]; the salt is unused."""
        if len(creds) != CREDS_LEN:
            raise ValueError(f"session creds must be {CREDS_LEN} bytes")
        key, iv = creds[:16], creds[16:32]
        return cls(send=Cipher(key, iv), recv=Cipher(key, iv))

    def seal(self, plaintext: bytes) -> bytes:
        """One wire frame: 2-byte big-endian ciphertext length ‖ ciphertext."""
        ciphertext = self.send.encrypt(plaintext)
        if len(ciphertext) > 0xFFFF:
            raise ValueError("message too large for a 16-bit length prefix")
        return len(ciphertext).to_bytes(2, "big") + ciphertext

    def open(self, ciphertext: bytes) -> bytes:
        """Decrypt one ciphertext (as returned by :meth:`FrameReader.feed`)."""
        return self.recv.decrypt(ciphertext)


class FrameReader:
    """Splits the byte stream into ciphertexts; tolerates any chunking of the input.

    A length prefix of 0, not a multiple of 16, or above ``max_len`` raises ``FramingError``;
    the reader is then poisoned (every later ``feed`` raises again), as the stream cannot be
    resynchronised.
    """

    __slots__ = ("_buf", "_error", "max_len")

    def __init__(self, max_len: int = 8192) -> None:
        if max_len < BLOCK:
            raise ValueError("max_len must allow at least one AES block")
        self.max_len = max_len
        self._buf = bytearray()
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the ciphertexts completed so far, in order."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if length == 0 or length % BLOCK or length > self.max_len:
                self._error = FramingError(
                    f"bad frame length {length} (must be a non-zero multiple of 16, "
                    f"at most {self.max_len})"
                )
                del buf[:]
                raise self._error
            end = pos + 2 + length
            if len(buf) < end:
                break
            out.append(bytes(buf[pos + 2 : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out
