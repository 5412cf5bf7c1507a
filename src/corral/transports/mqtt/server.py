"""corral's MQTT server: the device gateway transport (MQTT 3.1.1 and 5, plain and TLS).

Not a broker: each device talks to the cloud only, on its own topics (docs/mqtt.md). The
server holds one node's listeners, their connections (:mod:`.connection`) and the MQTT
session state kept for devices across connections (clean session = 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from corral.sessions.core import SessionHub
from corral.settings import Settings
from corral.transports.listening import close_server
from corral.transports.mqtt.connection import READ_SIZE, Connection
from corral.transports.mqtt.link import WRITE_BUFFER_HIGH, SessionState
from corral.transports.mqtt.tls import TlsContexts

log = logging.getLogger("corral.mqtt")

TLS_REFRESH_S: Final = 5.0
SWEEP_S: Final = 60.0


# --- the server and its listeners ---------------------------------------------------------------

class MqttListener:
    """One listening socket (plain or TLS). ``port`` is the bound port."""

    def __init__(self, server: MqttServer, name: str) -> None:
        self.server = server
        self.name = name
        self.tls = name == "tls"
        self.connections: set[Connection] = set()
        self.port = 0
        self.host = ""
        self._server: asyncio.Server | None = None

    async def _start(self, host: str, port: int) -> None:
        tls = self.server.tls_contexts() if self.tls else None
        self._server = await asyncio.start_server(
            self._on_client, host, port, ssl=tls.base if tls else None,
            ssl_handshake_timeout=self.server.settings.mqtt_connect_timeout_s if tls else None,
            limit=READ_SIZE, reuse_address=True,
            reuse_port=self.server.settings.listen_reuse_port or None,
            backlog=self.server.settings.device_listen_backlog)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        log.info("MQTT%s listening on %s:%d", "/TLS" if self.tls else "", self.host, self.port)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        await Connection(self.server, self, reader, writer).run()

    async def stop(self) -> None:
        """Stop accepting, end this listener's connections (reason: shutdown)."""
        if self._server is None:
            return
        srv, self._server = self._server, None
        await close_server(srv, self.connections)
        await self.server._detach(self)


class MqttServer:
    """The MQTT gateway of one node: listeners, connections and kept session state."""

    def __init__(self, hub: SessionHub, settings: Settings) -> None:
        self.hub = hub
        self.settings = settings
        self.connections: set[Connection] = set()
        self.sessions: dict[str, SessionState] = {}
        self.listeners: list[MqttListener] = []
        self.drain_timeout_s = 10.0  # a device that reads nothing for this long is dropped
        self._tls: TlsContexts | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def listen(self, host: str, port: int, *, tls: bool = False) -> MqttListener:
        """Open a listener (``port=0``: any free port; see ``.port``)."""
        if tls and self._tls is None:
            self._tls = TlsContexts(self.settings, self.hub)
            await self._tls.refresh()
            self._every(TLS_REFRESH_S, self._tls.refresh, "mqtt-tls-refresh")
        if not self._tasks or all(t.get_name() != "mqtt-sweep" for t in self._tasks):
            self._every(SWEEP_S, self._sweep, "mqtt-sweep")
        listener = MqttListener(self, "tls" if tls else "plain")
        await listener._start(host, port)
        self.listeners.append(listener)
        return listener

    def tls_contexts(self) -> TlsContexts:
        assert self._tls is not None
        return self._tls

    async def refresh_tls(self) -> bool:
        """Reload the product CAs now (also done every few seconds)."""
        return await self._tls.refresh() if self._tls is not None else False

    def _every(self, seconds: float, fn: Callable[[], Awaitable[Any]], name: str) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await fn()
                except Exception:
                    log.exception("%s failed", name)

        self._tasks.append(asyncio.get_running_loop().create_task(loop(), name=name))

    async def _detach(self, listener: MqttListener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not self.listeners:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self._tasks.clear()

    async def stop(self) -> None:
        for listener in list(self.listeners):
            await listener.stop()

    # -- session state --------------------------------------------------------------------------

    def claim_state(self, conn: Connection, *, clean: bool,
                    expiry_s: int) -> tuple[SessionState, bool]:
        """The MQTT session state for a new connection, and whether it was resumed."""
        device_id = conn.device_id
        state = self.sessions.get(device_id)
        if state is not None and state.owner is None and state.expires_at <= time.monotonic():
            state = None
        present = state is not None and not clean
        if state is None or clean:
            state = SessionState(device_id)
        assert state is not None
        state.owner = conn
        state.expiry_s = expiry_s
        self.sessions[device_id] = state
        conn.state = state
        return state, present

    def release_state(self, conn: Connection) -> None:
        """The connection ended: keep its state for the expiry interval, or forget it."""
        state = conn.state
        if state is None or state.owner is not conn:
            return
        state.owner = None
        for pid, out in list(state.inflight.items()):
            if not out.keep:
                del state.inflight[pid]
        state.queued = deque(o for o in state.queued if o.keep)
        if state.expiry_s > 0:
            state.expires_at = time.monotonic() + state.expiry_s
        elif self.sessions.get(state.device_id) is state:
            del self.sessions[state.device_id]

    async def _sweep(self) -> None:
        now = time.monotonic()
        for device_id, state in list(self.sessions.items()):
            if state.owner is None and state.expires_at <= now:
                del self.sessions[device_id]


async def start_mqtt_listeners(hub: SessionHub, settings: Settings, *,
                               host: str | None = None) -> list[MqttListener]:
    """Open the listeners the settings ask for: plain on ``mqtt_port`` and TLS on
    ``mqtt_tls_port`` (0 turns one off). They share one :class:`MqttServer`."""
    server = MqttServer(hub, settings)
    bind = host or settings.host
    listeners: list[MqttListener] = []
    try:
        if settings.mqtt_port:
            listeners.append(await server.listen(bind, settings.mqtt_port))
        if settings.mqtt_tls_port:
            listeners.append(await server.listen(bind, settings.mqtt_tls_port, tls=True))
    except BaseException:
        await server.stop()
        raise
    return listeners


__all__ = ["MqttListener", "MqttServer", "start_mqtt_listeners"]
