"""Route guards: a route declares the permission it needs by depending on a Guard.

``tests/test_permissions_matrix.py`` walks the app's routes, finds every Guard, and checks it
against every role and another tenant, so a new route joins the matrix by declaring one.
"""

from __future__ import annotations

from typing import ClassVar


class Guard:
    """Base for tenant guards. ``scope`` is "product" or "org"; ``permission`` a scope name."""

    scope: ClassVar[str] = ""
    path_param: ClassVar[str] = ""

    def __init__(self, permission: str) -> None:
        self.permission = permission

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.permission!r})"
