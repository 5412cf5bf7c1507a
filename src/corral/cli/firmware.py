"""``corral firmware`` (upload, list, release) and ``corral rollout status`` (over REST)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from corral.cli.client import Json, Product, _items, api
from corral.cli.output import console, errors, fail, fields, print_json, table

firmware_app = typer.Typer(help="Product firmware: upload, list, release.", no_args_is_help=True)
rollout_app = typer.Typer(help="Phased rollouts of a release.", no_args_is_help=True)


class _Reading:
    """A file whose reads advance a progress bar (httpx streams the multipart body from it)."""

    def __init__(self, f: BinaryIO, progress: Progress, task: Any) -> None:
        self.f, self.progress, self.task = f, progress, task

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.progress.advance(self.task, len(chunk))
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _firmware_row(f: dict[str, Any]) -> tuple[Any, ...]:
    released = "default" if f.get("product_default") else ""
    groups = ", ".join(f.get("groups") or [])
    return (f.get("version"), f.get("title"), f.get("size"), f.get("device_count"),
            ", ".join(x for x in (released, groups) if x), f.get("uploaded_on"),
            "yes" if f.get("signature") else "")


@firmware_app.command("upload")
def firmware_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", exists=True, dir_okay=False,
                                         help="The firmware binary.")],
    product: Product,
    version: Annotated[int, typer.Option(min=1, max=65535, help="Version number (greater "
                                         "than every earlier one).")],
    title: Annotated[str | None, typer.Option(help="Title (default: the file name).")] = None,
    description: Annotated[str | None, typer.Option(help="Description.")] = None,
    signature: Annotated[str | None, typer.Option(
        help="Your Ed25519 signature (base64), when the product checks uploaders' keys.")] = None,
    as_json: Json = False,
) -> None:
    """Upload a firmware binary with a progress bar (POST /v1/products/PRODUCT/firmware)."""
    a = api(ctx)
    data = {"version": str(version), "title": title or file.name}
    if description:
        data["description"] = description
    if signature:
        data["signature"] = signature
    size = file.stat().st_size
    with file.open("rb") as f, Progress(
            TextColumn("Uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeElapsedColumn(), console=errors) as progress:
        task = progress.add_task("upload", total=size)
        body = a.call("POST", f"/v1/products/{product}/firmware", data=data,
                      files={"binary": (file.name, _Reading(f, progress, task),
                                        "application/octet-stream")})
    if as_json:
        print_json(body)
        return
    fields(f"Uploaded version {version}", body if isinstance(body, dict) else {},
           ["version", "title", "size", "sha256", "signing_key_id", "module"])


@firmware_app.command("list")
def firmware_list(ctx: typer.Context, product: Product, as_json: Json = False) -> None:
    """List a product's firmware, newest first (GET /v1/products/PRODUCT/firmware)."""
    body = api(ctx).call("GET", f"/v1/products/{product}/firmware")
    if as_json:
        print_json(body)
        return
    table(f"Firmware of {product}",
          ["version", "title", "size", "devices", "released to", "uploaded", "signed"],
          [_firmware_row(f) for f in _items(body, "firmware")])


