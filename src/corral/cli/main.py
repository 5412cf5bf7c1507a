"""The ``corral`` command (entry point ``corral = "corral.cli.main:app"``)."""

from __future__ import annotations

from typing import Annotated

import typer

import corral
from corral.cli import client
from corral.cli.admin import admin_app
from corral.cli.billing import billing_app
from corral.cli.billing_subscription import register as register_billing_subscription
from corral.cli.devices import devices_app
from corral.cli.firmware import firmware_app, rollout_app
from corral.cli.groups import groups_app
from corral.cli.health import fleet_app
from corral.cli.integrations import integrations_app
from corral.cli.keys import keys_app
from corral.cli.ledgers import ledger_app
from corral.cli.serve import serve
from corral.cli.simulate import simulate

app = typer.Typer(
    name="corral",
    help="corral: a self-hosted device cloud with Particle's /v1 REST API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"corral {corral.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    api_url: Annotated[str | None, typer.Option(
        help="Server for the client commands (env CORRAL_API_URL; default: the one you "
        "logged in to, else http://127.0.0.1:8080).")] = None,
    token: Annotated[str | None, typer.Option(
        help="Access token for the client commands (env CORRAL_TOKEN; default: the "
        "stored login).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    ctx.obj = client.GlobalOptions(api_url=api_url, token=token)


app.command()(serve)
app.add_typer(admin_app, name="admin")
app.command()(client.login)
app.command()(client.logout)
app.command()(client.whoami)
app.add_typer(client.orgs_app, name="orgs")
app.add_typer(client.products_app, name="products")
app.add_typer(client.team_app, name="team")
app.add_typer(devices_app, name="devices")
app.add_typer(groups_app, name="groups")
app.command()(simulate)
app.add_typer(keys_app, name="keys")
app.add_typer(integrations_app, name="integrations")
app.add_typer(ledger_app, name="ledger")
app.add_typer(fleet_app, name="fleet")
app.add_typer(firmware_app, name="firmware")
app.add_typer(rollout_app, name="rollout")
register_billing_subscription(billing_app)  # status, invoices (corral.billing)
app.add_typer(billing_app, name="billing")

if __name__ == "__main__":
    app()
