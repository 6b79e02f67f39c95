"""Download image URLs from strangers without becoming a proxy into our own network (SSRF).

http(s) only. Every address a host name resolves to is checked by the connector's resolver, and the
connection goes to exactly those checked addresses (no second lookup); IP literals are checked directly.
Refused by default: everything that is not globally routable (loopback, RFC 1918, unique-local,
link-local and the metadata address, carrier-grade NAT, reserved, unspecified), multicast, and the
IPv4-mapped / 6to4 / NAT64 / Teredo forms of those. ``URL_ALLOWLIST`` (hosts or networks) opens chosen
ones for tests and private deployments; the Triton server's own ports stay closed even then. Redirects
are followed by hand, each hop checked the same way, at most ``MAX_REDIRECTS``. Size is bounded on
Content-Length and while streaming, time by one deadline for the whole download.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from gateway.errors import ImageError

MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried inside an IPv6 one (mapped, 6to4, NAT64, Teredo)."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour]
    if address.teredo:
        found += list(address.teredo)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [ip for ip in found if ip is not None]


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast, and so is every IPv4 address it embeds."""
    return all(ip.is_global and not ip.is_multicast for ip in [address, *embedded_ipv4(address)])


class AddressPolicy:
    """Which (host, address, port) a download may connect to."""

    def __init__(self, allowlist: Iterable[str] = (), blocked_ports: Iterable[int] = ()) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in allowlist:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))
        self.blocked_ports = set(blocked_ports)

    def check(self, host: str, address: IPAddress, port: int) -> None:
        """Raise ImageError unless connecting to ``address:port`` for ``host`` is allowed."""
        if port in self.blocked_ports and not is_public(address):
            raise ImageError("image URL points to a blocked address")
        if host.lower().rstrip(".") in self.hosts or any(address in network for network in self.networks):
            return
        if not is_public(address):
            raise ImageError("image URL points to a private, loopback or reserved address")


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver, then refuses the whole host if any address is not allowed."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self.inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            self.policy.check(host, ipaddress.ip_address(result["host"]), port)
        return results

    async def close(self) -> None:
        await self.inner.close()


class Fetcher:
    """One aiohttp session per event loop, with the guarded resolver; ``fetch`` returns the body bytes."""

    def __init__(self, policy: AddressPolicy, max_bytes: int, timeout: float) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, headers={"User-Agent": "depth-gateway/0.1"}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._follow(url)
        except TimeoutError:
            raise ImageError(f"image download timed out after {self.timeout:g} s") from None
        except aiohttp.ClientError:
            raise ImageError("could not download the image") from None

    async def _follow(self, url: str) -> bytes:
        target = self._checked_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            async with self._get_session().get(target, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageError("image URL redirected without a location")
                    target = self._checked_url(str(target.join(URL(location))))
                    continue
                if response.status != 200:
                    raise ImageError(f"image download failed with HTTP status {response.status}")
                return await self._read_bounded(response)
        raise ImageError(f"image URL redirected more than {MAX_REDIRECTS} times")

    def _checked_url(self, url: str) -> URL:
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            raise ImageError("invalid image URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ImageError("image URL must be http or https with a host")
        try:
            literal = ipaddress.ip_address(parsed.host)
        except ValueError:
            return parsed
        self.policy.check(parsed.host, literal, parsed.port or 0)
        return parsed

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.max_bytes
        if response.content_length is not None and response.content_length > limit:
            raise ImageError(f"image too large: {response.content_length} bytes, at most {limit}")
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise ImageError(f"image too large: more than {limit} bytes")
            chunks.append(chunk)
        if not size:
            raise ImageError("image URL returned no data")
        return b"".join(chunks)