@firmware_app.command("release")
def firmware_release(
    ctx: typer.Context,
    product: Product,
    version: Annotated[int, typer.Option(min=1, max=65535, help="The version to release.")],
    default: Annotated[bool, typer.Option("--default", help="Make it the product default.")] = False,
    group: Annotated[list[str] | None, typer.Option(
        help="Release to this group (repeat for several).")] = None,
    intelligent: Annotated[bool, typer.Option(
        "--intelligent", help="Update online devices at once.")] = False,
    percent: Annotated[float | None, typer.Option(
        min=0, max=100, help="Phased rollout: this share of the targeted devices.")] = None,
    count: Annotated[int | None, typer.Option(
        min=0, help="Phased rollout: this many of the targeted devices.")] = None,
    failure_threshold: Annotated[float | None, typer.Option(
        min=0, max=100, help="Pause the rollout when more than this % of updates fail.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only show which devices would change target.")] = False,
    as_json: Json = False,
) -> None:
    """Release a version (PUT /v1/products/PRODUCT/firmware/release)."""
    if percent is not None and count is not None:
        fail("Give --percent or --count, not both.", code=2)
    body: dict[str, Any] = {"version": version, "product_default": default,
                            "groups": group or [], "intelligent": intelligent}
    if percent is not None or count is not None:
        rollout: dict[str, Any] = {"percent": percent} if percent is not None else {"count": count}
        if failure_threshold is not None:
            rollout["failure_threshold_percent"] = failure_threshold
        body["rollout"] = rollout
    if dry_run:
        body["dry_run"] = True
    result = api(ctx).call("PUT", f"/v1/products/{product}/firmware/release", json=body)
    if as_json:
        print_json(result)
        return
    if dry_run:
        impact = result.get("impact", {}).get("devices", {}).get("firmware_update", {})
        console.print(f"Dry run: {impact.get('total', 0)} device(s) would update to "
                      f"version {version}; nothing was changed (run it again without "
                      f"--dry-run to release{', and start the rollout' if 'rollout' in body else ''}).",
                      highlight=False)
        table("Devices whose target changes", ["id", "name", "runs", "target now", "target after"],
              [(d["id"], d.get("name"), d.get("firmware_version"), d["before"]["version"],
                d["after"]["version"]) for d in result.get("devices", [])])
        return
    console.print(f"Released version {version}: default={result.get('product_default')}, "
                  f"groups={', '.join(result.get('groups') or []) or '-'}", highlight=False)
    if "rollout" in body:
        started = _newest_rollout(ctx, product, version)
        if started is not None:
            console.print(f"Rollout {started['id']} started; watch it with: corral rollout "
                          f"status {started['id']} --product {product} --watch",
                          highlight=False, soft_wrap=True)


def _newest_rollout(ctx: typer.Context, product: str,
                    version: int | None = None) -> dict[str, Any] | None:
    """The product's newest rollout (of ``version`` when given), or None."""
    body = api(ctx).call("GET", f"/v1/products/{product}/rollouts")
    rows = body.get("rollouts", []) if isinstance(body, dict) else []
    for r in rows:  # newest first
        if isinstance(r, dict) and (version is None or r.get("version") == version):
            return r
    return None


def _rollout_table(r: dict[str, Any]) -> Table:
    p = r.get("progress") or {}
    share = f"{r['percent']:g} %" if r.get("percent") is not None else f"{r.get('count')} devices"
    t = Table(title=f"Rollout {r.get('id')} of version {r.get('version')}: {share}, "
              f"{r.get('state')}", title_justify="left")
    t.add_column("")
    t.add_column("devices", justify="right")
    for label in ("eligible", "targeted", "updated", "failed", "pending"):
        t.add_row(label, str(p.get(label, 0)))
    for row in p.get("pending_by_version") or []:
        t.add_row(f"  pending from v{row['version']}" if row["version"] is not None
                  else "  pending, version unknown", str(row["total"]))
    if p.get("failure_rate") is not None:
        t.add_row("failure rate", f"{p['failure_rate'] * 100:.1f} %")
    if r.get("state_reason"):
        t.caption = r["state_reason"]
    return t


@rollout_app.command("status")
def rollout_status(
    ctx: typer.Context,
    product: Product,
    rollout: Annotated[int | None, typer.Argument(
        help="Rollout id (see GET .../rollouts); default: the product's newest.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    times: Annotated[int | None, typer.Option(
        "--times", min=1, help="With --watch: stop after this many refreshes.")] = None,
    as_json: Json = False,
) -> None:
    """Show a rollout's progress (GET /v1/products/PRODUCT/rollouts/ID), live with --watch."""
    a = api(ctx)
    if rollout is None:
        newest = _newest_rollout(ctx, product)
        if newest is None:
            fail(f"Product {product} has no rollout yet (a --dry-run release starts none): "
                 "release with --percent or --count first.")
        rollout = int(newest["id"])
    path = f"/v1/products/{product}/rollouts/{rollout}"

    def fetch() -> dict[str, Any]:
        body = a.call("GET", path)
        return body.get("rollout", {}) if isinstance(body, dict) else {}

    current = fetch()
    if as_json:
        print_json({"rollout": current})
        return
    if not watch:
        console.print(_rollout_table(current))
        return
    n = 1
    with Live(_rollout_table(current), console=console, auto_refresh=False) as live:
        try:
            while times is None or n < times:
                time.sleep(interval)
                current = fetch()
                live.update(_rollout_table(current), refresh=True)
                n += 1
        except KeyboardInterrupt:
            pass
