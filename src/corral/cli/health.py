"""``corral fleet health``: a product's fleet health in the terminal (over REST)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.client import Json, api
from corral.cli.output import console, print_json, table

fleet_app = typer.Typer(help="Fleet health of a product or an organization.",
                        no_args_is_help=True)


SERIES_ROWS = 48  # buckets of the data operations series printed


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"


@fleet_app.command("health")
def health(ctx: typer.Context,
           product: Annotated[str | None, typer.Option(
               "--product", help="Product id or slug.")] = None,
           org: Annotated[str | None, typer.Option(
               "--org", help="Organization id or slug: its products, each and summed "
                             "(instead of --product).")] = None,
           start: Annotated[str | None, typer.Option(
               "--start", help="ISO 8601 start (default: a day ago).")] = None,
           end: Annotated[str | None, typer.Option("--end", help="ISO 8601 end (now).")] = None,
           firmware: Annotated[int | None, typer.Option(
               "--firmware", help="Only devices on this product firmware version.")] = None,
           group: Annotated[str | None, typer.Option(
               "--group", help="Only devices in this device group (by name).")] = None,
           device_os: Annotated[str | None, typer.Option(
               "--device-os", help="Only devices on this Device OS version (e.g. 6.2.0); "
                                   "not with --group.")] = None,
           bucket: Annotated[int, typer.Option(
               "--bucket", min=60, help="Seconds per bucket of the data operations series "
                                        "(a product's; 3600).")] = 3600,
           as_json: Json = False) -> None:
    """Online devices, connections, events, call outcomes, firmware versions, update
    success per release, vitals and the most troubled devices (of the devices the filters
    select; disconnect reasons are not counted per firmware version). With ``--org``: per
    product of the organization and summed (``--group``: each product's group of that
    name)."""
    if (product is None) == (org is None):
        raise typer.BadParameter("give --product or --org (one of them)")
    params = {k: v for k, v in (("start_date", start), ("end_date", end),
                                ("product_fw", firmware), ("device_group", group),
                                ("device_os_version", device_os)) if v is not None}
    only = [f"{label} {value}" for label, value in (
        ("firmware", firmware), ("group", group), ("Device OS", device_os)) if value is not None]
    if org is not None:
        _org_health(ctx, org, params, only, as_json)
        return
    h = api(ctx).call("GET", f"/v1/products/{product}/fleet/health", params=params)
    if as_json:
        print_json(h)
        return
    d, c = h["devices"], h["connections"]
    console.print(f"[bold]Fleet health[/bold] of product {h['product_id']}"
                  f"{' (' + ', '.join(only) + ')' if only else ''}, "
                  f"{h['start_date']} to {h['end_date']}", highlight=False)
    table(None, ["devices", "online now", "most online", "connects", "disconnects",
                 "events", "data operations", "call errors", "timed out", "device offline"],
          [(d["total"], d["online"], d["online_max"], c["connects"], c["disconnects"],
            h["events"]["received"], h["data_operations"], _pct(h["error_rate"]),
            _pct(h["timeout_rate"]), _pct(h["offline_rate"]))])
    if d.get("as_of"):
        console.print(f"devices and firmware as of {d['as_of']} (the once-a-minute sample)",
                      highlight=False)
    fn, var = h["functions"], h["variables"]
    table("Calls", ["", "success", "failure", "timed out", "offline"],
          [(name, x["success"], x["failure"], x["timeout"], x["offline"])
           for name, x in (("functions", fn), ("variables", var))])
    ops = api(ctx).call("GET", f"/v1/products/{product}/metrics/data_operations",
                        params={**params, "bucket_size": bucket})["data_operations"]
    busy = [(p["time"], p["count"]) for p in ops if p["count"]][-SERIES_ROWS:]
    if busy:
        table(f"Data operations per {bucket} s (the latest {SERIES_ROWS} with any)",
              ["from", "data operations"], busy)
    table("Firmware", ["version", "devices", "online"],
          [(f["version"] if f["version"] is not None else "unknown", f["devices"], f["online"])
           for f in h["firmware"]])
    if h["updates"]:
        table("Updates per release", ["version", "applied", "failed", "open", "success"],
              [(u["version"], u["applied"], u["failed"], u["open"], _pct(u["success_rate"]))
               for u in h["updates"]])
    v = h["vitals"]
    rows = [(k, v[k]["median"], v[k]["worst"]) for k in ("rssi", "round_trip", "memory_used")
            if v.get(k)]
    if rows:
        table(f"Vitals ({v['reports']} reports)", ["vital", "median", "worst"], rows)
    if c.get("reasons"):
        table("Disconnect reasons", ["reason", "count"],
              [(x["reason"], x["count"]) for x in c["reasons"]])
    for key in ("disconnects", "errors"):
        if h["top"][key]:
            table(f"Most {key}" + (" (approximate: at least)" if h["top"].get("approximate")
                                   else ""), ["device", key],
                  [(t["device_id"], t[key]) for t in h["top"][key]])


ORG_COLUMNS = ("devices", "online", "disconnects", "events", "data_operations", "calls")


def _org_health(ctx: typer.Context, org: str, params: dict[str, Any], only: list[str],
                as_json: bool) -> None:
    h = api(ctx).call("GET", f"/v1/orgs/{org}/fleet/health", params=params)
    if as_json:
        print_json(h)
        return
    console.print(f"[bold]Fleet health[/bold] of organization {h['org_id']}"
                  f"{' (' + ', '.join(only) + ')' if only else ''}, "
                  f"{h['start_date']} to {h['end_date']}", highlight=False)
    rows = [(p["slug"], *(p[k] for k in ORG_COLUMNS), _pct(p["error_rate"]),
             _pct(p["timeout_rate"])) for p in h["products"]]
    t = h["total"]
    rows.append(("total", *(t.get(k, 0) for k in ORG_COLUMNS), _pct(t["error_rate"]),
                 _pct(t["timeout_rate"])))
    table(None, ["product", "devices", "online", "disconnects", "events", "data ops",
                 "calls", "errors", "timed out"], rows)
