"""The file cache connects only to public addresses (or allowed ones): checked on the address
connected to, after every redirect, for names and IP literals alike; a URL with credentials
fails instead of staying pending; one slow host cannot hold every download slot."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.abc import ResolveResult

from jobs.config import Settings
from jobs.egress import AddressPolicy, AddressRefused, GuardedResolver, non_public_kind
from jobs.errors import ConfigError
from jobs.providers.base import Observation, RemoteRef, Submitted
from jobs.providers.http import make_client
from jobs.results import FileCache
from jobs.states import State
from jobs.store import Job, JobFile, NewJob, Store

SECRET = b"internal-service-secret"

NON_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.251",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fd00:ec2::254",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_named(address: str) -> None:
    assert non_public_kind(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert non_public_kind(ipaddress.ip_address(address)) is None


def test_the_allowlist_takes_names_addresses_and_ranges() -> None:
    policy = AddressPolicy(["files.internal", "10.0.0.0/8", "[::1]"])
    assert policy.refusal("files.internal", "192.168.0.7") is None
    assert policy.refusal("other", "10.200.0.1") is None
    assert policy.refusal("::1", "::1") is None
    assert "private" in (policy.refusal("other", "192.168.0.7") or "")
    with pytest.raises(ConfigError, match="JOBS_CACHE_ALLOW_HOSTS"):
        Settings.from_env({"JOBS_CACHE_ALLOW_HOSTS": "http://x/"})
    assert Settings.from_env(
        {"JOBS_CACHE_ALLOW_HOSTS": " a.b , 10.0.0.0/8 "}
    ).cache_allow_hosts == (
        "a.b",
        "10.0.0.0/8",
    )


class _FakeDns:
    """A resolver answering ``address`` for every name: what a rebinding DNS server does."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": 2,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_refuses_a_name_that_resolves_inside() -> None:
    resolver = GuardedResolver(AddressPolicy())
    resolver._inner = _FakeDns("10.0.0.7")  # type: ignore[assignment]
    with pytest.raises(AddressRefused, match=r"files\.example \(10\.0\.0\.7\) is a private"):
        await resolver.resolve("files.example", 443)


# --- against a real server on 127.0.0.1 ----------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect?to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(SECRET)))
        self.end_headers()
        self.wfile.write(SECRET)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def internal() -> Iterator[tuple[int, list[str]]]:
    """An 'internal service' on 127.0.0.1: its port and the paths it was asked for."""
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def store(sqlite_migrated_url: str) -> Iterator[Store]:
    s = Store.open(sqlite_migrated_url)
    yield s
    s.close()


def _succeeded(store: Store, urls: list[str]) -> Job:
    job, _ = store.create_job(NewJob(application="fal-ai/x", arguments={}, download_files=True))
    store.begin_submit(job.id, 0)
    ref = RemoteRef(application="fal-ai/x", request_id=f"req-{job.id}")
    store.mark_submitted(
        job.id, Submitted(ref=ref, observation=Observation(State.QUEUED)), next_poll_at=0
    )
    files = [{"url": url, "content_type": "text/plain"} for url in urls]
    return store.apply(job.id, Observation(State.SUCCEEDED, result={"files": files})).job


async def _fetch(cache: FileCache, store: Store, urls: list[str]) -> list[JobFile]:
    job = _succeeded(store, urls)
    try:
        return await cache.fetch(job.id)
    finally:
        await cache.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_a_local_service_is_not_fetched(
    store: Store, tmp_path: Path, internal: tuple[int, list[str]], host: str
) -> None:
    port, hits = internal
    [row] = await _fetch(FileCache(store, tmp_path), store, [f"http://{host}:{port}/secret"])
    assert row.state == "failed" and row.sha256 is None
    assert (row.error or "").startswith("refused:") and "JOBS_CACHE_ALLOW_HOSTS" in (
        row.error or ""
    )
    assert hits == []  # no request reached the service


async def test_a_redirect_inside_is_refused(
    store: Store, tmp_path: Path, internal: tuple[int, list[str]]
) -> None:
    port, hits = internal
    cache = FileCache(store, tmp_path, allow_hosts=["localhost"])  # the first hop is allowed
    start = f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/secret"
    [row] = await _fetch(cache, store, [start])
    assert row.state == "failed" and "127.0.0.1 is a loopback address" in (row.error or "")
    assert hits == [f"/redirect?to=http://127.0.0.1:{port}/secret"]


async def test_the_address_connected_to_is_what_is_checked(
    store: Store, tmp_path: Path, internal: tuple[int, list[str]]
) -> None:
    """A public-looking name whose DNS answer is 127.0.0.1 (a rebinding DNS server) is refused;
    allowing the range lets the same download through, to the address the resolver gave."""
    port, hits = internal
    for allow, expected in (((), "failed"), (("127.0.0.0/8",), "downloaded")):
        dns = _FakeDns("127.0.0.1")
        resolver = GuardedResolver(AddressPolicy(allow))
        resolver._inner = dns  # type: ignore[assignment]
        client = make_client(max_connections=4, resolver=resolver)
        cache = FileCache(store, tmp_path, allow_hosts=allow, client=client)
        [row] = await _fetch(cache, store, [f"http://files.example.com:{port}/out.txt"])
        assert row.state == expected, row.error
        assert dns.asked == ["files.example.com"]
    assert hits == ["/out.txt"]
    assert row.sha256 == hashlib.sha256(SECRET).hexdigest()


async def test_a_url_with_credentials_fails_instead_of_staying_pending(
    store: Store, tmp_path: Path, internal: tuple[int, list[str]]
) -> None:
    port, hits = internal
    cache = FileCache(store, tmp_path, allow_hosts=["127.0.0.1"])
    [row] = await _fetch(cache, store, [f"http://user:pw@127.0.0.1:{port}/secret"])
    assert row.state == "failed" and "credentials" in (row.error or "")
    assert hits == []


async def test_one_slow_host_does_not_hold_every_slot(store: Store, tmp_path: Path) -> None:
    release = asyncio.Event()
    fast_done = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow.example":
            await release.wait()
        else:
            fast_done.set()
        return httpx.Response(200, content=request.url.path.encode())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    cache = FileCache(store, tmp_path, concurrency=2, host_slots=1, client=client)
    urls = ["https://slow.example/1", "https://slow.example/2", "https://fast.example/3"]
    job = _succeeded(store, urls)
    fetching = asyncio.create_task(cache.fetch(job.id))
    try:
        await asyncio.wait_for(fast_done.wait(), timeout=10)  # while slow.example hangs
    finally:
        release.set()
        rows = await asyncio.wait_for(fetching, timeout=10)
        await cache.aclose()
    assert [r.state for r in rows] == ["downloaded"] * 3
    assert cache._per_host == {}  # hosts no longer in use are forgotten
