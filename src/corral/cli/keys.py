"""``corral keys``: the server key a Particle device needs (no server needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corral.cli.admin import DataDir
from corral.cli.config import settings_from
from corral.cli.output import console, errors, fail

keys_app = typer.Typer(help="Keys devices need to reach this corral.", no_args_is_help=True)


@keys_app.command("server")
def server_key(
    host: Annotated[str, typer.Option(
        "--host", help="Address devices connect to: an IPv4 address or a domain name (the "
        "port is always 5683 for Particle TCP devices).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the device's server_key file here (default: server_key.der).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Write the Particle server_key file for devices (server public key DER, padded to 384
    bytes, then the address) and print the server public key as PEM. The key pair is created
    in the data directory on first use."""
    from corral.transports.particle.keys import (
        KeyFileError,
        key_path,
        load_or_create_server_key,
        public_pem,
        server_key_file,
    )

    settings = settings_from(data_dir=data_dir)
    target = out or Path("server_key.der")
    try:
        key = load_or_create_server_key(settings.data_dir)
        data = server_key_file(key.public_key(), host)
    except KeyFileError as exc:
        fail(str(exc), code=2)
    except (OSError, ValueError) as exc:
        fail(f"The server key {key_path(settings.data_dir)} cannot be used: {exc}")
    try:
        target.write_bytes(data)
    except OSError as exc:
        fail(f"Cannot write {target}: {exc}")
    errors.print(f"Wrote {target} ({len(data)} bytes) for devices connecting to {host}:5683.",
                 highlight=False)
    console.print(public_pem(key.public_key()), end="", highlight=False, soft_wrap=True)
