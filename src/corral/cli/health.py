"""``corral fleet health``: a product's fleet health in the terminal (over REST)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.client import Json, api
from corral.cli.output import console, print_json, table

fleet_app = typer.Typer(help="Fleet health of a product.", no_args_is_help=True)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"


@fleet_app.command("health")
def health(ctx: typer.Context,
           product: Annotated[str, typer.Option("--product", help="Product id or slug.")],
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
           as_json: Json = False) -> None:
    """Online devices, connections, events, call outcomes, firmware versions, update
    success per release, vitals and the most troubled devices (of the devices the filters
    select; disconnect reasons are not counted per firmware version)."""
    params = {k: v for k, v in (("start_date", start), ("end_date", end),
                                ("product_fw", firmware), ("device_group", group),
                                ("device_os_version", device_os)) if v is not None}
    h = api(ctx).call("GET", f"/v1/products/{product}/fleet/health", params=params)
    if as_json:
        print_json(h)
        return
    d, c = h["devices"], h["connections"]
    only = [f"{label} {value}" for label, value in (
        ("firmware", firmware), ("group", group), ("Device OS", device_os)) if value is not None]
    console.print(f"[bold]Fleet health[/bold] of product {h['product_id']}"
                  f"{' (' + ', '.join(only) + ')' if only else ''}, "
                  f"{h['start_date']} to {h['end_date']}", highlight=False)
    table(None, ["devices", "online now", "most online", "connects", "disconnects",
                 "events", "call errors", "device offline"],
          [(d["total"], d["online"], d["online_max"], c["connects"], c["disconnects"],
            h["events"]["received"], _pct(h["error_rate"]), _pct(h["offline_rate"]))])
    fn, var = h["functions"], h["variables"]
    table("Calls", ["", "success", "failure", "offline"],
          [("functions", fn["success"], fn["failure"], fn["offline"]),
           ("variables", var["success"], var["failure"], var["offline"])])
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
            table(f"Most {key}", ["device", key],
                  [(t["device_id"], t[key]) for t in h["top"][key]])
