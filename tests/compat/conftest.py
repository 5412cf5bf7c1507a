"""Fixtures for driving a real corral server with Particle's own Node clients.

* ``node_tools``: ``node``/``npm`` on PATH and ``tests/compat/node_modules`` installed
  (``npm ci`` from the lockfile when any package of package.json is missing: particle-api-js
  and particle-cli). Without node or npm the
  tests fail when ``CI`` is set and are skipped otherwise.
* ``corral_server``: ``python -m uvicorn corral.web.app:asgi_app --factory`` on 127.0.0.1
  and a free port, with a fresh SQLite database in a temporary directory (always SQLite,
  whatever ``CORRAL_TEST_DATABASE_URL`` says). Stopped by PID at the end of the module.
* ``run_driver``: runs a ``tests/compat/*.mjs`` driver against ``corral_server`` and returns
  the one JSON document it printed, plus ``_exit_code``, ``_stderr`` and ``_server_log``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

COMPAT_DIR = Path(__file__).resolve().parent
REPO_ROOT = COMPAT_DIR.parents[1]
NPM_TIMEOUT_S = 300
START_TIMEOUT_S = 90.0  # a busy machine starts a server slowly; healthy is what counts
STOP_TIMEOUT_S = 10.0
DRIVER_TIMEOUT_S = 90


def _unavailable(reason: str) -> None:
    """Fail in CI (the compat suite is required there), skip on a developer machine."""
    if os.environ.get("CI"):
        pytest.fail(f"compat: {reason} (CI is set, so this is a failure, not a skip)",
                    pytrace=False)
    pytest.skip(f"compat: {reason}")


@dataclass(frozen=True)
class NodeTools:
    node: str
    npm: str
    node_version: str
    packages: dict[str, str]  # installed name -> version (direct dependencies)

    def run_script(self, script: str, env: dict[str, str],
                   timeout: float = DRIVER_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``node tests/compat/<script>`` with a bounded time (the child is killed on timeout)."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        full_env.update(env)
        # Never route 127.0.0.1 through a proxy (node-fetch ignores these, but be explicit).
        full_env["NO_PROXY"] = full_env["no_proxy"] = "127.0.0.1,localhost"
        try:
            return subprocess.run(
                [self.node, str(COMPAT_DIR / script)], cwd=COMPAT_DIR, env=full_env,
                capture_output=True, text=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"node {script} did not finish in {timeout} s; stderr:\n"
                        f"{_text(exc.stderr)[-2000:]}", pytrace=False)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _installed_versions() -> dict[str, str]:
    manifest = json.loads((COMPAT_DIR / "package.json").read_text())
    versions = {}
    for name in manifest.get("dependencies", {}):
        pkg = COMPAT_DIR / "node_modules" / name / "package.json"
        if pkg.is_file():
            versions[name] = json.loads(pkg.read_text())["version"]
    return versions


def _npm_install(npm: str) -> None:
    if (COMPAT_DIR / "package-lock.json").is_file():
        cmd = [npm, "ci", "--no-audit", "--no-fund"]
    else:
        cmd = [npm, "install", "--no-audit", "--no-fund"]
    try:
        proc = subprocess.run(cmd, cwd=COMPAT_DIR, capture_output=True, text=True,
                              timeout=NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        _unavailable(f"`{' '.join(cmd[1:])}` in {COMPAT_DIR} timed out after {NPM_TIMEOUT_S} s")
        return
    if proc.returncode != 0:
        _unavailable(f"`npm {' '.join(cmd[1:])}` in {COMPAT_DIR} failed "
                     f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


@pytest.fixture(scope="session")
def node_tools() -> NodeTools:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if not p)
        _unavailable(f"{missing} not found on PATH; install Node.js >= 20 with npm")
    assert node and npm
    version = subprocess.run([node, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.strip()
    wanted = set(json.loads((COMPAT_DIR / "package.json").read_text())["dependencies"])
    # pytest-xdist workers share this directory: one `npm ci` at a time (it deletes and
    # rewrites node_modules), and a worker that waited finds the packages installed.
    with (COMPAT_DIR / ".npm-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if wanted - set(_installed_versions()):
            _npm_install(npm)
    packages = _installed_versions()
    if missing := wanted - set(packages):
        _unavailable(f"{', '.join(sorted(missing))} still missing from "
                     "tests/compat/node_modules after npm")
    return NodeTools(node=node, npm=npm, node_version=version, packages=packages)


# ---------------------------------------------------------------- the corral server


@dataclass(frozen=True)
class Server:
    base_url: str  # no trailing slash, as particle-api-js wants it
    pid: int
    data_dir: Path
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str) -> str | None:
    """None once ``GET /healthz`` says ok; otherwise why not (process exited, or timed out)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=2.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"server exited with code {proc.returncode}"
            try:
                r = http.get("/healthz")
                if r.status_code == 200 and r.json().get("ok") is True:
                    return None
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.TransportError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.1)
    return f"/healthz not ok after {START_TIMEOUT_S} s ({last})"


