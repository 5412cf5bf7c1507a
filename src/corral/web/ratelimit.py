"""The API rate limit (Particle's: 10,000 requests per 5 minutes per source address) and the
client address behind configured proxies.

:class:`ClientAddress` puts the real client address in the ASGI scope: the peer, or, when the
peer is one of ``CORRAL_TRUSTED_PROXIES``, the rightmost ``X-Forwarded-For`` address that is
not a trusted proxy. Nobody else's forwarding headers count (so a login lockout cannot be
escaped by sending one). corral starts uvicorn without its own proxy-header handling, which
trusts 127.0.0.1 by default.

:class:`RateLimiter` counts requests per address in fixed windows. Scaled out, each node
publishes its new counts on the bus about once a second and adds the others' (one budget
across nodes, at most a second behind); with the in-process bus the budget is the node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("corral.web.ratelimit")

Scope = dict[str, Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SUBJECT = "ratelimit.counts"
SHARE_EVERY_S = 1.0
LIMITED_PREFIXES = ("/v1/", "/oauth/")  # the API (the console and health checks are not)


def parse_networks(value: str) -> list[Network]:
    """``"10.0.0.1, 192.168.0.0/16"`` -> networks; ``ValueError`` names a bad entry."""
    out: list[Network] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {part!r}") from None
    return out


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def _within(ip: Any, nets: list[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def forwarded_client(peer: str, forwarded_for: list[str], trusted: list[Network]) -> str:
    """The client address of a request from ``peer`` with these ``X-Forwarded-For`` values."""
    ip = _ip(peer)
    if ip is None or not trusted or not _within(ip, trusted):
        return peer
    hops = [h.strip() for v in forwarded_for for h in v.split(",") if h.strip()]
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            return peer  # a malformed chain: believe only the socket
        if not _within(hop_ip, trusted):
            return str(hop_ip)
    return str(_ip(hops[0])) if hops else peer


class ClientAddress:
    """Pure ASGI: the scope's ``client`` becomes the real client address."""

    def __init__(self, app: Any, trusted: str = "") -> None:
        self.app = app
        self.trusted = parse_networks(trusted)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.trusted and scope["type"] in ("http", "websocket") and scope.get("client"):
            values = [v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k == b"x-forwarded-for"]
            if values:
                host, port = scope["client"]
                client = forwarded_client(host, values, self.trusted)
                if client != host:
                    scope = {**scope, "client": (client, 0)}
        await self.app(scope, receive, send)


class RateLimiter:
    """Requests per address in fixed windows of ``window_s``; ``limit`` 0 turns it off."""

    def __init__(self, limit: int, window_s: float, *,
                 now: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.window_s = window_s
        self.now = now
        self.window = -1
        self.counts: dict[str, int] = {}  # this window, every node's requests
        self.pending: dict[str, int] = {}  # this node's, not shared yet

    def _roll(self, t: float) -> None:
        w = int(t // self.window_s)
        if w != self.window:
            self.window, self.counts, self.pending = w, {}, {}

    def hit(self, address: str) -> float | None:
        """Count one request; None when within the budget, else seconds until it refills."""
        if self.limit <= 0:
            return None
        t = self.now()
        self._roll(t)
        n = self.counts.get(address, 0) + 1
        if n > self.limit:
            return (self.window + 1) * self.window_s - t
        self.counts[address] = n
        self.pending[address] = self.pending.get(address, 0) + 1
        return None

    def take_pending(self) -> dict[str, Any] | None:
        """This node's counts since the last call, to share (None when there are none)."""
        self._roll(self.now())
        if not self.pending:
            return None
        out, self.pending = self.pending, {}
        return {"window": self.window, "counts": out}

    def merge(self, window: int, counts: dict[str, int]) -> None:
        """Add another node's counts of ``window`` (older windows are ignored)."""
        self._roll(self.now())
        if window != self.window:
            return
        for address, n in counts.items():
            if isinstance(address, str) and isinstance(n, int) and n > 0:
                self.counts[address] = self.counts.get(address, 0) + n


class RateLimit:
    """Pure ASGI: 429 in Particle's shape, with ``Retry-After``, over the budget."""

    def __init__(self, app: Any, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(LIMITED_PREFIXES):
            client = scope.get("client")
            wait = self.limiter.hit(client[0] if client else "unknown")
            if wait is not None:
                await _too_many(send, wait, self.limiter)
                return
        await self.app(scope, receive, send)


async def _too_many(send: Any, wait: float, limiter: RateLimiter) -> None:
    retry = max(1, math.ceil(wait))
    body = json.dumps({
        "ok": False, "error": "rate_limit_exceeded",
        "error_description": f"Too many requests from this address: at most {limiter.limit} "
                             f"every {limiter.window_s:g} s; retry in {retry} s"}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry).encode())]})
    await send({"type": "http.response.body", "body": body})


class SharedBudget:
    """Scaled out: share this node's counts over the bus and merge the other nodes'."""

    def __init__(self, limiter: RateLimiter, bus: Any, node_id: str) -> None:
        self.limiter = limiter
        self.bus = bus
        self.node_id = node_id
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.bus.subscribe(SUBJECT, self._on_counts)
        self._task = asyncio.get_running_loop().create_task(self._share(), name="ratelimit")

    async def _on_counts(self, msg: Any) -> None:
        try:
            body = json.loads(msg.data)
            if body.get("node") == self.node_id:
                return
            self.limiter.merge(int(body["window"]), dict(body["counts"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring a malformed rate-limit message")

    async def _share(self) -> None:
        while True:
            await asyncio.sleep(SHARE_EVERY_S)
            out = self.limiter.take_pending()
            if out is not None:
                try:
                    await self.bus.publish(SUBJECT, {"node": self.node_id, **out})
                except Exception:  # the bus is down or closing: counts stay local
                    log.warning("could not share rate-limit counts", exc_info=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
