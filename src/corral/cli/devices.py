"""``corral devices``: import device IDs into a product, list and show devices (over REST)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from corral.cli.client import Api, Json, Product, _items, _unwrap, api, error_message
from corral.cli.output import console, errors, fail, fields, print_json, table

IMPORT_CHUNK_IDS = 50_000  # IDs per import request (the server takes up to 200,000)
LISTED = 20  # IDs shown per kind of problem after an import
# any error status: the import handles it itself, to say which chunks were imported
ERROR_STATUSES = tuple(range(400, 600))

IMPORT_HELP = (
    "Import device IDs into a product (POST /v1/products/PRODUCT/devices, multipart file)."
    "\n\n"
    f"A file of more than {IMPORT_CHUNK_IDS:,} IDs is sent as consecutive requests of "
    f"{IMPORT_CHUNK_IDS:,} IDs each, and each request is all-or-nothing on its own: if one "
    "fails, the requests before it stay imported (running the import again is safe; those "
    "IDs are then reported as existing)."
    "\n\n"
    "IDs that are not imported (invalid, nonmember, protected) are listed; that is not an "
    "error (exit status 0). An API error exits with status 1."
)

devices_app = typer.Typer(help="Devices of a product: import IDs, list, show.",
                          no_args_is_help=True)

# what each import outcome means, in the order the summary lists them
OUTCOMES = [
    ("updated", "updatedDeviceIds", "added to the product (or approved from quarantine)"),
    ("existing", "existingDeviceIds", "already in the product"),
    ("invalid", "invalidDeviceIds", "not a device ID (24 hex characters)"),
    ("nonmember", "nonmemberDeviceIds", "claimed by someone outside the product's team"),
    ("protected", "protectedDeviceIds",
     "in another product (--force moves it if you administer both)"),
]


def read_ids(data: bytes, name: str) -> list[str]:
    """The entries of an ID file as the server reads one: UTF-8 (BOM allowed), one per line
    (LF, CRLF or CR), surrounding spaces and blank lines ignored."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        fail(f"{name} is not UTF-8 text; give a file with one device ID per line.")
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def _read(file: Path) -> bytes:
    if str(file) == "-":
        return sys.stdin.buffer.read()
    try:
        return file.read_bytes()
    except OSError as exc:
        fail(f"Cannot read {file}: {exc.strerror or exc}", code=2)


def _post_chunk(a: Api, product: str, ids: list[str], force: bool) -> httpx.Response:
    """One import request: the IDs as a multipart ``file`` (as particle-cli sends them)."""
    payload = ("\n".join(ids) + "\n").encode()
    return a.send("POST", f"/v1/products/{product}/devices", accept=ERROR_STATUSES,
                  files={"file": ("file", payload, "text/plain")},
                  data={"force": "true"} if force else None)


