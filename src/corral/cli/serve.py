"""``corral serve``: the whole cloud in one process (API, workers), on uvicorn."""

from __future__ import annotations

import asyncio
import shlex
import signal
import socket
from enum import StrEnum
from typing import Annotated, Any

import typer

import corral
from corral.cli.admin import DATABASE_ERRORS, DatabaseUrl, DataDir, database, database_label
from corral.cli.config import settings_from
from corral.cli.output import console, fail
from corral.demo import DemoInfo, ensure_demo
from corral.kit.errors import CorralError
from corral.settings import Settings
from corral.web import logs

GRACEFUL_SHUTDOWN_S = 10  # open requests get this long after SIGINT/SIGTERM


class LogFormat(StrEnum):
    json = "json"
    text = "text"


class Role(StrEnum):
    all = "all"
    api = "api"
    gateway = "gateway"
    worker = "worker"


RESTART_DELAY_S = 1.0  # `--workers`: a worker process that died is started again after this


def serve(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(
        help="Interface to listen on. (env CORRAL_HOST; default 127.0.0.1)")] = None,
    http_port: Annotated[int | None, typer.Option(
        "--http-port", help="HTTP port. (env CORRAL_HTTP_PORT; default 8080)")] = None,
    database_url: DatabaseUrl = None,
    log_format: Annotated[LogFormat | None, typer.Option(
        help="Log lines on stderr. (env CORRAL_LOG_FORMAT; default json)")] = None,
    mqtt_port: Annotated[int | None, typer.Option(
        "--mqtt-port", help="MQTT port for devices; 0 turns it off. "
        "(env CORRAL_MQTT_PORT; default 1883)")] = None,
    mqtt_tls_port: Annotated[int | None, typer.Option(
        "--mqtt-tls-port", help="MQTT over TLS (client certificates provision devices from "
        "product CAs); 0 turns it off. (env CORRAL_MQTT_TLS_PORT; default 8883)")] = None,
    particle_port: Annotated[int | None, typer.Option(
        "--particle-port", help="Particle device protocol (TCP) port; 0 turns it off. "
        "(env CORRAL_PARTICLE_PORT; default 5683)")] = None,
    particle_udp_port: Annotated[int | None, typer.Option(
        "--particle-udp-port", help="Particle Gen 3 devices (DTLS over UDP) port; 0 turns it "
        "off. (env CORRAL_PARTICLE_UDP_PORT; default 5684)")] = None,
    demo: Annotated[bool | None, typer.Option(
        "--demo/--no-demo", help="Create a demo account, organization, product and "
        "fleet of devices (idempotent), run a few of them as live simulated devices, and "
        "print how to log in. (env CORRAL_DEMO)")] = None,
    role: Annotated[Role | None, typer.Option(
        "--role", help="What this node does when many share one PostgreSQL and NATS: all, "
        "api (HTTP API and event streams), gateway (device connections) or worker "
        "(singleton background work). (env CORRAL_NODE_ROLE; default all)")] = None,
    bus_url: Annotated[str | None, typer.Option(
        "--bus-url", help="NATS server(s) between the nodes, e.g. nats://127.0.0.1:4222; "
        "needs PostgreSQL. (env CORRAL_BUS_URL; default: none, a single node)")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, max=64, help="Processes on this machine sharing the HTTP and "
        "device ports (SO_REUSEPORT); more than 1 needs PostgreSQL and --bus-url.")] = 1,
    worker_of: Annotated[int | None, typer.Option("--worker-of", hidden=True)] = None,
) -> None:
    """Run corral: migrate the database, then serve the API and the device transports until
    SIGINT/SIGTERM."""
    settings = settings_from(data_dir=data_dir, host=host, http_port=http_port,
                             database_url=database_url, mqtt_port=mqtt_port,
                             mqtt_tls_port=mqtt_tls_port, particle_port=particle_port,
                             particle_udp_port=particle_udp_port,
                             log_format=log_format.value if log_format else None, demo=demo,
                             node_role=role.value if role else None, bus_url=bus_url)
    logs.setup(settings.log_format, settings.log_level)
    if workers > 1:
        _check_scaled(settings, f"--workers {workers}")
        settings = _free_default_ports(settings)
        _refuse_taken_ports(settings)
        _supervise(settings, workers)
        return
    if settings.bus_url:
        _check_scaled(settings, "--bus-url")
    if worker_of is None:
        settings = _free_default_ports(settings)
        _refuse_taken_ports(settings)

    import uvicorn  # imported late: the admin and client commands never need it

    from corral.web.app import create_app
    from corral.web.http import http_protocol

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # the demo's devices are clients of this very server: stop them before uvicorn
            # waits (up to GRACEFUL_SHUTDOWN_S) for open requests such as their downloads
            await app.state.runtime.stop_own_clients()
            await super().shutdown(sockets)

    app = create_app(settings, transports=True)
    server = Server(uvicorn.Config(
        app, host=settings.host, port=settings.http_port,
        log_config=None,  # keep the handlers corral.web.logs installed (JSON lines)
        access_log=True, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # the client address is corral's to decide (CORRAL_TRUSTED_PROXIES): uvicorn's own
        # proxy headers would believe X-Forwarded-For from anyone on 127.0.0.1
        proxy_headers=False, http=http_protocol(settings.http_header_timeout_s),
    ))
    _stop_on_signals(server)
    if worker_of is None:
        info = _prepare_demo(settings) if settings.demo else None
        _banner(settings, info)
    sockets = [_reuse_port_socket(settings.host, settings.http_port)] \
        if settings.listen_reuse_port else None
    server.run(sockets=sockets)  # uvloop/httptools when installed
    if not server.started:
        fail("corral did not start; see the log above.", code=3)


