"""``corral integrations``: list, create, delete, test and read the log of webhooks and MQTT
forwarding (over REST). ``--product`` or ``--org`` picks the scope; neither is your sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli.client import Json, _items, _unwrap, api
from corral.cli.output import console, fail, fields, print_json, table

integrations_app = typer.Typer(
    help="Integrations: webhooks and MQTT forwarding of device events.", no_args_is_help=True)

ProductOpt = Annotated[str | None, typer.Option("--product", help="Product id or slug.")]
OrgOpt = Annotated[str | None, typer.Option("--org", help="Organization id or slug.")]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="Integration id.")]


def _base(product: str | None, org: str | None) -> str:
    if product and org:
        fail("Give --product or --org, not both.", code=2)
    if product:
        return f"/v1/products/{product}/integrations"
    if org:
        return f"/v1/orgs/{org}/integrations"
    return "/v1/integrations"


def _object(value: str | None, what: str) -> Any:
    """A JSON object option: inline JSON or @file."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            fail(f"Cannot read {value[1:]}: {exc.strerror or exc}", code=2)
    try:
        return json.loads(text)
    except ValueError:
        fail(f"{what} is not valid JSON.", code=2)


@integrations_app.command("list")
def integrations_list(ctx: typer.Context, product: ProductOpt = None, org: OrgOpt = None,
                      as_json: Json = False) -> None:
    """List the integrations of your sandbox, a product or an organization."""
    body = api(ctx).call("GET", _base(product, org))
    rows = _items(body, "integrations", "webhooks")
    if as_json:
        print_json(rows)
        return
    table(None, ["id", "type", "event", "target", "status", "created"],
          [(r.get("id"), r.get("integration_type"), r.get("event"),
            (f"{r.get('requestType')} " if r.get("requestType") else "") + str(r.get("url")),
            "disabled" if r.get("disabled") else "enabled", r.get("created_at"))
           for r in rows])


@integrations_app.command("create")
def integrations_create(
    ctx: typer.Context,
    event: Annotated[str, typer.Argument(help="Event-name prefix that triggers it.")],
    url: Annotated[str, typer.Argument(
        help="Target: http(s)://... for a webhook, mqtt(s)://host[:port] for MQTT.")],
    product: ProductOpt = None,
    org: OrgOpt = None,
    request_type: Annotated[str, typer.Option("--method", "-X",
                                              help="GET, POST, PUT or DELETE.")] = "POST",
    name: Annotated[str | None, typer.Option(help="A name to recognise it by.")] = None,
    device: Annotated[str | None, typer.Option(help="Only this device ID.")] = None,
    json_body: Annotated[str | None, typer.Option(
        "--json-body", help="JSON body template (inline JSON or @file).")] = None,
    form: Annotated[str | None, typer.Option(help="Form fields (JSON object or @file).")] = None,
    query: Annotated[str | None, typer.Option(help="Query parameters (JSON object).")] = None,
    headers: Annotated[str | None, typer.Option(help="HTTP headers (JSON object).")] = None,
    topic: Annotated[str | None, typer.Option(help="MQTT topic template.")] = None,
    qos: Annotated[int | None, typer.Option(help="MQTT QoS (0 or 1).")] = None,
    no_defaults: Annotated[bool, typer.Option(
        "--no-defaults", help="Do not add event, data, coreid and published_at.")] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Do not verify the target's TLS certificate "
        "(rejectUnauthorized: false).")] = False,
    config: Annotated[str | None, typer.Option(
        help="Any further settings in Particle's names (JSON object or @file).")] = None,
    as_json: Json = False,
) -> None:
    """Create a webhook (http/https URL) or an MQTT forwarding (mqtt/mqtts URL)."""
    mqtt = url.lower().startswith(("mqtt://", "mqtts://"))
    body: dict[str, Any] = dict(_object(config, "--config") or {})
    body.update({"integration_type": "MQTT" if mqtt else "Webhook", "event": event,
                 "url": url})
    if not mqtt:
        body["requestType"] = request_type.upper()
    for key, value in (("name", name), ("deviceID", device), ("topic", topic), ("qos", qos),
                       ("json", _object(json_body, "--json-body")),
                       ("form", _object(form, "--form")), ("query", _object(query, "--query")),
                       ("headers", _object(headers, "--headers"))):
        if value is not None:
            body[key] = value
    if no_defaults:
        body["noDefaults"] = True
    if insecure:
        body["rejectUnauthorized"] = False
    created = api(ctx).call("POST", _base(product, org), json=body)
    if as_json:
        print_json(created)
        return
    fields("Integration created", created, ["id", "integration_type", "event", "url", "name",
                                            "created_at", "hookUrl"])
    console.print(f"Signing secret (shown once): [bold]{created.get('signing_secret')}[/]",
                  highlight=False, soft_wrap=True)


