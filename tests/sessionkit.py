"""What the REST-side session tests share: an in-test device, a live server, an SSE reader.

* :class:`ScriptedDevice` is a real :class:`corral.sessions.link.DeviceLink`: it is connected
  to the real session hub (``hub.open``), so a REST call goes API -> bus -> session core ->
  this object and back. Only the device's behaviour (what a function returns, a variable's
  value) is scripted by the test; the transports are tested with real clients elsewhere.
* :func:`live_server` serves the test's app with uvicorn on 127.0.0.1 and a free port in the
  test's own event loop (httpx's ASGITransport cannot stream).
* :class:`SSEReader` pumps a streaming response into a queue so a test can wait for bytes
  with a timeout, and also assert that nothing arrives for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn

from corral.sessions.link import DeviceError, Hello
from corral.sessions.session import DeviceSession
from helpers import bearer, post_ids

WAIT = 15.0  # seconds any single await may take: a bound for a loaded CI machine, never a pace


class ScriptedDevice:
    """A DeviceLink whose functions and variables the test scripts."""

    transport = "test"

    def __init__(self, functions: dict[str, Callable[[str], Any]] | None = None,
                 variables: dict[str, tuple[str, Any]] | None = None) -> None:
        self.functions = dict(functions or {})
        self.variables = dict(variables or {})  # name -> (type, value or callable)
        self.calls: list[tuple[str, str]] = []
        self.reads: list[str] = []
        self.delivered: list[tuple[str, str | None]] = []
        self.ledgers: list[dict[str, Any]] = []  # ledger documents the cloud sent
        self.disconnected: list[str] = []

    async def call_function(self, name: str, arg: str) -> int:
        self.calls.append((name, arg))
        result = self.functions[name](arg)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[no-any-return]

    async def read_variable(self, name: str) -> Any:
        self.reads.append(name)
        value = self.variables[name][1]
        if callable(value):
            value = value()
            if asyncio.iscoroutine(value):
                value = await value
        if isinstance(value, DeviceError):
            raise value
        return value

    async def deliver_event(self, name: str, data: str | None, *, published_at: str,
                            ttl: int, coreid: str) -> None:
        self.delivered.append((name, data))

    async def request_describe(self) -> None:
        return None

    async def deliver_ledger(self, name: str, document: dict[str, Any]) -> bool:
        self.ledgers.append(document)
        return True

    async def disconnect(self, reason: str) -> None:
        self.disconnected.append(reason)


async def connect(app: Any, device_id: str, device: ScriptedDevice) -> DeviceSession:
    """Open a session for ``device_id`` on the app's hub and describe the device."""
    hub = app.state.runtime.hub
    session: DeviceSession = await asyncio.wait_for(hub.open(Hello(device_id), device), WAIT)
    await asyncio.wait_for(session.describe(
        functions=list(device.functions),
        variables={n: t for n, (t, _v) in device.variables.items()}), WAIT)
    return session


async def import_device(client: httpx.AsyncClient, token: str, product: Any,
                        device_id: str) -> None:
    """Import (and so approve) ``device_id`` into ``product`` over the API."""
    r = await post_ids(client, token, product, id=device_id)
    assert r.status_code == 200 and r.json()["updatedDeviceIds"] == [device_id], r.text


@contextlib.asynccontextmanager
async def live_server(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` (its runtime already started by the fixture) on a free 127.0.0.1 port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None,
                                           access_log=False, ws="none",
                                           timeout_graceful_shutdown=2))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # Ctrl-C stays pytest's
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


class SSEReader:
    """Reads a streaming response in the background; waits are bounded by timeouts."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.received = b""  # every byte so far (for exact-format assertions)
        self.buffer = b""  # bytes not consumed by the reads below
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        if response.status_code == 200:
            self._pump = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for chunk in self.response.aiter_raw():
                await self._chunks.put(chunk)
        finally:
            await self._chunks.put(None)

    async def _more(self, within: float) -> None:
        chunk = await asyncio.wait_for(self._chunks.get(), within)
        if chunk is None:
            raise EOFError("the stream ended")
        self.received += chunk
        self.buffer += chunk

    async def read(self, n: int, within: float = WAIT) -> bytes:
        """Exactly the next ``n`` bytes."""
        async with asyncio.timeout(within):
            while len(self.buffer) < n:
                await self._more(within)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def event(self, within: float = WAIT) -> tuple[str, dict[str, Any]]:
        """The next event (keep-alive newlines skipped): its name and its data JSON."""
        async with asyncio.timeout(within):
            while True:
                self.buffer = self.buffer.lstrip(b"\n")
                end = self.buffer.find(b"\n\n")
                if end >= 0:
                    break
                await self._more(within)
        block, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        lines = block.decode().split("\n")
        assert len(lines) == 2, block
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        return lines[0][7:], json.loads(lines[1][6:])

    async def quiet(self, seconds: float) -> None:
        """Assert that no event (anything but keep-alive newlines) arrives for ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await self._more(left)
            assert not self.buffer.strip(b"\n"), f"unexpected bytes: {self.buffer!r}"

    async def close(self) -> None:
        await self.response.aclose()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump


@contextlib.asynccontextmanager
async def sse(base_url: str, path: str, token: str | None) -> AsyncIterator[SSEReader]:
    """Open ``GET path`` as a stream. For an error status the body is read at once (check
    ``reader.response``); only a 200 is pumped."""
    headers = bearer(token) if token else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=WAIT, trust_env=False) as http:
        request = http.build_request("GET", path, headers=headers)
        response = await asyncio.wait_for(http.send(request, stream=True), WAIT)
        if response.status_code != 200:
            await asyncio.wait_for(response.aread(), WAIT)
        reader = SSEReader(response)
        try:
            yield reader
        finally:
            await reader.close()


async def wait_for(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Poll ``predicate`` (cheap, in-process) until it holds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (state changes in other tasks)
            await asyncio.sleep(0.01)
