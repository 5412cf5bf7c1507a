"""The application factory: ``create_app(settings)`` composes every domain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import corral
from corral.auth.guards import add_tenant_check
from corral.billing.providers import PaymentProvider, make_provider
from corral.billing.service import BillingService, lock_check, paused_orgs
from corral.bus import Bus
from corral.bus.inprocess import InProcessBus
from corral.db import migrate
from corral.db.engine import make_engine
from corral.events.service import delete_older_than
from corral.events.writer import EventWriter
from corral.kit import clock
from corral.locations.service import LocationRecorder
from corral.mail.backends import MailBackend, make_backend
from corral.mail.tasks import Mailer
from corral.metering.gate import UsageGate
from corral.metering.tasks import MeteringService
from corral.sessions.core import SessionHub, publish_after_commit
from corral.settings import Settings
from corral.web import errors
from corral.web.middleware import BodyLimit, Metrics, RejectNul

log = logging.getLogger("corral.web")


class Runtime:
    """Long-lived parts of one server process: engine, sessions, background workers."""

    def __init__(self, settings: Settings, *, mail_backend: MailBackend | None = None,
                 bus: Bus | None = None, payments: PaymentProvider | None = None) -> None:
        self.settings = settings
        self.mail_backend = mail_backend or make_backend(settings)
        self.engine: AsyncEngine | None = None
        self.sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self.mailer: Mailer | None = None
        self.bus: Bus = bus or InProcessBus()
        self.writer: EventWriter | None = None
        self.hub: SessionHub | None = None
        self.delivery: Any = None  # corral.firmware.delivery.FirmwareDelivery, once started
        self.locations: LocationRecorder | None = None
        self.transports: list[Any] = []  # started device listeners (each has .stop())
        self._retention: asyncio.Task[None] | None = None
        self.gate = UsageGate()  # data-operation limits, pause, device cap (corral.metering)
        self.metering = MeteringService(settings, self.gate)
        # billing: the payment provider (fake | stripe) and the renewal/retry loop
        self.payments: PaymentProvider = payments or make_provider(settings)
        self.billing: BillingService | None = None
        self._billing_task: asyncio.Task[None] | None = None
        self.gate.add_pause_source(paused_orgs)  # locked orgs whose devices pause

    async def start(self, app: FastAPI, *, migrate_db: bool = True,
                    background: bool = True) -> None:
        url = self.settings.resolved_database_url()
        if url.startswith("sqlite"):
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url)
        if migrate_db:
            await migrate.upgrade(self.engine)
        self.mailer = Mailer(None, self.mail_backend)  # type: ignore[arg-type]
        self.sessionmaker = async_sessionmaker(
            self.engine, expire_on_commit=False, info={"wake_mailer": self.mailer.wake, "bus": self.bus,
                                       "metering_wake": self.metering.wake}
        )
        self.mailer.sessionmaker = self.sessionmaker
        app.state.sessionmaker = self.sessionmaker
        self.writer = EventWriter(self.sessionmaker)
        bus = self.bus
        self.writer.after_commit.append(lambda events: publish_after_commit(bus, events))
        self.locations = LocationRecorder(self.sessionmaker)  # points of committed `loc` events
        self.writer.after_commit.append(self.locations)
        self.writer.start()
        self.hub = SessionHub(self.settings, self.sessionmaker, self.bus, self.writer,
                              gate=self.gate, reset_presence=isinstance(self.bus, InProcessBus))
        await self.hub.start()
        from corral.firmware.delivery import FirmwareDelivery

        self.delivery = FirmwareDelivery(self.settings, self.sessionmaker, self.hub)
        self.delivery.start()
        self.metering.attach(self.sessionmaker, self.writer, self.hub)
        await self.metering.start(background=background)
        self.billing = BillingService(self.sessionmaker, self.settings, self.payments)
        if background:
            self.mailer.start()
            self._billing_task = asyncio.get_running_loop().create_task(
                self.billing.run(), name="billing")
            self._retention = asyncio.get_running_loop().create_task(
                self._retention_loop(), name="event-retention")

    async def start_transports(self) -> None:
        """Open the device listeners the settings ask for (``corral serve``); with
        ``settings.demo``, also run the demo's simulated devices against them."""
        from corral.transports.mqtt.server import start_mqtt_listeners

        assert self.hub is not None
        self.transports.extend(await start_mqtt_listeners(self.hub, self.settings))
        if self.settings.particle_port:
            from corral.transports.particle.server import start_particle_listener

            self.transports.append(await start_particle_listener(self.hub, self.settings))
        if self.settings.demo and self.settings.demo_simulated_devices:
            from corral.demo import start_demo_fleet

            self.transports.append(await start_demo_fleet(self))

    async def _retention_loop(self) -> None:
        """Delete events older than ``event_retention_days``, hourly."""
        assert self.sessionmaker is not None
        while True:
            cutoff = clock.now() - dt.timedelta(days=self.settings.event_retention_days)
            try:
                async with self.sessionmaker() as db:
                    n = await delete_older_than(db, cutoff)
                if n:
                    log.info("event retention: deleted %d events before %s", n, cutoff)
            except Exception:
                log.exception("event retention failed")
            await asyncio.sleep(3600)

    async def stop(self) -> None:
        for t in reversed(self.transports):  # the demo fleet first, then the listeners
            with contextlib.suppress(Exception):
                await t.stop()
        self.transports.clear()
        if self.delivery is not None:
            await self.delivery.stop()
        if self.hub:
            await self.hub.stop()
        await self.metering.stop()
        if self._billing_task:
            self._billing_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._billing_task
        aclose = getattr(self.payments, "aclose", None)  # the Stripe adapter's HTTP client
        if aclose is not None:
            await aclose()
        if self._retention:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        if self.writer:
            await self.writer.stop()
        if self.locations is not None:
            await self.locations.drain()
        await self.bus.close()
        if self.mailer:
            await self.mailer.stop()
        if self.engine:
            await self.engine.dispose()


