"""Demo data for ``corral serve --demo``: an owner account, an organization (subscribed to
Basic with one block on the fake payment provider), a product and a small fleet of devices
in it.

:func:`ensure_demo` is idempotent: each piece is looked up first and only created when
missing, so running it again changes nothing. Each piece is one ``_ensure_*`` step.

The fleet: ``DEMO_FLEET_SIZE`` devices imported into the product, with IDs derived from a
fixed seed (the same on every machine), named ``demo-sensor-01``..., the first
``DEMO_BETA_SIZE`` in group ``beta`` and the rest in ``field``, the first
``DEMO_DEVELOPMENT_SIZE`` marked as development devices; plus one device left in quarantine,
as if an unknown device had connected claiming the product. Only devices whose ID does not
exist at all are created and set up, so a device the user changed, moved or denied is left
as it is.

:func:`start_demo_fleet` makes the first ``settings.demo_simulated_devices`` approved fleet
devices live: each gets a fresh MQTT secret and runs as a simulated sensor (the device SDK's
:class:`~corral.device.simulator.Fleet`) against this server's own MQTT listener, publishing
``sim/temperature`` every few seconds and answering functions and variables.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.accounts import service as accounts
from corral.auth.models import User
from corral.auth.subject import Subject
from corral.billing import service as billing
from corral.billing import subscriptions
from corral.billing.providers import FakeProvider
from corral.db.session import commit
from corral.device.simulator import Fleet
from corral.devices import credentials, importer
from corral.devices import groups as device_groups
from corral.devices import service as devices
from corral.devices.access import find_device
from corral.devices.schemas import GroupCreate, ProductDeviceChange
from corral.kit import clock
from corral.orgs import service as orgs
from corral.orgs.models import Organization
from corral.products import service as products
from corral.products.access import product_role
from corral.products.models import Product
from corral.products.schemas import ProductCreate
from corral.settings import Settings

DEMO_ORG = "Demo Org"
DEMO_PRODUCT = "Demo Product"
DEMO_PLATFORM_ID = 12  # Argon
DEMO_DESCRIPTION = "Created by `corral serve --demo`."

DEMO_PLAN = "basic"  # the demo org's subscription (fake payment provider only)
DEMO_BLOCKS = 1
DEMO_PAYMENT_METHOD = "pm_card_visa"  # the fake provider's (and Stripe's) test card

DEMO_FLEET_SEED = "corral-demo-fleet"
DEMO_FLEET_SIZE = 24
DEMO_BETA_SIZE = 6  # the first devices are in "beta", the rest in "field"
DEMO_DEVELOPMENT_SIZE = 2  # the first devices are development devices
DEMO_RELEASE_VERSION = 2  # the demo firmware released as a phased rollout
DEMO_ROLLOUT_PERCENT = 50
DEMO_SIM_INTERVAL_S = 5.0  # seconds between a live demo device's events
DEMO_GROUPS = {"beta": ("#a855f7", "Early adopters: get new firmware first"),
               "field": ("#22c55e", "Deployed sensors")}


def demo_device_id(n: int) -> str:
    """The ID of demo device ``n`` (1-based; 0 is the quarantined one): 24 lowercase hex."""
    return hashlib.sha256(f"{DEMO_FLEET_SEED}:{n}".encode()).hexdigest()[:24]


def demo_device_name(n: int) -> str:
    return f"demo-sensor-{n:02d}"


def demo_device_groups(n: int) -> list[str]:
    return ["beta"] if n <= DEMO_BETA_SIZE else ["field"]


DEMO_FLEET_IDS = [demo_device_id(n) for n in range(1, DEMO_FLEET_SIZE + 1)]
DEMO_QUARANTINED_ID = demo_device_id(0)


@dataclass
class DemoInfo:
    username: str
    password: str
    org_id: int
    org_slug: str
    product_id: int
    product_slug: str
    created: list[str] = field(default_factory=list)  # what this run added ("user", ...)
    devices: int = 0  # devices in the demo product now
    quarantined: int = 0  # of those, waiting in quarantine
    live: int = 0  # of the others, how many `serve --demo` runs as simulated MQTT devices

    @property
    def fleet_summary(self) -> str:
        """The demo product's devices for the serve banner, e.g. "25 (1 in quarantine,
        5 live over MQTT)"."""
        notes = [f"{self.quarantined} in quarantine"] if self.quarantined else []
        if self.live:
            notes.append(f"{self.live} live over MQTT")
        return f"{self.devices} ({', '.join(notes)})" if notes else str(self.devices)


