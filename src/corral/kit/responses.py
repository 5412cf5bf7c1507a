"""Tiny response helpers shared by every domain's api.py."""

from __future__ import annotations

from typing import Any

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def ok(**extra: Any) -> dict[str, Any]:
    return {"ok": True, **extra}


def paging(page: int, per_page: int, total: int) -> dict[str, Any]:
    pages = max(1, -(-total // per_page)) if per_page else 1
    return {"total": total, "page": page, "per_page": per_page, "total_pages": pages}
