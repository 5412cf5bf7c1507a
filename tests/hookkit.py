"""Real HTTP targets for integration tests: a uvicorn server on 127.0.0.1 (optionally TLS
with a self-signed certificate) whose answers a test scripts, recording every request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

from corral.settings import Settings
from corral.transports.mqtt.tls import ensure_server_certificate


def hook_settings(database_url: str | None, tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings for integrations: 127.0.0.1 allowed as a target, quick retries and
    polls, cheap password hashing. A request may take 10 s: on a loaded CI machine a 1 s
    limit turned an answered request into a retry (test_timeout_is_retried sets its own)."""
    return Settings(**{
        "data_dir": tmp_path / "data", "database_url": database_url, "argon2_time_cost": 1,
        "argon2_memory_kib": 8, "log_format": "text", "integrations_allow_hosts": "127.0.0.1",
        "integrations_retry_base_s": 0.05, "integrations_retry_max_s": 0.2,
        "integrations_timeout_s": 10.0, "integrations_poll_s": 0.05, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.text, keep_blank_values=True))


@dataclasses.dataclass
class Answer:
    status: int = 200
    body: str = "ok"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    hold: asyncio.Event | None = None  # the answer waits until the test sets it


class Target:
    """An ASGI app: answers with ``script`` (a list consumed in order, then ``default``) or
    ``handler(seen) -> Answer``."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.script: list[Answer] = []
        self.default = Answer()
        self.handler: Callable[[Seen], Answer] | None = None
        self.port = 0
        self.scheme = "http"
        self.got = asyncio.Event()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hook"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        seen = Seen(scope["method"], scope["path"],
                    dict(parse_qsl(scope["query_string"].decode(), keep_blank_values=True)),
                    {k.decode().lower(): v.decode() for k, v in scope["headers"]}, body,
                    time.monotonic())
        self.seen.append(seen)
        self.got.set()
        answer = (self.handler(seen) if self.handler else
                  self.script.pop(0) if self.script else self.default)
        if answer.hold is not None:
            await answer.hold.wait()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        headers = [(b"content-type", b"text/plain")] + [
            (k.lower().encode(), v.encode()) for k, v in answer.headers.items()]
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": answer.body.encode()})

    async def wait(self, n: int, within: float = 10.0) -> list[Seen]:
        deadline = time.monotonic() + within
        while len(self.seen) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"the target saw {len(self.seen)} requests, not {n}"
            self.got.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self.got.wait()
        return self.seen


@contextlib.asynccontextmanager
async def serve(tls_dir: Path | None = None) -> AsyncIterator[Target]:
    """A :class:`Target` listening on 127.0.0.1 (HTTPS with a self-signed certificate
    when ``tls_dir`` is given)."""
    target = Target()
    target.port = free_port()
    kw: dict[str, Any] = {}
    if tls_dir is not None:
        cert, key = ensure_server_certificate(Settings(data_dir=tls_dir))
        kw = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        target.scheme = "https"
    config = uvicorn.Config(target, host="127.0.0.1", port=target.port, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=1, **kw)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        assert not task.done(), "the target server did not start"
        await asyncio.sleep(0.01)
    try:
        yield target
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Blackhole:
    """A dead target: accepts TCP connections and never answers (every request to it ends
    in the client's timeout). Counts the connections it got."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dead"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[Blackhole]:
    hole = Blackhole()
    server = await asyncio.start_server(hole._accept, "127.0.0.1", 0)
    hole.port = server.sockets[0].getsockname()[1]
    try:
        yield hole
    finally:
        server.close()
        for w in hole._writers:
            w.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


@contextlib.contextmanager
def threaded_target() -> Iterator[tuple[str, list[bytes]]]:
    """A webhook target for synchronous tests (the CLI's, the browser's): a threaded
    http.server on 127.0.0.1 answering ``pong`` to POSTs; the bodies it received."""
    got: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
            self.send_response(200)
            self.send_header("content-length", "4")
            self.end_headers()
            self.wfile.write(b"pong")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()