def _owner(user: User) -> Subject:
    """The demo owner as the actor of demo set-up steps (audit entries name them)."""
    return Subject(kind="user", token_id=0, client="corral-demo", user_id=user.id,
                   username=user.username)


async def ensure_demo(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
                      ) -> DemoInfo:
    """Make sure the demo owner, "Demo Org", "Demo Product" and its fleet exist (one
    transaction)."""
    created: list[str] = []
    async with sessionmaker() as db:
        user = await _ensure_user(db, settings, created)
        # the steps below act as the demo owner (audit entries name them), without a token
        owner = _owner(user)
        org = await _ensure_org(db, owner, created)
        product = await _ensure_product(db, owner, org, created)
        await _ensure_fleet(db, owner, product, created)
        await _ensure_quarantined(db, product, created)
        await _ensure_subscription(db, settings, owner, org, created)
        await _ensure_release(db, settings, owner, product, created)
        total, quarantined = await _fleet_counts(db, product)
        await commit(db)
    live = 0
    if settings.demo and (settings.mqtt_port or settings.mqtt_tls_port):
        live = min(settings.demo_simulated_devices, total - quarantined)
    return DemoInfo(username=user.username, password=settings.demo_password, org_id=org.id,
                    org_slug=org.slug, product_id=product.id, product_slug=product.slug,
                    created=created, devices=total, quarantined=quarantined, live=live)


async def _ensure_user(db: AsyncSession, settings: Settings, created: list[str]) -> User:
    user = await accounts.find_user(db, accounts.normalize_email(settings.demo_username))
    if user is None:
        user = await accounts.create_user(db, settings, username=settings.demo_username,
                                          password=settings.demo_password,
                                          account_info={"first_name": "Demo"})
        created.append("user")
    return user


async def _ensure_org(db: AsyncSession, owner: Subject, created: list[str]) -> Organization:
    for org, _role in await orgs.list_orgs(db, actor=owner):
        if not org.personal and org.name == DEMO_ORG:
            return org
    created.append("org")
    return await orgs.new_org(db, actor=owner, name=DEMO_ORG, ip=None)  # type: ignore[arg-type]


async def _ensure_subscription(db: AsyncSession, settings: Settings, owner: Subject,
                               org: Organization, created: list[str]) -> None:
    """Subscribe the demo organization to Basic with one block, monthly, paid with the fake
    provider's test card, so billing, usage and invoices have something to show. Only with
    the fake provider (a demo never charges a real card), and only once: a subscription the
    user changed or cancelled is left as it is."""
    if settings.payment_provider != "fake":
        return
    if await subscriptions.get_subscription(db, org.id) is not None:
        return
    outcome = await billing.subscribe(
        db, settings, FakeProvider(), org=org, actor=owner, ip="127.0.0.1",
        plan_code=DEMO_PLAN, interval="month", blocks=DEMO_BLOCKS,
        payment_method=DEMO_PAYMENT_METHOD, pause_devices_when_locked=None, now=clock.now())
    if not outcome.declined:
        created.append("subscription")


