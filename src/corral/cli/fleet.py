"""What ``corral simulate`` shares between its MQTT and Particle fleets: the state file that
keeps the fleet's devices, credentials and SIMs between runs, the refresh tick and the live
summary table."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import time
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import httpx
from rich.table import Table

from corral.cli import config
from corral.cli.client import TIMEOUT_S, Api
from corral.cli.output import errors, fail
from corral.device.simulator import FleetStats

API_CONCURRENCY = 16  # secret requests in flight
VERIFY_S = 15.0  # a connected device must show on the server within this long
VERIFY_SAMPLE = 5  # device IDs asked about per check
REFRESH_S = 0.5
STATE_VERSION = 1
DEVICE_ID_RE = re.compile(r"^[0-9a-f]{24}$")
# per device in the state file: the MQTT secret, the Particle key (PEM), whether the server
# has that key, and the SIM's ICCID of a cellular device (--cellular)
KEPT_FIELDS = ("secret", "rsa_key", "rsa_registered", "ec_key", "ec_registered", "iccid")
ICCID_PREFIX = "89"  # ITU-T E.118: the telecommunications industry
ICCID_DIGITS = 19  # with the check digit
SIMULATED_ICCID_RE = re.compile(r"^89[0-9]{17,18}$")


def luhn_digit(digits: str) -> str:
    """The Luhn check digit to append to ``digits``."""
    total = 0
    for i, ch in enumerate(reversed(digits)):  # from the right, every other one doubled
        n = int(ch) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return str(-total % 10)


def valid_sim_iccid(value: object) -> bool:
    """A simulated SIM's ICCID: 19 or 20 digits starting ``89``, the last a Luhn check digit."""
    return isinstance(value, str) and SIMULATED_ICCID_RE.fullmatch(value) is not None \
        and luhn_digit(value[:-1]) == value[-1]


def new_iccid() -> str:
    """A random ICCID of ``ICCID_DIGITS`` digits: ``89``, random digits, the check digit."""
    body = ICCID_PREFIX + "".join(secrets.choice("0123456789")
                                  for _ in range(ICCID_DIGITS - len(ICCID_PREFIX) - 1))
    return body + luhn_digit(body)


def give_sims(devices: list[dict[str, str]], others: list[dict[str, str]]) -> None:
    """Give each of ``devices`` without a usable ICCID a new one, unique among ``devices``
    and ``others`` (the rest of the state file, whose SIMs stay as they are)."""
    taken = {d["iccid"] for d in others if valid_sim_iccid(d.get("iccid"))}
    for d in devices:
        iccid = d.get("iccid")
        if iccid is None or not valid_sim_iccid(iccid) or iccid in taken:
            while (iccid := new_iccid()) in taken:
                pass
            d["iccid"] = iccid
        taken.add(iccid)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "default"


def default_state_path(a: Api, product: str) -> Path:
    """``<config dir>/simulate/<server>-<product>.json``: one fleet per server and product."""
    netloc = urlsplit(a.api_url).netloc or a.api_url
    return a.config_path.parent / "simulate" / f"{_safe(netloc)}-{_safe(product)}.json"


MAX_STATE_SLOTS = 50  # default state files tried per server and product


def _try_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on ``<path>.lock`` (held while the file stays open), or None when
    another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = (path.parent / f"{path.name}.lock").open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def claim_state(path: Path | None, a: Api, product: str) -> tuple[Path, IO[str]]:
    """The state file this run owns, locked for as long as the returned handle stays open.

    Two simulators never share a fleet: with the default path, a second run of the same
    server and product takes the next free default (``...-2.json``) and says so; a ``--state``
    another run holds is refused."""
    if path is not None:
        held = _try_lock(path)
        if held is None:
            fail(f"{path} is in use by another `corral simulate`; give this run its own "
                 "--state file (or leave --state out).", code=2)
        return path, held
    first = default_state_path(a, product)
    for slot in range(1, MAX_STATE_SLOTS + 1):
        candidate = first if slot == 1 else first.with_name(f"{first.stem}-{slot}{first.suffix}")
        held = _try_lock(candidate)
        if held is not None:
            if slot > 1:
                errors.print(f"Another `corral simulate` runs the fleet in {first}; this run "
                             f"uses its own: {candidate}.", highlight=False, soft_wrap=True)
            return candidate, held
    fail(f"{MAX_STATE_SLOTS} simulators of {product} already run on this machine.", code=2)


