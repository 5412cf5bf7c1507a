"""The application factory: ``create_app(settings)`` composes every domain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import corral
from corral import models
from corral.auth import cache as auth_cache
from corral.auth.cache import SubjectCache, TenantCache
from corral.auth.guards import add_tenant_check
from corral.billing.models import Subscription
from corral.billing.providers import PaymentProvider, make_provider
from corral.billing.subscriptions import judge_shut, lock_check, paused_orgs, shut_status_sql
from corral.billing.tasks import BillingService
from corral.bus import Bus
from corral.bus.base import Message
from corral.bus.inprocess import InProcessBus
from corral.cluster.lease import Leases, singleton
from corral.cluster.registry import NodeRegistry, new_node_id
from corral.db import migrate
from corral.db.engine import make_engine, refresh_statistics
from corral.db.session import AWAIT_AFTER_COMMIT
from corral.events import outbox
from corral.events.service import delete_older_than
from corral.events.writer import EventWriter
from corral.fleet import alerts as fleet_alerts
from corral.fleet import tops as fleet_tops
from corral.fleet.rollups import FleetTally, sample_online
from corral.fleet.tasks import fleet_retention
from corral.fleet.vitals import VitalsRecorder
from corral.integrations.tasks import IntegrationWorker
from corral.kit import clock, heap
from corral.locations.service import LocationRecorder
from corral.mail.backends import MailBackend, make_backend
from corral.mail.tasks import Mailer
from corral.metering.agreements import UsageReportWorker
from corral.metering.gate import UsageGate
from corral.metering.tasks import MeteringService
from corral.sessions.core import SessionHub, publish_after_commit
from corral.settings import Settings
from corral.web import errors, openapi, routing
from corral.web.middleware import BodyLimit, Metrics, RejectNul
from corral.web.ratelimit import ClientAddress, RateLimit, RateLimiter, SharedBudget

log = logging.getLogger("corral.web")

METERING = "metering"  # the lease of the usage fold and usage warnings
INTEGRATIONS = "integrations"  # the lease of the integration outbox and deliveries
# a plan or an integration changed: every node refreshes what depends on it
CLUSTER_WAKE = "cluster.wake"
AUTH_CHANGED = "auth.changed"  # a node committed a change to tokens or their owners
SLOW_STOP_S = 3.0  # a shutdown step that takes longer is named in the log


class Runtime:
    """Long-lived parts of one server process: engine, sessions, background workers."""

    def __init__(self, settings: Settings, *, mail_backend: MailBackend | None = None,
                 bus: Bus | None = None, payments: PaymentProvider | None = None) -> None:
        self.settings = settings
        self.mail_backend = mail_backend or make_backend(settings)
        self.engine: AsyncEngine | None = None
        self.sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self.mailer: Mailer | None = None
        # the in-process bus for one node; with settings.bus_url, NATS (connected in start)
        self.bus: Bus = bus or InProcessBus()
        self._own_bus = bus is None
        # scaled out (a bus between nodes): the node registry and leases of singleton work
        self.clustered = bool(settings.bus_url) or not isinstance(self.bus, InProcessBus)
        self.node_id = new_node_id()
        self.leases: Leases | None = None
        self.registry: NodeRegistry | None = None
        self._singletons: list[asyncio.Task[None]] = []
        self.writer: EventWriter | None = None
        self.hub: SessionHub | None = None
        self.delivery: Any = None  # corral.firmware.delivery.FirmwareDelivery, once started
        self.ledger_sync: Any = None  # corral.ledgers.sync.LedgerSync, once started
        self.integrations: IntegrationWorker | None = None  # webhooks and MQTT forwarding
        self.locations: LocationRecorder | None = None
        self.vitals: VitalsRecorder | None = None
        self.fleet: FleetTally | None = None  # this node's fleet rollup counts
        self.transports: list[Any] = []  # started device listeners (each has .stop())
        self.demo_fleet: Any = None  # the demo's simulated devices (``.stop()``), if running
        self._wakes: set[asyncio.Task[None]] = set()
        self.gate = UsageGate()  # data-operation limits, pause, device cap (corral.metering)
        # the API rate limit; scaled out, one budget shared over the bus
        self.limiter = RateLimiter(settings.api_rate_limit, settings.api_rate_window_s)
        self.shared_budget: SharedBudget | None = None
        self.metering = MeteringService(settings, self.gate)
        self.subject_cache = SubjectCache(settings.token_cache_s)  # token -> subject
        # (caller, product) -> the product and the caller's role on it, for reads
        self.tenant_cache = TenantCache(settings.tenant_cache_s)
        # billing: the payment provider (fake | stripe) and the renewal/retry loop
        self.payments: PaymentProvider = payments or make_provider(settings)
        self.billing: BillingService | None = None
        self.usage_reports: UsageReportWorker | None = None  # Particle's usage_reports
        self.gate.add_pause_source(paused_orgs)  # locked orgs whose devices pause

    async def start(self, app: FastAPI, *, migrate_db: bool = True,
                    background: bool = True) -> None:
        url = self.settings.resolved_database_url()
        if self.clustered and url.startswith("sqlite"):
            raise RuntimeError("Running as one node of many (a bus URL) needs PostgreSQL: set "
                               "CORRAL_DATABASE_URL=postgresql+asyncpg://... (docs/deploy.md)")
        if url.startswith("sqlite"):
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        pool = {"pool_size": self.settings.database_pool_size,
                "max_overflow": self.settings.database_max_overflow}
        self.engine = make_engine(url, **({} if url.startswith("sqlite") else
                                          {k: v for k, v in pool.items() if v is not None}))
        if migrate_db:
            await migrate.upgrade(self.engine)
        if self.settings.bus_url and self._own_bus:
            from corral.bus.nats import NatsBus

            self.bus = await NatsBus.connect(self.settings.bus_url,
                                             namespace=self.settings.bus_namespace,
                                             name=f"corral-{self.node_id}")
        self.mailer = Mailer(None, self.mail_backend)  # type: ignore[arg-type]
        self.sessionmaker = async_sessionmaker(
            self.engine, expire_on_commit=False, info={"wake_mailer": self.mailer.wake, "bus": self.bus,
                                       "metering_wake": self._metering_wake,
                                       "integrations_changed": self._integrations_changed,
                                       auth_cache.HOOK: self._auth_changed}
        )
        self.mailer.sessionmaker = self.sessionmaker
        app.state.sessionmaker = self.sessionmaker
        self.writer = EventWriter(self.sessionmaker)
        bus = self.bus
        self.writer.after_commit.append(lambda events: publish_after_commit(bus, events))
        self.locations = LocationRecorder(self.sessionmaker)  # points of committed `loc` events
        self.writer.after_commit.append(self.locations)
        self.vitals = VitalsRecorder(self.sessionmaker)  # diagnostics events' payloads
        self.writer.after_commit.append(self.vitals)
        self.fleet = FleetTally(self.sessionmaker, firmware_of=self._firmware_of)
        self.writer.after_commit.append(self.fleet)  # events, connects and disconnects
        self.writer.after_presence.append(self.fleet.presence)  # disconnect reasons
        self.writer.after_usage.append(self.fleet.usage)  # data operations without a row
        integrations = self.integrations = IntegrationWorker(self.settings, self.sessionmaker,
                                                             self.writer)
        # a batch with an outbox row (events that may trigger an integration): dispatch now;
        # a batch of usage or presence only (a function call's count) has nothing for it
        def dispatch(events: Any) -> None:
            if outbox.wanted(events):
                integrations.wake()

        self.writer.after_commit.append(dispatch)
        self.writer.start()
        cfg = self.settings
        self.leases = Leases(self.sessionmaker, self.node_id, cfg.lease_ttl_s,
                             local=not self.clustered)
        if self.clustered:
            self.registry = NodeRegistry(
                self.sessionmaker, self.leases, node_id=self.node_id, role=cfg.node_role,
                heartbeat_s=cfg.node_heartbeat_s, dead_after_s=cfg.node_dead_after_s,
                writer=self.writer, sessions=lambda: len(self.hub.sessions) if self.hub else 0,
                declared_dead=lambda: self.hub.drop_all(
                    "The corral node was declared dead; reconnect") if self.hub else None)
            await self.registry.register()
            await self.bus.subscribe(CLUSTER_WAKE, self._on_cluster_wake)
            if cfg.api_rate_limit:
                self.shared_budget = SharedBudget(self.limiter, self.bus, self.node_id)
                await self.shared_budget.start()
        await self.bus.subscribe(AUTH_CHANGED, self._on_auth_changed)
        # single node: it held every session, so devices a previous run left online are
        # offline now; scaled out, a node's start never touches devices others hold
        self.hub = SessionHub(self.settings, self.sessionmaker, self.bus, self.writer,
                              gate=self.gate, reset_presence=not self.clustered,
                              node_id=self.node_id if self.clustered else None)
        await self.hub.start()
        self.hub.call_results.append(self.fleet.call)
        from corral.firmware.delivery import FirmwareDelivery

        self.delivery = FirmwareDelivery(self.settings, self.sessionmaker, self.hub)
        await self.delivery.start()
        from corral.ledgers.sync import LedgerSync

        self.ledger_sync = LedgerSync(self.sessionmaker, self.hub, self.bus)
        await self.ledger_sync.start()
        self.metering.attach(self.sessionmaker, self.writer, self.hub)
        leases = self.leases
        singletons = cfg.node_role in ("all", "worker")
        if singletons:
            leases.want(METERING)
        self.metering.leads = lambda: leases.held(METERING)
        if self.clustered and singletons:
            await leases.acquire(METERING)  # the first refresh below may fold already
        await self.metering.start(background=background)
        self.billing = BillingService(self.sessionmaker, self.settings, self.payments)
        self.usage_reports = UsageReportWorker(self.sessionmaker)
        if self.registry is not None:
            self.registry.start()  # heartbeats, and the reaper under its lease on any node
        if background:
            self.fleet.start()
        if background and not self.clustered:
            self.integrations.start()
        if background and singletons:
            # exactly once across the cluster: each loop works while its node holds the lease
            loop = asyncio.get_running_loop()
            self._singletons = [
                loop.create_task(singleton(leases, "mail-outbox", self.mailer.deliver_due,
                                           every_s=self.mailer.poll_s,
                                           wake=self.mailer.woken), name="mail-outbox"),
                loop.create_task(singleton(leases, "billing", self.billing.tick,
                                           every_s=cfg.billing_tick_s), name="billing"),
                loop.create_task(singleton(leases, "usage-reports", self.usage_reports.run_due,
                                           every_s=30, wake=self.usage_reports.woken),
                                 name="usage-reports"),
                loop.create_task(singleton(leases, "event-retention", self._retention_pass,
                                           every_s=3600), name="event-retention"),
                loop.create_task(singleton(leases, "fleet-minute", self._fleet_minute,
                                           every_s=60), name="fleet-minute"),
            ]
            if url.startswith("sqlite") and cfg.sqlite_analyze_s > 0:
                engine = self.engine
                self._singletons.append(loop.create_task(singleton(
                    leases, "sqlite-statistics", lambda: refresh_statistics(engine),
                    every_s=cfg.sqlite_analyze_s), name="sqlite-statistics"))
            if self.clustered:
                leases.want(INTEGRATIONS)
                self._singletons.append(loop.create_task(self.integrations.run_while(
                    lambda: leases.held(INTEGRATIONS)), name="integrations"))
        leases.start()

    def _integrations_changed(self) -> None:
        """Integrations changed (after commit): the worker rescans, on whichever node runs it."""
        if self.integrations is not None:
            self.integrations.changed()
        self._tell_cluster("integrations")

    async def start_transports(self) -> None:
        """Open the device listeners the settings ask for (``corral serve``); with
        ``settings.demo``, also run the demo's simulated devices against them."""
        from corral.transports.mqtt.server import start_mqtt_listeners

        assert self.hub is not None
        if self.settings.node_role not in ("all", "gateway"):
            return  # an api or worker node holds no device connections
        self.transports.extend(await start_mqtt_listeners(self.hub, self.settings))
        if self.settings.particle_port:
            from corral.transports.particle.server import start_particle_listener

            self.transports.append(await start_particle_listener(self.hub, self.settings))
        if self.settings.particle_udp_port:
            from corral.transports.particle.udp import start_particle_udp_listener

            self.transports.append(await start_particle_udp_listener(self.hub, self.settings))
        if self.settings.demo and self.settings.demo_simulated_devices:
            from corral.demo import start_demo_fleet

            self.demo_fleet = await start_demo_fleet(self)

    async def stop_own_clients(self) -> None:
        """Stop the clients this process runs against itself (the demo's simulated devices)
        before the HTTP server drains its connections: a demo device's firmware download in
        flight would otherwise hold the graceful shutdown for its whole timeout."""
        fleet, self.demo_fleet = self.demo_fleet, None
        if fleet is not None:
            with contextlib.suppress(Exception):
                await fleet.stop()

    async def _retention_pass(self) -> None:
        """Delete events older than ``event_retention_days`` (hourly, as a singleton)."""
        assert self.sessionmaker is not None
        cutoff = clock.now() - dt.timedelta(days=self.settings.event_retention_days)
        async with self.sessionmaker() as db:
            n = await delete_older_than(db, cutoff)
        if n:
            log.info("event retention: deleted %d events before %s", n, cutoff)
        await fleet_retention(self.sessionmaker, self.settings)

    def _firmware_of(self, device_id: str) -> int | None:
        session = self.hub.sessions.get(device_id) if self.hub else None
        return session.firmware_version if session is not None else None

    async def _fleet_minute(self) -> None:
        """Once a minute, as a singleton: record the devices online now and the products'
        device counts in the fleet rollups, check the products' alert rules, then make the
        closed days' "most troubled" lists (:mod:`corral.fleet.tops`; a bounded number per
        pass, after the alerts so they never wait for them)."""
        assert self.sessionmaker is not None and self.writer is not None
        async with self.sessionmaker() as db:
            await sample_online(db)
            await db.commit()
        await fleet_alerts.run_pass(self.sessionmaker, self.writer,
                                    public_url=self.settings.resolved_public_url())
        async with self.sessionmaker() as db:
            await fleet_tops.make_lists(db, now=clock.now())

    def _metering_wake(self) -> None:
        """A plan or limit changed (after commit): every node's gate refreshes now."""
        self.metering.wake()
        self._tell_cluster("metering")

    def _auth_changed(self, info: dict[str, Any], caches: frozenset[str]) -> None:
        """A committed transaction changed tokens, users, customers, OAuth clients, products,
        organizations, memberships or a tenant check's table (corral.auth.cache): the
        caches it made stale (``caches``: the token cache, the tenant cache) are cleared on
        this node now, on the others when ``auth.changed`` reaches them. The publish is awaited before the request answers
        (``corral.db.session.commit``)."""
        self._clear_caches(caches)
        task = self._publish_soon(AUTH_CHANGED, {"node": self.node_id,
                                                 "caches": sorted(caches)})
        info.setdefault(AWAIT_AFTER_COMMIT, []).append(task)

    async def _on_auth_changed(self, msg: Message) -> None:
        caches: Any = None
        with contextlib.suppress(ValueError, AttributeError):
            body = msg.json()
            if body.get("node") == self.node_id:
                return
            caches = body.get("caches")
        # a message that names no caches (or is unreadable) clears both
        named = frozenset(c for c in caches if isinstance(c, str)) \
            if isinstance(caches, list) else None
        self._clear_caches(named or auth_cache.BOTH)

    def _clear_caches(self, caches: frozenset[str]) -> None:
        if auth_cache.SUBJECTS in caches:
            self.subject_cache.clear()
        if auth_cache.TENANTS in caches:
            self.tenant_cache.clear()

    def _tell_cluster(self, what: str) -> None:
        """Scaled out: the other nodes hear of a change their background work depends on."""
        if self.clustered:
            self._publish_soon(CLUSTER_WAKE, {"node": self.node_id, "what": what})

    def _publish_soon(self, subject: str, body: dict[str, Any]) -> asyncio.Task[None]:
        """Publish ``body`` from a task (callers are synchronous hooks); a failed publish
        is dropped (the bus is at-most-once anyway)."""
        bus = self.bus

        async def tell() -> None:
            with contextlib.suppress(Exception):
                await bus.publish(subject, body)

        task = asyncio.get_running_loop().create_task(tell())
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)
        return task

    async def _on_cluster_wake(self, msg: Message) -> None:
        try:
            body = msg.json()
            if body.get("node") == self.node_id:
                return
            what = body.get("what")
        except (ValueError, AttributeError):
            return
        if what == "metering":
            self.metering.wake()
        elif what == "integrations" and self.integrations is not None:
            self.integrations.changed()

    async def stop(self) -> None:
        """Stop everything, in order; a step that takes long is named in the log (a stuck
        shutdown says where it is stuck)."""
        step = "demo devices"
        started = time.monotonic()

        async def watch() -> None:
            while True:
                await asyncio.sleep(SLOW_STOP_S)
                log.warning("shutdown: still stopping %s after %.0f s", step,
                            time.monotonic() - started)

        watchdog = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stop_own_clients()
            if self.shared_budget is not None:
                step = "the shared rate-limit budget"
                await self.shared_budget.stop()
                self.shared_budget = None
            step = "the device listeners"
            for t in reversed(self.transports):
                with contextlib.suppress(Exception):
                    await t.stop()
            self.transports.clear()
            step = "deliveries and integrations"
            if self.delivery is not None:
                await self.delivery.stop()
            if self.ledger_sync is not None:
                await self.ledger_sync.stop()
            if self.integrations is not None:
                await self.integrations.stop()
            step = "the device hub"
            if self.hub:
                await self.hub.stop()
            step = "metering"
            await self.metering.stop()
            step = "background passes"
            for task in self._singletons:
                task.cancel()
            for task in self._singletons:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._singletons.clear()
            if self.leases is not None:
                await self.leases.stop()
            aclose = getattr(self.payments, "aclose", None)  # the Stripe adapter's client
            if aclose is not None:
                await aclose()
            if self.registry is not None:
                await self.registry.stop()
            step = "the event writer"
            if self.writer:
                await self.writer.stop()
            step = "fleet rollups, locations and vitals"
            if self.fleet is not None:  # after the writer: its last batches are counted
                with contextlib.suppress(Exception):
                    await self.fleet.stop()
            if self.locations is not None:
                await self.locations.drain()
            if self.vitals is not None:
                await self.vitals.drain()
            step = "the bus"
            await self.bus.close()
            step = "the mailer"
            if self.mailer:  # started by hand (the server runs its passes as a singleton)
                await self.mailer.stop()
            step = "the database engine"
            if self.engine:
                await self.engine.dispose()
        finally:
            watchdog.cancel()

