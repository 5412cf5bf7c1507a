"""Secrets: tokens are 40 lowercase hex characters and stored only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets


def new_token() -> str:
    """A 40-hex bearer token (160 random bits), as Particle issues."""
    return _secrets.token_hex(20)


def new_secret(nbytes: int = 24) -> str:
    return _secrets.token_hex(nbytes)


def new_short_id(nbytes: int = 6) -> str:
    return _secrets.token_hex(nbytes)


def digest(value: str) -> str:
    """SHA-256 hex digest of a high-entropy secret (tokens, client secrets, invite codes)."""
    return hashlib.sha256(value.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