async def _ensure_product(db: AsyncSession, owner: Subject, org: Organization,
                          created: list[str]) -> Product:
    for view in await products.org_products(db, org):
        if view.product.name_key == DEMO_PRODUCT.lower():
            return view.product
    created.append("product")
    req = ProductCreate(name=DEMO_PRODUCT, platform_id=DEMO_PLATFORM_ID,
                        description=DEMO_DESCRIPTION)
    view = await products.create_product(db, actor=owner, org=org, req=req,
                                         ip=None)  # type: ignore[arg-type]
    return view.product


async def _missing(db: AsyncSession, ids: list[str]) -> list[str]:
    """The IDs no device has (in any product, or none)."""
    return [did for did in ids if await find_device(db, did, None) is None]


async def _ensure_fleet(db: AsyncSession, owner: Subject, product: Product,
                        created: list[str]) -> None:
    """Import the demo devices that do not exist yet, then name, group and mark those."""
    new = await _missing(db, DEMO_FLEET_IDS)
    if not new:
        return
    await importer.import_devices(db, actor=owner, ip=None,  # type: ignore[arg-type]
                                  product=product, request=importer.ImportInput(entries=new))
    existing = {g.name for g, _n in await device_groups.list_groups(db, product)}
    for name, (color, description) in DEMO_GROUPS.items():
        if name not in existing:
            await device_groups.create_group(db, actor=owner, ip=None,  # type: ignore[arg-type]
                                             product=product, req=GroupCreate(
                                                 name=name, color=color,
                                                 description=description))
    role = await product_role(db, owner.user_id, product) if owner.user_id else None
    for n, did in enumerate(DEMO_FLEET_IDS, start=1):
        if did not in new:
            continue
        device = await find_device(db, did, None)
        assert device is not None and device.product_id == product.id
        change = ProductDeviceChange(name=demo_device_name(n), groups=demo_device_groups(n),
                                     **({"development": True}
                                        if n <= DEMO_DEVELOPMENT_SIZE else {}))
        await devices.update_device(db, actor=owner, ip=None,  # type: ignore[arg-type]
                                    device=device, req=change, product=product, role=role)
    created.append("devices")


async def _ensure_release(db: AsyncSession, settings: Settings, owner: Subject,
                          product: Product, created: list[str]) -> None:
    """A release in progress for the console to show: version 2 of the demo product's
    firmware (opaque, as MQTT devices take it), the product default as a phased rollout to
    half of the fleet. Simulated devices it admits update (and restart); offline ones stay
    pending, so the rollout stays live. Only when the product has no firmware yet."""
    from corral.firmware import releases
    from corral.firmware import service as firmware
    from corral.firmware.schemas import FirmwareFields, Release
    from corral.rollouts.schemas import RolloutShares

    if await firmware.product_firmware(db, product):
        return
    data = b"".join(f"corral demo firmware v{DEMO_RELEASE_VERSION} block {i:04d}\n".encode()
                    for i in range(256))
    await firmware.create_firmware(
        db, actor=owner, ip=None, product=product, settings=settings,  # type: ignore[arg-type]
        upload=firmware.Upload(data, "demo-v2.bin", FirmwareFields(
            version=DEMO_RELEASE_VERSION, title="Faster sampling",
            description="The demo's release in progress: half of the fleet first.")))
    await releases.release(db, actor=owner, ip=None, product=product,  # type: ignore[arg-type]
                           req=Release(version=DEMO_RELEASE_VERSION, product_default=True,
                                       rollout=RolloutShares(percent=DEMO_ROLLOUT_PERCENT)))
    created.append("release")


async def _ensure_quarantined(db: AsyncSession, product: Product, created: list[str]) -> None:
    """One device that "connected" without being imported: admitted as the product's
    quarantine setting says (quarantined by default). Nothing connects it for real."""
    if not await _missing(db, [DEMO_QUARANTINED_ID]):
        return
    await devices.admit(db, device_id=DEMO_QUARANTINED_ID, product_id=product.id,
                        platform_id=product.platform_id)
    created.append("quarantined device")


