"""Turn (integration, event) into a request, send it, and classify what happened.

Webhook requests follow Particle's webhook reference: the default data (``event``,
``data``, ``published_at``, ``coreid``) goes as a form (POST, PUT, DELETE) or as query
parameters (GET) unless ``noDefaults``; ``json`` / ``form`` / ``query`` get the defaults
added, ``body`` is sent as rendered. Every request is signed (:mod:`.signing`).

An :class:`Outcome` says whether the attempt succeeded, may be retried (timeouts, network
errors, 408, 429 and 5xx; a ``Retry-After`` is honoured), or failed for good.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import email.utils
import json
import logging
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

import corral
from corral.integrations import signing, templates
from corral.integrations.guard import Blocked, GuardedTransport, Policy
from corral.integrations.secrets import mask_header, mask_url
from corral.kit import clock
from corral.kit.text import bounded_loads

log = logging.getLogger("corral.integrations")

EXCERPT = 1024  # bytes of a request or response body kept in the delivery log
RESPONSE_MAX = 65_536  # bytes of a response read (for hook-response events)
USER_AGENT = f"corral-integrations/{corral.__version__}"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclasses.dataclass(slots=True)
class Outcome:
    """How one attempt went. ``kind``: ``success``, ``retry`` (a transient failure) or
    ``failed`` (retrying cannot help: a 4xx, a refused target, a template error)."""

    kind: str
    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds the target asked us to wait
    request: str | None = None  # excerpt for the log (secrets masked)
    response: str | None = None  # excerpt for the log
    body: str = ""  # the response body (up to RESPONSE_MAX), for hook-response

    @property
    def ok(self) -> bool:
        return self.kind == "success"


@dataclasses.dataclass(slots=True)
class Prepared:
    method: str
    url: str
    headers: dict[str, str]
    content: bytes
    msg_id: str


def _excerpt(data: bytes | str, limit: int = EXCERPT) -> str:
    text = data if isinstance(data, str) else data[:limit].decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "…"


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - clock.now()).total_seconds())


def build(settings: dict[str, Any], facts: templates.EventFacts, *, integration_id: str,
          secret: str) -> Prepared:
    """The signed request for one event. Raises :class:`templates.TemplateError`."""
    ctx = facts.context()
    method = str(settings.get("requestType") or "POST").upper()
    url = templates.render(str(settings["url"]), ctx)
    defaults = {} if settings.get("noDefaults") else facts.defaults()
    headers: dict[str, str] = {"User-Agent": USER_AGENT}
    query: dict[str, str] = {}
    content = b""
    if settings.get("query") is not None:
        query.update(templates.render_value(settings["query"], ctx))
    if settings.get("json") is not None:
        value = templates.render_value(settings["json"], ctx)
        if isinstance(value, str):  # a template of a JSON text: parse what it rendered to
            try:
                value = bounded_loads(value)
            except ValueError:  # not JSON, or nested too deeply to send again: as text
                pass
        if isinstance(value, dict):
            value = {**defaults, **value}
        content = (value if isinstance(value, str) else
                   json.dumps(value, separators=(",", ":"), ensure_ascii=False)).encode()
        headers["Content-Type"] = "application/json"
    elif settings.get("form") is not None:
        form = {**defaults, **templates.render_value(settings["form"], ctx)}
        if method == "GET":
            query.update(form)
        else:
            content = _urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif settings.get("body") is not None:
        content = templates.render(str(settings["body"]), ctx).encode()
    elif method == "GET":
        query = {**defaults, **query}
    elif defaults:
        content = _urlencode(defaults)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if query:
        sep = "&" if urlsplit(url).query else "?"
        url = url + sep + _urlencode(query).decode()
    for name, value in (templates.render_value(settings.get("headers") or {}, ctx)).items():
        headers[name] = value
    auth = settings.get("auth") or {}
    if auth.get("bearer"):
        headers["Authorization"] = "Bearer " + templates.render(auth["bearer"], ctx)
    elif auth.get("username") is not None or auth.get("password") is not None:
        pair = (f"{templates.render(auth.get('username') or '', ctx)}:"
                f"{templates.render(auth.get('password') or '', ctx)}")
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    msg_id = (signing.delivery_id(integration_id, facts.event_id)
              if facts.event_id is not None else "msg_test_" + signing.new_secret()[6:22])
    stamp = int(time.time())
    headers["webhook-id"] = msg_id
    headers["webhook-timestamp"] = str(stamp)
    headers["webhook-signature"] = signing.sign(secret, msg_id, stamp, content)
    return Prepared(method, url, headers, content, msg_id)


def _urlencode(values: dict[str, Any]) -> bytes:
    return urlencode({k: "" if v is None else str(v) for k, v in values.items()}).encode()


def describe_request(p: Prepared) -> str:
    """The request as the delivery log shows it: secrets in headers and URL masked."""
    lines = [f"{p.method} {mask_url(p.url)}"]
    lines += [f"{k}: {mask_header(k, v)}" for k, v in p.headers.items()]
    if p.content:
        lines += ["", _excerpt(p.content)]
    return "\n".join(lines)


class WebhookSender:
    """Sends webhook requests through the SSRF guard (two connection pools: certificates
    verified, and not verified for ``rejectUnauthorized: false``)."""

    def __init__(self, policy: Policy, *, timeout_s: float, max_connections: int = 1000) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=min(200, max_connections))
        timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self._clients = {
            verify: httpx.AsyncClient(transport=GuardedTransport(policy, verify=verify,
                                                                  limits=limits),
                                      timeout=timeout, trust_env=False)
            for verify in (True, False)}

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()

    async def send(self, settings: dict[str, Any], facts: templates.EventFacts, *,
                   integration_id: str, secret: str) -> Outcome:
        try:
            p = build(settings, facts, integration_id=integration_id, secret=secret)
        except templates.TemplateError as exc:
            return Outcome("failed", error=str(exc)[:500])
        described = describe_request(p)
        parts = urlsplit(p.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Outcome("failed", error="the rendered url is not an http(s) URL",
                           request=described)
        client = self._clients[bool(settings.get("rejectUnauthorized", True))]
        follow = bool(settings.get("followRedirects"))
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                req = client.build_request(p.method, p.url, headers=p.headers,
                                           content=p.content or None)
                resp = await client.send(req, stream=True, follow_redirects=follow)
                try:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) >= RESPONSE_MAX:
                            body = body[:RESPONSE_MAX]
                            break
                finally:
                    await resp.aclose()
        except Blocked as exc:
            return Outcome("failed", error=str(exc)[:500], request=described,
                           latency_ms=_ms(started))
        except TimeoutError:
            return Outcome("retry", error=f"timed out after {self.timeout_s:g} s",
                           request=described, latency_ms=_ms(started))
        except httpx.TooManyRedirects:
            return Outcome("failed", error="too many redirects", request=described,
                           latency_ms=_ms(started))
        except (httpx.HTTPError, OSError) as exc:
            text = str(exc) or type(exc).__name__
            # a certificate the target cannot fix by waiting is still worth a retry: the
            # operator may be renewing it; the backoff keeps the cost low
            return Outcome("retry", error=f"{type(exc).__name__}: {text}"[:500],
                           request=described, latency_ms=_ms(started))
        latency = _ms(started)
        text = body.decode("utf-8", "replace")
        status = resp.status_code
        response = f"HTTP {status} {resp.reason_phrase}\n\n{_excerpt(text)}".rstrip()
        if 200 <= status < 300:
            return Outcome("success", status_code=status, latency_ms=latency,
                           request=described, response=response, body=text)
        host = parts.hostname
        error = f"error status {status} from {host}"
        if 300 <= status < 400:
            error += " (redirects are not followed unless followRedirects is set)"
        kind = "retry" if status in RETRYABLE_STATUS else "failed"
        return Outcome(kind, status_code=status, latency_ms=latency, error=error,
                       retry_after=retry_after(resp.headers.get("retry-after")),
                       request=described, response=response, body=text)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
