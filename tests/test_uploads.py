"""Uploads to fal's CDN (the emulator's): once per content, resumable, folders zipped, bad
input refused before anything is sent or recorded."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from support.managers import local_settings, open_manager

from jobs import AsyncJobManager
from jobs.config import Secret, Settings
from jobs.errors import ConfigError, ProviderRejected, UploadError
from jobs.migrate import upgrade
from jobs.providers.fal_cdn import FalCdn
from jobs.store import NewUpload, Store
from jobs.testing import FakeFal, FakeFalConfig, FakeFalServer
from jobs.uploads import (
    Uploader,
    encode,
    encode_file,
    parse_file_option,
    parse_ttl,
    zip_folder,
)

KEY = "test-key"
THIRTY_DAYS = 30 * 86400


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(key=KEY)) as server:
        yield server


@pytest.fixture
async def jm(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    settings = local_settings(tmp_path, fal.url, fal_key=KEY, fal_rest_url=fal.url)
    async with open_manager(settings) as manager:
        yield manager


def _store(tmp_path: Path) -> Store:
    store = Store.open(f"sqlite:///{tmp_path}/jobs.db")
    upgrade(store.engine)
    return store


def _uploads(jm: AsyncJobManager) -> list[tuple[str, str]]:
    return [(u.state, u.sha256) for u in jm.store.list_uploads()]


async def test_upload_bytes_once(jm: AsyncJobManager, fal: FakeFalServer) -> None:
    first = await jm.upload(b"hello", "text/plain", "hello.txt")
    assert not first.reused and first.size == 5
    assert first.sha256 == hashlib.sha256(b"hello").hexdigest()
    stored = fal.fake.cdn.file(first.url)
    assert stored is not None and stored.content == b"hello"
    assert stored.content_type == "text/plain"
    # JOBS_UPLOAD_TTL (default 30d) is asked for and recorded
    assert stored.lifecycle == {"expiration_duration_seconds": THIRTY_DAYS}
    assert first.uploaded_at is not None and first.expires_at == first.uploaded_at + THIRTY_DAYS
    async with httpx.AsyncClient() as http:
        assert (await http.get(first.url)).content == b"hello"

    again = await jm.upload("hello", "text/plain")
    assert again.reused and again.url == first.url
    other_type = await jm.upload(b"hello", "application/octet-stream")
    assert not other_type.reused and other_type.url != first.url
    stats = fal.fake.stats
    assert stats.cdn_uploads == 2 and stats.cdn_tokens == 1  # the token is cached
    assert str(first) == first.url
    # what `jobsctl upload` prints
    assert first.to_dict() == {
        "url": first.url,
        "sha256": first.sha256,
        "size": 5,
        "content_type": "text/plain",
        "reused": False,
    }
    assert again.to_dict()["reused"] is True


async def test_reuse_survives_a_new_process(
    tmp_path: Path, jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"\x89PNG not really")
    first = await jm.upload_file(path)
    assert first.content_type == "image/png" and first.file_name == "cat.png"
    settings = local_settings(tmp_path, fal.url, fal_key=KEY, fal_rest_url=fal.url)
    async with open_manager(settings) as other:
        again = await other.upload_file(path)
    assert again.reused and again.url == first.url
    assert fal.fake.stats.cdn_uploads == 1 and fal.fake.stats.cdn_tokens == 1


async def test_expired_upload_is_sent_again(tmp_path: Path, fal: FakeFalServer) -> None:
    store = _store(tmp_path)
    now = [1_000_000.0]
    async with httpx.AsyncClient() as http:
        cdn = FalCdn(rest_url=fal.url, key=Secret(KEY), client=http)
        uploader = Uploader(store, cdn, ttl="2h", clock=lambda: now[0])
        first = await uploader.upload(b"short-lived", "text/plain")
        assert first.expires_at == now[0] + 7200
        now[0] += 3000  # still an hour left (the margin is min(1h, ttl/2)): reused
        assert (await uploader.upload(b"short-lived", "text/plain")).reused
        now[0] += 3000  # under an hour left: a job might outlive the URL, so upload anew
        second = await uploader.upload(b"short-lived", "text/plain")
    store.close()
    assert not second.reused and second.url != first.url
    assert fal.fake.stats.cdn_uploads == 2


async def test_never_sends_no_lifetime(tmp_path: Path, fal: FakeFalServer) -> None:
    settings = local_settings(
        tmp_path, fal.url, fal_key=KEY, fal_rest_url=fal.url, upload_ttl="never"
    )
    async with open_manager(settings) as jm:
        uploaded = await jm.upload(b"forever", "text/plain")
    stored = fal.fake.cdn.file(uploaded.url)
    assert stored is not None and stored.lifecycle is None and uploaded.expires_at is None


async def test_token_is_refreshed_when_it_expires(fal: FakeFalServer) -> None:
    now = [time.time()]
    async with httpx.AsyncClient() as http:
        cdn = FalCdn(rest_url=fal.url, key=Secret(KEY), client=http, clock=lambda: now[0])
        first = await cdn.token()
        assert await cdn.token() is first
        now[0] = first.expires_at  # expired (60 s early, in fact)
        second = await cdn.token()
    assert second.token != first.token and fal.fake.stats.cdn_tokens == 2


async def test_folder_is_zipped_deterministically(
    tmp_path: Path, jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    def make(root: Path) -> Path:
        (root / "sub").mkdir(parents=True)
        (root / "b.png").write_bytes(b"B" * 100)
        (root / "a.txt").write_text("caption a")
        (root / "sub" / "c.jpg").write_bytes(b"C" * 50)
        return root

    one = make(tmp_path / "one" / "photos")
    two = make(tmp_path / "two" / "photos")
    os.utime(two / "a.txt", (0, 0))  # other timestamps: the same bytes all the same
    os.chmod(two / "b.png", 0o600)
    first = await jm.upload_file(one)
    assert first.content_type == "application/zip" and first.file_name == "photos.zip"
    second = await jm.upload_file(two)
    assert second.reused and second.sha256 == first.sha256 and second.url == first.url
    stored = fal.fake.cdn.file(first.url)
    assert stored is not None
    with zipfile.ZipFile(io.BytesIO(stored.content)) as archive:
        assert archive.namelist() == ["a.txt", "b.png", "sub/c.jpg"]
        assert archive.read("sub/c.jpg") == b"C" * 50
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert fal.fake.stats.cdn_uploads == 1


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="no files"):
        zip_folder(tmp_path, tmp_path.parent / "empty.zip")


async def test_multipart_sends_each_part_once_in_parallel(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    store = _store(tmp_path)
    data = os.urandom(5 * 1000 + 7)
    async with httpx.AsyncClient() as http:
        cdn = FalCdn(rest_url=fal.url, key=Secret(KEY), client=http)
        uploader = Uploader(store, cdn, threshold=4096, part_size=1000, concurrency=3)
        uploaded = await uploader.upload(data, "application/octet-stream", "big.bin")
        again = await uploader.upload(data, "application/octet-stream", "big.bin")
    store.close()
    stored = fal.fake.cdn.file(uploaded.url)
    assert stored is not None and stored.content == data
    stats = fal.fake.stats
    assert stats.cdn_multipart_initiated == 1 and stats.cdn_completes == 1
    assert stats.cdn_parts == {next(iter(stats.cdn_parts)): {n: 1 for n in range(1, 7)}}
    assert again.reused and again.url == uploaded.url and stats.cdn_part_puts == 6


async def test_missing_file_records_and_sends_nothing(
    tmp_path: Path, jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    with pytest.raises(UploadError, match="does not exist"):
        await jm.upload_file(tmp_path / "nope.png")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UploadError, match="not a file"):
        await jm.upload_file(fifo)
    assert _uploads(jm) == [] and fal.fake.stats.cdn_tokens == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_unreadable_file_is_refused(tmp_path: Path, jm: AsyncJobManager) -> None:
    path = tmp_path / "secret.bin"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(UploadError, match="permission denied"):
        await jm.upload_file(path)
    assert _uploads(jm) == []


async def test_over_the_size_cap(tmp_path: Path, fal: FakeFalServer) -> None:
    settings = local_settings(
        tmp_path, fal.url, fal_key=KEY, fal_rest_url=fal.url, upload_max_bytes=10
    )
    async with open_manager(settings) as jm:
        with pytest.raises(UploadError, match="over the limit of 10"):
            await jm.upload(b"x" * 11, "text/plain")
        assert _uploads(jm) == []
    assert fal.fake.stats.cdn_tokens == 0


async def test_no_credentials(tmp_path: Path, fal: FakeFalServer) -> None:
    settings = local_settings(tmp_path, fal.url, fal_key=KEY, fal_rest_url=fal.url)
    async with open_manager(settings.replace(fal_key=None)) as jm:
        with pytest.raises(ConfigError, match="FAL_KEY"):
            await jm.upload(b"x", "text/plain")
        assert _uploads(jm) == []
    assert fal.fake.stats.cdn_tokens == 0


async def test_wrong_key_and_refusing_cdn(tmp_path: Path, fal: FakeFalServer) -> None:
    settings = local_settings(tmp_path, fal.url, fal_key="wrong", fal_rest_url=fal.url)
    async with open_manager(settings) as jm:
        with pytest.raises(ProviderRejected, match="HTTP 401") as error:
            await jm.upload(b"x", "text/plain")
        assert "wrong" not in str(error.value)
    fal.fake.update_config({"cdn_refuse_status": 403})
    settings = settings.replace(fal_key=Secret(KEY))
    async with open_manager(settings) as jm:
        with pytest.raises(ProviderRejected, match=r"refused the upload \(HTTP 403\)"):
            await jm.upload(b"x", "text/plain")
        assert _uploads(jm) == []


def test_bad_ttl() -> None:
    assert parse_ttl("30d") == THIRTY_DAYS and parse_ttl("90") == 90 and parse_ttl("never") is None
    with pytest.raises(ConfigError, match="JOBS_UPLOAD_TTL"):
        parse_ttl("soon")
    with pytest.raises(ConfigError, match="JOBS_UPLOAD_TTL"):
        Settings.from_env({"JOBS_UPLOAD_TTL": "0s"})


def test_encode(tmp_path: Path) -> None:
    assert encode("hi", "text/plain") == "data:text/plain;base64,aGk="
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"a": 1}))
    assert encode_file(path).startswith("data:application/json;base64,")


RESUME_SCRIPT = """
import asyncio, sys
import httpx
from jobs.config import Secret, Settings
from jobs.providers.fal_cdn import FalCdn
from jobs.store import NewUpload, Store
from jobs.uploads import Uploader

