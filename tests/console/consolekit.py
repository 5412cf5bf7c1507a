"""Helpers for the browser tests: sign in, visit-and-audit, and quick set-up through /v1."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

DEMO_USER, DEMO_PASSWORD = "demo@corral.example", "corral-demo"
PASSWORD = "correct horse battery"
PHONE = {"width": 390, "height": 844}

# Every visible form control must have an accessible name, no control may be taken out of
# the tab order, every link needs text. Returns the offenders.
AUDIT_JS = """
() => {
  const bad = [];
  const nameOf = (el) => {
    if (el.labels && el.labels.length) {
      const t = Array.from(el.labels).map((l) => l.textContent.trim()).join(" ");
      if (t) return t;
    }
    const aria = el.getAttribute("aria-label");
    if (aria && aria.trim()) return aria;
    const by = el.getAttribute("aria-labelledby");
    if (by) {
      const t = by.split(/\\s+/).map((id) => (document.getElementById(id) || {}).textContent || "").join(" ").trim();
      if (t) return t;
    }
    if (el.tagName === "BUTTON") return el.textContent.trim();
    if (["submit", "button", "reset"].includes(el.type)) return el.value;
    return "";
  };
  for (const el of document.querySelectorAll("input, select, textarea, button")) {
    if (el.type === "hidden") continue;
    if (!nameOf(el)) bad.push("no label: " + el.outerHTML.slice(0, 160));
    if (el.getAttribute("tabindex") === "-1") bad.push("not keyboard reachable: " + el.outerHTML.slice(0, 160));
  }
  for (const a of document.querySelectorAll("a[href]")) {
    if (!a.textContent.trim() && !a.getAttribute("aria-label")) bad.push("unnamed link: " + a.outerHTML.slice(0, 160));
    if (a.getAttribute("tabindex") === "-1") bad.push("link not keyboard reachable: " + a.outerHTML.slice(0, 160));
  }
  for (const s of document.querySelectorAll("summary")) {
    if (!s.textContent.trim() && !s.getAttribute("aria-label")) bad.push("unnamed summary: " + s.outerHTML.slice(0, 160));
  }
  if (!document.querySelector("h1")) bad.push("no h1");
  if (!document.title) bad.push("no title");
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth + 1) bad.push(`page wider than the window: ${doc.scrollWidth} > ${doc.clientWidth}`);
  return bad;
}
"""


def audit(page: Any) -> None:
    """Fail when the current page has an unlabelled control, an unreachable one, or is wider
    than the window."""
    problems = page.evaluate(AUDIT_JS)
    assert not problems, f"{page.url}: {problems}"


def visit(page: Any, base: str, path: str, *, status: int = 200) -> Any:
    """Open ``path``, check the answer's status, audit the page."""
    response = page.goto(base + path)
    assert response is not None and response.status == status, (
        f"{path}: {response.status if response else None}")
    audit(page)
    return response


# Marks every visible, enabled control and link with data-kb (a number) and returns how many
# there are; the Tab walk then records which of them took the focus.
MARK_JS = """
() => {
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    const st = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && st.visibility !== "hidden" && !el.closest("[inert]");
  };
  let n = 0;
  for (const el of document.querySelectorAll("input, select, textarea, button, a[href], summary")) {
    if (el.type === "hidden" || el.disabled || !visible(el)) continue;
    if (el.closest("details:not([open])") && el.tagName !== "SUMMARY") continue;
    if (el.closest("dialog:not([open])")) continue;
    el.dataset.kb = String(n++);
  }
  return n;
}
"""


def tab_walk(page: Any, limit: int = 400) -> None:
    """Press Tab through the page from its top: every visible control and link must take
    the focus (keyboard reachable, in the tab order), and the focus must never be lost."""
    total = page.evaluate(MARK_JS)
    page.evaluate("() => { document.activeElement && document.activeElement.blur(); "
                  "window.scrollTo(0, 0); }")
    reached: set[str] = set()
    for _ in range(min(limit, total * 2 + 10)):
        page.keyboard.press("Tab")
        kb = page.evaluate("() => document.activeElement ? "
                           "(document.activeElement.dataset.kb ?? '') : ''")
        if kb:
            if kb in reached and len(reached) == total:
                break
            reached.add(kb)
    missing = page.evaluate("(got) => Array.from(document.querySelectorAll('[data-kb]'))"
                            ".filter(el => !got.includes(el.dataset.kb))"
                            ".map(el => el.outerHTML.slice(0, 160))", sorted(reached))
    assert not missing, f"{page.url}: not reached with Tab: {missing}"


def sign_in(page: Any, base: str, username: str = DEMO_USER,
            password: str = DEMO_PASSWORD, *, product: str | None = None) -> None:
    page.goto(base + "/console/login")
    page.get_by_label("E-mail address").fill(username)
    page.get_by_label("Password").fill(password)
    if product:
        page.get_by_text("I am a customer of a product").click()
        page.get_by_label("Product (its ID or slug)").fill(product)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/console/(orgs|devices|products).*"))


@dataclass
class Api:
    """Set-up through the public API (the console is what the test drives)."""

    base: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def signup(self, username: str, password: str = PASSWORD) -> str:
        with self.client() as c:
            r = c.post("/v1/users", json={"username": username, "password": password})
            assert r.status_code == 200, r.text
        return self.login(username, password)

    def login(self, username: str, password: str = PASSWORD) -> str:
        with self.client() as c:
            r = c.post("/oauth/token", data={
                "grant_type": "password", "username": username, "password": password,
                "client_id": "corral-test", "client_secret": "corral-test"})
            assert r.status_code == 200, r.text
            return str(r.json()["access_token"])

    def call(self, token: str, method: str, path: str, **kw: Any) -> Any:
        with self.client(token) as c:
            r = c.request(method, path, **kw)
            assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
            return r.json() if r.content else None

    def invite_and_accept(self, owner: str, org: str, username: str, role: str) -> None:
        """Make ``username`` (signed up already) a member of ``org`` with ``role``."""
        self.call(owner, "POST", f"/v1/orgs/{org}/team", json={"username": username,
                                                               "role": role})
        token = self.login(username)
        invitations = self.call(token, "GET", "/v1/user/invitations")["invitations"]
        inv = next(i for i in invitations if i["organization"]["slug"] == org)
        self.call(token, "POST", f"/v1/user/invitations/{inv['id']}/accept")
