"""Short-lived download links for MQTT firmware transfers.

A link names one device, one firmware and one update, and expires::

    /v1/firmware/downloads/{token}
    token = base64url("{device}.{firmware_id}.{update_id}.{expires_unix}") "." base64url(mac)
    mac   = HMAC-SHA256(key, that text), first 16 bytes

The key is ``settings.firmware_download_secret`` or a random key kept in
``data_dir/firmware/download.key`` (made on first use), so every node sharing the data
directory (or the setting) accepts the others' links.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from corral.kit import clock
from corral.settings import Settings

MAC_BYTES = 16
_keys: dict[str, bytes] = {}


@dataclass(frozen=True)
class Grant:
    device_id: str
    firmware_id: int
    update_id: int
    expires: int  # unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def download_key(settings: Settings) -> bytes:
    """The HMAC key of download links (see the module docstring)."""
    if settings.firmware_download_secret:
        return hashlib.sha256(settings.firmware_download_secret.encode()).digest()
    path = Path(settings.data_dir) / "firmware" / "download.key"
    cached = _keys.get(str(path))
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
    else:
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    if len(key) < 16:
        raise RuntimeError(f"{path} holds no usable key; delete it to make a new one")
    _keys[str(path)] = key
    return key


def _mac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("ascii"), hashlib.sha256).digest()[:MAC_BYTES]


def make_token(settings: Settings, *, device_id: str, firmware_id: int, update_id: int) -> str:
    expires = int(clock.now().timestamp()) + settings.firmware_download_ttl_s
    text = f"{device_id.lower()}.{firmware_id}.{update_id}.{expires}"
    return f"{_b64(text.encode('ascii'))}.{_b64(_mac(download_key(settings), text))}"


def check_token(settings: Settings, token: str, device_id: str | None = None) -> Grant | None:
    """The grant of a valid, unexpired token (for ``device_id``, when given); None
    otherwise."""
    if not isinstance(token, str) or len(token) > 300 or token.count(".") != 1:
        return None
    body, mac = token.split(".")
    try:
        text = _unb64(body).decode("ascii")
        given = _unb64(mac)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not hmac.compare_digest(given, _mac(download_key(settings), text)):
        return None
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    grant = Grant(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
    if device_id is not None and grant.device_id != device_id.lower():
        return None
    if grant.expires < clock.now().timestamp():
        return None
    return grant
