"""The NATS server the scaled-out tests use (``127.0.0.1:4222``, or
``CORRAL_TEST_NATS_URL``). ``.ci/run`` starts one when none listens; without one a test that
needs it is skipped on a developer's machine and fails in CI (``CI`` set)."""

from __future__ import annotations

import os
import secrets
import socket
from urllib.parse import urlsplit

import pytest

NATS_URL = os.environ.get("CORRAL_TEST_NATS_URL", "nats://127.0.0.1:4222")


def nats_reachable(url: str = NATS_URL) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222),
                                      timeout=2):
            return True
    except OSError:
        return False


def need_nats() -> str:
    """The NATS URL; skips (fails in CI) when no server answers there."""
    if not nats_reachable():
        message = f"no NATS server at {NATS_URL} (start one: nats-server -a 127.0.0.1 -p 4222)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return NATS_URL


def namespace() -> str:
    """A bus namespace no other test run shares (tests run in parallel on one server)."""
    return f"t{secrets.token_hex(6)}"
