"""TLS for the MQTT listener: the server certificate and the client-certificate trust set.

The server certificate comes from the settings (``mqtt_tls_cert``/``mqtt_tls_key``) or is a
self-signed one created once in ``data_dir/mqtt-tls/``. Client certificates are optional;
the ones accepted are those issued by a registered product CA. Product CAs change while the
server runs, so the trust set is rebuilt when it changes (:meth:`TlsContexts.refresh`) and
every new handshake switches to the current context from the SNI callback (which OpenSSL
calls for every ClientHello, with or without a server name). A certificate the current
trust set cannot verify fails the handshake.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corral.settings import Settings

log = logging.getLogger("corral.mqtt")


class CaSource(Protocol):
    async def ca_certificates(self) -> list[x509.Certificate]: ...


def ensure_server_certificate(settings: Settings) -> tuple[Path, Path]:
    """The server certificate and key files: the configured ones, or a self-signed pair in
    ``data_dir/mqtt-tls`` (created on first use; the key is readable by the owner only)."""
    if settings.mqtt_tls_cert is not None:
        return settings.mqtt_tls_cert, settings.mqtt_tls_key or settings.mqtt_tls_cert
    folder = settings.data_dir / "mqtt-tls"
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral MQTT"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corral")])
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    if settings.host not in ("0.0.0.0", "::", "localhost", "127.0.0.1", "::1"):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(settings.host)))
        except ValueError:
            names.append(x509.DNSName(settings.host))
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("created a self-signed MQTT/TLS server certificate in %s", folder)
    return cert_path, key_path


class TlsContexts:
    """The listening context (``base``) and the current client-CA context it hands over to."""

    def __init__(self, settings: Settings, source: CaSource) -> None:
        self.source = source
        self.cert_path, self.key_path = ensure_server_certificate(settings)
        self.fingerprints: frozenset[str] = frozenset()
        self.current = self._context([])
        self.base = self._context([])
        self.base.sni_callback = self._switch

    def _context(self, cas: list[x509.Certificate]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        # Always ask for a certificate (the verify mode is fixed when the connection is
        # created; only the trust store follows the switched context).
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a product CA may be intermediate
        if cas:
            ctx.load_verify_locations(cadata="".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in cas))
        return ctx

    def _switch(self, sslobj: ssl.SSLObject, server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    async def refresh(self) -> bool:
        """Reload the product CAs; True when the trust set changed."""
        cas = await self.source.ca_certificates()
        fps = frozenset(hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
                        for c in cas)
        if fps == self.fingerprints:
            return False
        self.current = self._context(cas)
        self.fingerprints = fps
        log.info("MQTT/TLS trusts %d product CA certificate(s)", len(cas))
        return True


__all__ = ["TlsContexts", "ensure_server_certificate"]
