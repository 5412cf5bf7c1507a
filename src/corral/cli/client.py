"""Client commands: talk to a corral server over its REST API (Particle's /v1 wire format).

Where to talk to, highest first: ``--api-url`` / ``--token``; ``CORRAL_API_URL`` /
``CORRAL_TOKEN``; what ``corral login`` stored; the default ``http://127.0.0.1:8080``.
A stored token is only sent to the server it was issued by.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from corral.cli import config
from corral.cli.output import console, fail, fields, print_json, table

CLIENT_ID = "corral-cli"  # a public client: Particle accepts any id with secret == id
TIMEOUT_S = 30.0

Json = Annotated[bool, typer.Option("--json", help="Print the raw JSON response.")]


@dataclass
class GlobalOptions:
    """``corral --api-url ... --token ...``, set by the root callback."""

    api_url: str | None = None
    token: str | None = None


@dataclass
class Api:
    api_url: str
    token: str | None
    config_path: Path
    stored: dict[str, Any] = field(default_factory=dict)

    def send(self, method: str, path: str, *, auth: bool = True, accept: tuple[int, ...] = (),
             **kw: Any) -> httpx.Response:
        """Make one request; exit 1 with the server's message on an error status (except
        those in ``accept``) and with a hint when the server cannot be reached."""
        headers = {"User-Agent": "corral-cli"}
        if auth:
            if not self.token:
                fail("Not logged in: run `corral login` (or pass --token / set CORRAL_TOKEN).")
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            r = httpx.request(method, self.api_url + path, headers=headers, timeout=TIMEOUT_S,
                              **kw)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            fail(f"Invalid API URL {self.api_url!r}; set --api-url or CORRAL_API_URL.")
        except httpx.TransportError as exc:
            fail(f"Cannot reach corral at {self.api_url} ({type(exc).__name__}). Is the server "
                 "running (`corral serve`)? Point the CLI elsewhere with --api-url or "
                 "CORRAL_API_URL.")
        if r.status_code >= 400 and r.status_code not in accept:
            message = error_message(r)
            if r.status_code == 401 and auth:
                message += " — run `corral login` to get a new token."
            fail(message)
        return r

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """``send`` and decode the JSON body (``None`` when there is none)."""
        r = self.send(method, path, **kw)
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            fail(f"The server at {self.api_url} did not answer with JSON (HTTP {r.status_code}).")


def error_message(r: httpx.Response) -> str:
    """The server's ``error_description`` (or ``error``), as Particle's clients show it."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error_description", "error", "message", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return f"{body[key]} (HTTP {r.status_code})"
    return f"HTTP {r.status_code} {r.reason_phrase}"


def api(ctx: typer.Context) -> Api:
    """The server and credentials this invocation talks to (see the module docstring)."""
    opts = ctx.find_root().obj
    if not isinstance(opts, GlobalOptions):
        opts = GlobalOptions()
    settings = config.settings_from()
    path = settings.cli_config_path()
    stored = config.load(path)
    if opts.api_url:
        url = opts.api_url
    elif "api_url" in settings.model_fields_set:
        url = settings.api_url
    else:
        url = stored.get("api_url") or settings.api_url
    url = str(url).rstrip("/")
    token = opts.token or settings.token
    if not token and str(stored.get("api_url", "")).rstrip("/") == url:
        token = stored.get("token")
    return Api(url, token, path, stored)


def _items(body: Any, *keys: str) -> list[dict[str, Any]]:
    """The list in a response: a bare list, or the first of ``keys`` present."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for key in keys:
            if isinstance(body.get(key), list):
                return body[key]
    return []


def _unwrap(body: Any, key: str) -> dict[str, Any]:
    """``{"product": {...}}`` or a bare object."""
    if isinstance(body, dict) and isinstance(body.get(key), dict):
        return body[key]
    return body if isinstance(body, dict) else {}


# --- session ---------------------------------------------------------------------------

def login(
    ctx: typer.Context,
    username: Annotated[str | None, typer.Option("--username", "-u",
                                                 help="Your e-mail (prompted if missing).")] = None,
    password: Annotated[str | None, typer.Option("--password", "-p",
                                                 help="Prompted (hidden) if missing.")] = None,
) -> None:
    """Log in and store the token in ~/.config/corral/config.json (mode 0600)."""
    a = api(ctx)
    username = username or typer.prompt("Username (e-mail)")
    password = password or typer.prompt("Password", hide_input=True)
    body = a.call("POST", "/oauth/token", auth=False, data={
        "grant_type": "password", "username": username, "password": password,
        "client_id": CLIENT_ID, "client_secret": CLIENT_ID,
    })
    if not isinstance(body, dict) or not body.get("access_token"):
        fail("The server answered without an access token.")
    expires_in = int(body.get("expires_in") or 0)
    expires_at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in)).isoformat(
        timespec="seconds") if expires_in else None
    config.save(a.config_path, {**a.stored, "api_url": a.api_url, "username": username,
                                "token": body["access_token"], "expires_at": expires_at})
    console.print(f"Logged in to [bold]{a.api_url}[/] as [bold]{username}[/]. "
                  f"Token stored in {a.config_path}", highlight=False)


def logout(ctx: typer.Context) -> None:
    """Revoke the token in use on the server and forget it locally."""
    a = api(ctx)
    r = a.send("DELETE", "/v1/access_tokens/current", accept=(401,))
    if a.token == a.stored.get("token"):
        config.save(a.config_path, {k: v for k, v in a.stored.items()
                                    if k not in ("token", "username", "expires_at")})
    if r.status_code == 401:
        console.print("The token was no longer valid; it is forgotten now.")
    else:
        console.print(f"Logged out of {a.api_url}.", highlight=False)


def whoami(ctx: typer.Context, as_json: Json = False) -> None:
    """Show the user the token belongs to and their organizations."""
    a = api(ctx)
    body = a.call("GET", "/v1/user")
    if as_json:
        print_json(body)
        return
    console.print(f"[bold]{body.get('username')}[/] on {a.api_url}", highlight=False)
    _orgs_table(_items(body, "orgs"))


# --- organizations ---------------------------------------------------------------------

orgs_app = typer.Typer(help="Organizations you belong to.", no_args_is_help=True)


def _orgs_table(rows: list[dict[str, Any]]) -> None:
    table("Organizations", ["id", "slug", "name", "personal", "subscription"],
          [(o.get("id"), o.get("slug"), o.get("name"), o.get("personal"),
            _subscription(o)) for o in rows])


def _subscription(org: dict[str, Any]) -> str:
    """``plan (status)``; ``none`` without a subscription."""
    sub = org.get("subscription")
    if not isinstance(sub, dict):
        return org.get("subscription_status") or "none"
    return f"{sub.get('plan')} ({org.get('subscription_status') or sub.get('status')})"


@orgs_app.command("list")
def orgs_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List your organizations (GET /v1/orgs)."""
    body = api(ctx).call("GET", "/v1/orgs")
    if as_json:
        print_json(body)
    else:
        _orgs_table(_items(body, "organizations", "orgs"))