def routers() -> list[APIRouter]:
    """Every domain's router, in mounting order (the permission-matrix test walks these)."""
    from corral.accounts.api import router as accounts_router
    from corral.audit.api import router as audit_router
    from corral.billing.api import router as billing_router
    from corral.cohorts.api import router as cohorts_router
    from corral.customers.api import router as customers_router
    from corral.devices.api import router as devices_router
    from corral.devices.claims_api import router as claims_router
    from corral.devices.credentials_api import router as credentials_router
    from corral.events.api import router as events_router
    from corral.firmware.api import router as firmware_router
    from corral.firmware.download_api import router as firmware_delivery_router
    from corral.fleet.api import router as fleet_router
    from corral.fleet.vitals_api import router as vitals_router
    from corral.integrations.api import router as integrations_router
    from corral.ledgers.api import router as ledgers_router
    from corral.ledgers.sync_api import router as ledger_sync_router
    from corral.locations.api import router as locations_router
    from corral.metering.agreements_api import router as agreements_router
    from corral.metering.api import router as metering_router
    from corral.orgs.api import router as orgs_router
    from corral.products.api import router as products_router
    from corral.rollouts.api import router as rollouts_router
    from corral.sessions.api import router as sessions_router
    from corral.transports.api import router as endpoints_router

    # events before devices (/v1/devices/events must win over /v1/devices/{id}); functions
    # and variables last (/v1/devices/{id}/{name} must not shadow any other device route)
    return [accounts_router, orgs_router, billing_router, products_router, audit_router,
            events_router,
            claims_router, credentials_router, customers_router, devices_router,
            cohorts_router,
            firmware_router, firmware_delivery_router, rollouts_router, metering_router,
            agreements_router,
            locations_router, integrations_router, ledgers_router, ledger_sync_router,
            vitals_router,
            endpoints_router,
            fleet_router,
            sessions_router]


