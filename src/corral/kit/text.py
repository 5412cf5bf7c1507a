"""Small text rules shared by domains: slugs and names."""

from __future__ import annotations

import re
import unicodedata

_NON_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(value: str, *, max_len: int = 60) -> str:
    norm = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    slug = _NON_SLUG.sub("-", norm.lower()).strip("-")[:max_len].strip("-")
    if not slug or slug.isdigit():
        # an all-digit slug would be ambiguous with a numeric id in paths
        slug = f"p-{slug}"[:max_len] if slug else "item"
    return slug
