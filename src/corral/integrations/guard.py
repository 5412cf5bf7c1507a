"""The SSRF guard: an integration may not reach the operator's own network.

A tenant chooses an integration's target, so without a guard corral would send requests
on the tenant's behalf to loopback services, the private network, or a cloud metadata
endpoint. The rule: a target address must be globally routable (``ipaddress``'s
``is_global``; IPv4-mapped IPv6 is judged as IPv4), unless the operator lists it in
``CORRAL_INTEGRATIONS_ALLOW_HOSTS`` (host names, addresses, CIDR networks).

The check is made on the *resolved* addresses at connect time, for every connection
(redirects included), and the connection then goes to the address that was checked, so a
DNS answer that changes between check and connect (rebinding) cannot slip through. TLS
still verifies the certificate against the host name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Blocked(Exception):
    """The target is not allowed (or cannot be resolved); never retried."""


class Policy:
    """Which targets integrations may reach."""

    def __init__(self, allow: str | Iterable[str] = "") -> None:
        items = allow.split(",") if isinstance(allow, str) else list(allow)
        self.hosts: set[str] = set()
        self.networks: list[IPNetwork] = []
        for raw in items:
            item = raw.strip().lower()
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.rstrip("."))

    def address_allowed(self, ip: IPAddress, host: str | None = None) -> bool:
        if host is not None and host.lower().rstrip(".") in self.hosts:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.networks if net.version == ip.version):
            return True
        return ip.is_global and not ip.is_multicast

    def check_literal(self, host: str) -> None:
        """At configuration time: refuse a target given as a forbidden IP address (a host
        name is judged when it is resolved, at send time)."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        if not self.address_allowed(ip, host):
            raise Blocked(f"{host} is a private, loopback, link-local or reserved address")

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to for ``host``: every address it resolves to must be
        allowed (a name that resolves to a public and a private address is refused)."""
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise Blocked(f"cannot resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise Blocked(f"{host} has no address")
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not self.address_allowed(ip, host):
                raise Blocked(f"{host} resolves to {address}, a private, loopback, "
                              "link-local or reserved address; integrations may not reach it")
        return addresses[0]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy in front of every TCP connect."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        address = await self.policy.resolve(host, port)
        return await self.inner.connect_tcp(address, port, timeout=timeout,
                                            local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise Blocked("integrations may not use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class PinnedNameContext(ssl.SSLContext):
    """An SSL context that verifies (and sends SNI for) ``pinned_name`` whatever host the
    client library connected to: lets an MQTT client connect to the checked address while
    the certificate is still checked against the broker's name."""

    pinned_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.pinned_name or kwargs.get("server_hostname")
        return super().wrap_socket(sock, *args, **kwargs)


def client_context(*, verify: bool, server_name: str | None = None,
                   ca_pem: str | None = None) -> ssl.SSLContext:
    """A TLS client context: CA-verified and name-checked, or (``verify`` False, Particle's
    ``rejectUnauthorized: false``) accepting any certificate."""
    ctx = PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.pinned_name = server_name
    if verify:
        ctx.load_default_certs()
        if ca_pem:
            ctx.load_verify_locations(cadata=ca_pem)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with every connection going through :class:`GuardedBackend`. No
    proxy from the environment (a proxy would be the address checked, not the target)."""

    def __init__(self, policy: Policy, *, verify: bool, limits: httpx.Limits) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )
