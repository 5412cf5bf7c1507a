"""Small text rules shared by domains: slugs and names, strict JSON."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

_NON_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(value: str, *, max_len: int = 60) -> str:
    norm = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    slug = _NON_SLUG.sub("-", norm.lower()).strip("-")[:max_len].strip("-")
    if not slug or slug.isdigit():
        # an all-digit slug would be ambiguous with a numeric id in paths
        slug = f"p-{slug}"[:max_len] if slug else "item"
    return slug


def reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


# The deepest nesting of objects and arrays corral takes in JSON from outside (request
# bodies, form fields, devices' documents): far beyond any real document, far below what
# the encoders of answers and database columns recurse through before they fail
MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests arrays and objects (a scalar: 0), counted
    without recursion: a document that parses can still be too deep to encode again."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return deepest


def bounded_loads(raw: str | bytes, **kw: Any) -> Any:
    """``json.loads`` (``kw`` passed on) for JSON from outside (a device's payload, a form's
    JSON text): a document nested deeper than :data:`MAX_JSON_DEPTH`, or too deeply to parse
    at all, raises ValueError like any other malformed JSON (UnicodeDecodeError is one too),
    so the caller's one ``except ValueError`` answers it."""
    try:
        doc = json.loads(raw, **kw)
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    if json_depth(doc) > MAX_JSON_DEPTH:
        raise ValueError(f"it nests more than {MAX_JSON_DEPTH} levels of objects and arrays")
    return doc


def strict_loads(raw: str | bytes) -> Any:
    """JSON as the standard has it: no ``NaN``/``Infinity``, and no number so large it
    becomes infinite (PostgreSQL's JSON columns refuse both); bounded as
    :func:`bounded_loads`. Raises ValueError for all of it."""
    return bounded_loads(raw, parse_constant=reject_json_constant, parse_float=_finite_float)
