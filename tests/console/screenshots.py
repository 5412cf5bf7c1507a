"""``make screenshots``: PNGs of the console's main pages, so a reviewer can look at them
without running a browser.

Starts ``corral serve --demo`` on free ports with a fresh data directory (as the browser
tests do), waits until the demo fleet is online, signs in as the demo user in headless
Chromium (the Debian package, never a downloaded browser) and writes one full-page PNG per
page at 1280 px wide (and a few at phone width) into ``screenshots/`` (gitignored).

    .venv/bin/python tests/console/screenshots.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # consolekit, test_serve

from consolekit import PHONE, sign_in  # noqa: E402
from corral.demo import DEMO_FLEET_IDS  # noqa: E402
from test_serve import corral_serve  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PRODUCT = "/console/products/demo-product"
LIVE = DEMO_FLEET_IDS[0]
# (file name, path): the main pages, in the order a new user meets them
PAGES = [
    ("01-org-products", "/console/orgs/demo-org"),
    ("02-product-overview", PRODUCT),
    ("03-devices", f"{PRODUCT}/devices"),
    ("04-device", f"{PRODUCT}/devices/{LIVE}"),
    ("05-import", f"{PRODUCT}/devices/import"),
    ("06-quarantine", f"{PRODUCT}/quarantine"),
    ("07-groups", f"{PRODUCT}/groups"),
    ("08-firmware", f"{PRODUCT}/firmware"),
    ("09-rollouts", f"{PRODUCT}/rollouts"),
    ("10-logs", f"{PRODUCT}/logs"),
    ("11-integrations", f"{PRODUCT}/integrations"),
    ("12-customers", f"{PRODUCT}/customers"),
    ("13-product-team", f"{PRODUCT}/team"),
    ("14-api-users", f"{PRODUCT}/api-users"),
    ("15-certificates", f"{PRODUCT}/certificates"),
    ("16-audit", f"{PRODUCT}/audit"),
    ("17-product-settings", f"{PRODUCT}/settings"),
    ("18-org-team", "/console/orgs/demo-org/team"),
    ("19-billing", "/console/orgs/demo-org/billing"),
    ("20-org-logs", "/console/orgs/demo-org/logs"),
    ("21-org-ledgers", "/console/orgs/demo-org/ledgers"),
]
PHONE_PAGES = [("phone-devices", f"{PRODUCT}/devices"),
               ("phone-device", f"{PRODUCT}/devices/{LIVE}"),
               ("phone-billing", "/console/orgs/demo-org/billing")]


def _wait_alive(page, base: str, within_s: float = 90) -> None:  # type: ignore[no-untyped-def]
    """Until the first demo device is online (its page says so), bounded."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        page.goto(f"{base}{PRODUCT}/devices/{LIVE}")
        if "Online" in page.locator(".presence").inner_text():
            page.wait_for_timeout(6000)  # a few events and a metering tick
            return
        page.wait_for_timeout(1000)
    raise SystemExit("the demo fleet did not come online")


def main(out: Path) -> int:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        print(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="corral-screenshots-"))
    written = []
    with corral_serve(root / "data", root / "logs", "--demo", start_timeout_s=90) as served, \
            sync_playwright() as p:
        base = served.url
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            desk = browser.new_context(viewport={"width": 1280, "height": 900})
            page = desk.new_page()
            page.goto(f"{base}/console/login")
            page.screenshot(path=str(out / "00-sign-in.png"), full_page=True)
            written.append("00-sign-in.png")
            sign_in(page, base)
            _wait_alive(page, base)
            for name, path in PAGES:
                page.goto(base + path)
                page.wait_for_timeout(400)  # live parts fill in
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                written.append(f"{name}.png")
            phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
            pp = phone.new_page()
            sign_in(pp, base)
            for name, path in PHONE_PAGES:
                pp.goto(base + path)
                pp.wait_for_timeout(400)
                pp.screenshot(path=str(out / f"{name}.png"), full_page=True)
                written.append(f"{name}.png")
        finally:
            browser.close()
    print(f"{len(written)} screenshots in {out}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")))