@pytest.fixture(scope="module")
def corral_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("corral-compat")
    data_dir = root / "data"
    log_path = root / "server.log"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    base_env.update({
        "CORRAL_DATA_DIR": str(data_dir),
        "CORRAL_DATABASE_URL": f"sqlite+aiosqlite:///{root / 'corral-compat.db'}",
        "CORRAL_ARGON2_TIME_COST": "1",
        "CORRAL_ARGON2_MEMORY_KIB": "8",
        "CORRAL_HOST": "127.0.0.1",
        "CORRAL_LOG_FORMAT": "text",
        "PYTHONUNBUFFERED": "1",
    })
    failure = ""
    for _attempt in range(3):  # another process may grab the port between probe and bind
        port = _free_port()
        env = dict(base_env, CORRAL_HTTP_PORT=str(port))
        cmd = [sys.executable, "-m", "uvicorn", "corral.web.app:asgi_app", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
               "--no-proxy-headers"]  # as corral serve: forwarding headers are corral's call
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        base_url = f"http://127.0.0.1:{port}"
        problem = _wait_healthy(proc, base_url)
        if problem is None:
            try:
                yield Server(base_url=base_url, pid=proc.pid, data_dir=data_dir,
                             log_path=log_path)
            finally:
                _stop(proc)
            return
        _stop(proc)
        failure = problem
        if "address already in use" not in log_path.read_text(errors="replace").lower():
            break
    pytest.fail(f"corral did not start: {failure}\n--- server log ---\n"
                f"{log_path.read_text(errors='replace')[-4000:]}", pytrace=False)


# ---------------------------------------------------------------- running a driver


@pytest.fixture(scope="module")
def run_driver(node_tools: NodeTools,
               corral_server: Server) -> Callable[[str, dict[str, str]], dict[str, Any]]:
    """``run_driver("driver_x.mjs", env)``: run the driver (bounded by ``DRIVER_TIMEOUT_S``)
    with ``CORRAL_COMPAT_BASE_URL`` set to the server, and return the JSON document it printed
    last, with ``_exit_code``, ``_stderr`` and ``_server_log`` added. No JSON fails the test."""

    def run(script: str, env: dict[str, str]) -> dict[str, Any]:
        proc = node_tools.run_script(
            script, {"CORRAL_COMPAT_BASE_URL": corral_server.base_url, **env})
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        try:
            doc = json.loads(lines[-1])
        except (IndexError, ValueError):
            pytest.fail(f"{script} printed no JSON (exit {proc.returncode})\nstdout:\n"
                        f"{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}\n"
                        f"--- server log ---\n{corral_server.log_tail()}", pytrace=False)
        if not isinstance(doc, dict):
            pytest.fail(f"{script} printed JSON that is not an object: {lines[-1][:500]}",
                        pytrace=False)
        doc["_exit_code"] = proc.returncode
        doc["_stderr"] = proc.stderr[-2000:]
        doc["_server_log"] = corral_server.log_tail()
        return doc

    return run
