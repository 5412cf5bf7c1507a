"""A lean asyncio MQTT load client for benchmarks (corral's sans-IO codec over raw streams).

Not the device SDK: no reconnects, no handlers, just what a load loop needs, so the load
generator's own cost stays low and is the same against Mosquitto and against corral.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from corral.transports.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Decoder,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    encode,
)


class Conn:
    """One MQTT connection: publish with a bounded in-flight window, count acks/messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 version: int) -> None:
        self.r, self.w, self.v = reader, writer, version
        self.dec = Decoder(version=version, max_packet_size=1 << 20)
        self.next_id = 0
        self.inflight: dict[int, float] = {}
        self.window = asyncio.Semaphore(1)
        self.acked = 0
        self.refused = 0
        self.received = 0
        self.latencies: list[float] = []
        self.on_publish: Callable[[Conn, Publish], Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def open(cls, host: str, port: int, client_id: str, *, username: str | None = None,
                   password: str | None = None, version: int = MQTT_311,
                   keep_alive: int = 600, timeout: float = 30) -> Conn:  # noqa: ASYNC109
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        c = cls(reader, writer, version)
        writer.write(encode(Connect(client_id=client_id, username=username,
                                    password=password.encode() if password else None,
                                    keep_alive=keep_alive, protocol_level=version), version))
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise ConnectionError(f"{client_id}: closed before CONNACK")
            packets = c.dec.feed(data)
            if packets:
                ack = packets[0]
                if not isinstance(ack, Connack) or ack.reason_code != 0:
                    raise ConnectionError(f"{client_id}: refused {ack}")
                break
        c._reader = asyncio.get_running_loop().create_task(c._read())
        return c

    def set_window(self, n: int) -> None:
        self.window = asyncio.Semaphore(n)

    async def _read(self) -> None:
        try:
            while data := await self.r.read(65536):
                for p in self.dec.feed(data):
                    if isinstance(p, Puback):
                        sent = self.inflight.pop(p.packet_id, None)
                        if sent is not None:
                            if p.reason_code < 0x80:
                                self.acked += 1
                            else:
                                self.refused += 1
                            self.latencies.append(time.perf_counter() - sent)
                            self.window.release()
                    elif isinstance(p, Publish):
                        self.received += 1
                        if p.qos == 1 and p.packet_id is not None:
                            self.w.write(encode(Puback(p.packet_id), self.v))
                        if self.on_publish is not None:
                            self.on_publish(self, p)
                    elif isinstance(p, Suback):
                        pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()

    def _pid(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        if qos == 0:
            self.w.write(encode(Publish(topic, payload), self.v))
            return
        await self.window.acquire()
        pid = self._pid()
        self.inflight[pid] = time.perf_counter()
        self.w.write(encode(Publish(topic, payload, qos=1, packet_id=pid), self.v))
        if self.w.transport.get_write_buffer_size() > 256 * 1024:
            await self.w.drain()

    def send(self, packet: Any) -> None:
        self.w.write(encode(packet, self.v))

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        self.w.write(encode(Subscribe(self._pid(), tuple(
            Subscription(f, qos=qos) for f in filters)), self.v))
        await self.w.drain()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.w.close()
        with contextlib.suppress(Exception):
            await self.w.wait_closed()


async def open_many(n: int, opener: Callable[[int], Any], *, concurrency: int = 100) -> list[Conn]:
    """Open ``n`` connections, at most ``concurrency`` handshakes at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Conn:
        async with sem:
            return await opener(i)  # type: ignore[no-any-return]

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def reply_to_requests(conn: Conn, p: Publish) -> None:
    """Answer corral function/variable requests (devices/{id}/requests/{rid}) at once."""
    parts = p.topic.split("/")
    if len(parts) != 4 or parts[2] != "requests":
        return
    req = json.loads(p.payload)
    body: dict[str, Any] = {"return_value": 1} if req.get("kind") == "function" else {"result": 1.5}
    conn.send(Publish(f"devices/{parts[1]}/replies/{parts[3]}", json.dumps(body).encode(), qos=0))


__all__ = ["MQTT_5", "MQTT_311", "Conn", "open_many", "reply_to_requests"]
