"""``corral serve``: a real process on a free port, the demo data, logs, signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.demo import DEMO_ORG, DEMO_PLATFORM_ID, DEMO_PRODUCT
from helpers import bearer

START_TIMEOUT_S = 90  # a busy machine (CI, parallel workers) starts a server slowly
STOP_TIMEOUT_S = 15
PORT_ATTEMPTS = 3
DEMO_USER, DEMO_PASSWORD = "demo@corral.example", "corral-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            tail = "\n".join(self.stderr.read_text().splitlines()[-30:])
            pytest.fail(f"corral serve did not stop within {STOP_TIMEOUT_S} s of {sig.name}; "
                        f"the end of its log:\n{tail}")

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()


@contextlib.contextmanager
def corral_serve(data_dir: Path, logs: Path, *args: str,
                 start_timeout_s: float = START_TIMEOUT_S,
                 env: dict[str, str] | None = None) -> Iterator[Served]:
    """``corral serve`` as a subprocess, healthy on a free port; killed if still running.
    ``env``: extra environment (``CORRAL_*`` settings)."""
    for _attempt in range(PORT_ATTEMPTS):
        served = _start(data_dir, logs, *args, env_extra=env)
        try:
            if _wait_healthy(served, start_timeout_s):
                yield served
                return
        finally:
            if served.proc.poll() is None:
                served.proc.kill()
                served.proc.wait(timeout=STOP_TIMEOUT_S)
    pytest.fail(f"no free port after {PORT_ATTEMPTS} attempts")


def _start(data_dir: Path, logs: Path, *args: str,
           env_extra: dict[str, str] | None = None) -> Served:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"CORRAL_ARGON2_TIME_COST": "1", "CORRAL_ARGON2_MEMORY_KIB": "8",
                "COLUMNS": "200", **(env_extra or {})})
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{port}.out", logs / f"{port}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli.main", "serve", "--http-port", str(port),
             "--mqtt-port", str(free_port()), "--mqtt-tls-port", "0",
             "--particle-port", "0", "--particle-udp-port", "0",
             "--data-dir", str(data_dir), *args],
            stdout=fo, stderr=fe, env=env)
    return Served(proc, f"http://127.0.0.1:{port}", out, err)


def _wait_healthy(served: Served, timeout_s: float = START_TIMEOUT_S) -> bool:
    """True once /healthz answers; False if another process took the port first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            stdout, stderr = served.output()
            if "address already in use" in stderr.lower():
                return False  # the port was free when picked, not when bound: pick again
            pytest.fail(f"corral serve exited with {served.proc.returncode}:\n{stdout}\n{stderr}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{served.url}/healthz", timeout=2).status_code == 200:
                return True
        time.sleep(0.1)
    pytest.fail(f"corral serve was not healthy within {timeout_s} s:\n"
                + "\n".join(served.output()))


def demo_login(url: str) -> str:
    r = httpx.post(f"{url}/oauth/token", timeout=10, data={
        "grant_type": "password", "username": DEMO_USER, "password": DEMO_PASSWORD,
        "client_id": "corral-cli", "client_secret": "corral-cli"})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object (fails on any other line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_serve_demo_end_to_end(tmp_path: Path) -> None:
    with corral_serve(tmp_path / "data", tmp_path / "logs", "--demo") as served:
        token = demo_login(served.url)
        me = httpx.get(f"{served.url}/v1/user", headers=bearer(token), timeout=10)
        assert me.status_code == 200 and me.json()["username"] == DEMO_USER

        docs = httpx.get(f"{served.url}/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        metrics = httpx.get(f"{served.url}/metrics", timeout=10)
        assert metrics.status_code == 200 and "corral_http_requests_total" in metrics.text

        assert served.stop(signal.SIGTERM) == 0
        stdout, stderr = served.output()

    for expected in (DEMO_USER, DEMO_PASSWORD, served.url, f"{served.url}/docs",
                     str((tmp_path / "data").resolve()), f"curl {served.url}/oauth/token"):
        assert expected in stdout, stdout
    # the console's address and the demo login come first
    console_at = stdout.index(f"{served.url}/console/")
    assert console_at < stdout.index(DEMO_USER) < stdout.index(f"{served.url}/docs"), stdout
    logs = json_lines(stderr)
    assert {"ts", "level", "logger", "msg"} <= set(logs[0])
    access = [e for e in logs if e["logger"] == "uvicorn.access"]
    assert any(e.get("method") == "POST" and e.get("path") == "/oauth/token"
               and e.get("status") == 200 for e in access), access
    assert any(e["msg"] == "Application shutdown complete." for e in logs)


@pytest.mark.slow
def test_serve_demo_twice_creates_nothing_new(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with corral_serve(data, tmp_path / "logs", "--demo") as first:
        assert first.stop(signal.SIGINT) == 0
        assert "created user, org, product" in first.output()[0]

    with corral_serve(data, tmp_path / "logs", "--demo", "--log-format", "text") as second:
        token = demo_login(second.url)
        orgs = httpx.get(f"{second.url}/v1/orgs", headers=bearer(token), timeout=10).json()
        assert [o["name"] for o in orgs["organizations"] if not o["personal"]] == [DEMO_ORG]
        products = httpx.get(f"{second.url}/v1/products", headers=bearer(token),
                             timeout=10).json()["products"]
        assert [(p["name"], p["platform_id"], p["organization"]) for p in products] == [
            (DEMO_PRODUCT, DEMO_PLATFORM_ID, "demo-org")]
        assert second.stop(signal.SIGTERM) == 0
        stdout, stderr = second.output()
    assert "Demo login (already present)" in stdout
    assert "Uvicorn running" in stderr and not stderr.lstrip().startswith("{")


@pytest.mark.slow
def test_serve_banner_is_whole_at_80_columns(tmp_path: Path) -> None:
    """On an 80-column terminal every address and path in the banner stays whole (a bordered
    panel cut them)."""
    data = tmp_path / ("a-rather-long-directory-name-for-the-data-" * 2) / "data"
    with corral_serve(data, tmp_path / "logs", "--demo", env={"COLUMNS": "80"}) as served:
        assert served.stop(signal.SIGTERM) == 0
        stdout, _ = served.output()
    for expected in (str(data.resolve()), f"{served.url}/console/", f"{served.url}/docs",
                     f"curl {served.url}/oauth/token", DEMO_PASSWORD):
        assert expected in stdout, stdout
    assert "…" not in stdout


def test_serve_on_a_taken_http_port_says_so(tmp_path: Path) -> None:
    """A taken HTTP port stops the start before any banner, naming the port and the option."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        proc = subprocess.run(
            [sys.executable, "-m", "corral.cli.main", "serve", "--http-port", str(port),
             "--mqtt-port", "0", "--mqtt-tls-port", "0", "--particle-port", "0",
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, env={**env, "COLUMNS": "200"},
            timeout=START_TIMEOUT_S)
    assert proc.returncode == 3, proc
    assert f"HTTP port {port} on 127.0.0.1 is taken" in proc.stderr
    assert "--http-port" in proc.stderr and "CORRAL_HTTP_PORT" in proc.stderr
    assert "Console" not in proc.stdout and "corral did not start" in proc.stderr
