"""Defects an attack found, each closed: cross-site requests and DNS rebinding against a local
server, inputs the store cannot hold, Unicode digits, a full disk, credentials that cannot be
sent, secrets in database errors and logs, long host names in lease owners, reused
idempotency keys, and safe copies of result files."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event
from support.jwks import use_keys
from support.managers import local_settings

from jobs import IdempotencyConflict
from jobs.claims import dead_local_owner, new_owner, owner_host
from jobs.config import Secret, Settings
from jobs.errors import ConfigError
from jobs.logs import RedactFilter
from jobs.manager import AsyncJobManager
from jobs.providers.jwks import JwksCache
from jobs.providers.signatures import public_jwk
from jobs.results import FileCache, safe_name
from jobs.serve import is_loopback, serve
from jobs.states import State
from jobs.store import Callback, Change, JobFile, NewJob, Store
from jobs.testing import FakeFalConfig, FakeFalServer
from jobs.web import create_app

APP = "fal-ai/flux/dev"
BODY_LIMIT = 4096


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.1, queue_time=0.02, seed=5)) as server:
        yield server


@pytest.fixture
async def manager(tmp_path: Path, fal: FakeFalServer) -> AsyncIterator[AsyncJobManager]:
    settings = local_settings(
        tmp_path,
        fal.url,
        public_url="https://jobs.example.com",
        allowed_hosts=("jobs.internal",),
    )
    jm = AsyncJobManager(settings)
    try:
        yield jm
    finally:
        await jm.aclose()
        jm.store.close()


@pytest.fixture
async def client(manager: AsyncJobManager) -> AsyncIterator[httpx.AsyncClient]:
    jwk = public_jwk(Ed25519PrivateKey.generate(), "k")
    keys = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"keys": [jwk]}))
    )
    jwks = JwksCache("https://keys.example/jwks.json", keys)
    app = create_app(
        use_keys(manager, jwks),
        settings=manager.settings,
        body_limit=BODY_LIMIT,
        bind_host="0.0.0.0",
    )
    transport = httpx.ASGITransport(app=app)
    async with keys, httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


def _jobs(manager: AsyncJobManager) -> int:
    return len(manager.store.list_jobs(limit=1000))


# --- CSRF and DNS rebinding ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
async def test_a_submit_not_declared_json_is_refused(
    client: httpx.AsyncClient, manager: AsyncJobManager, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"application": "fal-ai/flux/dev", "arguments": {}}'
    response = await client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["type"] == "unsupported_media_type"
    assert _jobs(manager) == 0


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example"])
async def test_a_host_name_not_served_is_refused(client: httpx.AsyncClient, host: str) -> None:
    for method, path in (("GET", "/v1/jobs"), ("GET", "/"), ("POST", "/v1/jobs/x/cancel")):
        response = await client.request(method, path, headers={"host": host})
        assert response.status_code == 421, (method, path)
        assert "JOBS_ALLOWED_HOSTS" in response.json()["error"]["message"]
    # Health and metrics answer whatever the Host (probes use the pod's address or name).
    assert (await client.get("/healthz", headers={"host": host})).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8000",
        "127.0.0.1:8000",
        "[::1]:8000",
        "10.0.0.5:8000",
        "jobs.example.com",
        "JOBS.internal",
    ],
)
async def test_the_served_names_are_answered(client: httpx.AsyncClient, host: str) -> None:
    assert (await client.get("/v1/jobs", headers={"host": host})).status_code == 200


async def test_a_request_from_another_site_cannot_change_anything(
    client: httpx.AsyncClient, manager: AsyncJobManager
) -> None:
    body = {"application": APP, "arguments": {}}
    for origin in ("https://evil.example", "null", "http://203.0.113.9"):
        response = await client.post("/v1/jobs", json=body, headers={"origin": origin})
        assert response.status_code == 403, origin
    assert _jobs(manager) == 0
    same = await client.post("/v1/jobs", json=body, headers={"origin": "http://localhost:8000"})
    assert same.status_code == 202


async def test_status_urls_use_the_public_url_not_the_host_header(
    client: httpx.AsyncClient,
) -> None:
    body = {"application": APP, "arguments": {}}
    response = await client.post("/v1/jobs", json=body, headers={"host": "10.0.0.5:8000"})
    assert response.json()["status_url"].startswith("https://jobs.example.com/v1/jobs/")


def test_binding_a_public_address_without_a_token_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    settings = local_settings(tmp_path, "http://127.0.0.1:9")
    monkeypatch.setattr("uvicorn.Server.run", lambda self: None)  # start nothing
    monkeypatch.setattr("jobs.serve.configure", lambda *a, **k: None)  # keep caplog's handler
    with caplog.at_level(logging.WARNING, logger="jobs.serve"):
        serve(settings, host="0.0.0.0", port=0)
    assert any("without JOBS_API_TOKEN" in r.getMessage() for r in caplog.records)


def test_serve_without_a_fal_key_refuses_to_start(tmp_path: Path) -> None:
    settings = Settings.from_env({}, database_url=f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(ConfigError, match="no provider credentials are set"):
        serve(settings, host="127.0.0.1", port=0)
    assert not (tmp_path / "x.db").exists()


# --- limits where input enters -------------------------------------------------------------


async def test_a_submit_body_over_the_limit_is_refused(
    client: httpx.AsyncClient, manager: AsyncJobManager
) -> None:
    body = {"application": APP, "arguments": {"prompt": "x" * BODY_LIMIT}}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 413
    assert _jobs(manager) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch", "b" * 1000),
        ("idempotency_key", "k" * 256),
        ("application", "fal-ai/" + "a" * 300),
        ("hint", "h" * 256),
        ("batch", "with\x00nul"),
        ("idempotency_key", "nul\x00"),
    ],
)
async def test_fields_the_columns_cannot_hold_are_refused(
    client: httpx.AsyncClient, manager: AsyncJobManager, field: str, value: str
) -> None:
    body = {"application": APP, "arguments": {}, field: value}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert _jobs(manager) == 0


def test_the_python_api_refuses_them_too() -> None:
    with pytest.raises(ConfigError, match="batch is 1000 characters long; the most is 255"):
        NewJob(application=APP, arguments={}, batch="b" * 1000)
    with pytest.raises(ConfigError, match="labels: 65 labels"):
        NewJob(application=APP, arguments={}, labels={str(i): "v" for i in range(65)})
    with pytest.raises(ConfigError, match="NUL"):
        NewJob(application=APP, arguments={}, labels={"k": "v\x00"})


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/abc%00def",
        "/v1/jobs/abc%00def/result",
        "/v1/jobs/" + "x" * 300,
        "/v1/jobs/abc%00/files/0",
    ],
)
async def test_ids_no_job_can_have_get_400(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "id"


@pytest.mark.parametrize(
    "query",
    [
        "application=a%00b",
        "batch=%00",
        "cursor=%00",
        "limit=%C2%B2",
        "limit=%D9%A3",
        "batch=" + "b" * 300,
    ],
)
async def test_query_parameters_no_job_can_match_get_422(
    client: httpx.AsyncClient, query: str
) -> None:
    response = await client.get(f"/v1/jobs?{query}")
    assert response.status_code == 422, response.text


async def test_a_unicode_digit_file_number_is_not_found(
    client: httpx.AsyncClient, manager: AsyncJobManager
) -> None:
    job = await manager.submit(APP, {})
    response = await client.get(f"/v1/jobs/{job.id}/files/%E2%91%A0")
    assert response.status_code == 404


def test_the_store_answers_nul_and_long_ids_without_sql(sqlite_migrated_url: str) -> None:
    store = Store.open(sqlite_migrated_url)
    try:
        with pytest.raises(Exception, match="no job"):
            store.get("a\x00b")
        assert store.find_by_request_id("fal", "x" * 500) is None
        assert store.list_jobs(batch="a\x00") == []
    finally:
        store.close()


async def test_a_callback_with_a_long_request_id_is_malformed() -> None:
    from jobs.providers.base import Observation

    with pytest.raises(ValueError, match="not an id"):
        Change(obs=Observation(State.SUCCEEDED), request_id="r" * 129)
    with pytest.raises(ValueError, match="not an id"):
        Callback(
            obs=Observation(State.SUCCEEDED),
            provider="fal",
            request_id="r",
            user_id="u",
            job_id="j\x00",
        )


def test_a_long_host_name_still_fits_the_lease_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = "batch-worker-" + "x" * 240  # Kubernetes allows up to 253
    monkeypatch.setattr("socket.gethostname", lambda: pod)
    owner = new_owner()
    assert len(owner) <= 64
    assert owner_host() != owner_host(pod + "y")  # still tells hosts apart
    dead = f"{owner_host()}:{2**22 + 12345}:abcdef"  # a pid no process has
    assert dead_local_owner(dead) == dead


# --- the database under faults -------------------------------------------------------------


async def test_a_full_disk_answers_503_and_healthz_says_writes_fail(
    client: httpx.AsyncClient, manager: AsyncJobManager
) -> None:
    assert (await client.get("/healthz")).json()["database"] == "up"
    engine = manager.store.engine
    engine.dispose()

    @event.listens_for(engine, "connect")
    def full(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count = {pages}")  # no room for one more page
        cursor.close()

    big = {"prompt": "p" * 3000}
    responses = [await client.post("/v1/jobs", json={"application": APP, "arguments": big})]
    while responses[-1].status_code == 202 and len(responses) < 50:  # until the file is full
        responses.append(await client.post("/v1/jobs", json={"application": APP, "arguments": big}))
    failed = responses[-1]
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert error["type"] == "database_unavailable" and "full" in error["message"]
    assert "idempotency_key" in error["message"]
    health = await client.get("/healthz")
    assert health.status_code == 503 and health.json()["database"] == "writes_failing"
    event.remove(engine, "connect", full)
    engine.dispose()
    await manager.submit(APP, {"prompt": "room again"})
    assert (await client.get("/healthz")).status_code == 200


def test_database_errors_hide_the_password_and_the_parameters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Store.open("nosuchdriver://user:hunter2-secret@db.example/jobs")
    assert "hunter2" not in str(caught.value) and "user:***@" in str(caught.value)
    store = Store.open(f"sqlite:///{tmp_path}/none.db")  # not migrated: every query fails
    try:
        with pytest.raises(Exception) as failed:
            store.create_job(NewJob(application=APP, arguments={"prompt": "user-secret-arg"}))
        assert "user-secret-arg" not in str(failed.value)
    finally:
        store.close()


# --- idempotency keys ----------------------------------------------------------------------


async def test_a_reused_idempotency_key_with_other_arguments_is_a_conflict(
    client: httpx.AsyncClient, manager: AsyncJobManager
) -> None:
    first = await manager.submit(APP, {"prompt": "a"}, idempotency_key="k1")
    again = await manager.submit(APP, {"prompt": "a"}, idempotency_key="k1")
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict, match="arguments differ"):
        await manager.submit(APP, {"prompt": "b"}, idempotency_key="k1")
    body = {
        "application": "fal-ai/flux/schnell",
        "arguments": {"prompt": "a"},
        "idempotency_key": "k1",
    }
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["type"] == "idempotency_conflict" and error["job"]["id"] == first.id
    assert error["differs"] == ["application"]


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["abc:def\n", "abc\r\ndef", "ab c", "kéy:secret", "key\x00"])
def test_a_fal_key_that_cannot_be_sent_is_refused_at_once(key: str) -> None:
    with pytest.raises(ConfigError, match="FAL_KEY holds") as caught:
        Settings.from_env({"FAL_KEY": key})
    assert key.strip() not in str(caught.value)
    with pytest.raises(ConfigError, match="FAL_KEY holds"):
        Settings.from_env({}, fal_key=Secret(key))


def test_a_cache_dir_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"JOBS_CACHE_DIR .* is a file, not a directory"):
        Settings.from_env({"JOBS_CACHE_DIR": str(path)})


def test_short_secrets_are_not_redacted_inside_words() -> None:
    redact = RedactFilter(["k", "long-secret-value"]).redact
    assert redact("polling job kitten-k1 for key k") == "polling job kitten-k1 for key ***"
    assert redact("xxlong-secret-valuexx") == "xx***xx"


# --- copying result files out --------------------------------------------------------------


def _file(name: str | None, url: str = "https://cdn.example/x/out.png") -> JobFile:
    return JobFile(
        job_id="j1",
        n=0,
        url=url,
        json_path="$.image",
        file_name=name,
        content_type="image/png",
        size=None,
        sha256=None,
        state="downloaded",
        error=None,
        stored_at=0.0,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("photo\u202egnp.exe", "photognp.exe"),  # right-to-left override: reads "photoexe.png"
        ("zero\u200bwidth.png", "zerowidth.png"),
        ("-rf.png", "_rf.png"),
        ("--help", "_-help.png"),
    ],
)
def test_names_lose_bidi_controls_and_leading_dashes(name: str, expected: str) -> None:
    assert safe_name(_file(name)) == expected


def test_long_names_fit_in_255_bytes_and_keep_their_extension() -> None:
    name = safe_name(_file("é" * 300 + ".png"))
    assert len(name.encode()) <= 255 and name.endswith(".png")


def test_copies_never_follow_links_or_overwrite(tmp_path: Path, sqlite_migrated_url: str) -> None:
    store = Store.open(sqlite_migrated_url)
    try:
        cache = FileCache(store, tmp_path / "cache")
        digest = "ab" * 32
        source = cache.path_for(digest)
        source.parent.mkdir(parents=True)
        source.write_bytes(b"new bytes")
        dest = tmp_path / "out"
        dest.mkdir()
        victim = tmp_path / "victim.txt"
        victim.write_text("keep me")
        os.symlink(victim, dest / "out.png")
        (dest / "out-2.png").write_text("someone else's file")
        row = _file("out.png")
        row = JobFile(**{**row.__dict__, "sha256": digest})
        [saved] = cache.copy_out([row], dest, set())
        assert saved.name == "out-3.png" and (dest / "out-3.png").read_bytes() == b"new bytes"
        assert victim.read_text() == "keep me"
        assert (dest / "out-2.png").read_text() == "someone else's file"
        [again] = cache.copy_out([row], dest, set())  # the same copy again: reused, not repeated
        assert again.name == "out-3.png" and not (dest / "out-4.png").exists()
    finally:
        store.close()


def test_files_with_long_or_nul_names_are_all_recorded(sqlite_migrated_url: str) -> None:
    from jobs.results import find_files

    result = {
        "a": {"url": "https://cdn/a.png", "file_name": "n" * 1000, "content_type": "image/png"},
        "b": {"url": "https://cdn/b\x00.png", "file_name": "x\x00y.png", "content_type": "i\x00"},
    }
    store = Store.open(sqlite_migrated_url)
    try:
        job, _ = store.create_job(NewJob(application=APP, arguments={}))
        rows = store.add_files(job.id, find_files(result, "fal"))
        assert len(rows) == 2
        assert len(rows[0].file_name or "") == 255 and rows[1].file_name == "xy.png"
        assert "\x00" not in rows[1].url
    finally:
        store.close()


def test_a_one_character_key_is_hidden_only_as_a_word() -> None:
    # RedactFilter on a real handler, as jobs.logs.configure installs it.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactFilter(["a"]))
    logger = logging.getLogger("test.hardening")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("a banana and a plan")
    assert stream.getvalue() == "*** banana and *** plan\n"


def test_a_pending_rollback_after_a_dropped_connection_is_retried(
    sqlite_migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import PendingRollbackError

    monkeypatch.setattr("time.sleep", lambda _: None)
    store = Store.open(sqlite_migrated_url)
    calls: list[int] = []

    def once_broken(conn: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise PendingRollbackError("Can't reconnect until invalid transaction is rolled back")
        return "ok"

    try:
        assert store._tx(once_broken) == "ok" and len(calls) == 2
    finally:
        store.close()


# --- on both databases: what PostgreSQL refused with a 500 -----------------------------------


def test_inputs_the_columns_refused_are_handled_on_both_databases(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.providers.base import Observation, RemoteRef, Submitted
    from jobs.results import find_files

    monkeypatch.setattr("socket.gethostname", lambda: "pod-" + "p" * 200)
    store = Store.open(db_url)
    try:
        job, _ = store.create_job(NewJob(application=APP, arguments={"prompt": "nul\x00ok"}))
        store.begin_submit(job.id, 0)
        ref = RemoteRef(application=APP, request_id="req-1")
        submitted = Submitted(ref=ref, observation=Observation(State.QUEUED))
        store.mark_submitted(job.id, submitted, next_poll_at=0)
        # A Kubernetes-length host name: the poller's claim still works.
        [claimed] = store.claim_due(new_owner(), limit=10, lease_seconds=30)
        assert claimed.job.id == job.id
        result = {
            "a": {"url": "https://cdn/a.png", "file_name": "n" * 1000, "content_type": "x/y"},
            "b": {"url": "https://cdn/b\x00.png", "file_name": "x\x00y", "content_type": "i\x00"},
        }
        assert len(store.add_files(job.id, find_files(result, "fal"))) == 2
        assert store.list_jobs(application="a\x00", batch="b" * 300) == []
        with pytest.raises(Exception, match="no job"):
            store.get("id\x00")
    finally:
        store.close()
