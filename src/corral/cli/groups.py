"""``corral groups``: a product's device groups, static or dynamic (over REST)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.client import Json, Product, _items, _unwrap, api
from corral.cli.output import console, fields, print_json, table

groups_app = typer.Typer(help="Device groups of a product: list, create (static or dynamic "
                         "with --query), preview a query, delete.", no_args_is_help=True)

_GROUP_KEYS = ("name", "dynamic", "query", "device_count", "color", "description")


@groups_app.command("list")
def groups_list(ctx: typer.Context, product: Product, as_json: Json = False) -> None:
    """The product's groups with their device counts and, for dynamic ones, their query
    (GET /v1/products/PRODUCT/groups)."""
    body = api(ctx).call("GET", f"/v1/products/{product}/groups")
    if as_json:
        print_json(body)
        return
    table(f"Groups of {product}", ["name", "devices", "kind", "query"],
          [(g.get("name"), g.get("device_count"), "dynamic" if g.get("dynamic") else "static",
            g.get("query") or "") for g in _items(body, "groups")])


@groups_app.command("create")
def groups_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits, '-' and '_'.")],
    product: Product,
    query: Annotated[str | None, typer.Option(
        help="Make it dynamic: its devices are those matching this filter, e.g. "
        "'tag = north and last_heard < 7d' (see the README, Dynamic groups).")] = None,
    color: Annotated[str | None, typer.Option(help="#rrggbb")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    as_json: Json = False,
) -> None:
    """Create a group (POST /v1/products/PRODUCT/groups)."""
    payload: dict[str, Any] = {"name": name}
    for key, value in (("query", query), ("color", color), ("description", description)):
        if value is not None:
            payload[key] = value
    body = api(ctx).call("POST", f"/v1/products/{product}/groups", json=payload)
    if as_json:
        print_json(body)
    else:
        fields("Group created", _unwrap(body, "group"), _GROUP_KEYS)


@groups_app.command("preview")
def groups_preview(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="The filter to try.")],
    product: Product,
    per_page: Annotated[int, typer.Option(min=1, max=100, help="Devices shown.")] = 10,
    as_json: Json = False,
) -> None:
    """How many devices a query matches now and the first of them, without saving
    (POST /v1/products/PRODUCT/groups/preview)."""
    body = api(ctx).call("POST", f"/v1/products/{product}/groups/preview",
                         json={"query": query, "per_page": per_page})
    if as_json:
        print_json(body)
        return
    n = body.get("device_count") if isinstance(body, dict) else None
    console.print(f"{n} device(s) match", highlight=False)
    table(None, ["id", "name", "online", "last_heard"],
          [(d.get("id"), d.get("name") or "", "yes" if d.get("online") else "no",
            d.get("last_heard") or "never") for d in _items(body, "devices")])


@groups_app.command("delete")
def groups_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    product: Product,
) -> None:
    """Delete a group; a static group's devices just leave it
    (DELETE /v1/products/PRODUCT/groups/NAME)."""
    api(ctx).call("DELETE", f"/v1/products/{product}/groups/{name}")
    console.print(f"Group {name} deleted", highlight=False)
