"""JwksCache against an httpx.MockTransport and a hand-turned clock: no network, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from support.jwks import Clock, JwksServer

from jobs.providers.jwks import JwksCache, JwksUnavailable

URL = "https://keys.example/.well-known/jwks.json"


def _raw(keys: list[Ed25519PublicKey]) -> list[bytes]:
    return [k.public_bytes_raw() for k in keys]


def _pub(*keys: Ed25519PrivateKey) -> list[bytes]:
    return [k.public_key().public_bytes_raw() for k in keys]


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def server(signer: Ed25519PrivateKey) -> JwksServer:
    return JwksServer(signer)


@pytest.fixture
async def client(server: JwksServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as c:
        yield c


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _cache(client: httpx.AsyncClient, clock: Clock, **options: Any) -> JwksCache:
    return JwksCache(URL, client, clock=clock, **options)


async def test_fetches_lazily_then_serves_from_cache(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock, signer: Ed25519PrivateKey
) -> None:
    cache = _cache(client, clock)
    assert server.requests == 0
    assert _raw(await cache.keys()) == _pub(signer)
    clock.now += 3599
    await cache.keys()
    assert server.requests == 1


async def test_refetches_after_max_age(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock
) -> None:
    cache = _cache(client, clock, max_age=100)
    await cache.keys()
    rotated = Ed25519PrivateKey.generate()
    server.keys = [rotated]
    clock.now += 100
    # Expired keys are still served while the refetch runs in the background.
    assert _raw(await cache.keys()) != _pub(rotated)
    await cache.idle()
    assert _raw(await cache.keys()) == _pub(rotated)
    assert server.requests == 2


def test_max_age_never_above_a_day(client: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError, match="max_age"):
        JwksCache(URL, client, max_age=24 * 3600 + 1)
    with pytest.raises(ValueError, match="refresh_interval"):
        JwksCache(URL, client, refresh_interval=-1)
    assert JwksCache(URL, client, max_age=24 * 3600).max_age == 24 * 3600


async def test_refresh_after_miss_is_rate_limited(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock
) -> None:
    cache = _cache(client, clock, refresh_interval=60)
    await cache.keys()
    rotated = Ed25519PrivateKey.generate()
    server.keys = [rotated]
    # The cache is younger than refresh_interval: a miss does not refetch.
    clock.now += 59
    assert not await cache.refresh_after_miss()
    assert server.requests == 1
    clock.now += 1
    assert await cache.refresh_after_miss()
    assert _raw(await cache.keys()) == _pub(rotated)
    # A flood of misses right after costs nothing more.
    for _ in range(100):
        assert not await cache.refresh_after_miss()
    assert server.requests == 2


async def test_refresh_with_unchanged_keys_says_so(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock
) -> None:
    cache = _cache(client, clock, refresh_interval=0)
    await cache.keys()
    assert not await cache.refresh_after_miss()  # fetched again, same keys: no use retrying
    assert server.requests == 2


async def test_concurrent_first_calls_fetch_once(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock, signer: Ed25519PrivateKey
) -> None:
    cache = _cache(client, clock)
    results = await asyncio.gather(*(cache.keys() for _ in range(20)))
    assert server.requests == 1
    assert all(_raw(keys) == _pub(signer) for keys in results)


async def test_concurrent_misses_share_one_refetch(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock
) -> None:
    cache = _cache(client, clock, refresh_interval=60)
    tried = await cache.keys()
    server.keys = [Ed25519PrivateKey.generate()]
    clock.now += 61
    answers = await asyncio.gather(*(cache.refresh_after_miss(tried) for _ in range(10)))
    assert server.requests == 2
    assert all(answers)  # those that verified with the old keys learn of the new ones
    # A caller whose keys are already the new ones gains nothing from retrying.
    assert not await cache.refresh_after_miss()


async def test_down_with_keys_cached_keeps_them(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock, signer: Ed25519PrivateKey
) -> None:
    cache = _cache(client, clock, max_age=100, refresh_interval=60)
    await cache.keys()
    server.down = True
    clock.now += 200  # expired: the next use tries to refetch, fails, keeps the old keys
    assert _raw(await cache.keys()) == _pub(signer)
    await cache.idle()
    assert server.requests == 2
    # ... and does not try again on every call while the URL is down.
    assert _raw(await cache.keys()) == _pub(signer)
    assert not await cache.refresh_after_miss()
    assert server.requests == 2
    clock.now += 60
    server.down = False
    await cache.keys()
    await cache.idle()
    assert server.requests == 3


async def test_down_with_no_keys_raises_and_retries_later(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock, signer: Ed25519PrivateKey
) -> None:
    cache = _cache(client, clock, refresh_interval=60)
    server.down = True
    with pytest.raises(JwksUnavailable):
        await cache.keys()
    with pytest.raises(JwksUnavailable):
        await cache.keys()  # rate-limited: not fetched again
    assert server.requests == 1
    server.down = False
    clock.now += 60
    assert _raw(await cache.keys()) == _pub(signer)


@pytest.mark.parametrize(
    "body",
    [
        {"keys": []},
        {"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]},
        {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!not base64!!"}]},
        ["not", "an", "object"],
    ],
    ids=["empty", "rsa-only", "broken-key", "not-an-object"],
)
async def test_a_document_without_usable_keys_is_a_failure(
    client: httpx.AsyncClient, server: JwksServer, clock: Clock, body: Any
) -> None:
    server.body = body
    with pytest.raises(JwksUnavailable):
        await _cache(client, clock).keys()


async def test_not_json_and_transport_errors_are_failures(clock: Clock) -> None:
    def not_json(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>")

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for handler in (not_json, refused):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            with pytest.raises(JwksUnavailable):
                await _cache(client, clock).keys()


async def test_several_keys_are_all_returned(client: httpx.AsyncClient, clock: Clock) -> None:
    other = Ed25519PrivateKey.generate()
    server = JwksServer(other, Ed25519PrivateKey.generate())
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as c:
        keys = await _cache(c, clock).keys()
    assert len(keys) == 2 and _raw(keys)[0] == _pub(other)[0]


class _Hanging:
    """A JWKS host that answers the headers, then sends one byte and never the rest (a
    drip feed), once ``hang`` is set; ``clock_step`` seconds pass during each request."""

    def __init__(self, server: JwksServer, clock: Clock, clock_step: float = 0.0) -> None:
        self.server = server
        self.clock = clock
        self.clock_step = clock_step
        self.hang = False
        self.never = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.clock.now += self.clock_step
        if not self.hang:
            return self.server(request)
        self.server.requests += 1

        async def drip() -> Any:
            yield b"{"
            await self.never.wait()

        return httpx.Response(200, content=drip())


async def test_a_drip_feeding_host_is_cut_off_as_a_whole(server: JwksServer, clock: Clock) -> None:
    host = _Hanging(server, clock)
    host.hang = True
    async with httpx.AsyncClient(transport=httpx.MockTransport(host)) as client:
        cache = _cache(client, clock, fetch_timeout=0.2)
        with pytest.raises(JwksUnavailable):
            await asyncio.wait_for(cache.keys(), timeout=10)


async def test_cached_keys_are_served_while_a_refresh_hangs(
    server: JwksServer, clock: Clock, signer: Ed25519PrivateKey
) -> None:
    host = _Hanging(server, clock)
    async with httpx.AsyncClient(transport=httpx.MockTransport(host)) as client:
        cache = _cache(client, clock, max_age=100, fetch_timeout=30)
        await cache.keys()
        host.hang = True
        clock.now += 200
        for _ in range(3):  # no caller waits on the hanging refresh
            assert _raw(await asyncio.wait_for(cache.keys(), timeout=5)) == _pub(signer)
        assert server.requests == 2  # one refresh in flight, not one per caller
        await cache.aclose()


async def test_the_minute_between_fetches_counts_from_the_end_of_one(
    server: JwksServer, clock: Clock
) -> None:
    host = _Hanging(server, clock, clock_step=50)  # every fetch takes 50 s
    server.down = True
    async with httpx.AsyncClient(transport=httpx.MockTransport(host)) as client:
        cache = _cache(client, clock, refresh_interval=60)
        with pytest.raises(JwksUnavailable):
            await cache.keys()  # started at 1000, failed at 1050
        clock.now += 20  # 70 s after the start, 20 s after the end
        with pytest.raises(JwksUnavailable):
            await cache.keys()
        assert server.requests == 1
        clock.now += 40  # 60 s after the end
        with pytest.raises(JwksUnavailable):
            await cache.keys()
        assert server.requests == 2
