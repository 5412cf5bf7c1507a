"""The Particle gateway's server key pair and the device's ``server_key`` file; ``corral keys
server``."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from corral.cli.main import app
from corral.transports.particle.keys import (
    KeyFileError,
    address_tlv,
    key_path,
    load_or_create_server_key,
    load_or_create_udp_server_key,
    particle_server_key_file,
    server_key_file,
    udp_key_path,
    udp_server_key_file,
)

CLEAN_ENV: dict[str, str | None] = {"CORRAL_DATA_DIR": None, "CORRAL_DATABASE_URL": None}


def test_server_key_created_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_or_create_server_key(tmp_path)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537
    path = key_path(tmp_path)
    assert path == tmp_path / "particle" / "server_key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_server_key(tmp_path)
    assert again.private_numbers() == key.private_numbers()
    assert [p.name for p in path.parent.iterdir()] == ["server_key.pem"]  # no temp files left


def test_a_key_that_is_not_rsa_2048_is_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = key_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(small.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="RSA-2048"):
        load_or_create_server_key(tmp_path)


def test_server_key_file_ipv4_layout(tmp_path: Path) -> None:
    pub = load_or_create_server_key(tmp_path).public_key()
    data = server_key_file(pub, "192.168.1.20")
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert len(der) == 294 and data[:294] == der
    assert data[294:384] == bytes(90)
    assert data[384:] == b"\x00\x04" + ipaddress.IPv4Address("192.168.1.20").packed
    # Device OS reads the modulus at offset 33 of the SPKI, e is fixed to 65537
    assert int.from_bytes(data[33:33 + 256], "big") == pub.public_numbers().n


def test_server_key_file_domain_name(tmp_path: Path) -> None:
    pub = load_or_create_server_key(tmp_path).public_key()
    data = server_key_file(pub, "corral.example.com")
    assert data[384:] == b"\x01\x12corral.example.com" and len(data) == 384 + 2 + 18
    assert address_tlv("devices.example.com.") == b"\x01\x13devices.example.com"


@pytest.mark.parametrize("host", ["", "::1", "bad host", "a..b", "x" * 254, "ünï.example"])
def test_addresses_device_os_cannot_read_are_refused(host: str) -> None:
    with pytest.raises(KeyFileError):
        address_tlv(host)


def test_cli_keys_server_writes_the_file_and_prints_the_pem(tmp_path: Path) -> None:
    out = tmp_path / "server_key.der"
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(app, ["keys", "server", "--host", "10.0.0.7", "--out", str(out),
                                      "--data-dir", str(data_dir)], env=CLEAN_ENV,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    key = load_or_create_server_key(data_dir)
    assert out.read_bytes() == server_key_file(key.public_key(), "10.0.0.7")
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert pem in result.stdout
    # the same key next time
    again = CliRunner().invoke(app, ["keys", "server", "--host", "corral.local", "--out",
                                     str(out), "--data-dir", str(data_dir)], env=CLEAN_ENV,
                               catch_exceptions=False)
    assert again.exit_code == 0 and pem in again.stdout
    assert out.read_bytes()[384:] == b"\x01\x0ccorral.local"


def test_cli_keys_server_bad_host(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "server", "--host", "::1", "--out",
                                      str(tmp_path / "k.der"), "--data-dir", str(tmp_path)],
                                env=CLEAN_ENV)
    assert result.exit_code == 2
    assert "IPv6" in result.output
    assert not (tmp_path / "k.der").exists()


def test_udp_server_key_created_once_and_its_file_layout(tmp_path: Path) -> None:
    """Gen 3 (DTLS): a P-256 key; the file a device takes (DCT alt_server_public_key +
    alt_server_address): SPKI DER (91 bytes) padded with 0xFF to 192, the address block
    there (type, length, value at 194) and the port u16 big-endian at 258."""
    key = load_or_create_udp_server_key(tmp_path)
    assert isinstance(key.curve, ec.SECP256R1)
    path = udp_key_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_udp_server_key(tmp_path).private_numbers() == key.private_numbers()
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    data = udp_server_key_file(key.public_key(), "192.168.1.20", 5684)
    assert len(der) == 91 and data[:91] == der and data[91:192] == b"\xff" * 101
    assert data[192:198] == b"\x00\x04" + ipaddress.IPv4Address("192.168.1.20").packed
    assert data[258:260] == (5684).to_bytes(2, "big") and len(data) == 320
    named = udp_server_key_file(key.public_key(), "corral.example.com", 15684)
    assert named[192:194 + 18] == b"\x01\x12corral.example.com"
    assert named[258:260] == (15684).to_bytes(2, "big")
    with pytest.raises(KeyFileError, match="too long"):
        udp_server_key_file(key.public_key(), "a" * 60 + ".example.com")
    with pytest.raises(KeyFileError, match="P-256"):
        udp_server_key_file(ec.generate_private_key(ec.SECP384R1()).public_key(), "10.0.0.1")


def test_cli_keys_server_udp(tmp_path: Path) -> None:
    out = tmp_path / "server_key_udp.der"
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(app, ["keys", "server", "--protocol", "udp", "--host",
                                      "10.0.0.7", "--port", "15684", "--out", str(out),
                                      "--data-dir", str(data_dir)], env=CLEAN_ENV,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    key = load_or_create_udp_server_key(data_dir)
    assert out.read_bytes() == udp_server_key_file(key.public_key(), "10.0.0.7", 15684)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert pem in result.stdout and "10.0.0.7:15684 (UDP)" in result.output
    assert not key_path(data_dir).exists()  # the TCP key is another pair, made when needed
    tcp = CliRunner().invoke(app, ["keys", "server", "--host", "10.0.0.7", "--port", "5683",
                                   "--out", str(tmp_path / "x"), "--data-dir", str(data_dir)],
                             env=CLEAN_ENV)
    assert tcp.exit_code == 2 and "--port needs --protocol udp or --layout particle" in \
        tcp.output


def test_particle_layout_of_the_tcp_server_key(tmp_path: Path) -> None:
    """Particle's 512-byte file (``particle keys server``, the DCT's server key slot): the
    SPKI DER, 0xFF fill, the address TLV at 384, the port u16 big-endian at 450 (0xFFFF
    when not given: the device's default, 5683)."""
    from corral.device.particle_fleet import load_server_key

    pub = load_or_create_server_key(tmp_path).public_key()
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    data = particle_server_key_file(pub, "192.168.1.20", 5683)
    assert len(data) == 512 and data[:294] == der and data[294:384] == b"\xff" * 90
    assert data[384:390] == b"\x00\x04" + ipaddress.IPv4Address("192.168.1.20").packed
    assert data[390:450] == b"\xff" * 60 and data[450:452] == b"\x16\x33"
    assert data[452:] == b"\xff" * 60
    named = particle_server_key_file(pub, "corral.example.com")
    assert named[384:386 + 18] == b"\x01\x12corral.example.com"
    assert named[450:452] == b"\xff\xff" and len(named) == 512
    # corral's own simulated devices read it too
    assert load_server_key(data).public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
    with pytest.raises(KeyFileError, match="too long"):
        particle_server_key_file(pub, "a" * 60 + ".example.com")
    with pytest.raises(KeyFileError, match="IPv6"):
        particle_server_key_file(pub, "::1")


def test_cli_keys_server_particle_layout(tmp_path: Path) -> None:
    out = tmp_path / "server_key.der"
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(app, ["keys", "server", "--host", "10.0.0.7", "--layout",
                                      "particle", "--port", "5683", "--out", str(out),
                                      "--data-dir", str(data_dir)], env=CLEAN_ENV,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    key = load_or_create_server_key(data_dir)
    assert out.read_bytes() == particle_server_key_file(key.public_key(), "10.0.0.7", 5683)
    assert "(512 bytes)" in result.output and "10.0.0.7:5683" in result.output
