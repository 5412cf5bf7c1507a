"""``corral ledger``: read, write and see the history of ledger documents (over REST).
``--org`` picks an organization's ledgers; without it, your sandbox's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli.client import Json, _items, _unwrap, api
from corral.cli.output import console, fail, print_json, table

ledger_app = typer.Typer(help="Ledgers: JSON documents per owner, product or device.",
                         no_args_is_help=True)

OrgOpt = Annotated[str | None, typer.Option("--org", help="Organization id or slug.")]
NameArg = Annotated[str, typer.Argument(metavar="LEDGER", help="Ledger name.")]
ScopeArg = Annotated[str, typer.Argument(
    metavar="SCOPE_VALUE",
    help="Device id, product id or slug, or owner (product:<x> / owner for defaults).")]


def _base(org: str | None, name: str, scope_value: str) -> str:
    root = f"/v1/orgs/{org}/ledgers" if org else "/v1/ledgers"
    return f"{root}/{name}/instances/{scope_value}"


def _document(value: str) -> Any:
    """Inline JSON, ``@file`` or ``-`` (stdin): must be a JSON object."""
    text = value
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            fail(f"Cannot read {value[1:]}: {exc.strerror or exc}", code=2)
    try:
        data = json.loads(text)
    except ValueError:
        fail("The document is not valid JSON.", code=2)
    if not isinstance(data, dict):
        fail("The document must be a JSON object.", code=2)
    return data


@ledger_app.command("get")
def ledger_get(ctx: typer.Context, name: NameArg, scope_value: ScopeArg, org: OrgOpt = None,
               version: Annotated[int | None, typer.Option(
                   help="An earlier version instead of the current one.")] = None,
               as_json: Json = False) -> None:
    """Print a ledger instance's document (``--json``: the whole instance)."""
    path = _base(org, name, scope_value) + (f"/versions/{version}" if version else "")
    inst = _unwrap(api(ctx).call("GET", path), "instance")
    if as_json:
        print_json(inst)
        return
    console.print(f"[bold]{name}[/bold] {inst.get('scope', {}).get('value')} "
                  f"version {inst.get('version')} ({inst.get('size_bytes')} bytes, "
                  f"{inst.get('updated_at')} by {inst.get('updated_by')})", highlight=False)
    print_json(inst.get("data"))


@ledger_app.command("set")
def ledger_set(ctx: typer.Context, name: NameArg, scope_value: ScopeArg,
               document: Annotated[str, typer.Argument(
                   help="The JSON object: inline, @file or - (stdin).")],
               org: OrgOpt = None,
               merge: Annotated[bool, typer.Option(
                   "--merge", help="Merge into the current document (objects merge key by "
                   "key) instead of replacing it.")] = False,
               as_json: Json = False) -> None:
    """Write a ledger instance (a new version)."""
    data = _document(document)
    r = api(ctx).send("PUT", _base(org, name, scope_value), accept=(422,),
                      params={"set_mode": "Merge" if merge else "Replace"},
                      json={"instance": {"data": data}})
    if r.status_code == 422:  # the ledger's schema: say where
        found = r.json().get("violations") or []
        fail("The document does not match the ledger's schema:\n" + "\n".join(
            f"  {v.get('path')}: {v.get('message')}" for v in found))
    inst = _unwrap(r.json(), "instance")
    if as_json:
        print_json(inst)
        return
    console.print(f"Saved {name} {inst.get('scope', {}).get('value')}: version "
                  f"{inst.get('version')} ({inst.get('size_bytes')} bytes)", highlight=False)


@ledger_app.command("history")
def ledger_history(ctx: typer.Context, name: NameArg, scope_value: ScopeArg,
                   org: OrgOpt = None,
                   limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
                   as_json: Json = False) -> None:
    """A ledger instance's versions, newest first."""
    body = api(ctx).call("GET", _base(org, name, scope_value) + "/versions",
                         params={"limit": limit})
    rows = _items(body, "versions")
    if as_json:
        print_json(rows)
        return
    table(f"{name} {scope_value}", ["version", "op", "bytes", "written", "by", "replaced"],
          [(v.get("version"), v.get("op") + (f" (from {v['restored_from']})"
                                             if v.get("restored_from") else ""),
            v.get("size_bytes"), v.get("created_at"), v.get("updated_by"),
            v.get("replaced_at") or "current") for v in rows])


@ledger_app.command("rollback")
def ledger_rollback(ctx: typer.Context, name: NameArg, scope_value: ScopeArg,
                    version: Annotated[int, typer.Argument(help="The version to restore.")],
                    org: OrgOpt = None) -> None:
    """Restore an earlier version's document as a new version."""
    inst = _unwrap(api(ctx).call("POST", _base(org, name, scope_value) + "/rollback",
                                 json={"version": version}), "instance")
    console.print(f"Restored version {version} of {name} {scope_value} as version "
                  f"{inst.get('version')}", highlight=False)
