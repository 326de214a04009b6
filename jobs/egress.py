"""Where the file cache may connect: public internet addresses only, unless allowed.

Result file URLs come from a remote service's output, so a URL pointing at this machine or
its network (``127.0.0.1``, ``localhost``, ``10.0.0.5``, the cloud metadata address
``169.254.169.254``) would make ``jobs`` fetch an internal service's answer and then serve
it from ``GET /v1/jobs/{id}/files/{n}`` (server-side request forgery).

The check is made on the address actually connected to: :class:`GuardedResolver` is the
resolver of the cache's HTTP connector, so a name that resolves to a public address when
checked and to a private one when connected (DNS rebinding) is still refused, and so is
every redirect target. IP literals never reach a resolver, so :meth:`AddressPolicy.check_url_host`
checks them for each URL (the first and every redirect).

``JOBS_CACHE_ALLOW_HOSTS`` (host names or CIDR ranges) lets users who host outputs on a
private network, and tests that run the emulator on ``127.0.0.1``, reach those hosts.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# RFC 6052: IPv6 addresses that a NAT64 gateway translates to the IPv4 address they embed.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
ALLOW_VARIABLE = "JOBS_CACHE_ALLOW_HOSTS"


class AddressRefused(OSError):
    """A connection to a non-public address that no allowlist entry permits.

    An ``OSError`` so that aiohttp's connector passes it on as a connection failure; the
    file cache finds it in the exception chain and records the message, not retrying."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public internet address (``"loopback"``, ``"private"``…), or
    None for a public one. An IPv6 address that embeds an IPv4 one (``::ffff:127.0.0.1``,
    6to4, Teredo, NAT64) is judged by the IPv4 address too."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            kind = non_public_kind(embedded)
            if kind is not None:
                return kind
    checks = (
        (ip.is_loopback, "loopback"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local (cloud metadata)"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "non-public"),
    )
    return next((kind for hit, kind in checks if hit), None)


def parse_allow_entry(entry: str) -> str | IPNetwork:
    """One ``JOBS_CACHE_ALLOW_HOSTS`` entry: a CIDR range or address (``10.0.0.0/8``,
    ``127.0.0.1``, ``::1``), else a host name (lower-cased). ``ValueError`` if neither."""
    text = entry.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    labels = text.split(".")
    if not text or len(text) > 253 or not all(_is_label(label) for label in labels):
        raise ValueError(f"{entry!r} is neither a host name nor an address or CIDR range")
    return text


def _is_label(label: str) -> bool:
    return 0 < len(label) <= 63 and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)


class AddressPolicy:
    """Public addresses are allowed; others only when an ``allow`` entry names the host or
    contains the address."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        entries = [parse_allow_entry(entry) for entry in allow]
        self.names = frozenset(e for e in entries if isinstance(e, str))
        self.networks = tuple(e for e in entries if not isinstance(e, str))

    def name_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def refusal(self, host: str, address: str) -> str | None:
        """Why connecting to ``address`` (``host`` resolved to it) is refused, or None."""
        if self.name_allowed(host):
            return None
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone id
        except ValueError:
            return f"refused: {host} resolved to {address!r}, not an IP address"
        kind = non_public_kind(ip)
        if kind is None or any(ip in network for network in self.networks):
            return None
        shown = host if host == address else f"{host} ({address})"
        return (
            f"refused: {shown} is a {kind} address; "
            f"list the host in {ALLOW_VARIABLE} to download from it"
        )

    def check_url_host(self, host: str) -> str | None:
        """The refusal for a URL whose host is an IP literal (connected to without a
        lookup), or None: a host name is checked when it is resolved."""
        bare = host.removeprefix("[").removesuffix("]")
        try:
            ipaddress.ip_address(bare.partition("%")[0])
        except ValueError:
            return None
        return self.refusal(bare, bare)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses ``policy`` allows; raises
    :class:`AddressRefused` when none is left."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        name = host.rstrip(".")
        refusals = [self.policy.refusal(name, r["host"]) for r in found]
        allowed = [r for r, refused in zip(found, refusals, strict=True) if refused is None]
        if not allowed:
            raise AddressRefused(next((r for r in refusals if r), f"refused: {name} unresolved"))
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def refusal_in(exc: BaseException) -> AddressRefused | None:
    """The :class:`AddressRefused` behind a transport error, if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short (httpx error <- aiohttp error <- ours)
        if seen is None:
            return None
        if isinstance(seen, AddressRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


__all__ = [
    "ALLOW_VARIABLE",
    "AddressPolicy",
    "AddressRefused",
    "GuardedResolver",
    "non_public_kind",
    "parse_allow_entry",
    "refusal_in",
]
