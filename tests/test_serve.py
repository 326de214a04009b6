"""``jobs serve`` as a real subprocess against the fal emulator: jobs submitted by the CLI,
by Python and over HTTP all finish with their results cached, with webhooks on and off; a
signal stops it cleanly and promptly; its logs are JSON lines that carry the job's ids and
never a secret."""

from __future__ import annotations

import base64
import io
import json
import logging
import signal
import sqlite3
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.serve import ServeProcess, jobs_env, run_cli
from support.waiting import free_port, wait_for

from jobs import JobManager, Settings
from jobs.config import Secret
from jobs.logs import (
    JobContextFilter,
    JsonFormatter,
    RedactFilter,
    TextFormatter,
    job_context,
    secrets_of,
)
from jobs.testing import FakeFalConfig, FakeFalServer

pytestmark = pytest.mark.timeout(90)

APP = "fal-ai/flux/dev"
FAL_KEY = "fal-key-id-4242:fal-key-secret-do-not-log"
API_TOKEN = "api-token-do-not-log-7777"


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.5, queue_time=0.1, seed=3)) as server:
        yield server


def _finished(serve: ServeProcess, job_id: str) -> bool:
    return _state(serve, job_id) == "succeeded"


def _state(serve: ServeProcess, job_id: str) -> str:
    reply = httpx.get(f"{serve.url}/v1/jobs/{job_id}", headers=_auth(), timeout=5)
    reply.raise_for_status()
    state: str = reply.json()["state"]
    return state


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def _expected(fal: FakeFalServer, request_id: str) -> Any:
    request = fal.fake.get_request(request_id)
    assert request is not None
    return request.output(fal.config.result_padding)


@pytest.mark.parametrize("webhooks", [False, True], ids=["polling", "webhooks"])
def test_jobs_from_cli_python_and_http_finish(
    tmp_path: Path, fal: FakeFalServer, webhooks: bool
) -> None:
    port = free_port()
    public_url = f"http://127.0.0.1:{port}" if webhooks else None
    db_url = f"sqlite:///{tmp_path}/jobs.db"
    env = jobs_env(
        db_url, fal.url, fal_key=FAL_KEY, public_url=public_url, JOBS_API_TOKEN=API_TOKEN
    )
    fal.config.key = FAL_KEY
    serve = ServeProcess(env, tmp_path / "serve.log", "--tick", "0.1", "--log-format", "json")
    serve.port, serve.url = port, f"http://127.0.0.1:{port}"
    with serve:
        cli = run_cli(["submit", APP, "--input", '{"prompt": "from the cli"}'], env)
        assert cli.returncode == 0, cli.stderr
        by_cli = json.loads(cli.stdout)
        settings = Settings.from_env(
            {},
            database_url=db_url,
            fal_queue_url=fal.url,
            fal_key=Secret(FAL_KEY),
            public_url=public_url,
        )
        with JobManager(settings) as jm:
            by_python = jm.submit(APP, {"prompt": "from python"}).to_dict()
        reply = httpx.post(
            f"{serve.url}/v1/jobs",
            json={"application": APP, "arguments": {"prompt": "over http"}},
            headers=_auth(),
            timeout=10,
        )
        assert reply.status_code == 202, reply.text
        by_http = reply.json()
        assert by_http["status_url"] == f"{serve.url}/v1/jobs/{by_http['id']}"
        submitted = [by_cli, by_python, by_http]

        for job in submitted:
            wait_for(partial(_finished, serve, job["id"]), 30, f"job {job['id']}")
        fetched_before = fal.fake.stats.result_fetches
        for job in submitted:
            result = httpx.get(f"{serve.url}/v1/jobs/{job['id']}/result", headers=_auth())
            assert result.status_code == 200
            assert result.json() == _expected(fal, job["request_id"])
        assert fal.fake.stats.result_fetches == fetched_before  # served from the cache

        code, took = serve.stop(signal.SIGTERM)
    assert code == 0 and took < 10, serve.log()

    for job in submitted:
        counters = fal.fake.stats.requests[job["request_id"]]
        if webhooks:  # the webhook carried the result: no poll, no fetch
            assert counters.webhook_successes == 1
            assert counters.status_polls == 0 and counters.result_fetches == 0
        else:
            assert counters.webhook_attempts == 0
            assert counters.status_polls >= 1 and counters.result_fetches == 1
    log = serve.log()
    assert FAL_KEY not in log and API_TOKEN not in log
    records = serve.log_records()
    assert {"Application startup complete.", "poller stopped"} <= {r["message"] for r in records}
    if not webhooks:
        finished = [r for r in records if r["message"] == "job succeeded"]
        assert {r["job_id"] for r in finished} == {job["id"] for job in submitted}
        assert all(r["request_id"] for r in finished)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_it_promptly_and_hands_the_leases_back(
    tmp_path: Path, fal: FakeFalServer, sig: int
) -> None:
    db = tmp_path / "jobs.db"
    env = jobs_env(f"sqlite:///{db}", fal.url)
    serve = ServeProcess(env, tmp_path / "serve.log", "--tick", "0.05", "--stop-timeout", "1")
    with serve:
        settings = Settings.from_env(
            {}, database_url=f"sqlite:///{db}", fal_queue_url=fal.url, fal_key=Secret("k")
        )
        with JobManager(settings) as jm:
            ids = [jm.submit(APP, {"n": i, "_fake": {"duration": 60}}).id for i in range(5)]
        fal.config.latency = 30.0  # every poll hangs: the shutdown must cut them off

        def leased() -> int:
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT count(*) FROM jobs WHERE lease_owner IS NOT NULL")
                return int(row.fetchone()[0])

        wait_for(lambda: leased() == len(ids), 20, "the poller to claim every job")
        code, took = serve.stop(sig)
    # 1 s for open connections, 1 s for polls in flight, then the leases go back.
    assert code == 0 and took < 6, (code, took, serve.log())
    assert leased() == 0
    assert "Traceback" not in serve.log()