def load_state(path: Path, a: Api, product: str) -> list[dict[str, str]]:
    """The devices a previous run left for this server and product (others are ignored)."""
    data = config.load(path)
    if not data:
        return []
    if data.get("api_url") != a.api_url or str(data.get("product")) != product:
        errors.print(f"[yellow]Warning:[/] {path} belongs to another server or product; "
                     "starting a new fleet.", highlight=False)
        return []
    out: list[dict[str, str]] = []
    for entry in data.get("devices") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) \
                and DEVICE_ID_RE.fullmatch(entry["id"]):
            out.append({"id": entry["id"], **{k: v for k in KEPT_FIELDS
                                               if isinstance(v := entry.get(k), str) and v}})
    return out


def save_state(path: Path, a: Api, product: str, devices: list[dict[str, str]]) -> None:
    config.save(path, {"version": STATE_VERSION, "api_url": a.api_url, "product": product,
                       "devices": devices})


async def tick(stop: asyncio.Event, deadline: float | None) -> bool:
    """Wait one refresh period; False once stopped (signal) or past the deadline."""
    wait = REFRESH_S if deadline is None else min(REFRESH_S, deadline - time.monotonic())
    if stop.is_set() or wait <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), wait)
    return not stop.is_set()


class FleetView(Protocol):
    """What the summary shows of a fleet (MQTT or Particle)."""

    @property
    def stats(self) -> FleetStats: ...
    @property
    def connected(self) -> int: ...
    @property
    def ever_connected(self) -> int: ...


def summary(fleet: FleetView, started: float, duration: float | None) -> Table:
    s = fleet.stats
    elapsed = time.monotonic() - started
    t = Table(title="corral simulate", title_justify="left")
    for name in ("devices", "online", "events", "refused", "failed", "calls", "reconnects",
                 "elapsed"):
        t.add_column(name, justify="right", no_wrap=True)
    limit = f"/{duration:g}s" if duration else "s"
    t.add_row(f"{s.devices:,}", f"{fleet.connected:,}", f"{s.events_sent:,}",
              f"{s.events_refused:,}", f"{s.events_failed:,}", f"{s.calls_answered:,}",
              f"{s.connects - fleet.ever_connected:,}", f"{elapsed:,.0f}{limit}")
    return t


def connected_ids(fleet: Any) -> list[str]:
    """The IDs of the fleet's devices that have connected at least once (MQTT or Particle)."""
    out = []
    for d in fleet.devices:
        connects = d.connects if hasattr(d, "connects") else d.device.connects
        if connects:
            out.append(d.device_id)
    return out


async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless stopped first; False once stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return not stop.is_set()


class ServerCheck:
    """Did the server see the fleet? A device can "connect" to another program on the port
    (a local Mosquitto on 1883 accepts anyone): ``corral simulate`` reports success only when
    corral itself shows one of the connected devices online or heard from."""

    def __init__(self, a: Api, product: str) -> None:
        self.a = a
        self.product = product
        self.seen: bool | None = None  # None: not known yet

    async def ask(self, ids: list[str]) -> bool:
        """One look at a few of ``ids`` on the server."""
        headers = {"User-Agent": "corral-cli", "Authorization": f"Bearer {self.a.token}"}
        async with httpx.AsyncClient(base_url=self.a.api_url, timeout=TIMEOUT_S,
                                     headers=headers) as http:
            for did in ids[:VERIFY_SAMPLE]:
                try:
                    r = await http.get(f"/v1/products/{self.product}/devices/{did}")
                    body = r.json() if r.status_code == 200 else {}
                except (httpx.HTTPError, ValueError):
                    continue
                if isinstance(body, dict) and (body.get("online") or body.get("last_heard")):
                    self.seen = True
                    return True
        return False

    async def watch(self, fleet: Any, stop: asyncio.Event) -> None:
        """Once devices connected: wait for the server to see one (``VERIFY_S``); if it never
        does, say so and stop the run."""
        while not connected_ids(fleet):
            if not await _pause(stop, 0.2):
                return
        deadline = time.monotonic() + VERIFY_S
        while not await self.ask(connected_ids(fleet)):
            if time.monotonic() > deadline:
                self.seen = False
                stop.set()
                return
            if not await _pause(stop, 1.0):
                return

    async def verdict(self, fleet: Any) -> str | None:
        """At the end: None when the server saw the fleet, else why the run failed."""
        ids = connected_ids(fleet)
        if not ids:
            return "no device could connect"
        if self.seen or await self.ask(ids):
            return None
        return (f"{len(ids)} device(s) connected to {fleet.host}:{fleet.port}, but the corral "
                f"server at {self.a.api_url} never saw them: another program (an MQTT broker?) "
                "holds that port. Leave out the port option to use the one the server "
                "reports (GET /v1/device_endpoints), or give the one `corral serve` prints")
