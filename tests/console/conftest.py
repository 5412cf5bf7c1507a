"""Fixtures for driving the web console in a real browser.

* ``console_server`` (one per test module): ``corral serve --demo`` as a subprocess on free
  ports with a fresh SQLite data directory, so the demo fleet runs live (five simulated MQTT
  devices publishing events and answering functions). Stopped at the end of the module.
* ``browser`` (one per test module): the Debian ``chromium`` through Playwright for Python,
  never a downloaded browser. Without it the tests fail when ``CI`` is set and are skipped
  otherwise.
* ``page`` (per test): a fresh browser context (no cookies) at 1280 x 900. Any message the
  browser logs as an error, and any uncaught script error, fails the test.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_serve, helpers

CHROMIUM = os.environ.get("CORRAL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_serve import corral_serve

    root = tmp_path_factory.mktemp("console")
    # a loaded machine starts a server slowly: the browser tests wait longer than 20 s
    with corral_serve(root / "data", root / "logs", "--demo", start_timeout_s=90) as served:
        yield served


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed console test carries the tail of the server's stderr in its report: a page
    that answered 500 is explained by the traceback the server logged, and the log itself
    lives in a temporary directory pytest deletes after three runs."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    served = getattr(item, "funcargs", {}).get("console_server")
    if report.failed and served is not None:
        try:
            tail = served.stderr.read_bytes()[-20_000:].decode(errors="replace")
        except OSError as exc:
            tail = f"(could not read {served.stderr}: {exc})"
        report.sections.append((f"corral serve stderr ({served.stderr})", tail))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Per module: Playwright's synchronous API runs an event loop of its own while it is
    open, and the async tests that follow on the same worker need it closed."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (make install)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page whose browser errors fail the test. A page the server answers with an error
    status (a form sent back with its errors: 400) makes Chromium log "Failed to load
    resource" for the document itself: that one is the test's to judge, not an error of the
    page; any other resource that fails is."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    pg = context.new_page()
    messages: list[tuple[str, str]] = []
    documents: set[str] = set()
    pg.on("console", lambda m: messages.append((m.text, m.location.get("url", "")))
          if m.type == "error" else None)
    pg.on("pageerror", lambda e: messages.append((f"uncaught: {e}", "")))
    pg.on("response", lambda r: documents.add(r.url)
          if r.request.is_navigation_request() else None)
    try:
        yield pg
    finally:
        context.close()
    errors = [f"{text} ({url})" for text, url in messages
              if not (text.startswith("Failed to load resource") and url in documents)]
    assert not errors, f"the browser reported errors: {errors}"