def routers() -> list[APIRouter]:
    """Every domain's router, in mounting order (the permission-matrix test walks these)."""
    from corral.accounts.api import router as accounts_router
    from corral.audit.api import router as audit_router
    from corral.billing.api import router as billing_router
    from corral.customers.api import router as customers_router
    from corral.devices.api import router as devices_router
    from corral.devices.claims_api import router as claims_router
    from corral.devices.credentials_api import router as credentials_router
    from corral.events.api import router as events_router
    from corral.firmware.api import router as firmware_router
    from corral.firmware.download_api import router as firmware_delivery_router
    from corral.locations.api import router as locations_router
    from corral.metering.api import router as metering_router
    from corral.orgs.api import router as orgs_router
    from corral.products.api import router as products_router
    from corral.rollouts.api import router as rollouts_router
    from corral.sessions.api import router as sessions_router

    # events before devices (/v1/devices/events must win over /v1/devices/{id}); functions
    # and variables last (/v1/devices/{id}/{name} must not shadow any other device route)
    return [accounts_router, orgs_router, billing_router, products_router, audit_router,
            events_router,
            claims_router, credentials_router, customers_router, devices_router,
            firmware_router, firmware_delivery_router, rollouts_router, metering_router,
            locations_router,
            sessions_router]


def create_app(settings: Settings, *, runtime: Runtime | None = None,
               transports: bool = False) -> FastAPI:
    """The ASGI app. ``transports=True`` (``corral serve``) also opens the device listeners."""
    rt = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await rt.start(app)
        try:
            if transports:
                await rt.start_transports()
            yield
        finally:
            await rt.stop()

    app = FastAPI(
        title="corral",
        version=corral.__version__,
        description="A self-hosted device cloud. `/v1` follows Particle's Device Cloud API.",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runtime = rt
    errors.install(app)
    add_tenant_check(lock_check)  # a locked or inactive organization answers 402

    for router in routers():
        app.include_router(router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        """Liveness and database reachability."""
        try:
            async with request.app.state.sessionmaker() as db:
                await db.execute(text("SELECT 1"))
        except Exception as exc:  # report, never raise
            return JSONResponse({"ok": False, "database": repr(exc)[:200]}, status_code=503)
        return JSONResponse({"ok": True, "version": corral.__version__})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    bulk = [(r"^/v1/products/[^/]+/(devices|device_keys)/?$", settings.max_import_bytes),
            # a firmware upload: the binary plus the multipart framing and form fields
            (r"^/v1/products/[^/]+/firmware/?$", settings.firmware_max_bytes + 65_536)]
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, large=bulk)  # type: ignore[arg-type]
    app.add_middleware(RejectNul)  # type: ignore[arg-type]
    app.add_middleware(Metrics)  # type: ignore[arg-type]
    return app


def asgi_app() -> Any:  # pragma: no cover - for `uvicorn corral.web.app:asgi_app --factory`
    from corral.settings import get_settings

    return create_app(get_settings())