@integrations_app.command("get")
def integrations_get(ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None,
                     org: OrgOpt = None, as_json: Json = False) -> None:
    """Show one integration (secrets masked)."""
    body = _unwrap(api(ctx).call("GET", f"{_base(product, org)}/{integration_id}"),
                   "integration")
    if as_json:
        print_json(body)
        return
    fields(None, body, [k for k in body if k != "logs"])


@integrations_app.command("delete")
def integrations_delete(ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None,
                        org: OrgOpt = None) -> None:
    """Delete an integration."""
    api(ctx).send("DELETE", f"{_base(product, org)}/{integration_id}")
    console.print(f"Deleted integration {integration_id}.")


@integrations_app.command("enable")
def integrations_enable(ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None,
                        org: OrgOpt = None) -> None:
    """Enable an integration (also one corral disabled because its target kept failing)."""
    api(ctx).call("PUT", f"{_base(product, org)}/{integration_id}", json={"disabled": False})
    console.print(f"Enabled integration {integration_id}.")


@integrations_app.command("disable")
def integrations_disable(ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None,
                         org: OrgOpt = None) -> None:
    """Disable an integration (nothing is sent while it is disabled)."""
    api(ctx).call("PUT", f"{_base(product, org)}/{integration_id}", json={"disabled": True})
    console.print(f"Disabled integration {integration_id}.")


@integrations_app.command("test")
def integrations_test(
    ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None, org: OrgOpt = None,
    data: Annotated[str, typer.Option(help="The test event's data.")] = "test-event",
    as_json: Json = False,
) -> None:
    """Send a test event now and show what the target answered."""
    body = api(ctx).call("POST", f"{_base(product, org)}/{integration_id}/test",
                         json={"data": data})
    if as_json:
        print_json(body)
        return
    if body.get("pass"):
        console.print(f"[green]Passed[/] (HTTP {body.get('status_code')}): "
                      f"{(body.get('data') or '')[:500]}", highlight=False)
    else:
        console.print(f"[red]Failed:[/] {body.get('error')}", highlight=False)
        raise typer.Exit(1)


@integrations_app.command("log")
def integrations_log(
    ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None, org: OrgOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Entries to show.")] = 20,
    as_json: Json = False,
) -> None:
    """The delivery log, newest first."""
    body = api(ctx).call("GET", f"{_base(product, org)}/{integration_id}/log",
                         params={"limit": limit})
    rows = _items(body, "log")
    if as_json:
        print_json(rows)
        return
    table(None, ["at", "outcome", "status", "ms", "event", "error"],
          [(r.get("at"), r.get("outcome"), r.get("status_code"), r.get("latency_ms"),
            r.get("event_id"), (r.get("error") or "")[:80]) for r in rows])


@integrations_app.command("redeliver")
def integrations_redeliver(
    ctx: typer.Context, integration_id: IdArg, product: ProductOpt = None, org: OrgOpt = None,
    event: Annotated[int | None, typer.Option(help="Send this stored event again.")] = None,
    since: Annotated[str | None, typer.Option(
        help="With --until: failed and skipped deliveries created in this range "
        "(ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="End of the range (exclusive).")] = None,
) -> None:
    """Send one event again, or every failed or skipped delivery in a time range."""
    payload: dict[str, Any] = ({"event_id": event} if event is not None
                               else {k: v for k, v in (("since", since), ("until", until)) if v})
    body = api(ctx).call("POST", f"{_base(product, org)}/{integration_id}/redeliver",
                         json=payload)
    console.print(f"Queued {body.get('redelivered', 0)} deliveries again.")
