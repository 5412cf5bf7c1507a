"""Ledgers on the device side (docs/mqtt.md "Ledgers"): the documents the cloud syncs to a
device (cloud-to-device ledgers) and the ones a device writes (device-to-cloud).

:meth:`corral.device.Device.ledger` returns a :class:`Ledger`. The device subscribes to
``devices/{id}/ledgers/#`` once any ledger is asked for, and after every connect tells the
cloud what it holds (``devices/{id}/ledgers/sync`` ``{"have": {name: version}}``); the cloud
sends each cloud-to-device ledger whose version differs on ``devices/{id}/ledgers/{name}``.
A document is applied only when its version is newer than the one held (a version already
acknowledged is never applied again, an older one never replaces it); each applied version
is acknowledged on ``devices/{id}/ledgers/{name}/applied``.

With ``store`` (a file path) the documents survive a restart: the device then asks only for
what changed. Without it they live as long as the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("corral.device.ledgers")

NAME_RE = re.compile(r"^[a-z0-9-]{1,32}$")
ChangeHandler = Callable[["Ledger"], Awaitable[None] | None]


def check_ledger_name(name: str) -> None:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ValueError("a ledger name is 1 to 32 lowercase letters, digits and '-'")


class Ledger:
    """One ledger as this device sees it. ``version`` is 0 and ``data`` None until the
    cloud has sent it (or, for a device-to-cloud ledger, until this device set it)."""

    def __init__(self, book: LedgerBook, name: str) -> None:
        self._book = book
        self.name = name
        self.version = 0
        self.data: dict[str, Any] | None = None
        self.updated_at: str | None = None
        self.scope: str | None = None
        self._handlers: list[ChangeHandler] = []
        self._arrived = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Ledger {self.name} v{self.version}>"

    def get(self) -> dict[str, Any]:
        """A copy of the document ({} until the cloud has sent it)."""
        return copy.deepcopy(self.data) if self.data is not None else {}

    def on_change(self, handler: ChangeHandler) -> ChangeHandler:
        """Call ``handler(ledger)`` each time the cloud sends a newer version (plain or
        coroutine function; usable as a decorator)."""
        self._handlers.append(handler)
        return handler

    async def wait(self, *, version: int | None = None, within: float = 30.0) -> Ledger:
        """Wait until the cloud has sent this ledger (at least ``version`` of it), at most
        ``within`` seconds (:class:`TimeoutError`)."""
        async with asyncio.timeout(within):
            while self.data is None or (version is not None and self.version < version):
                self._arrived.clear()
                await self._arrived.wait()
        return self

    async def set(self, data: dict[str, Any], *, merge: bool = False) -> None:
        """Write this device's device-to-cloud ledger: replace the document, or merge
        ``data``'s keys into it. Returns once the cloud committed the new version;
        :class:`~corral.device.errors.PublishRefused` says why it refused (not a
        device-to-cloud ledger, invalid against its schema, too large)."""
        if not isinstance(data, dict):
            raise ValueError("a ledger document is a JSON object")
        body = {"data": data, "set_mode": "Merge" if merge else "Replace"}
        await self._book.send(f"{self.name}/set", body)
        merged = {**(self.data or {}), **data} if merge else data
        self.data = copy.deepcopy(merged)


class LedgerBook:
    """The device's ledgers, keyed by name (one per :class:`~corral.device.Device`)."""

    def __init__(self, send: Callable[[str, dict[str, Any]], Awaitable[None]],
                 store: str | os.PathLike[str] | None = None) -> None:
        self._send = send
        self.store = Path(store) if store is not None else None
        self.ledgers: dict[str, Ledger] = {}
        self.wanted = False  # subscribe to ledgers/# on connect
        self.listeners: list[ChangeHandler] = []  # told of every ledger's new version
        if self.store is not None and self.store.exists():
            self._load(self.store)

    def ledger(self, name: str) -> Ledger:
        check_ledger_name(name)
        self.wanted = True
        found = self.ledgers.get(name)
        if found is None:
            found = self.ledgers[name] = Ledger(self, name)
        return found

    async def send(self, rest: str, body: dict[str, Any]) -> None:
        await self._send(rest, body)

    def have(self) -> dict[str, int]:
        """What this device holds: name -> version (the sync it sends after connecting)."""
        return {n: led.version for n, led in self.ledgers.items() if led.version > 0}

    async def received(self, name: str, payload: bytes) -> None:
        """A document from the cloud on ``ledgers/{name}``: applied when newer, then
        acknowledged (an already held version is acknowledged again, an older one ignored)."""
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if (not isinstance(doc, dict) or NAME_RE.fullmatch(name) is None
                or type(doc.get("version")) is not int or not isinstance(doc.get("data"), dict)):
            log.warning("ledger %s: a message that is not a ledger document was ignored", name)
            return
        led = self.ledgers.get(name) or self.ledger(name)
        version = doc["version"]
        if version < led.version:
            log.info("ledger %s: version %d is older than %d; ignored", name, version,
                     led.version)
            return
        if version > led.version:
            led.version, led.data = version, doc["data"]
            led.updated_at, led.scope = doc.get("updated_at"), doc.get("scope")
            self._save()
            led._arrived.set()
            for handler in [*led._handlers, *self.listeners]:
                await self._run(handler, led)
        await self._send(f"{name}/applied", {"version": version})

    async def _run(self, handler: ChangeHandler, led: Ledger) -> None:
        try:
            result = handler(led)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("ledger %s: change handler failed", led.name)

    def _load(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ledger store %s unreadable (%s); starting empty", path, exc)
            return
        for name, item in (stored.get("ledgers") or {}).items():
            if NAME_RE.fullmatch(name) and isinstance(item, dict) \
                    and type(item.get("version")) is int and isinstance(item.get("data"), dict):
                led = self.ledgers[name] = Ledger(self, name)
                led.version, led.data = item["version"], item["data"]
                led.updated_at, led.scope = item.get("updated_at"), item.get("scope")

    def _save(self) -> None:
        if self.store is None:
            return
        doc = {"ledgers": {n: {"version": led.version, "data": led.data,
                               "updated_at": led.updated_at, "scope": led.scope}
                           for n, led in self.ledgers.items() if led.version > 0}}
        tmp = self.store.with_suffix(self.store.suffix + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(doc), "utf-8")
            os.replace(tmp, self.store)


__all__ = ["Ledger", "LedgerBook", "check_ledger_name"]
