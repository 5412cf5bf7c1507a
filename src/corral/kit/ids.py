"""One parsing rule for numeric ids taken from a path (or a query).

``str.isdigit()`` accepts Unicode digits such as ``²`` or ``٣`` that ``int()`` then refuses or
reads differently, and a value beyond the id column's range reaches the database (SQLite
overflows in the driver, PostgreSQL refuses an ``integer`` beyond 2**31-1). Every numeric id in
a path goes through :func:`path_id`: ASCII digits only, within the column's range; anything else
is simply not an id (the caller answers 404, or tries the value as a slug).
"""

from __future__ import annotations

import re

_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")
INT32_MAX = 2**31 - 1  # an ``Integer`` column (PostgreSQL ``integer``)
INT64_MAX = 2**63 - 1  # a ``BigInteger`` column


def path_id(value: str | int | None, *, hi: int = INT32_MAX) -> int | None:
    """``value`` as an id in 1..``hi``, or None when it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 1 <= value <= hi else None
    if not isinstance(value, str) or not _ASCII_DIGITS.fullmatch(value):
        return None
    n = int(value)
    return n if 1 <= n <= hi else None