@orgs_app.command("create")
def orgs_create(ctx: typer.Context, name: str, as_json: Json = False) -> None:
    """Create an organization with you as its Owner (POST /v1/orgs)."""
    body = api(ctx).call("POST", "/v1/orgs", json={"name": name})
    if as_json:
        print_json(body)
        return
    org = _unwrap(body, "organization")
    fields("Organization created", org, ["id", "slug", "name"])


# --- products --------------------------------------------------------------------------

products_app = typer.Typer(help="Products (fleets of devices) in your organizations.",
                           no_args_is_help=True)

_PRODUCT_KEYS = ["id", "slug", "name", "platform_id", "description", "org", "organization"]


@products_app.command("list")
def products_list(
    ctx: typer.Context,
    org: Annotated[str | None, typer.Option(help="Only this organization's products.")] = None,
    as_json: Json = False,
) -> None:
    """List products you can see (GET /v1/products or /v1/orgs/ORG/products)."""
    path = f"/v1/orgs/{org}/products" if org else "/v1/products"
    body = api(ctx).call("GET", path)
    if as_json:
        print_json(body)
        return
    table("Products", ["id", "slug", "name", "platform_id", "organization"],
          [(p.get("id"), p.get("slug"), p.get("name"), p.get("platform_id"),
            p.get("organization", p.get("org"))) for p in _items(body, "products")])


@products_app.command("create")
def products_create(
    ctx: typer.Context,
    name: str,
    org: Annotated[str | None, typer.Option(
        help="Organization id or slug (default: your personal organization).")] = None,
    platform_id: Annotated[int | None, typer.Option(help="Device OS platform id.")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    as_json: Json = False,
) -> None:
    """Create a product (POST /v1/orgs/ORG/products, or /v1/user/products)."""
    product: dict[str, Any] = {"name": name}
    if platform_id is not None:
        product["platform_id"] = platform_id
    if description is not None:
        product["description"] = description
    path = f"/v1/orgs/{org}/products" if org else "/v1/user/products"
    body = api(ctx).call("POST", path, json={"product": product})
    if as_json:
        print_json(body)
    else:
        fields("Product created", _unwrap(body, "product"), _PRODUCT_KEYS)


@products_app.command("get")
def products_get(ctx: typer.Context, product: str, as_json: Json = False) -> None:
    """Show one product by id or slug (GET /v1/products/PRODUCT)."""
    body = api(ctx).call("GET", f"/v1/products/{product}")
    if as_json:
        print_json(body)
    else:
        fields("Product", _unwrap(body, "product"), _PRODUCT_KEYS)


# --- product team ----------------------------------------------------------------------

team_app = typer.Typer(help="A product's team: members, roles, invitations.",
                       no_args_is_help=True)

Product = Annotated[str, typer.Option("--product", help="Product id or slug.")]


def _role(member: dict[str, Any]) -> Any:
    role = member.get("role")
    return role.get("name") if isinstance(role, dict) else role


@team_app.command("list")
def team_list(ctx: typer.Context, product: Product, as_json: Json = False) -> None:
    """List the team of a product (GET /v1/products/PRODUCT/team)."""
    body = api(ctx).call("GET", f"/v1/products/{product}/team")
    if as_json:
        print_json(body)
        return
    table(f"Team of {product}", ["username", "role", "api user"],
          [(m.get("username"), _role(m), "yes" if m.get("is_programmatic") else "")
           for m in _items(body, "team")])


@team_app.command("invite")
def team_invite(
    ctx: typer.Context,
    email: str,
    product: Product,
    role: Annotated[str, typer.Option(
        help="Administrator, Developer, View-only or Support.")],
    as_json: Json = False,
) -> None:
    """Invite an existing user to a product's team (POST /v1/products/PRODUCT/team)."""
    body = api(ctx).call("POST", f"/v1/products/{product}/team",
                         json={"username": email, "role": role})
    if as_json:
        print_json(body)
    else:
        console.print(f"Invited [bold]{email}[/] to {product} as {role}.", highlight=False)
