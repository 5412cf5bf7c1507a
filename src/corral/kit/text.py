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


def strict_loads(raw: str | bytes) -> Any:
    """JSON as the standard has it: no ``NaN``/``Infinity``, and no number so large it
    becomes infinite (PostgreSQL's JSON columns refuse both). Raises ValueError (and
    UnicodeDecodeError, RecursionError) like ``json.loads``."""
    return json.loads(raw, parse_constant=reject_json_constant, parse_float=_finite_float)
