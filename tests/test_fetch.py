"""The URL fetcher against real loopback servers: no request forgery, bounded size and time, clean errors.

A "victim" server counts every hit; none of the refused URLs may reach it, directly or by redirect. The
"allowed" server lives on 127.0.0.2, which the test policy opens (as URL_ALLOWLIST would); the victim
on 127.0.0.1 (and ::1) stays closed. Addresses outside this machine are refused before any connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from gateway.errors import ImageError
from gateway.inputs.fetch import MAX_REDIRECTS, AddressPolicy, Fetcher, embedded_ipv4, is_public
from tests.servers import ImageServer, running_image_server

PRIVATE = "image URL points to a private, loopback or reserved address"


@pytest.fixture(scope="module")
def victim() -> Iterator[ImageServer]:
    with running_image_server("127.0.0.1") as server:
        server.add("secret.jpg", b"secret")
        yield server


@pytest.fixture(scope="module")
def victim6() -> Iterator[ImageServer]:
    with running_image_server("::1") as server:
        server.add("secret.jpg", b"secret")
        yield server


@pytest.fixture(scope="module")
def allowed() -> Iterator[ImageServer]:
    with running_image_server("127.0.0.2") as server:
        server.add("ok.jpg", b"\xff\xd8 image bytes")
        yield server


def fetch(url: str, policy: AddressPolicy | None = None, max_bytes: int = 1 << 20, timeout: float = 2.0) -> bytes:
    async def run() -> bytes:
        fetcher = Fetcher(policy or AddressPolicy(["127.0.0.2"]), max_bytes, timeout)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.close()

    return asyncio.run(run())


def refused(url: str, message: str = PRIVATE, policy: AddressPolicy | None = None) -> None:
    with pytest.raises(ImageError) as caught:
        fetch(url, policy)
    assert str(caught.value) == message


def test_allowed_server_is_fetched(allowed: ImageServer) -> None:
    assert fetch(allowed.url("/files/ok.jpg")) == b"\xff\xd8 image bytes"


def victim_urls(victim: ImageServer, victim6: ImageServer) -> list[str]:
    path = "/files/secret.jpg"
    return [
        f"http://127.0.0.1:{victim.port}{path}",
        f"http://localhost:{victim.port}{path}",
        f"http://LOCALHOST:{victim.port}{path}",
        f"http://[::1]:{victim6.port}{path}",
        f"http://[::ffff:127.0.0.1]:{victim.port}{path}",
        f"http://0.0.0.0:{victim.port}{path}",
    ]


def test_direct_urls_to_this_machine_never_reach_it(victim: ImageServer, victim6: ImageServer) -> None:
    for url in victim_urls(victim, victim6):
        refused(url)
    for url in (f"http://127.1:{victim.port}/files/secret.jpg", f"http://2130706433:{victim.port}/files/secret.jpg"):
        with pytest.raises(ImageError):
            fetch(url)
    assert sum(victim.hits.values()) == 0
    assert sum(victim6.hits.values()) == 0


def test_redirects_to_this_machine_never_reach_it(
    allowed: ImageServer, victim: ImageServer, victim6: ImageServer
) -> None:
    for url in victim_urls(victim, victim6):
        refused(allowed.url(f"/redirect?to={quote(url, safe='')}"))
    assert allowed.hits["/redirect"] == len(victim_urls(victim, victim6))
    assert sum(victim.hits.values()) == 0
    assert sum(victim6.hits.values()) == 0


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "224.0.0.1", "0.0.0.0",
     "255.255.255.255", "fd00::1", "fe80::1", "ff02::1", "::", "::ffff:10.0.0.1", "2002:a9fe:a9fe::1",
     "64:ff9b::a9fe:a9fe", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
     # IPv4-compatible, SIIT, local-use NAT64 (RFC 6052 /96 and /48 layouts): metadata and loopback
     "::169.254.169.254", "::7f00:1", "::ffff:0:127.0.0.1", "::ffff:0:a9fe:a9fe", "64:ff9b:1::a9fe:a9fe",
     "64:ff9b:1:7f00:0:100::"],
)  # fmt: skip
def test_non_public_addresses_are_refused_before_connecting(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    host = f"[{address}]" if ":" in address else address
    started = time.monotonic()
    refused(f"http://{host}/latest/meta-data/")
    assert time.monotonic() - started < 1  # refused, not timed out: no packet was sent


def test_public_addresses_are_public() -> None:
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "::8.8.8.8"):
        assert is_public(ipaddress.ip_address(address))


def test_the_ipv4_inside_each_translated_form_is_found() -> None:
    for address in ("::7f00:1", "::ffff:0:127.0.0.1", "64:ff9b::7f00:1", "64:ff9b:1::7f00:1", "64:ff9b:1:7f00:0:100::"):
        assert ipaddress.IPv4Address("127.0.0.1") in embedded_ipv4(ipaddress.ip_address(address)), address


EMBEDDED_LOOPBACK = ["::127.0.0.1", "::ffff:0:127.0.0.1", "64:ff9b:1::7f00:1"]


@pytest.mark.parametrize("literal", EMBEDDED_LOOPBACK)
def test_ipv4_embedding_forms_are_refused_directly_and_by_redirect(
    literal: str, allowed: ImageServer, victim: ImageServer
) -> None:
    url = f"http://[{literal}]:{victim.port}/files/secret.jpg"
    refused(url)
    refused(allowed.url(f"/redirect?to={quote(url, safe='')}"))
    assert sum(victim.hits.values()) == 0


@pytest.mark.parametrize("answer", ["::7f00:1", "::ffff:0:a9fe:a9fe", "64:ff9b:1::a9fe:a9fe"])
def test_names_resolving_to_embedded_private_addresses_are_refused(
    answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fake_resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict]:
        return [{"hostname": host, "host": answer, "port": port, "family": socket.AF_INET6, "proto": 0, "flags": 0}]

    monkeypatch.setattr("aiohttp.resolver.ThreadedResolver.resolve", fake_resolve)
    refused("http://translated.example/latest/meta-data/")


def test_downloads_carry_no_cookies_from_other_downloads(allowed: ImageServer) -> None:
    async def run() -> None:
        fetcher = Fetcher(AddressPolicy(["127.0.0.2"]), 1 << 20, 2.0)
        try:
            assert await fetcher.fetch(allowed.url("/cookie")) == b"\xff\xd8\xff\xd9"  # sets a cookie
            await fetcher.fetch(allowed.url("/files/ok.jpg"))  # another job, same host
        finally:
            await fetcher.close()

    asyncio.run(run())
    assert allowed.hits["/cookie"] == 1
    assert allowed.cookies == []


def test_one_clients_dead_urls_do_not_delay_another_clients_download(allowed: ImageServer) -> None:
    """Five jobs of 16 URLs that never answer, then one good URL of another job."""

    async def run() -> tuple[bytes, float]:
        fetcher = Fetcher(AddressPolicy(["127.0.0.2"]), 1 << 20, timeout=3.0)
        try:
            jobs = [fetcher.job_downloads() for _ in range(5)]
            hang = allowed.url("/hang")
            dead = [asyncio.create_task(fetcher.fetch(hang, downloads)) for downloads in jobs for _ in range(16)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            body = await fetcher.fetch(allowed.url("/files/ok.jpg"), fetcher.job_downloads())
            elapsed = time.monotonic() - started
            for task in dead:
                task.cancel()
            await asyncio.gather(*dead, return_exceptions=True)
            return body, elapsed
        finally:
            await fetcher.close()

    body, elapsed = asyncio.run(run())
    assert body == b"\xff\xd8 image bytes"
    assert elapsed < 1.0
    assert 0 < allowed.hits["/hang"] <= 5 * 4  # each job runs at most its own limit of downloads


def test_waiting_for_a_jobs_download_limit_is_outside_the_deadline(allowed: ImageServer) -> None:
    """Three URLs of one job, one download at a time: each gets the whole deadline however long it queued."""

    async def run() -> list:
        fetcher = Fetcher(AddressPolicy(["127.0.0.2"]), 1 << 20, timeout=0.5, per_job=1)
        downloads = fetcher.job_downloads()
        try:
            urls = [allowed.url("/hang")] * 2 + [allowed.url("/files/ok.jpg")]
            return await asyncio.gather(*(fetcher.fetch(url, downloads) for url in urls), return_exceptions=True)
        finally:
            await fetcher.close()

    first, second, good = asyncio.run(run())
    assert str(first) == str(second) == "image download timed out after 0.5 s"
    assert good == b"\xff\xd8 image bytes"  # waited 1 s for its turn, then downloaded


@pytest.mark.parametrize("location", ["http://127.0.0.2:99999/x", "http://[::1:80/x", "http://exa mple.com:-1/"])
def test_redirects_to_malformed_urls_fail_cleanly(allowed: ImageServer, location: str) -> None:
    refused(allowed.url(f"/redirect?to={quote(location, safe='')}"), "image URL redirected to an invalid URL")


def test_urls_with_lone_surrogates_fail_cleanly() -> None:
    refused("http://example.com/\ud800", "invalid image URL")


def test_names_resolving_to_metadata_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict]:
        return [{"hostname": host, "host": "169.254.169.254", "port": port, "family": 2, "proto": 0, "flags": 0}]

    monkeypatch.setattr("aiohttp.resolver.ThreadedResolver.resolve", fake_resolve)
    refused("http://metadata.example/latest/")


def test_triton_ports_stay_closed_even_when_loopback_is_allowed(victim: ImageServer) -> None:
    policy = AddressPolicy(["127.0.0.0/8", "localhost"], blocked_ports=[victim.port])
    refused(victim.url("/files/secret.jpg"), "image URL points to a blocked address", policy)
    refused(f"http://localhost:{victim.port}/files/secret.jpg", "image URL points to a blocked address", policy)
    assert sum(victim.hits.values()) == 0
    assert fetch(victim.url("/files/secret.jpg"), AddressPolicy(["127.0.0.0/8"])) == b"secret"  # the control


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.2/x.jpg", "file:///etc/passwd", "gopher://127.0.0.2/", "http://", "not a url", "//x/y"]
)
def test_only_http_and_https(url: str) -> None:
    refused(url, "image URL must be http or https with a host")


def test_redirect_loops_end_after_the_hop_limit(allowed: ImageServer) -> None:
    refused(allowed.url("/loop/0"), f"image URL redirected more than {MAX_REDIRECTS} times")
    assert sum(n for path, n in allowed.hits.items() if path.startswith("/loop")) == MAX_REDIRECTS + 1


def test_lying_content_length_never_reads_past_the_announced_size(allowed: ImageServer) -> None:
    started = time.monotonic()
    try:
        outcome = len(fetch(allowed.url("/lie")))
    except ImageError as error:  # aiohttp may also reject the surplus bytes as a broken response
        outcome = str(error)
    assert outcome == "could not download the image" or outcome <= 1000
    assert time.monotonic() - started < 2


def test_announced_size_over_the_limit(allowed: ImageServer) -> None:
    refused(allowed.url("/huge"), "image too large: 10000000000 bytes, at most 1048576")


def test_endless_stream_stops_at_the_size_limit(allowed: ImageServer) -> None:
    started = time.monotonic()
    refused(allowed.url("/forever"), "image too large: more than 1048576 bytes")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("path", ["/drip", "/hang"])
def test_slow_servers_end_at_the_deadline(allowed: ImageServer, path: str) -> None:
    started = time.monotonic()
    refused(allowed.url(path), "image download timed out after 2 s")
    assert 1.9 < time.monotonic() - started < 3


def test_http_errors_and_unreachable_hosts(allowed: ImageServer) -> None:
    refused(allowed.url("/files/none.jpg"), "image download failed with HTTP status 404")
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    refused(f"http://127.0.0.2:{port}/x.jpg", "could not download the image")