async def _fleet_counts(db: AsyncSession, product: Product) -> tuple[int, int]:
    """How many devices the product has, and how many of them wait in quarantine."""
    everything = await devices.list_product_devices(db, product, devices.DeviceQuery(per_page=1))
    waiting = await devices.list_product_devices(
        db, product, devices.DeviceQuery(per_page=1, quarantined=True))
    return everything.total, waiting.total


# --- live simulated devices (`corral serve --demo`) ------------------------------------------

log = logging.getLogger("corral.demo")


async def _demo_product(db: AsyncSession, settings: Settings) -> tuple[Subject, Product] | None:
    """The demo owner and "Demo Product", when :func:`ensure_demo` made them."""
    user = await accounts.find_user(db, accounts.normalize_email(settings.demo_username))
    if user is None:
        return None
    owner = _owner(user)
    for org, _role in await orgs.list_orgs(db, actor=owner):
        if not org.personal and org.name == DEMO_ORG:
            for view in await products.org_products(db, org):
                if view.product.name_key == DEMO_PRODUCT.lower():
                    return owner, view.product
    return None


async def live_demo_credentials(sessionmaker: async_sessionmaker[AsyncSession],
                                settings: Settings) -> list[tuple[str, str]]:
    """``(device ID, new MQTT secret)`` for the first ``demo_simulated_devices`` fleet devices
    that are approved in the demo product (one transaction; the old secrets stop working)."""
    want = settings.demo_simulated_devices
    out: list[tuple[str, str]] = []
    async with sessionmaker() as db:
        found = await _demo_product(db, settings)
        if found is None or not want:
            return out
        owner, product = found
        for did in DEMO_FLEET_IDS:
            device = await find_device(db, did, None)
            if device is None or device.product_id != product.id or device.quarantined \
                    or device.denied:
                continue
            secret = await credentials.rotate_mqtt_secret(db, actor=owner, ip=None,
                                                          device=device)
            out.append((device.id, secret))
            if len(out) >= want:
                break
        await commit(db)
    return out


def _mqtt_endpoint(runtime: Any) -> tuple[str, int, ssl.SSLContext | None] | None:
    """Where the demo devices connect: the running plain MQTT listener, else the TLS one
    (our own server on this machine: its certificate is not checked)."""
    listeners = [t for t in runtime.transports if isinstance(getattr(t, "port", None), int)
                 and getattr(t, "port", 0) > 0]
    listeners.sort(key=lambda t: bool(getattr(t, "tls", False)))  # plain first
    if not listeners:
        return None
    listener = listeners[0]
    host = str(getattr(listener, "host", "") or "127.0.0.1")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    context = None
    if getattr(listener, "tls", False):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return host, int(listener.port), context


class _NoFleet:
    """What :func:`start_demo_fleet` returns when there is nothing to run."""

    async def stop(self) -> None:
        return None


async def start_demo_fleet(runtime: Any) -> Fleet | _NoFleet:
    """Run the first ``settings.demo_simulated_devices`` approved demo devices as simulated
    MQTT devices against this server's listener; returns the fleet (``await .stop()``)."""
    settings: Settings = runtime.settings
    endpoint = _mqtt_endpoint(runtime)
    if endpoint is None:
        log.warning("demo: no MQTT listener is running; the demo devices stay offline")
        return _NoFleet()
    creds = await live_demo_credentials(runtime.sessionmaker, settings)
    if not creds:
        log.warning("demo: no approved demo device to run")
        return _NoFleet()
    host, port, context = endpoint
    labels = [demo_device_name(DEMO_FLEET_IDS.index(did) + 1) for did, _s in creds]
    fleet = Fleet(creds, host, port, interval=DEMO_SIM_INTERVAL_S, tls=context,
                  labels=labels, connect_concurrency=10, ledgers=True)
    await fleet.start()
    log.info("demo: %d simulated devices connecting to %s:%d", len(creds), host, port)
    return fleet
