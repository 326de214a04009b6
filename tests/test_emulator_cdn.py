"""The emulator's CDN refuses what fal's would: bad credentials, unknown uploads, incomplete
part lists; and it serves only finished files."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from jobs.testing import FakeFal, FakeFalConfig

KEY = "cdn-key"


@pytest.fixture
def fake() -> FakeFal:
    return FakeFal(FakeFalConfig(key=KEY))


@pytest.fixture
async def http(fake: FakeFal) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=fake)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake.test") as client:
        yield client


async def _token(http: httpx.AsyncClient) -> dict[str, str]:
    reply = await http.post(
        "/storage/auth/token?storage_type=fal-cdn-v3",
        json={},
        headers={"Authorization": f"Key {KEY}"},
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["base_url"] == "http://fake.test" and body["token_type"] == "Bearer"
    return {"Authorization": f"Bearer {body['token']}"}


async def test_token_needs_the_key_and_the_storage_type(http: httpx.AsyncClient) -> None:
    url = "/storage/auth/token?storage_type=fal-cdn-v3"
    assert (await http.post(url, headers={"Authorization": "Key wrong"})).status_code == 401
    other = await http.post(
        "/storage/auth/token?storage_type=gcs", headers={"Authorization": f"Key {KEY}"}
    )
    assert other.status_code == 400


async def test_uploads_need_a_live_token(http: httpx.AsyncClient) -> None:
    reply = await http.post("/files/upload", content=b"x", headers={"Authorization": "Bearer nope"})
    assert reply.status_code == 401
    auth = await _token(http)
    reply = await http.post("/files/upload", content=b"x", headers=auth)
    assert reply.status_code == 200 and reply.headers["connection"] == "close"


async def test_multipart_complete_checks_every_part(http: httpx.AsyncClient, fake: FakeFal) -> None:
    auth = await _token(http)
    opened = (
        await http.post("/files/upload/multipart", headers={**auth, "X-Fal-File-Name": "w.bin"})
    ).json()
    base = opened["access_url"].removeprefix("http://fake.test")
    upload = f"{base}/multipart/{opened['uploadId']}"
    one = await http.put(f"{upload}/1", content=b"a" * 10, headers=auth)
    two = await http.put(f"{upload}/2", content=b"b" * 5, headers=auth)
    assert (await http.get(base)).status_code == 404  # not complete: nothing served yet
    missing = {"parts": [{"partNumber": 1, "etag": one.headers["etag"]}]}
    assert (await http.post(f"{upload}/complete", json=missing, headers=auth)).status_code == 400
    wrong = {
        "parts": [{"partNumber": 1, "etag": "x"}, {"partNumber": 2, "etag": two.headers["etag"]}]
    }
    assert (await http.post(f"{upload}/complete", json=wrong, headers=auth)).status_code == 400
    both = {
        "parts": [
            {"partNumber": 1, "etag": one.headers["etag"]},
            {"partNumber": 2, "etag": two.headers["etag"]},
        ]
    }
    done = await http.post(f"{upload}/complete", json=both, headers=auth)
    assert done.status_code == 200 and done.json()["access_url"] == opened["access_url"]
    served = await http.get(base)
    assert served.content == b"a" * 10 + b"b" * 5
    # the upload is finished: its parts cannot be sent again
    assert (await http.put(f"{upload}/3", content=b"c", headers=auth)).status_code == 404
    stats = fake.stats
    assert stats.cdn_parts[opened["uploadId"]] == {1: 1, 2: 1} and stats.cdn_downloads == 1


async def test_refuse_status(http: httpx.AsyncClient, fake: FakeFal) -> None:
    auth = await _token(http)
    fake.update_config({"cdn_refuse_status": 507})
    assert (await http.post("/files/upload", content=b"x", headers=auth)).status_code == 507


async def test_stream_needs_the_key(http: httpx.AsyncClient) -> None:
    reply = await http.post("/_run/fal-ai/flux/dev/stream", json={})
    assert reply.status_code == 401
    bad = await http.post(
        "/_run/fal-ai/flux/dev/stream",
        json={"_fake": {"events": 0}},
        headers={"Authorization": f"Key {KEY}"},
    )
    assert bad.status_code == 422
