"""Secrets never leak: ``jobs serve`` (JSON logs at DEBUG) and the CLI run real jobs against
the fal emulator with a recognisable ``FAL_KEY`` and ``JOBS_API_TOKEN``: submitted by the
CLI and over HTTP, with webhooks and by polling, succeeding, failing remotely and rejected
at submit, plus every kind of error answer. Afterwards neither secret, nor any recognisable
piece of one, appears in the server's log, the CLI's output, any answer of the API (bodies
and headers, errors, ``/metrics``, the dashboard), any column of any table, or the raw bytes
of the database files."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.serve import ServeProcess, jobs_env, run_cli
from support.waiting import free_port, wait_for

from jobs.testing import FakeFalConfig, FakeFalServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

APP = "fal-ai/flux/dev"
FAL_KEY_ID = "fal-id-XYZ123"
FAL_KEY_SECRET = "fal-secret-XYZ123-do-not-leak"
FAL_KEY = f"{FAL_KEY_ID}:{FAL_KEY_SECRET}"
API_TOKEN = "api-token-XYZ789-do-not-leak"
# Whole secrets and the pieces that identify them: a truncated or split secret is a leak too.
NEEDLES = (FAL_KEY, FAL_KEY_SECRET, API_TOKEN, "XYZ123", "XYZ789", "do-not-leak")


def _leaks(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle in text]


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    config = FakeFalConfig(duration=0.3, queue_time=0.05, seed=17, key=FAL_KEY)
    with FakeFalServer(config) as server:
        yield server


class Recorder:
    """Every answer the API gave, as text: status line, headers and body."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=10, trust_env=False)
        self.seen: list[str] = []

    def request(
        self, method: str, path: str, *, auth: bool = True, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_TOKEN}"} if auth else {}
        response = self.client.request(method, path, headers=headers, **kwargs)
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.seen.append(f"{method} {path} -> {response.status_code}\n{head}\n{response.text}")
        return response

    def close(self) -> None:
        self.client.close()


def _dump_tables(path: Path) -> list[str]:
    """Every column of every row of every table, as text."""
    rows: list[str] = []
    with sqlite3.connect(path) as conn:
        tables = [
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        assert {"jobs", "job_events", "results", "job_logs", "job_files"} <= set(tables)
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                rows.extend(f"{table}: {value!r}" for value in row)
    conn.close()
    return rows


def test_no_secret_reaches_logs_answers_or_tables(tmp_path: Path, fal: FakeFalServer) -> None:
    db = tmp_path / "jobs.db"
    port = free_port()
    env = jobs_env(
        f"sqlite:///{db}",
        fal.url,
        fal_key=FAL_KEY,
        public_url=f"http://127.0.0.1:{port}",
        JOBS_API_TOKEN=API_TOKEN,
    )
    serve = ServeProcess(
        env,
        tmp_path / "serve.log",
        "--tick",
        "0.1",
        "--log-format",
        "json",
        "--log-level",
        "debug",
        port=port,
    )
    api = Recorder(serve.url)
    cli_output: list[str] = []

    def cli(*args: str) -> dict[str, Any]:
        done = run_cli(["submit", APP, *args], env)
        cli_output.append(f"{args} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        line: dict[str, Any] = json.loads(done.stdout.splitlines()[0]) if done.stdout else {}
        return line

    try:
        with serve:
            # By the CLI: webhook on; polled (no webhook); failing remotely while polled.
            by_cli = cli("--input", '{"prompt": "cli"}')
            # Still running at its first poll (1 s), so the poller logs it at DEBUG.
            polled = cli(
                "--input", '{"prompt": "polled", "_fake": {"duration": 1.5}}', "--no-webhook"
            )
            polled_failure = cli(
                "--input", '{"prompt": "polled failure", "_fake": {"fail": 500}}', "--no-webhook"
            )
            # Rejected at submit: the emulator answers 422 and says why.
            rejected = run_cli(["submit", APP, "--input", '{"_fake": {"fail": 200}}'], env)
            cli_output.append(
                f"rejected -> {rejected.returncode}\n{rejected.stdout}\n{rejected.stderr}"
            )
            assert rejected.returncode == 1
            # Over HTTP: a success and a remote failure, both answered by webhook.
            by_http = api.request(
                "POST", "/v1/jobs", json={"application": APP, "arguments": {"prompt": "http"}}
            ).json()
            http_failure = api.request(
                "POST",
                "/v1/jobs",
                json={"application": APP, "arguments": {"_fake": {"fail": 422}}},
            ).json()
            refused = api.request(
                "POST", "/v1/jobs", json={"application": APP, "arguments": {"_fake": {"fail": 1}}}
            )
            assert refused.status_code == 422
            jobs = [by_cli, polled, polled_failure, by_http, http_failure]
            assert all(job.get("id") for job in jobs), jobs

            def finished() -> bool:
                states = [
                    api.client.get(
                        f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {API_TOKEN}"}
                    ).json()["state"]
                    for job in jobs
                ]
                return all(s in ("succeeded", "failed") for s in states)

            wait_for(finished, 30, "every job to finish", every=0.2)

            # Every kind of answer, good and bad.
            final = [api.request("GET", f"/v1/jobs/{job['id']}").json() for job in jobs]
            for job in jobs:
                api.request("GET", f"/v1/jobs/{job['request_id']}/result")
                api.request("POST", f"/v1/jobs/{job['id']}/cancel")  # 409: finished
            api.request("GET", "/v1/jobs?limit=100")
            api.request("GET", "/v1/jobs?state=failed")
            api.request("GET", "/v1/jobs/no-such-job")
            api.request("GET", "/v1/jobs?limit=0")
            api.request("POST", "/v1/jobs", content=b"{not json")
            api.request("POST", "/v1/jobs", json={"application": "flux", "arguments": {}})
            api.request("GET", "/v1/jobs", auth=False)
            api.request("GET", "/", auth=False)
            api.request("DELETE", "/v1/jobs")
            api.request("GET", "/nowhere")
            api.request("POST", "/v1/webhooks/fal", content=b"{}")
            assert api.request("GET", "/").status_code == 200  # the dashboard
            assert api.request("GET", "/metrics").status_code == 200
            api.request("GET", "/healthz")
            api.request("GET", "/openapi.json")
            code, _ = serve.stop(signal.SIGTERM)
            assert code == 0, serve.log()
    finally:
        api.close()

    assert [(job["state"], job["failure_reason"]) for job in final] == [
        ("succeeded", None),
        ("succeeded", None),
        ("failed", "remote_error"),
        ("succeeded", None),
        ("failed", "remote_error"),
    ]
    # The paths really ran: webhooks for some, polls for the others.
    assert fal.stats.webhook_successes >= 3 and fal.stats.status_polls >= 2

    log = serve.log()
    records = serve.log_records()
    assert records and len(records) == len([line for line in log.splitlines() if line.strip()])
    assert any(r["level"] == "DEBUG" for r in records)  # DEBUG lines were written, and checked
    assert _leaks(log) == [], [line for line in log.splitlines() if _leaks(line)][:5]
    assert _leaks("\n".join(cli_output)) == []
    for answer in api.seen:
        assert _leaks(answer) == [], answer[:500]
    rows = _dump_tables(db)
    assert [row for row in rows if _leaks(row)] == []
    for path in tmp_path.glob("jobs.db*"):  # the file, and a WAL or journal if one is left
        raw = path.read_bytes()
        assert [n for n in NEEDLES if n.encode() in raw] == [], path
