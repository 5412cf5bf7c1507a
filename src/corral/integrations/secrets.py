"""What the API and the delivery log show of an integration's secrets: never the whole.

Secrets are the ``auth`` values (password, bearer token), header values (an
``Authorization`` or API-key header is the usual way to authenticate to a target), query
values whose names look like credentials, a password in a URL, and the MQTT password.
A masked value keeps a short prefix so a user can tell which one is set.

An edit (Particle's PUT replaces the whole configuration) that sends a masked value back
unchanged keeps the stored secret: :func:`restore` puts it back.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "…"
# headers whose values are not secrets (shown in full)
PLAIN_HEADERS = frozenset({"content-type", "accept", "user-agent", "content-encoding",
                           "accept-encoding", "accept-language", "cache-control",
                           "webhook-id", "webhook-timestamp", "webhook-signature"})
SECRET_NAME = re.compile(r"(key|token|secret|pass|auth|sig|credential|session)", re.IGNORECASE)


def mask(value: str) -> str:
    """``abcd…`` for a value longer than 8 characters, else just ``…``."""
    if "{{" in value:  # a template names a variable, it holds no secret itself
        return value
    return value[:4] + MASK if len(value) > 8 else MASK


def is_masked(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(MASK)


def mask_header(name: str, value: str) -> str:
    return value if name.lower() in PLAIN_HEADERS else mask(value)


def mask_query(values: dict[str, str]) -> dict[str, str]:
    return {k: mask(v) if SECRET_NAME.search(k) else v for k, v in values.items()}


def mask_url(url: str) -> str:
    """A URL with its password and credential-like query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_NAME.search(k) for k, _ in pairs):
            query = urlencode([(k, mask(v) if SECRET_NAME.search(k) else v) for k, v in pairs],
                              safe=MASK)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def masked_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``Integration.settings`` as the API shows them."""
    out = dict(settings)
    if "url" in out:
        out["url"] = mask_url(str(out["url"]))
    auth = out.get("auth")
    if isinstance(auth, dict):
        out["auth"] = {k: (v if k == "username" else mask(str(v))) for k, v in auth.items()}
    if isinstance(out.get("headers"), dict):
        out["headers"] = {k: mask_header(k, str(v)) for k, v in out["headers"].items()}
    if isinstance(out.get("query"), dict):
        out["query"] = mask_query(out["query"])
    return out


def restore(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """An edited configuration with every value the client echoed back masked replaced by
    the stored secret it stands for."""
    out = dict(new)
    if is_masked(out.get("url")) or MASK in str(out.get("url", "")):
        if mask_url(str(old.get("url", ""))) == out.get("url"):
            out["url"] = old.get("url")
    for field in ("auth", "headers", "query"):
        mine, theirs = out.get(field), old.get(field)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            out[field] = {k: (theirs[k] if is_masked(v) and k in theirs
                              and masked_settings({field: {k: theirs[k]}})[field][k] == v
                              else v)
                          for k, v in mine.items()}
    return out
