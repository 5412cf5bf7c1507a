"""MQTT forwarding: publish matching events to a customer's broker (aiomqtt).

One connection per integration, opened on first use and kept; any error closes it (the
delivery is retried like a webhook's, and the next attempt reconnects). The broker's
address goes through the SSRF guard like a webhook target: the client connects to the
checked address, and TLS still verifies the broker's certificate against its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from corral.integrations import templates
from corral.integrations.guard import Blocked, Policy, client_context
from corral.integrations.secrets import MASK
from corral.integrations.sender import Outcome


class _Conn:
    def __init__(self, fingerprint: str, client: aiomqtt.Client) -> None:
        self.fingerprint = fingerprint
        self.client = client


class MqttPublisher:
    def __init__(self, policy: Policy, *, timeout_s: float) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self._conns: dict[str, _Conn] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        for key in list(self._conns):
            await self._drop(key)

    async def _drop(self, key: str) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.client.__aexit__(None, None, None)

    async def forget(self, key: str) -> None:
        """The integration changed or went away: close its connection."""
        await self._drop(key)

    async def _client(self, key: str, settings: dict[str, Any]) -> aiomqtt.Client:
        fingerprint = json.dumps(settings, sort_keys=True)
        conn = self._conns.get(key)
        if conn is not None and conn.fingerprint == fingerprint:
            return conn.client
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is not None and conn.fingerprint == fingerprint:
                return conn.client
            await self._drop(key)
            parts = urlsplit(settings["url"])
            tls = parts.scheme.lower() == "mqtts"
            host = parts.hostname or ""
            port = parts.port or (8883 if tls else 1883)
            address = await self.policy.resolve(host, port)
            auth = settings.get("auth") or {}
            client = aiomqtt.Client(
                hostname=address, port=port, username=auth.get("username"),
                password=auth.get("password"), identifier=settings.get("clientId") or None,
                tls_context=client_context(verify=bool(settings.get("rejectUnauthorized",
                                                                    True)),
                                           server_name=host, ca_pem=settings.get("ca"))
                if tls else None,
                timeout=self.timeout_s, keepalive=60)
            async with asyncio.timeout(self.timeout_s):
                await client.__aenter__()
            self._conns[key] = _Conn(fingerprint, client)
            return client

    async def send(self, key: str, settings: dict[str, Any],
                   facts: templates.EventFacts) -> Outcome:
        ctx = facts.context()
        started = time.monotonic()
        url = settings.get("url", "")
        try:
            topic = templates.render(str(settings.get("topic")), ctx)
            payload = (templates.render(settings["payload"], ctx)
                       if settings.get("payload") is not None
                       else json.dumps(facts.defaults(), separators=(",", ":")))
        except templates.TemplateError as exc:
            return Outcome("failed", error=str(exc)[:500])
        qos = int(settings.get("qos", 1))
        described = (f"PUBLISH {url} topic={topic} qos={qos} "
                     f"retain={bool(settings.get('retain'))}"
                     + (f" user={(settings.get('auth') or {}).get('username')} "
                        f"password={MASK}" if settings.get("auth") else "")
                     + f"\n\n{payload[:1024]}")
        if not topic or "+" in topic or "#" in topic or "\x00" in topic \
                or len(topic.encode()) > 65535:
            return Outcome("failed", error=f"not a topic one can publish to: {topic!r}",
                           request=described)
        try:
            client = await self._client(key, settings)
            async with asyncio.timeout(self.timeout_s):
                await client.publish(topic, payload.encode(), qos=qos,
                                     retain=bool(settings.get("retain")))
        except Blocked as exc:
            return Outcome("failed", error=str(exc)[:500], request=described,
                           latency_ms=_ms(started))
        except TimeoutError:
            await self._drop(key)
            return Outcome("retry", error=f"timed out after {self.timeout_s:g} s",
                           request=described, latency_ms=_ms(started))
        except (aiomqtt.MqttError, OSError, ValueError) as exc:
            await self._drop(key)
            return Outcome("retry", error=f"{type(exc).__name__}: {exc}"[:500],
                           request=described, latency_ms=_ms(started))
        return Outcome("success", latency_ms=_ms(started), request=described,
                       response="PUBACK" if qos else "sent (QoS 0)")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