async def main(db, url, path):
    store = Store.open(db)
    async with httpx.AsyncClient(timeout=60) as http:
        cdn = FalCdn(rest_url=url, key=Secret("test-key"), client=http)
        await Uploader(store, cdn, concurrency=2).upload_file(path)

asyncio.run(main(*sys.argv[1:4]))
"""


async def test_killed_upload_resumes_with_missing_parts_only(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    import subprocess
    import sys

    path = tmp_path / "weights.safetensors"
    with path.open("wb") as out:
        for _ in range(15):  # 150 MiB: 15 parts of 10 MiB
            out.write(os.urandom(10 * 1024 * 1024))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    db = f"sqlite:///{tmp_path}/jobs.db"
    store = _store(tmp_path)
    fal.fake.update_config({"cdn_part_delay": 0.2})
    child = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, db, fal.url, str(path)])
    try:
        deadline = time.monotonic() + 60
        partial = None
        while time.monotonic() < deadline and child.poll() is None:
            partial = store.find_partial_upload(digest, "application/octet-stream", 10 * 1024**2)
            if partial is not None and len(partial[1]) >= 4:
                break
            time.sleep(0.05)
        child.kill()  # SIGKILL: no cleanup, mid-upload
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert partial is not None and 4 <= len(partial[1]) < 15, "killed too late to prove a resume"
    sent_before = store.find_partial_upload(digest, "application/octet-stream", 10 * 1024**2)
    assert sent_before is not None
    recorded = sent_before[1]
    fal.fake.update_config({"cdn_part_delay": 0})

    async with httpx.AsyncClient(timeout=60) as http:
        uploader = Uploader(store, FalCdn(rest_url=fal.url, key=Secret(KEY), client=http))
        resumed = await uploader.upload_file(path)
        again = await uploader.upload_file(path)
    store.close()
    stats = fal.fake.stats
    assert stats.cdn_multipart_initiated == 1 and stats.cdn_completes == 1
    (counts,) = stats.cdn_parts.values()
    assert sorted(counts) == list(range(1, 16))
    assert all(counts[n] == 1 for n in recorded)  # recorded parts were not sent again
    # only the parts in flight at the kill (at most the child's concurrency) went twice
    assert sum(counts.values()) - 15 <= 2
    stored = fal.fake.cdn.file(resumed.url)
    assert stored is not None and hashlib.sha256(stored.content).hexdigest() == digest
    assert resumed.sha256 == digest and again.reused and again.url == resumed.url


async def test_upload_inputs_sets_dotted_keys(
    tmp_path: Path, jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(b"cat")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "1.jpg").write_bytes(b"one")
    arguments = {"prompt": "p", "training": {"steps": 10}}
    files = [("image_url", str(image)), ("training.images_data_url", str(photos))]
    updated, uploaded = await jm.upload_inputs(arguments, files)
    assert updated["image_url"] == uploaded[0].url
    assert updated["training"] == {"steps": 10, "images_data_url": uploaded[1].url}
    assert arguments == {"prompt": "p", "training": {"steps": 10}}  # the caller's is untouched
    again, reused = await jm.upload_inputs(arguments, files)
    assert again == updated and all(u.reused for u in reused)
    assert fal.fake.stats.cdn_uploads == 2


async def test_upload_inputs_checks_every_path_first(
    tmp_path: Path, jm: AsyncJobManager, fal: FakeFalServer
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(b"good")
    with pytest.raises(UploadError, match="does not exist"):
        await jm.upload_inputs({}, [("a", str(good)), ("b", str(tmp_path / "missing.png"))])
    with pytest.raises(UploadError, match="prompt is not an object"):
        await jm.upload_inputs({"prompt": "x"}, [("prompt.url", str(good))])
    assert _uploads(jm) == [] and fal.fake.stats.cdn_tokens == 0


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("image_url=cat.png", ("image_url", "cat.png")), ("a.b=x=y.png", ("a.b", "x=y.png"))],
)
def test_parse_file_option(text: str, parsed: tuple[str, str]) -> None:
    assert parse_file_option(text) == parsed


@pytest.mark.parametrize("text", ["cat.png", "=cat.png", "a..b=x", "key="])
def test_parse_file_option_refuses(text: str) -> None:
    with pytest.raises(UploadError, match="KEY=PATH"):
        parse_file_option(text)


async def test_token_dead_early_is_refreshed_once() -> None:
    """The CDN's clock says the token expired while ours says it lives: a 401, a new token,
    the upload goes through."""
    cdn_now = [1_000_000.0]
    fake = FakeFal(FakeFalConfig(key=KEY, cdn_token_ttl=3600), wall_clock=lambda: cdn_now[0])
    transport = httpx.ASGITransport(app=fake)
    async with httpx.AsyncClient(transport=transport, base_url="http://cdn.test") as http:
        ours = [1_000_000.0]
        cdn = FalCdn(
            rest_url="http://cdn.test", key=Secret(KEY), client=http, clock=lambda: ours[0]
        )
        await cdn.upload(b"one", content_type="text/plain", file_name=None, lifetime_seconds=None)
        cdn_now[0] += 7200  # expired at the CDN only
        url = await cdn.upload(
            b"two", content_type="text/plain", file_name=None, lifetime_seconds=None
        )
    stored = fake.cdn.file(url)
    assert stored is not None and stored.content == b"two"
    assert fake.stats.cdn_tokens == 2 and fake.stats.cdn_uploads == 2


async def test_resume_of_an_upload_the_cdn_forgot_starts_over(
    tmp_path: Path, fal: FakeFalServer
) -> None:
    store = _store(tmp_path)
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    stale = store.begin_upload(
        NewUpload(
            sha256=digest,
            size=len(data),
            content_type="application/octet-stream",
            file_name=None,
            lifecycle_seconds=None,
            part_size=1000,
            multipart_id="expired-at-the-cdn",
            access_url=f"{fal.url}/files/gone/upload.bin",
        )
    )
    store.record_part(stale.id, 1, '"etag-1"', 1000)
    async with httpx.AsyncClient() as http:
        cdn = FalCdn(rest_url=fal.url, key=Secret(KEY), client=http)
        uploader = Uploader(store, cdn, threshold=2000, part_size=1000)
        uploaded = await uploader.upload(data, "application/octet-stream")
    states = {u.id: u.state for u in store.list_uploads()}
    store.close()
    assert states[stale.id] == "abandoned" and list(states.values()).count("uploaded") == 1
    stored = fal.fake.cdn.file(uploaded.url)
    assert stored is not None and stored.content == data
    assert fal.fake.stats.cdn_multipart_initiated == 1
