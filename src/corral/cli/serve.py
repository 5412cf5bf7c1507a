"""``corral serve``: the whole cloud in one process (API, workers), on uvicorn."""

from __future__ import annotations

import asyncio
import shlex
import signal
import socket
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.panel import Panel
from rich.table import Table

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
    demo: Annotated[bool | None, typer.Option(
        "--demo/--no-demo", help="Create a demo account, organization, product and "
        "fleet of devices (idempotent), run a few of them as live simulated devices, and "
        "print how to log in. (env CORRAL_DEMO)")] = None,
) -> None:
    """Run corral: migrate the database, then serve the API and the device transports until
    SIGINT/SIGTERM."""
    settings = settings_from(data_dir=data_dir, host=host, http_port=http_port,
                             database_url=database_url, mqtt_port=mqtt_port,
                             mqtt_tls_port=mqtt_tls_port, particle_port=particle_port,
                             log_format=log_format.value if log_format else None, demo=demo)
    logs.setup(settings.log_format, settings.log_level)
    settings = _free_default_ports(settings)

    import uvicorn  # imported late: the admin and client commands never need it

    from corral.web.app import create_app

    server = uvicorn.Server(uvicorn.Config(
        create_app(settings, transports=True), host=settings.host, port=settings.http_port,
        log_config=None,  # keep the handlers corral.web.logs installed (JSON lines)
        access_log=True, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    ))
    _stop_on_signals(server)
    info = _prepare_demo(settings) if settings.demo else None
    _banner(settings, info)
    server.run()  # uvloop/httptools when installed
    if not server.started:
        fail("corral did not start; see the log above.", code=3)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_default_ports(settings: Settings) -> Settings:
    """A device port left at its default (1883, 8883, 5683) that another program already holds
    (typically a local Mosquitto) moves to a free port, and the banner says which; a port
    chosen with a flag or variable is used as given (and fails loudly if taken)."""
    changes: dict[str, int] = {}
    for name in ("mqtt_port", "mqtt_tls_port", "particle_port"):
        port = getattr(settings, name)
        if port and name not in settings.model_fields_set and not _port_free(settings.host, port):
            with socket.socket() as s:
                s.bind((settings.host, 0))
                changes[name] = s.getsockname()[1]
            console.print(f"Port {port} is in use (another broker?); corral listens for "
                          f"devices on {changes[name]} instead. Choose one with "
                          f"--{name.replace('_', '-')}.", highlight=False)
    return settings.model_copy(update=changes) if changes else settings


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


def _banner(settings: Settings, info: DemoInfo | None) -> None:
    url = settings.resolved_public_url()
    grid = Table.grid(padding=(0, 2))
    grid.add_row("API", url)
    grid.add_row("Docs", f"{url}/docs")
    mqtt_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    if settings.mqtt_port:
        grid.add_row("MQTT", f"mqtt://{mqtt_host}:{settings.mqtt_port}")
    if settings.mqtt_tls_port:
        grid.add_row("MQTT/TLS", f"mqtts://{mqtt_host}:{settings.mqtt_tls_port}")
    if settings.particle_port:
        grid.add_row("Particle", f"tcp://{mqtt_host}:{settings.particle_port}")
    grid.add_row("Data dir", str(settings.data_dir.resolve()))
    grid.add_row("Database", database_label(settings))
    console.print(Panel(grid, title=f"corral {corral.__version__}", title_align="left",
                        expand=False), highlight=False)
    if info is None:
        return
    demo = Table.grid(padding=(0, 2))
    demo.add_row("Username", info.username)
    demo.add_row("Password", info.password)
    demo.add_row("Organization", f"{info.org_slug} (id {info.org_id})")
    demo.add_row("Product", f"{info.product_slug} (id {info.product_id})")
    demo.add_row("Devices", info.fleet_summary)
    state = f"created {', '.join(info.created)}" if info.created else "already present"
    console.print(Panel(demo, title=f"Demo login ({state})", title_align="left",
                        expand=False), highlight=False)
    console.print("Get an access token:", highlight=False)
    console.print(demo_curl(url, info), highlight=False, soft_wrap=True, markup=False)


def demo_curl(url: str, info: DemoInfo) -> str:
    return (f"curl {shlex.quote(url + '/oauth/token')} -d grant_type=password "
            f"-d client_id=corral-cli -d client_secret=corral-cli "
            f"--data-urlencode {shlex.quote('username=' + info.username)} "
            f"--data-urlencode {shlex.quote('password=' + info.password)}")
