"""The API rate limit (429 in Particle's shape with Retry-After; one budget across nodes over
NATS), forwarding headers only from configured proxies (a login lockout cannot be escaped by
sending X-Forwarded-For to ``corral serve``), and the HTTP port's header-read timeout (an
idle connection is closed without an answer, never sent a 408)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.bus.nats import NatsBus
from corral.settings import Settings
from corral.web.ratelimit import RateLimiter, SharedBudget, forwarded_client, parse_networks
from devicekit import eventually
from helpers import PASSWORD, signup
from natskit import namespace, need_nats
from test_serve import corral_serve


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_rate_limit": 5, "api_rate_window_s": 300.0})


def _client(app: Any, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)),
                             base_url="http://corral.test")


async def test_over_the_budget_is_429_with_retry_after(app: Any) -> None:
    async with _client(app, "10.0.0.1") as one, _client(app, "10.0.0.2") as two:
        for _ in range(5):
            assert (await one.get("/v1/user")).status_code == 401  # counted, not limited
        r = await one.get("/v1/user")
        assert r.status_code == 429
        body = r.json()
        assert body["ok"] is False and body["error"] == "rate_limit_exceeded"
        assert "at most 5 every 300 s" in body["error_description"]
        assert 1 <= int(r.headers["retry-after"]) <= 300
        assert (await one.post("/oauth/token", data={})).status_code == 429
        # another address has its own budget; health checks are not the API
        assert (await two.get("/v1/user")).status_code == 401
        assert (await one.get("/healthz")).status_code == 200


def test_fixed_windows_refill() -> None:
    now = [1000.0]
    limiter = RateLimiter(2, 60.0, now=lambda: now[0])
    assert limiter.hit("a") is None and limiter.hit("a") is None
    assert limiter.hit("a") == pytest.approx(20.0)  # the window 960..1020 ends in 20 s
    now[0] = 1020.0
    assert limiter.hit("a") is None
    assert RateLimiter(0, 60.0).hit("a") is None  # 0 turns it off


async def test_one_budget_across_nodes_over_nats() -> None:
    url, ns = need_nats(), namespace()
    buses = [await NatsBus.connect(url, namespace=ns, name=f"rl-{i}") for i in range(2)]
    limiters = [RateLimiter(6, 300.0) for _ in buses]
    shared = [SharedBudget(lim, bus, f"node-{i}")
              for i, (lim, bus) in enumerate(zip(limiters, buses, strict=True))]
    try:
        for s in shared:
            await s.start()
        for _ in range(4):
            assert limiters[0].hit("10.9.9.9") is None
        other = limiters[1]

        async def shared_counts() -> bool:
            return other.counts.get("10.9.9.9") == 4

        await eventually(shared_counts, within=10)
        assert other.hit("10.9.9.9") is None and other.hit("10.9.9.9") is None
        assert other.hit("10.9.9.9") is not None  # 4 + 2 of 6: the shared budget is spent
        assert other.hit("10.1.1.1") is None
    finally:
        for s in shared:
            await s.stop()
        for bus in buses:
            await bus.close()


def test_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = parse_networks("127.0.0.1, 10.0.0.0/8")
    assert forwarded_client("127.0.0.1", ["1.2.3.4"], []) == "127.0.0.1"
    assert forwarded_client("192.0.2.7", ["1.2.3.4"], proxies) == "192.0.2.7"
    assert forwarded_client("127.0.0.1", ["1.2.3.4"], proxies) == "1.2.3.4"
    # the rightmost address that is not a proxy: a client cannot prepend its own
    assert forwarded_client("127.0.0.1", ["6.6.6.6, 1.2.3.4, 10.1.1.1"], proxies) == "1.2.3.4"
    assert forwarded_client("127.0.0.1", ["garbage"], proxies) == "127.0.0.1"
    with pytest.raises(ValueError, match="not an IP"):
        parse_networks("10.0.0.0/8, nope")
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        Settings(trusted_proxies="nope")


async def _fail_logins(url: str, username: str, n: int, headers: dict[str, str]) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        out = []
        for _ in range(n):
            r = await c.post("/oauth/token", headers=headers, data={
                "grant_type": "password", "username": username, "password": "wrong one",
                "client_id": "corral-cli", "client_secret": "corral-cli"})
            out.append(r.status_code)
        r = await c.post("/oauth/token", headers=headers, data={
            "grant_type": "password", "username": username, "password": PASSWORD,
            "client_id": "corral-cli", "client_secret": "corral-cli"})
        out.append(r.status_code)
        return out


async def _sign_up(url: str, username: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        await signup(c, username)


async def test_login_lockout_cannot_be_escaped_with_x_forwarded_for(tmp_path: Path) -> None:
    env = {"CORRAL_LOGIN_MAX_FAILURES": "2"}
    with corral_serve(tmp_path / "a", tmp_path / "logs", env=env) as served:
        await _sign_up(served.url, "ada@example.com")
        codes = await _fail_logins(served.url, "ada@example.com", 2, {})
        assert codes[:2] == [400, 400] and codes[2] in (403, 429), codes  # locked out
        # the same client claiming to be another address is still the same client
        spoofed = {"X-Forwarded-For": "203.0.113.9"}
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as c:
            r = await c.post("/oauth/token", headers=spoofed, data={
                "grant_type": "password", "username": "ada@example.com", "password": PASSWORD,
                "client_id": "corral-cli", "client_secret": "corral-cli"})
        assert r.status_code == codes[2], r.text
    # behind a configured proxy (here: 127.0.0.1 itself) the forwarded address counts
    env["CORRAL_TRUSTED_PROXIES"] = "127.0.0.1"
    with corral_serve(tmp_path / "b", tmp_path / "logs", env=env) as served:
        await _sign_up(served.url, "bob@example.com")
        locked = await _fail_logins(served.url, "bob@example.com", 2,
                                    {"X-Forwarded-For": "198.51.100.1"})
        assert locked[2] in (403, 429), locked
        other = await _fail_logins(served.url, "bob@example.com", 0,
                                   {"X-Forwarded-For": "198.51.100.2"})
        assert other == [200]


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(20)  # a bound for a stuck test, not a speed assertion
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


async def test_header_read_timeout_closes_quietly(tmp_path: Path) -> None:
    env = {"CORRAL_HTTP_HEADER_TIMEOUT_S": "1"}
    with corral_serve(tmp_path / "data", tmp_path / "logs", env=env) as served:
        host, port = served.url.removeprefix("http://").split(":")
        # a connection that never sends a byte (a browser's preconnect): closed, no 408
        with socket.create_connection((host, int(port))) as idle:
            assert await asyncio.to_thread(_read_until_closed, idle) == b""
        # a request whose headers never finish: closed the same way
        with socket.create_connection((host, int(port))) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: corral\r\n")
            assert await asyncio.to_thread(_read_until_closed, slow) == b""
        # a complete request is answered; then the idle keep-alive connection ends quietly
        with socket.create_connection((host, int(port))) as ok:
            ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: corral\r\n\r\n")
            answer = await asyncio.to_thread(_read_until_closed, ok)
            assert answer.startswith(b"HTTP/1.1 200") and b"408" not in answer.split(b"\r\n")[0]
        async with httpx.AsyncClient(timeout=10) as c:
            assert (await c.get(f"{served.url}/healthz")).status_code == 200
