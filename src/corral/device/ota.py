"""Firmware updates for SDK devices (the device side of ``docs/mqtt.md`` "Firmware updates").

The cloud publishes ``devices/{id}/ota/offer``::

    {"version": 7, "size": 1048576, "sha256": "<hex>", "signature": "<base64>"|null,
     "key_id": "..."|null, "url": "https://.../v1/firmware/downloads/{token}",
     "chunk_size": 1048576, "public_keys": ["<base64>", ...]}

:class:`OtaUpdater` downloads ``url`` in HTTP Range requests of ``chunk_size``, streamed (a
download cut short resumes from the last byte received, also across offers of the same image
while the updater lives; a restarted process starts again), checks the SHA-256
and the Ed25519 signature (against ``trusted_keys`` when given, else the offer's
``public_keys``), hands the image to the application's ``apply`` handler, reports
``devices/{id}/ota/status`` ``{"state": "downloading"|"applied"|"failed", "reason", "bytes"}``
and restarts: it describes the new ``firmware_version`` and reconnects. An image that fails a
check is never applied: the device reports ``failed`` with the reason and drops what it
downloaded (the cloud offers it again, up to its attempt limit).

``ota/pending`` ``{"pending": true}`` says an update waits while the device has updates
disabled (``Device.describe(updates_enabled=False)``); :attr:`OtaUpdater.pending` keeps it.
``ota/forced`` ``{"forced": true}`` comes before the offer of a forced update (the device has
updates disabled, and the product forces them); :attr:`OtaUpdater.forced` keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from corral.device.client import Device

log = logging.getLogger("corral.device.ota")

ApplyHandler = Callable[["Offer", bytes], Awaitable[None] | None]
MAX_IMAGE = 64 * 1024 * 1024


class OtaError(Exception):
    """An update cannot be used (``reason`` is reported to the cloud)."""


@dataclass(frozen=True)
class Offer:
    version: int
    size: int
    sha256: str
    url: str
    chunk_size: int
    signature: str | None
    key_id: str | None
    public_keys: tuple[str, ...]

    @classmethod
    def parse(cls, payload: bytes) -> Offer:
        try:
            body = json.loads(payload)
        except ValueError:
            raise OtaError("the offer is not JSON") from None
        if not isinstance(body, dict):
            raise OtaError("the offer is not a JSON object")
        version, size, sha, url = (body.get("version"), body.get("size"), body.get("sha256"),
                                   body.get("url"))
        chunk = body.get("chunk_size") or 1_048_576
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (version, size, chunk)):
            raise OtaError("version, size and chunk_size must be integers")
        assert isinstance(version, int) and isinstance(size, int) and isinstance(chunk, int)
        if not 0 < size <= MAX_IMAGE or chunk <= 0:
            raise OtaError(f"the image size {size} is not acceptable")
        if not isinstance(sha, str) or len(sha) != 64:
            raise OtaError("sha256 must be 64 hexadecimal characters")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise OtaError("the offer has no download url")
        keys = body.get("public_keys") or []
        sig, key_id = body.get("signature"), body.get("key_id")
        return cls(version=version, size=size, sha256=sha.lower(), url=url, chunk_size=chunk,
                   signature=sig if isinstance(sig, str) else None,
                   key_id=key_id if isinstance(key_id, str) else None,
                   public_keys=tuple(k for k in keys if isinstance(k, str)))


class OtaUpdater:
    """Firmware updates for ``device``: ``OtaUpdater(device, apply).attach()`` before
    connecting. ``apply(offer, image)`` installs the checked image (raise to refuse it);
    afterwards the updater reports ``applied``, describes ``offer.version`` and reconnects.

    ``trusted_keys``: the product's Ed25519 public keys (base64/hex) the device trusts; when
    given, the offer's own keys are ignored. ``require_signature``: refuse unsigned images.
    """

    def __init__(self, device: Device, apply: ApplyHandler | None = None, *,
                 trusted_keys: Iterable[str] | None = None, require_signature: bool = False,
                 restart: bool = True, http: httpx.AsyncClient | None = None,
                 report_every: int = 4) -> None:
        self.device = device
        self.apply = apply
        self.trusted_keys = list(trusted_keys) if trusted_keys is not None else None
        self.require_signature = require_signature
        self.restart = restart
        self.report_every = max(1, report_every)  # downloading reports per image
        self._http = http  # given: shared, the caller closes it
        self._own_http: httpx.AsyncClient | None = None  # made on first use, kept
        self.pending = False
        self.forced = False  # the cloud said the next update is forced (ota/forced)
        self.applied: list[int] = []  # versions applied, in order
        self.failures: list[str] = []  # reasons reported
        self._partial: dict[str, bytearray] = {}  # sha256 -> bytes downloaded so far
        self._current: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def attach(self) -> OtaUpdater:
        self.device.on_ota(self.handle)
        return self

    async def handle(self, subtopic: str, payload: bytes) -> None:
        if subtopic == "pending":
            with contextlib.suppress(ValueError, AttributeError):
                self.pending = bool(json.loads(payload).get("pending"))
            return
        if subtopic == "forced":
            with contextlib.suppress(ValueError, AttributeError):
                self.forced = bool(json.loads(payload).get("forced"))
            return
        if subtopic != "offer":
            return
        try:
            offer = Offer.parse(payload)
        except OtaError as exc:
            await self._report("failed", reason=f"bad offer: {exc}")
            return
        if self._current is not None and not self._current.done():
            return  # one update at a time; the cloud offers again if this one fails
        self.pending = False
        task = asyncio.get_running_loop().create_task(self._update(offer))
        self._current = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, within: float = 30.0) -> None:
        """Wait for the update in progress (tests)."""
        async with asyncio.timeout(within):
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_http is not None:
            await self._own_http.aclose()
            self._own_http = None

    async def _update(self, offer: Offer) -> None:
        try:
            image = await self._download(offer)
            self._check(offer, image)
            if self.apply is not None:
                result = self.apply(offer, image)
                if inspect.isawaitable(result):
                    await result
        except OtaError as exc:
            self.failures.append(str(exc))
            await self._report("failed", reason=str(exc))
            return
        except (httpx.HTTPError, OSError) as exc:
            reason = f"download failed: {exc!r}"[:300]
            self.failures.append(reason)
            await self._report("failed", reason=reason,
                               received=len(self._partial.get(offer.sha256, b"")))
            return
        except Exception as exc:  # the application refused or failed to apply it
            self.failures.append(f"apply failed: {exc!r}")
            await self._report("failed", reason=f"apply failed: {exc!r}"[:300])
            return
        self.applied.append(offer.version)
        await self._report("applied", received=offer.size)
        if self.restart:
            # the new version is described on the next connection only: a describe sent on
            # this one could race the disconnect
            self.device._facts["firmware_version"] = offer.version
            await self.device.reconnect()

    async def _download(self, offer: Offer) -> bytes:
        buf = self._partial.setdefault(offer.sha256, bytearray())
        if len(buf) > offer.size:
            buf.clear()
        client = self._http
        if client is None:  # one client per updater (making one costs milliseconds of CPU)
            if self._own_http is None:
                self._own_http = httpx.AsyncClient(timeout=30.0)
            client = self._own_http
        step = max(1, offer.size // self.report_every)
        next_report = len(buf) + step
        while len(buf) < offer.size:
            end = min(offer.size, len(buf) + offer.chunk_size) - 1
            before = len(buf)
            # streamed: what arrives is kept even when the response is cut short (a resume
            # then starts from the last byte received, not from the request's start)
            async with client.stream("GET", offer.url,
                                     headers={"Range": f"bytes={len(buf)}-{end}"}) as r:
                if r.status_code == 200:  # no Range support: the whole image
                    buf.clear()
                    before = 0
                elif r.status_code != 206:
                    raise OtaError(f"the download answered HTTP {r.status_code}")
                async for piece in r.aiter_bytes():
                    buf += piece
                    if len(buf) > offer.size:
                        buf.clear()
                        raise OtaError("the download is larger than the offer says")
                    if next_report <= len(buf) < offer.size:
                        next_report = len(buf) + step
                        await self._report("downloading", received=len(buf))
            if len(buf) == before:
                raise OtaError("the download returned no data")
        return bytes(buf)

    def _check(self, offer: Offer, image: bytes) -> None:
        digest = hashlib.sha256(image).digest()
        if digest.hex() != offer.sha256:
            self._partial.pop(offer.sha256, None)  # start again from scratch next time
            raise OtaError("sha256 mismatch: the download is corrupted")
        keys = self.trusted_keys if self.trusted_keys is not None else list(offer.public_keys)
        if offer.signature is None:
            if self.require_signature:
                self._partial.pop(offer.sha256, None)
                raise OtaError("the image is not signed")
        elif _verify(digest, offer.signature, keys) is None:
            self._partial.pop(offer.sha256, None)
            raise OtaError("the signature does not verify against the product's keys")
        self._partial.pop(offer.sha256, None)

    async def _report(self, state: str, *, reason: str | None = None,
                      received: int | None = None) -> None:
        try:
            await self.device.send_ota_status(state, reason=reason, bytes_received=received)
        except Exception as exc:
            log.info("device %s: OTA status %s not sent: %r", self.device.device_id, state, exc)


def _verify(digest: bytes, signature: str, keys: list[str]) -> str | None:
    # corral.firmware.signing is pure (cryptography only, no server); imported when a
    # signature is checked, so importing the SDK still loads nothing outside corral.device
    from corral.firmware.signing import verify_digest

    return verify_digest(digest, signature, keys)


__all__ = ["ApplyHandler", "Offer", "OtaError", "OtaUpdater"]
