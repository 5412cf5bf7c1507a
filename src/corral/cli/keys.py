"""``corral keys``: the server key a Particle device needs (no server needed)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from corral.cli.admin import DataDir
from corral.cli.config import settings_from
from corral.cli.output import console, errors, fail

keys_app = typer.Typer(help="Keys devices need to reach this corral.", no_args_is_help=True)


class Protocol(StrEnum):
    tcp = "tcp"
    udp = "udp"


class Layout(StrEnum):
    corral = "corral"
    particle = "particle"


@keys_app.command("server")
def server_key(
    host: Annotated[str, typer.Option(
        "--host", help="Address devices connect to: an IPv4 address or a domain name.")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the device's server key file here (default: server_key.der, "
        "or server_key_udp.der for --protocol udp).")] = None,
    protocol: Annotated[Protocol, typer.Option(
        "--protocol", help="tcp: Photon/P1-era devices and the Linux virtual device "
        "(RSA, port 5683); udp: Gen 3 devices (Argon, Boron, B-SoM, Tracker, P2, M-SoM; "
        "ECC P-256 over DTLS, port 5684).")] = Protocol.tcp,
    port: Annotated[int | None, typer.Option(
        "--port", help="The port written into the file. UDP: default 5684 (Device OS uses "
        "5684 whatever the file says, except M-SoM). TCP: only with --layout particle "
        "(left unset it means 5683).", min=1, max=65534)] = None,
    layout: Annotated[Layout, typer.Option(
        "--layout", help="TCP: corral (the key zero-padded to 384 bytes, then the address) or "
        "particle (the 512-byte file `particle keys server` writes for the DCT: 0xFF fill, "
        "the address at 384, the port at 450). UDP files always have Particle's 320-byte "
        "layout.")] = Layout.corral,
    data_dir: DataDir = None,
) -> None:
    """Write the Particle server key file for devices and print the server public key as
    PEM. TCP: the RSA public key DER, padded to 384 bytes, then the address (the port is
    always 5683), or with ``--layout particle`` Particle's 512-byte file (0xFF fill, the
    address at 384, the port at 450). UDP: the P-256 public key DER, padded to 192 bytes, then the address and
    the port at 258. The key pair is created in the data directory on first use."""
    from corral.transports.particle.keys import (
        UDP_PORT,
        KeyFileError,
        key_path,
        load_or_create_server_key,
        load_or_create_udp_server_key,
        particle_server_key_file,
        public_pem,
        server_key_file,
        udp_key_path,
        udp_server_key_file,
    )

    settings = settings_from(data_dir=data_dir)
    udp = protocol is Protocol.udp
    particle_layout = layout is Layout.particle
    if port is not None and not udp and not particle_layout:
        fail("--port needs --protocol udp or --layout particle (the short TCP file has no "
             "port: TCP devices use 5683)", code=2)
    target = out or Path("server_key_udp.der" if udp else "server_key.der")
    where = udp_key_path(settings.data_dir) if udp else key_path(settings.data_dir)
    try:
        if udp:
            ec_key = load_or_create_udp_server_key(settings.data_dir)
            public = ec_key.public_key()
            data = udp_server_key_file(public, host, port or UDP_PORT)
            pem = public_pem(public)
        else:
            rsa_key = load_or_create_server_key(settings.data_dir)
            data = (particle_server_key_file(rsa_key.public_key(), host, port)
                    if particle_layout else server_key_file(rsa_key.public_key(), host))
            pem = public_pem(rsa_key.public_key())
    except KeyFileError as exc:
        fail(str(exc), code=2)
    except (OSError, ValueError) as exc:
        fail(f"The server key {where} cannot be used: {exc}")
    try:
        target.write_bytes(data)
    except OSError as exc:
        fail(f"Cannot write {target}: {exc}")
    reach = f"{host}:{port or UDP_PORT} (UDP)" if udp else f"{host}:{port or 5683}"
    errors.print(f"Wrote {target} ({len(data)} bytes) for devices connecting to {reach}.",
                 highlight=False)
    console.print(pem, end="", highlight=False, soft_wrap=True)
