"""Pure-ASGI middleware: body size limit and Prometheus request metrics (cheap per request)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from prometheus_client import Counter, Histogram

REQUESTS = Counter("corral_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("corral_http_request_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

Scope = dict[str, Any]


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 JSON, by header or by counting.

    ``large`` maps path regexes to a larger limit (bulk uploads)."""

    def __init__(self, app: Any, limit: int, large: list[tuple[str, int]] | None = None) -> None:
        self.app, self.default = app, limit
        self.large = [(re.compile(p), n) for p, n in (large or [])]

    def limit_for(self, path: str) -> int:
        for pattern, n in self.large:
            if pattern.match(path):
                return n
        return self.default

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > limit
                except ValueError:
                    too_big = True
                if too_big:
                    await _send_json(send, 413, {"ok": False, "error": "payload_too_large",
                                                 "error_description": f"Body exceeds {limit} bytes"})
                    return
        seen = 0
        started = False

        async def guarded_receive() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return msg

        async def tracking_send(msg: Any) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"ok": False, "error": "payload_too_large",
                                             "error_description": f"Body exceeds {limit} bytes"})


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class Metrics:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def wrapped(msg: Any) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)


class RejectNul:
    """NUL characters in a path or query are refused (PostgreSQL text cannot store them, and no
    identifier, name or parameter of ours contains one)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
            or b"\x00" in scope.get("query_string", b"")
        ):
            await _send_json(send, 400, {"ok": False, "error": "invalid_request",
                                         "error_description": "NUL characters are not allowed"})
            return
        await self.app(scope, receive, send)
