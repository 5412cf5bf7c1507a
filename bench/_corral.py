"""Benchmark fixtures around a real ``corral serve`` process (API + MQTT listener) and a
private Mosquitto, both bound to 127.0.0.1 on free ports and stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _server import free_port, server_env, signup_and_login


@dataclass
class Corral:
    base: str
    mqtt_port: int
    pid: int
    database_url: str


@contextlib.contextmanager
def corral_serve(data_dir: Path, *, database_url: str | None = None,
                 extra_env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None,
                 start_timeout_s: float = 60,
                 prefix: list[str] | None = None) -> Iterator[Corral]:
    """``corral serve`` (no demo, ``extra_args`` added) with MQTT on a free port.
    ``prefix``: a command the server runs under (valgrind ...); its PID is the server's."""
    http, mqtt = free_port(), free_port()
    env = server_env()
    env.update({"CORRAL_LOG_LEVEL": "WARNING", "CORRAL_ARGON2_TIME_COST": "1",
                "CORRAL_ARGON2_MEMORY_KIB": "8", "CORRAL_PARTICLE_UDP_PORT": "0",
                **(extra_env or {})})
    url = database_url or f"sqlite+aiosqlite:///{(data_dir / 'corral.db').resolve()}"
    env["CORRAL_DATABASE_URL"] = url
    log = open(data_dir / "serve.log", "wb")
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "corral.cli.main", "serve", "--no-demo", "--data-dir",
         str(data_dir), "--http-port", str(http), "--mqtt-port", str(mqtt),
         "--mqtt-tls-port", "0", *(extra_args or [])], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"corral serve exited: {(data_dir / 'serve.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"corral did not start within {start_timeout_s} s")
        yield Corral(base, mqtt, proc.pid, url)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@contextlib.contextmanager
def private_mosquitto() -> Iterator[int]:
    """A private Mosquitto whose queues do not drop QoS 1 messages for a slow subscriber."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 10000000\nmax_inflight_messages 0\n"
                        "persistence false\nlog_dest none\n")
        proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    import socket
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def device_ids(n: int, salt: str = "bench") -> list[str]:
    return [hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:24] for i in range(n)]


def proc_cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system, all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def create_product(c: httpx.AsyncClient, name: str, n: int,
                         settings: dict[str, Any]) -> dict[str, Any]:
    """A product for ``n`` devices. Up to 100 it lives in the user's personal organization
    (Free plan); beyond, the Free plan's device cap would refuse first connections, so it
    lives in an organization of its own on Basic, a block per 100 devices, paid through the
    default fake payment provider."""
    if n <= 100:
        r = await c.post("/v1/user/products", json={"product": {
            "name": name, "platform_id": 12, "settings": settings}})
        r.raise_for_status()
        return dict(r.json()["product"])
    r = await c.post("/v1/orgs", json={"name": f"{name} org"})
    r.raise_for_status()
    org = r.json()["organization"]["slug"]
    r = await c.put(f"/v1/orgs/{org}/billing", json={
        "plan": "basic", "blocks": -(-n // 100), "interval": "month",
        "payment_method": "pm_card_visa"})
    r.raise_for_status()
    r = await c.post(f"/v1/orgs/{org}/products", json={"product": {
        "name": name, "platform_id": 12, "settings": settings}})
    r.raise_for_status()
    return dict(r.json()["product"])


async def provision_fleet(base: str, n: int, *, settings: dict[str, Any] | None = None,
                          salt: str = "bench") -> tuple[str, str, list[tuple[str, str]]]:
    """A user, a product (with ``settings``) and ``n`` devices with MQTT secrets.

    Returns (token, product slug, [(device id, secret)])."""
    token = await asyncio.to_thread(signup_and_login, base)
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as c:
        product = (await create_product(c, f"Bench {salt}", n,
                                        {"quarantine": False, **(settings or {})}))["slug"]
        ids = device_ids(n, salt)
        r = await c.post(f"/v1/products/{product}/devices", json={"ids": ids})
        r.raise_for_status()
        sem = asyncio.Semaphore(16)

        async def secret(did: str) -> tuple[str, str]:
            async with sem:
                r = await c.post(f"/v1/products/{product}/devices/{did}/mqtt_secret")
                r.raise_for_status()
                return did, r.json()["mqtt_secret"]

        creds = list(await asyncio.gather(*(secret(d) for d in ids)))
    return token, product, creds
