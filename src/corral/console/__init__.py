"""The web console: server-rendered pages (Jinja2) over the same services, guards and policy
as ``/v1``. ``docs/console.md`` explains how to add a page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from corral.console.session import check_csrf


def console_routers() -> list[APIRouter]:
    """Every console router, in mounting order (the permission matrix walks these too).
    Each gets the CSRF check on its state-changing routes."""
    from corral.console.views import (
        auth,
        billing,
        cohorts,
        device,
        devices,
        firmware,
        fleet,
        home,
        integrations,
        ledgers,
        logs,
        manage,
        products,
        team,
    )

    return [auth.router, home.router, products.router, devices.router, logs.router,
            device.router, firmware.router, team.router, manage.router, integrations.router,
            billing.router, fleet.router, cohorts.router, ledgers.router]


def install(app: FastAPI) -> tuple[Callable[[str], bool], Any]:
    """Mount the console's routes and its static files. Returns its HTML error pages (which
    paths, and the renderer) for the app's error handlers to register: the console does not
    reach into the web layer that mounts it."""
    from corral.console.errors import is_console_path, render_error
    from corral.console.render import STATIC

    for router in console_routers():
        app.include_router(router, include_in_schema=False,
                           dependencies=[Depends(check_csrf)])
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    return is_console_path, render_error
