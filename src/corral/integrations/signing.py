"""Request signatures and idempotency ids, in the Standard Webhooks format.

Every webhook request carries three headers (https://www.standardwebhooks.com):

``webhook-id``
    The idempotency id: the same for every attempt and every redelivery of one event to
    one integration (derived from the two), so a receiver can drop duplicates.
``webhook-timestamp``
    Unix seconds when this attempt was signed; reject old ones to stop replays.
``webhook-signature``
    ``v1,<base64 HMAC-SHA256>`` over ``<webhook-id>.<webhook-timestamp>.<body>`` with the
    integration's signing secret (``whsec_<base64 key>``; the key is the base64-decoded
    part).

docs/integrations.md shows how to verify them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid

SECRET_PREFIX = "whsec_"
_NAMESPACE = uuid.UUID("6d1c7c1e-3f0b-4c59-9a87-5c0f4a0e2b11")  # corral integrations


def new_secret() -> str:
    """A signing secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def key_of(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def delivery_id(integration_id: str, event_id: int) -> str:
    """The idempotency id of (integration, event): stable across attempts and restarts."""
    return "msg_" + uuid.uuid5(_NAMESPACE, f"{integration_id}/{event_id}").hex


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    digest = hmac.new(key_of(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, msg_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """Does ``header`` (space-separated ``v1,<sig>`` entries) hold a valid signature?"""
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, part) for part in header.split())


def mask(secret: str) -> str:
    """What the API shows of a signing secret."""
    return secret[: len(SECRET_PREFIX) + 4] + "…"