def _check_scaled(settings: Settings, what: str) -> None:
    """Several processes need a database and a bus they can share: refuse clearly."""
    if settings.resolved_database_url().startswith("sqlite"):
        fail(f"{what} runs corral as several processes, which share one PostgreSQL database: "
             "set --database-url postgresql+asyncpg://... (SQLite is for a single process).",
             code=2)
    if not settings.bus_url:
        fail(f"{what} runs corral as several processes, which talk over NATS: set "
             "--bus-url nats://host:4222 (or CORRAL_BUS_URL).", code=2)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening address several processes bind at once (the kernel spreads connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _supervise(settings: Settings, workers: int) -> None:
    """``--workers N``: migrate once, then run N ``corral serve`` processes on the same ports
    (SO_REUSEPORT), restart any that dies, and stop them all on SIGINT/SIGTERM."""
    import os
    import subprocess
    import sys
    import time

    from corral.db import migrate
    from corral.db.engine import make_engine

    async def upgrade() -> None:
        engine = make_engine(settings.resolved_database_url())
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(upgrade())
    except DATABASE_ERRORS as exc:
        fail(f"Database {database_label(settings)}: {exc}")
    info = _prepare_demo(settings) if settings.demo else None
    _banner(settings, info)
    env = {**os.environ, "CORRAL_LISTEN_REUSE_PORT": "true", "CORRAL_DEMO": "false",
           "CORRAL_HOST": settings.host, "CORRAL_HTTP_PORT": str(settings.http_port),
           "CORRAL_MQTT_PORT": str(settings.mqtt_port),
           "CORRAL_MQTT_TLS_PORT": str(settings.mqtt_tls_port),
           "CORRAL_PARTICLE_PORT": str(settings.particle_port),
           "CORRAL_PARTICLE_UDP_PORT": str(settings.particle_udp_port),
           "CORRAL_DATA_DIR": str(settings.data_dir),
           "CORRAL_DATABASE_URL": settings.resolved_database_url(),
           "CORRAL_BUS_URL": settings.bus_url or "", "CORRAL_NODE_ROLE": settings.node_role,
           "CORRAL_LOG_FORMAT": settings.log_format}
    command = [sys.executable, "-m", "corral.cli.main", "serve", "--worker-of",
               str(os.getpid())]
    stopping = False

    def start() -> subprocess.Popen[bytes]:
        # its own session: a terminal's Ctrl-C reaches the workers once, through stop()
        return subprocess.Popen(command, env=env, start_new_session=True)

    def stop(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    procs = [start() for _ in range(workers)]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    console.print(f"{workers} worker processes: pids {', '.join(str(p.pid) for p in procs)}",
                  highlight=False)
    while True:
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code is not None and not stopping:
                console.print(f"worker pid {proc.pid} exited with {code}; starting another",
                              highlight=False)
                time.sleep(RESTART_DELAY_S)
                if not stopping:
                    procs[i] = start()
        if stopping and all(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    if any(code not in (0, -signal.SIGINT, -signal.SIGTERM) for code in codes):
        fail(f"worker processes exited with {codes}", code=3)


def _port_free(host: str, port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_default_ports(settings: Settings) -> Settings:
    """A device port left at its default (1883, 8883, 5683, UDP 5684) that another program already holds
    (typically a local Mosquitto) moves to a free port, and the banner says which; a port
    chosen with a flag or variable is used as given (and fails loudly if taken)."""
    changes: dict[str, int] = {}
    for name in ("mqtt_port", "mqtt_tls_port", "particle_port", "particle_udp_port"):
        port = getattr(settings, name)
        kind = socket.SOCK_DGRAM if name == "particle_udp_port" else socket.SOCK_STREAM
        if port and name not in settings.model_fields_set and not _port_free(settings.host, port,
                                                                             kind):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((settings.host, 0))
                changes[name] = s.getsockname()[1]
            console.print(f"Port {port} is in use (another broker?); corral listens for "
                          f"devices on {changes[name]} instead. Choose one with "
                          f"--{name.replace('_', '-')}.", highlight=False)
    return settings.model_copy(update=changes) if changes else settings


def _refuse_taken_ports(settings: Settings) -> None:
    """Before the banner: a port corral must listen on that another program holds stops the
    start with a message naming the port and what to do (uvicorn's own error comes after a
    banner that looked like a start, and names no option)."""
    if settings.listen_reuse_port:
        return  # processes sharing their ports on purpose (SO_REUSEPORT)
    ports = [("HTTP", "http_port")]
    if settings.node_role in ("all", "gateway"):  # the nodes that listen for devices
        ports += [("MQTT", "mqtt_port"), ("MQTT/TLS", "mqtt_tls_port"),
                  ("Particle", "particle_port")]
    for what, name in ports:
        port = getattr(settings, name)
        if port and not _port_free(settings.host, port):
            fail(f"corral did not start: the {what} port {port} on {settings.host} is taken "
                 f"(address already in use). Stop the program holding it (another corral?) "
                 f"or choose another port with --{name.replace('_', '-')} "
                 f"(or CORRAL_{name.upper()}).", code=3)


def _stop_on_signals(server: Any) -> None:
    """SIGINT/SIGTERM mean "shut down gracefully, then exit 0".

    While serving, uvicorn's own handlers do the graceful shutdown; afterwards uvicorn
    re-raises the signal to the handlers that were in place before, which are these: they
    only ask the (by then stopped) server to stop, so the process ends normally. A signal
    that arrives before uvicorn runs (during migrations or the demo set-up) stops the
    server right after its start-up.
    """

    def stop(_sig: int, _frame: Any) -> None:
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def _prepare_demo(settings: Settings) -> DemoInfo:
    async def go() -> DemoInfo:
        async with database(settings) as sessionmaker:
            return await ensure_demo(sessionmaker, settings)

    try:
        return asyncio.run(go())
    except CorralError as exc:
        fail(f"Could not create the demo data: {exc.description}")
    except DATABASE_ERRORS as exc:
        fail(f"Database {database_label(settings)}: {exc}")


def _section(title: str, rows: list[tuple[str, str]]) -> None:
    """A title and aligned ``label  value`` lines, never wrapped or cut (a URL or path must
    stay whole and copyable at any terminal width; a bordered panel cut them at 80 columns)."""
    console.print(title, style="bold", highlight=False, markup=False, soft_wrap=True)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        console.print(f"  {label.ljust(width)}  {value}", highlight=False, markup=False,
                      soft_wrap=True)
    console.print()


def _banner(settings: Settings, info: DemoInfo | None) -> None:
    """What a person needs first: where the console is and (with ``--demo``) how to sign
    in; then the other endpoints and the demo's details."""
    url = settings.resolved_public_url()
    console_url = f"{url}/console/"
    if info is not None:
        _section("Open the console and sign in", [
            ("Console", console_url), ("Username", info.username), ("Password", info.password)])
    rows = [("Console", console_url), ("API", url), ("Docs", f"{url}/docs")]
    mqtt_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    if settings.mqtt_port:
        rows.append(("MQTT", f"mqtt://{mqtt_host}:{settings.mqtt_port}"))
    if settings.mqtt_tls_port:
        rows.append(("MQTT/TLS", f"mqtts://{mqtt_host}:{settings.mqtt_tls_port}"))
    if settings.particle_port:
        rows.append(("Particle", f"tcp://{mqtt_host}:{settings.particle_port}"))
    if settings.particle_udp_port:
        rows.append(("Particle Gen 3", f"udp://{mqtt_host}:{settings.particle_udp_port}"))
    rows += [("Data dir", str(settings.data_dir.resolve())),
             ("Database", database_label(settings))]
    _section(f"corral {corral.__version__}", rows)
    if info is None:
        return
    state = f"created {', '.join(info.created)}" if info.created else "already present"
    _section(f"Demo login ({state})", [
        ("Organization", f"{info.org_slug} (id {info.org_id})"),
        ("Product", f"{info.product_slug} (id {info.product_id})"),
        ("Devices", info.fleet_summary)])
    console.print("Get an access token:", highlight=False)
    console.print(demo_curl(url, info), highlight=False, soft_wrap=True, markup=False)


def demo_curl(url: str, info: DemoInfo) -> str:
    return (f"curl {shlex.quote(url + '/oauth/token')} -d grant_type=password "
            f"-d client_id=corral-cli -d client_secret=corral-cli "
            f"--data-urlencode {shlex.quote('username=' + info.username)} "
            f"--data-urlencode {shlex.quote('password=' + info.password)}")