def create_app(settings: Settings, *, runtime: Runtime | None = None,
               transports: bool = False) -> FastAPI:
    """The ASGI app. ``transports=True`` (``corral serve``) also opens the device listeners."""
    models.load()  # every table mapped before the first request
    rt = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await rt.start(app)
        try:
            if transports:
                await rt.start_transports()
            heap.settle_after_start(settings.gc_gen0_threshold)
            yield
        finally:
            await rt.stop()

    app = FastAPI(
        title="corral",
        version=corral.__version__,
        description="A self-hosted device cloud. `/v1` follows Particle's Device Cloud API.",
        lifespan=lifespan,
        docs_url=None,  # served by corral.web.openapi, with local assets
        openapi_url="/openapi.json",
        redoc_url=None,
        # off, FastAPI's telemetry hook costs nothing per request; on by default, every
        # request asked the global OpenTelemetry providers (three lookups and the
        # environment): ~5 % of a cached-token GET /v1/user (bench/README B1)
        telemetry=None if settings.http_telemetry else {
            "tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.state.runtime = rt
    errors.install(app)
    # a locked or inactive organization answers 402
    add_tenant_check(lock_check, fact=shut_status_sql, judge=judge_shut,
                     tables=(Subscription.__tablename__,))

    api = routers()
    if settings.node_role in ("all", "api"):  # gateways and workers: health and metrics only
        for router in api:
            app.include_router(router)
        from corral.console import install as install_console

        errors.add_html_errors(*install_console(app))  # the web console at / and /console/
        openapi.install(app, [route for router in api for route in router.routes])

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        """Liveness and database reachability."""
        try:
            async with request.app.state.sessionmaker() as db:
                await db.execute(text("SELECT 1"))
        except Exception as exc:  # report, never raise
            return JSONResponse({"ok": False, "database": repr(exc)[:200]}, status_code=503)
        body: dict[str, Any] = {"ok": True, "version": corral.__version__}
        if rt.clustered:
            body |= {"node": rt.node_id, "role": settings.node_role,
                     "bus": "connected" if getattr(rt.bus, "connected", True) else "down"}
        return JSONResponse(body)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    from corral.ledgers.schemas import CLOUD_ONLY_LIMIT

    bulk = [(r"^/v1/products/[^/]+/(devices|device_keys)/?$", settings.max_import_bytes),
            # a firmware upload: the binary plus the multipart framing and form fields
            (r"^/v1/products/[^/]+/firmware/?$", settings.firmware_max_bytes + 65_536),
            # a binary flashed to one device (PUT, multipart file)
            (r"^/v1/(products/[^/]+/)?devices/[^/]+/?$", settings.firmware_max_bytes + 65_536),
            # the console's Import dialog and firmware upload
            (r"^/console/products/[^/]+/devices/import$", settings.max_import_bytes),
            (r"^/console/products/[^/]+/firmware$", settings.firmware_max_bytes + 65_536),
            # a cloud-only ledger document: up to 1 MB of data plus its envelope
            (r"^/v1/((orgs|products)/[^/]+/)?ledgers/[^/]+/instances/[^/]+/?$",
             CLOUD_ONLY_LIMIT + 65_536)]
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, large=bulk)  # type: ignore[arg-type]
    app.add_middleware(RejectNul)  # type: ignore[arg-type]
    app.add_middleware(Metrics)  # type: ignore[arg-type]
    app.add_middleware(RateLimit, limiter=rt.limiter)  # type: ignore[arg-type]
    # outermost: every part below sees the real client address
    app.add_middleware(ClientAddress, trusted=settings.trusted_proxies)  # type: ignore[arg-type]
    routing.gate(app)  # a request skips a router none of whose paths fits in one regex test
    return app


def asgi_app() -> Any:  # pragma: no cover - for `uvicorn corral.web.app:asgi_app --factory`
    """Start it with ``--no-proxy-headers``: uvicorn otherwise believes X-Forwarded-For from
    127.0.0.1 (corral honours it from ``CORRAL_TRUSTED_PROXIES`` only)."""
    from corral.settings import get_settings

    return create_app(get_settings())
