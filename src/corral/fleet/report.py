"""Reading a vitals report (Particle's diagnostics JSON): the value at a dotted path, and
that value as a number. Shared by storing, rolling up and showing vitals."""

from __future__ import annotations

from typing import Any


def pick(payload: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of ``payload`` (``None`` when absent)."""
    node: Any = payload
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def number(payload: dict[str, Any], path: str) -> float | None:
    v = pick(payload, path)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:  # an integer beyond a float's range
        return None
