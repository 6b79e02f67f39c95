"""Download image URLs from strangers without becoming a proxy into our own network (SSRF).

http(s) only. Every address a host name resolves to is checked by the connector's resolver, and the
connection goes to exactly those checked addresses (no second lookup); IP literals are checked directly.
Refused by default: everything that is not globally routable (loopback, RFC 1918, unique-local,
link-local and the metadata address, carrier-grade NAT, reserved, unspecified), multicast, and the
IPv6 forms that embed or translate to one of those (mapped, IPv4-compatible, SIIT, 6to4,
Teredo, NAT64 including the local-use prefix). ``URL_ALLOWLIST`` (hosts or networks) opens chosen
ones for tests and private deployments; the Triton server's own ports stay closed even then. Redirects
are followed by hand, each hop checked the same way, at most ``MAX_REDIRECTS``. Size is bounded on
Content-Length and while streaming, time by one deadline for the whole download.

Fairness between clients: downloads carry no cookies (no jar is shared between jobs), a job runs at most
``per_job`` downloads at once (``Fetcher.job_downloads``), and the deadline starts when the download
gets its turn, so one client's dead URLs delay only that client's own images. The shared connection pool
is sized above ``per_job`` times the worker's job concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
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
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible ::a.b.c.d
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # stateless IP/ICMP translation (RFC 7915)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 prefix (RFC 8215)
# RFC 6052 places the IPv4 address around the reserved "u" octet (bits 64-71) by prefix length:
# (first bit, bit count) of each piece. A local-use prefix may be any of /48, /56, /64 or /96.
_RFC6052_LAYOUTS = (((48, 16), (72, 16)), ((56, 8), (72, 24)), ((72, 32),), ((96, 32),))


def _bits(value: int, first: int, count: int) -> int:
    """``count`` bits of a 128-bit ``value`` starting at bit ``first`` (0 = most significant)."""
    return (value >> (128 - first - count)) & ((1 << count) - 1)


def _rfc6052_candidates(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = []
    for layout in _RFC6052_LAYOUTS:
        value = 0
        for first, count in layout:
            value = (value << count) | _bits(int(address), first, count)
        found.append(ipaddress.IPv4Address(value))
    return found


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 one carries or may be translated to.

    Mapped, IPv4-compatible, SIIT, 6to4, Teredo (server and client), the well-known NAT64 prefix and
    every RFC 6052 layout of the local-use NAT64 prefix.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour]
    if address.teredo:
        found += list(address.teredo)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in (_V4_COMPATIBLE, _SIIT, _NAT64)):
        found.append(low32)
    if address in _NAT64_LOCAL:
        found += _rfc6052_candidates(address)
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

    def check(self, host: str, address: IPAddress, port: int, what: str = "image URL") -> None:
        """Raise ImageError unless connecting to ``address:port`` for ``host`` is allowed."""
        if port in self.blocked_ports and not is_public(address):
            raise ImageError(f"{what} points to a blocked address")
        if host.lower().rstrip(".") in self.hosts or any(address in network for network in self.networks):
            return
        if not is_public(address):
            raise ImageError(f"{what} points to a private, loopback or reserved address")


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


POOL_CONNECTIONS = 512


class Fetcher:
    """One aiohttp session per event loop, with the guarded resolver; ``fetch`` returns the body bytes."""

    def __init__(self, policy: AddressPolicy, max_bytes: int, timeout: float, per_job: int = 4) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.per_job = per_job
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=POOL_CONNECTIONS
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # no cookies: nothing carries from one job to another
                trust_env=False,
                headers={"User-Agent": "depth-gateway/0.1"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def job_downloads(self) -> asyncio.Semaphore:
        """A new job's download limit: at most ``per_job`` of its downloads run at once."""
        return asyncio.Semaphore(self.per_job)

    async def fetch(
        self,
        url: str,
        downloads: asyncio.Semaphore | None = None,
        max_bytes: int | None = None,
        timeout: float | None = None,
        what: str = "image",
    ) -> bytes:
        """The body of ``url`` (at most ``max_bytes``, default the image limit, within ``timeout``, default
        the image deadline); waiting for the job's ``downloads`` limit does not count against the deadline.
        Errors name ``what`` was downloaded."""
        timeout = timeout or self.timeout
        async with downloads if downloads is not None else contextlib.nullcontext():
            try:
                async with asyncio.timeout(timeout):
                    return await self._follow(url, max_bytes or self.max_bytes, what)
            except TimeoutError:
                raise ImageError(f"{what} download timed out after {timeout:g} s") from None
            except aiohttp.ClientError:
                raise ImageError(f"could not download the {what}") from None

    async def _follow(self, url: str, limit: int, what: str) -> bytes:
        target = self._checked_url(url, what)
        for _ in range(MAX_REDIRECTS + 1):
            async with self._get_session().get(target, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageError(f"{what} URL redirected without a location")
                    target = self._checked_url(self._join(target, location, what), what)
                    continue
                if response.status != 200:
                    raise ImageError(f"{what} download failed with HTTP status {response.status}")
                return await self._read_bounded(response, limit, what)
        raise ImageError(f"{what} URL redirected more than {MAX_REDIRECTS} times")

    @staticmethod
    def _join(base: URL, location: str, what: str) -> str:
        try:
            return str(base.join(URL(location)))
        except (ValueError, TypeError):
            raise ImageError(f"{what} URL redirected to an invalid URL") from None

    def _checked_url(self, url: str, what: str = "image") -> URL:
        try:
            url.encode("utf-8")
            parsed = URL(url)
            scheme, host, port = parsed.scheme, parsed.host, parsed.port or 0
        except (ValueError, TypeError):  # bad port, bracket, encoding: yarl and str say ValueError
            raise ImageError(f"invalid {what} URL") from None
        if scheme not in ("http", "https") or not host:
            raise ImageError(f"{what} URL must be http or https with a host")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return parsed
        self.policy.check(host, literal, port, f"{what} URL")
        return parsed

    @staticmethod
    async def _read_bounded(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        if response.content_length is not None and response.content_length > limit:
            raise ImageError(f"{what} too large: {response.content_length} bytes, at most {limit}")
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise ImageError(f"{what} too large: more than {limit} bytes")
            chunks.append(chunk)
        if not size:
            raise ImageError(f"{what} URL returned no data")
        return b"".join(chunks)