def _result(a: Api, r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        fail(f"The server at {a.api_url} did not answer with an import result "
             f"(HTTP {r.status_code}).")
    return body


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The chunks' answers as one: counts added, ID lists joined in file order."""
    merged: dict[str, Any] = {"updated": sum(int(r.get("updated") or 0) for r in results)}
    for _label, key, _meaning in OUTCOMES:
        merged[key] = [i for r in results for i in (r.get(key) or [])]
    return merged


@devices_app.command("import", help=IMPORT_HELP)
def devices_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(
        metavar="FILE", allow_dash=True, help="Text file with one device ID per line ('-' reads standard input).")],
    product: Product,
    force: Annotated[bool, typer.Option(
        "--force", help="Move devices that are in another product you also administer "
        "(their credentials are reset).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON (the answers of several requests merged: "
        "counts added, ID lists joined).")] = False,
    chunk_size: Annotated[int, typer.Option(hidden=True, min=1)] = IMPORT_CHUNK_IDS,
) -> None:
    """Import device IDs into a product (see ``IMPORT_HELP``)."""
    a = api(ctx)
    ids = read_ids(_read(file), str(file))
    if not ids:
        fail("No device IDs in the file (one 24-hex-character ID per line).")
    chunks = [ids[i:i + chunk_size] for i in range(0, len(ids), chunk_size)]
    results: list[dict[str, Any]] = []
    with Progress(TextColumn("Importing"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("IDs"), TimeElapsedColumn(), console=errors) as progress:
        task = progress.add_task("import", total=len(ids))
        for n, chunk in enumerate(chunks, start=1):
            r = _post_chunk(a, product, chunk, force)
            if r.status_code >= 400:
                progress.stop()
                _fail_chunk(r, n, len(chunks), sum(len(c) for c in chunks[:n - 1]))
            results.append(_result(a, r))
            progress.advance(task, len(chunk))
    merged = _merge(results)
    if as_json:
        print_json(merged)
    else:
        _summary(product, merged)


def _fail_chunk(r: httpx.Response, n: int, of: int, done: int) -> NoReturn:
    """Exit 1 with the server's message, saying which requests were imported before."""
    message = error_message(r)
    if r.status_code == 401:
        message += " — run `corral login` to get a new token."
    if of > 1:
        message = f"Request {n} of {of} failed: {message}"
        if done:
            before = "request 1" if n == 2 else f"requests 1-{n - 1}"
            message += (f". The {done:,} IDs of {before} were imported; running the import "
                        "again is safe.")
    fail(message)


def _summary(product: str, merged: dict[str, Any]) -> None:
    counts = {"updated": merged["updated"]}
    counts.update({label: len(merged[key]) for label, key, _m in OUTCOMES[1:]})
    table(f"Import into {product}", ["result", "devices", "meaning"],
          [(label, f"{counts[label]:,}", meaning) for label, _key, meaning in OUTCOMES])
    for label, key, _meaning in OUTCOMES[2:]:
        listed = merged[key]
        if not listed:
            continue
        console.print(f"[bold]{label.capitalize()}[/] ({len(listed):,}):", highlight=False)
        for device_id in listed[:LISTED]:
            console.print(f"  {device_id}", markup=False, highlight=False)
        if len(listed) > LISTED:
            console.print(f"  ... and {len(listed) - LISTED:,} more", highlight=False)


def _yes(value: Any) -> str:
    return "yes" if value else ""


@devices_app.command("list")
def devices_list(
    ctx: typer.Context,
    product: Product,
    page: Annotated[int, typer.Option(min=1, help="Page number.")] = 1,
    per_page: Annotated[int, typer.Option(min=1, max=1000, help="Devices per page.")] = 25,
    group: Annotated[list[str] | None, typer.Option(
        help="Only devices in this group (repeat for any of several).")] = None,
    tag: Annotated[list[str] | None, typer.Option(
        help="Only devices carrying this tag (repeat: devices carrying all of them).")] = None,
    as_json: Json = False,
) -> None:
    """List a product's devices, most recently heard first (GET /v1/products/PRODUCT/devices)."""
    params: dict[str, Any] = {"page": page, "per_page": per_page}
    if group:
        params["groups"] = ",".join(group)
    if tag:
        params["tags"] = tag
    body = api(ctx).call("GET", f"/v1/products/{product}/devices", params=params)
    if as_json:
        print_json(body)
        return
    t = Table(title=f"Devices of {product}", title_justify="left")
    t.add_column("id", no_wrap=True, min_width=24)  # never cut an ID: people copy them
    t.add_column("name", no_wrap=True)
    for col in ("online", "last_heard", "groups", "tags", "development", "quarantined"):
        t.add_column(col)
    for d in _items(body, "devices"):
        t.add_row(str(d.get("id")), d.get("name") or "", "yes" if d.get("online") else "no",
                  d.get("last_heard") or "never", ", ".join(d.get("groups") or []),
                  ", ".join(d.get("tags") or []),
                  _yes(d.get("development")), _yes(d.get("quarantined")))
    console.print(t)
    meta = body.get("meta") if isinstance(body, dict) else None
    if isinstance(meta, dict):
        console.print(f"Page {meta.get('page')} of {meta.get('total_pages')} "
                      f"({meta.get('total')} devices)", highlight=False)


_DEVICE_KEYS = ["id", "name", "product_id", "platform_id", "online", "last_heard",
                "first_online_at", "last_disconnect_reason", "transport", "groups",
                "tags", "development", "quarantined", "denied", "owner", "notes", "serial_number",
                "firmware_version", "system_firmware_version", "functions", "variables"]


@devices_app.command("get")
def devices_get(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="Device ID (or the name of one of yours).")],
    product: Annotated[str | None, typer.Option(
        help="Product id or slug: get the device as a product device.")] = None,
    as_json: Json = False,
) -> None:
    """Show one device (GET /v1/products/PRODUCT/devices/ID, or /v1/devices/ID)."""
    path = f"/v1/products/{product}/devices/{device}" if product else f"/v1/devices/{device}"
    body = api(ctx).call("GET", path)
    if as_json:
        print_json(body)
    else:
        fields("Device", _unwrap(body, "device"), _DEVICE_KEYS)


@devices_app.command("tag")
def devices_tag(
    ctx: typer.Context,
    devices: Annotated[list[str], typer.Argument(help="Device IDs.")],
    product: Product,
    add: Annotated[list[str] | None, typer.Option(
        "--add", help="Add this tag (repeatable).")] = None,
    remove: Annotated[list[str] | None, typer.Option(
        "--remove", help="Remove this tag (repeatable).")] = None,
    set_: Annotated[str | None, typer.Option(
        "--set", help="Make one device's tags exactly these (comma-separated; '' clears).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Tag devices: --add/--remove on many at once (PUT /v1/products/PRODUCT/devices, all or
    nothing), or --set one device's tags (PUT /v1/products/PRODUCT/devices/ID)."""
    if set_ is not None:
        if add or remove or len(devices) != 1:
            fail("--set takes exactly one device and no --add/--remove")
        tags = [t.strip() for t in set_.split(",") if t.strip()]
        body = api(ctx).call("PUT", f"/v1/products/{product}/devices/{devices[0]}",
                             json={"tags": tags})
        if as_json:
            print_json(body)
        else:
            shown = ", ".join(body.get("tags") or []) if isinstance(body, dict) else ""
            console.print(f"Tags of {devices[0]}: {shown or '(none)'}", highlight=False)
        return
    if not add and not remove:
        fail("Say what to do: --add TAG, --remove TAG or --set TAGS")
    body = api(ctx).call("PUT", f"/v1/products/{product}/devices", json={
        "action": "tags", "devices": devices,
        "metadata": {"add": add or [], "remove": remove or []}})
    if as_json:
        print_json(body)
    else:
        console.print(f"Tags changed on {len(devices)} device(s).", highlight=False)


@devices_app.command("secret")
def devices_secret(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="Device ID.")],
    product: Product,
    as_json: Json = False,
) -> None:
    """Give a device a new MQTT secret and print it; it is shown only this once, and the old
    one stops working (POST /v1/products/PRODUCT/devices/ID/mqtt_secret)."""
    body = api(ctx).call("POST", f"/v1/products/{product}/devices/{device}/mqtt_secret")
    if as_json:
        print_json(body)
        return
    secret = body.get("mqtt_secret") if isinstance(body, dict) else None
    console.print(f"MQTT secret of {device} (shown once):", highlight=False)
    console.print(str(secret), highlight=False, markup=False, soft_wrap=True)
