"""The console's navigation: one list per context. A page joins the sidebar by adding an
item here (``docs/console.md``); an item shows only to roles that hold its permission."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NavItem:
    key: str  # the ``section`` a page passes to ``page()`` to mark itself active
    label: str
    path: str  # relative to the product's or organization's console URL ("" = its overview)
    permission: str  # shown only to roles with this permission
    icon: str = "dot"  # a name in templates/_icons.html


PRODUCT_NAV: list[NavItem] = [
    NavItem("overview", "Overview", "", "products:get", "home"),
    NavItem("devices", "Devices", "/devices", "devices:list", "chip"),
    NavItem("quarantine", "Quarantine", "/quarantine", "devices:list", "shield"),
    NavItem("groups", "Groups", "/groups", "groups:list", "layers"),
    NavItem("cohorts", "Cohorts", "/cohorts", "cohorts:list", "layers"),
    NavItem("firmware", "Firmware", "/firmware", "firmware:list", "upload"),
    NavItem("logs", "Logs", "/logs", "events:get", "terminal"),
    NavItem("customers", "Customers", "/customers", "customers:list", "user"),
    NavItem("team", "Team", "/team", "teams.users:list", "users"),
    NavItem("api-users", "API users", "/api-users", "teams.users:list", "key"),
    NavItem("clients", "OAuth clients", "/clients", "clients:list", "key"),
    NavItem("certificates", "Certificates", "/certificates", "products:get", "badge"),
    NavItem("signing", "Signing keys", "/signing-keys", "firmware:list", "pen"),
    NavItem("audit", "Audit log", "/audit", "audit:list", "list"),
    NavItem("settings", "Settings", "/settings", "products:get", "gear"),
]

ORG_NAV: list[NavItem] = [
    NavItem("products", "Products", "", "orgs:get", "grid"),
    NavItem("team", "Team", "/team", "orgs.team:list", "users"),
    NavItem("logs", "Logs", "/logs", "events:get", "terminal"),
    NavItem("billing", "Billing & usage", "/billing", "orgs.billing:get", "card"),
    NavItem("audit", "Audit log", "/audit", "orgs.audit:list", "list"),
    NavItem("settings", "Settings", "/settings", "orgs:get", "gear"),
]


def add_product_page(item: NavItem, *, before: str | None = None) -> None:
    """Add ``item`` to the product sidebar (before the item keyed ``before``, else last
    but Settings)."""
    _insert(PRODUCT_NAV, item, before or "settings")


def add_org_page(item: NavItem, *, before: str | None = None) -> None:
    """Add ``item`` to the organization sidebar."""
    _insert(ORG_NAV, item, before or "settings")


def _insert(items: list[NavItem], item: NavItem, before: str) -> None:
    if any(i.key == item.key for i in items):
        return
    keys = [i.key for i in items]
    items.insert(keys.index(before) if before in keys else len(items), item)