def test_bad_settings_are_one_line_and_exit_2(tmp_path: Path, fal: FakeFalServer) -> None:
    env = jobs_env(f"sqlite:///{tmp_path}/jobs.db", fal.url, JOBS_AMBIGUOUS_POLICY="maybe")
    done = run_cli(["serve", "--port", str(free_port())], env)
    assert done.returncode == 2
    assert "JOBS_AMBIGUOUS_POLICY" in done.stderr and "Traceback" not in done.stderr


# --- the log format and the redaction filter ---------------------------------------------


def _logger(
    stream: io.StringIO, formatter: logging.Formatter, secrets: list[str]
) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(JobContextFilter())
    handler.addFilter(RedactFilter(secrets))
    logger = logging.getLogger(f"test.serve.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger


def test_json_lines_carry_the_job_ids() -> None:
    stream = io.StringIO()
    log = _logger(stream, JsonFormatter(), [])
    with job_context("job-1", "req-1"):
        log.info("job %s", "succeeded", extra={"polls": 3})
    log.warning("not about a job")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "job succeeded" and first["level"] == "INFO"
    assert (first["job_id"], first["request_id"], first["polls"]) == ("job-1", "req-1", 3)
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert "job_id" not in second


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_secrets_never_reach_the_log(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    log = _logger(stream, formatter, [FAL_KEY, API_TOKEN])
    log.info("key is %s", FAL_KEY)
    log.info(f"token {API_TOKEN} in the message itself")
    log.info("headers %s", {"Authorization": "Key someone-elses-key-123", "Accept": "json"})
    log.info("raw header line: authorization: Bearer abc.def.ghi")
    log.info("extra", extra={"detail": f"Key {FAL_KEY}"})
    try:
        raise RuntimeError(f"request failed with Authorization: Key {FAL_KEY}")
    except RuntimeError:
        log.exception("with a traceback")
    with job_context("job-2"):
        log.error("nested %r", {"auth": {"authorization": f"Bearer {API_TOKEN}"}})
    text = stream.getvalue()
    for secret in (FAL_KEY, "fal-key-secret", API_TOKEN, "someone-elses-key-123", "abc.def.ghi"):
        assert secret not in text
    assert text.count("***") >= 7
    assert "Accept" in text and "with a traceback" in text and "RuntimeError" in text


def test_replicate_credentials_are_redacted_one_by_one(tmp_path: Path) -> None:
    """The Replicate token and each webhook secret of a rotation are credentials: a log
    line or an answer holding any one of them shows it redacted."""
    old = "whsec_" + base64.b64encode(b"o" * 32).decode()
    new = "whsec_" + base64.b64encode(b"n" * 32).decode()
    settings = Settings.from_env(
        {
            "JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db",
            "REPLICATE_API_TOKEN": "r8_replicate-token-do-not-log",
            "JOBS_REPLICATE_WEBHOOK_SECRET": f"{old} {new}",
        }
    )
    stream = io.StringIO()
    log = _logger(stream, TextFormatter(), secrets_of(settings))
    log.info("token r8_replicate-token-do-not-log, new secret %s", new)
    text = stream.getvalue()
    assert "r8_replicate-token-do-not-log" not in text and new not in text
    assert text.count("***") == 2


def test_serve_needs_some_provider_credentials(tmp_path: Path) -> None:
    """A Replicate-only deployment serves; none at all is one clear error."""
    from jobs.providers import configured

    base = {"JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db", "FAL_KEY": ""}
    assert configured(Settings.from_env(base)) == []
    only_replicate = Settings.from_env({**base, "REPLICATE_API_TOKEN": "r8_x"})
    assert configured(only_replicate) == ["replicate"]
    env = jobs_env(f"sqlite:///{tmp_path}/jobs.db", "http://127.0.0.1:9", fal_key="")
    refused = run_cli(["serve", "--port", "0"], {**env, "REPLICATE_API_TOKEN": ""})
    assert refused.returncode == 2
    assert "FAL_KEY" in refused.stderr and "REPLICATE_API_TOKEN" in refused.stderr
