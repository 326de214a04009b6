"""The ``jobs`` command end to end, in subprocesses, against ``jobs fake-fal``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

JOBS = [sys.executable, "-m", "jobs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake_fal() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [*JOBS, "fake-fal", "--port", str(port), "--duration", "0.5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/_fake/stats", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("jobs fake-fal did not start in 20 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def env(tmp_path: Path, fake_fal: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_"))}
    return {
        **keep,
        "JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "JOBS_FAL_QUEUE_URL": fake_fal,
        "FAL_KEY": "cli-test-key",
        "JOBS_CACHE_ALLOW_HOSTS": "127.0.0.1",  # the emulator's result files
    }


def jobs(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JOBS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def stats(url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/_fake/stats").json()
    return data


def test_submit_wait_status(env: dict[str, str], fake_fal: str) -> None:
    submitted = jobs(env, "submit", "fal-ai/flux/dev", "--input", '{"prompt": "a cat"}')
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "queued" and job["request_id"] and job["id"]

    result = jobs(env, "result", job["id"], "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["prompt"] == "a cat" and output["images"][0]["content_type"] == "image/png"

    status = jobs(env, "status", job["request_id"])
    assert json.loads(status.stdout)["state"] == "succeeded"
    listed = [json.loads(line) for line in jobs(env, "list").stdout.splitlines()]
    assert [j["id"] for j in listed] == [job["id"]]


def test_idempotency_key_sends_nothing_the_second_time(env: dict[str, str], fake_fal: str) -> None:
    args = ("submit", "fal-ai/flux/dev", "--input", '{"prompt": "once"}', "--idempotency-key", "k9")
    first = json.loads(jobs(env, *args).stdout)
    before = stats(fake_fal)["submits"]
    second = jobs(env, *args)
    assert second.returncode == 0 and json.loads(second.stdout)["id"] == first["id"]
    assert stats(fake_fal)["submits"] == before


def test_killed_wait_resumes_the_same_job(env: dict[str, str], fake_fal: str) -> None:
    job = json.loads(
        jobs(
            env,
            "submit",
            "fal-ai/flux/dev",
            "--input",
            '{"prompt": "slow", "_fake": {"duration": 3}}',
        ).stdout
    )
    waiter = subprocess.Popen(
        [*JOBS, "result", job["id"], "--wait"], env=env, stdout=subprocess.DEVNULL
    )
    time.sleep(1.5)
    waiter.send_signal(signal.SIGKILL)
    waiter.wait(timeout=10)
    before = stats(fake_fal)["submits"]
    started = time.monotonic()
    again = jobs(env, "result", job["id"], "--wait", "--timeout", "30")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["prompt"] == "slow"
    assert stats(fake_fal)["submits"] == before  # resumed, not resubmitted
    assert time.monotonic() - started < 20  # the dead waiter's lease did not hold it up


def test_exit_codes_and_clear_errors(env: dict[str, str], fake_fal: str, tmp_path: Path) -> None:
    unknown = jobs(env, "status", "nope")
    assert unknown.returncode == 4 and unknown.stderr.startswith("error: no job")

    bad_json = jobs(env, "submit", "fal-ai/flux/dev", "--input", "{prompt: cat}")
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr

    not_object = jobs(env, "submit", "fal-ai/flux/dev", "--input", "[1]")
    assert not_object.returncode == 2 and "JSON object" in not_object.stderr

    no_key = jobs({**env, "FAL_KEY": ""}, "submit", "fal-ai/flux/dev", "--input", "{}")
    assert no_key.returncode == 2 and "FAL_KEY is not set" in no_key.stderr

    port = _free_port()
    down = jobs(
        {**env, "JOBS_FAL_QUEUE_URL": f"http://127.0.0.1:{port}"},
        "submit",
        "fal-ai/flux/dev",
        "--input",
        "{}",
    )
    assert down.returncode == 1 and "submit_unreachable" in down.stderr

    bad_db = jobs({**env, "JOBS_DATABASE_URL": "nosuchdb://x"}, "list")
    assert bad_db.returncode == 2 and "cannot open database" in bad_db.stderr

    missing_dir = jobs({**env, "JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/no/such/dir.db"}, "list")
    assert missing_dir.returncode == 2 and "database" in missing_dir.stderr

    failing = json.loads(
        jobs(env, "submit", "fal-ai/flux/dev", "--input", '{"_fake": {"fail": 422}}').stdout
    )
    failed = jobs(env, "result", failing["id"], "--wait", "--timeout", "30")
    assert failed.returncode == 1 and "failed" in failed.stderr

    slow = json.loads(
        jobs(env, "submit", "fal-ai/flux/dev", "--input", '{"_fake": {"duration": 60}}').stdout
    )
    assert jobs(env, "result", slow["id"]).returncode == 3
    assert jobs(env, "result", slow["id"], "--wait", "--timeout", "0.5").returncode == 3

    for run in (unknown, bad_json, no_key, down, bad_db, missing_dir, failed):
        assert "Traceback" not in run.stderr
        assert "cli-test-key" not in run.stderr + run.stdout


def test_cancel_and_track(env: dict[str, str], fake_fal: str) -> None:
    queued = json.loads(
        jobs(env, "submit", "fal-ai/flux/dev", "--input", '{"_fake": {"queue_time": 60}}').stdout
    )
    cancelled = jobs(env, "cancel", queued["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    assert jobs(env, "cancel", queued["id"]).returncode == 1  # too late: already cancelled

    foreign = httpx.post(
        f"{fake_fal}/fal-ai/flux/dev",
        json={"prompt": "by fal_client"},
        headers={"Authorization": "Key k"},
    ).json()
    tracked = jobs(env, "track", "fal-ai/flux/dev", foreign["request_id"])
    assert (
        tracked.returncode == 0
        and json.loads(tracked.stdout)["request_id"] == foreign["request_id"]
    )
    got = jobs(env, "result", foreign["request_id"], "--wait", "--timeout", "30")
    assert json.loads(got.stdout)["prompt"] == "by fal_client"


def test_db_upgrade(env: dict[str, str]) -> None:
    done = jobs(env, "db", "upgrade")
    assert done.returncode == 0 and "revision" in done.stderr
