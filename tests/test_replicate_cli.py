"""The command line with ``--provider replicate``, end to end against ``jobsctl
fake-replicate`` run as a user runs it (its own process, ``--port 0``, its webhook secret
read from ``GET /v1/webhooks/default/secret``): the twin of tests/test_cli_jobsctl.py.

``submit``, ``result --wait``, ``run``, ``track`` (a prediction made elsewhere), a batch
file (``--inputs``; re-running it creates nothing), mistakes that record nothing, and a
``jobsctl serve`` with ``JOBS_PUBLIC_URL`` whose jobs finish by webhook without a poll.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import replicate as rp
from support.serve import ServeProcess
from support.waiting import free_port, wait_for

pytestmark = pytest.mark.timeout(120)

JOBSCTL = [sys.executable, "-m", "jobs"]
APP = rp.APP


class Emulator:
    """``jobsctl fake-replicate --port 0`` in its own process, stopped by the fixture."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [*JOBSCTL, "fake-replicate", "--port", "0", "--duration", "0.3"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        self.url = line.split("JOBS_REPLICATE_API_URL=")[1].rstrip(")\n")
        self.secret: str = httpx.get(f"{self.url}/v1/webhooks/default/secret", timeout=10).json()[
            "key"
        ]

    def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(f"{self.url}/_fake/stats", timeout=10).json()
        return found

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    made = Emulator(tmp_path_factory.mktemp("fake-replicate"))
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def env(tmp_path: Path, emulator: Emulator) -> dict[str, str]:
    httpx.post(f"{emulator.url}/_fake/reset", timeout=10)
    return rp.env(
        f"sqlite:///{tmp_path}/jobs.db",
        emulator.url,
        secret=emulator.secret,
        cache_dir=tmp_path / "cache",
    )


def jobsctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JOBSCTL, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def ok(env: dict[str, str], *args: str) -> Any:
    done = jobsctl(env, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def rows(env: dict[str, str]) -> list[tuple[Any, ...]]:
    path = Path(env["JOBS_DATABASE_URL"].removeprefix("sqlite:///"))
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT id, state, provider FROM jobs").fetchall()
        except sqlite3.OperationalError:  # no schema yet: nothing was recorded
            return []


def test_submit_then_result_and_run(env: dict[str, str], emulator: Emulator) -> None:
    job = ok(env, "submit", APP, "--provider", "replicate", "--input", '{"prompt": "cli"}')
    assert job["provider"] == "replicate" and job["state"] == "queued" and job["request_id"]
    result = ok(env, "result", job["id"], "--wait", "--timeout", "30")
    assert result == {"echo": {"prompt": "cli"}}
    shown = ok(env, "show", job["request_id"])
    assert shown["job"]["state"] == "succeeded"
    ran = ok(env, "run", APP, "--provider", "replicate", "--input", '{"prompt": "ran"}')
    assert ran == {"echo": {"prompt": "ran"}}
    failed = jobsctl(
        env, "run", APP, "--provider", "replicate", "--input", '{"_fake": {"fail": "no GPU"}}'
    )
    assert failed.returncode == 1 and "no GPU" in one_line_error(failed)
    assert emulator.stats()["creates"] == 3


def test_track_adopts_a_prediction_made_elsewhere(env: dict[str, str], emulator: Emulator) -> None:
    made = httpx.post(
        f"{emulator.url}/v1/models/{APP}/predictions",
        json={"input": {"prompt": "elsewhere"}},
        headers={"Authorization": f"Bearer {rp.TOKEN}"},
        timeout=10,
    ).json()
    tracked = ok(env, "track", APP, made["id"], "--provider", "replicate")
    assert tracked["tracked"] is True and tracked["request_id"] == made["id"]
    assert ok(env, "result", made["id"], "--wait", "--timeout", "30") == {
        "echo": {"prompt": "elsewhere"}
    }
    assert emulator.stats()["creates"] == 1  # tracking never sends
    bad = jobsctl(env, "track", APP, "NOT-a-prediction!", "--provider", "replicate")
    assert bad.returncode != 0 and "prediction id" in one_line_error(bad)


def test_a_batch_file_goes_in_once(env: dict[str, str], emulator: Emulator, tmp_path: Path) -> None:
    lines = [{"prompt": f"line {i}"} for i in range(6)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ("submit", APP, "--provider", "replicate", "--inputs", str(path), "--batch", "b")
    done = jobsctl(env, *args)
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in done.stdout.splitlines()]
    assert len(out) == 6 and all(x["request_id"] for x in out)
    again = jobsctl(env, *args)
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["creates"] == 6  # a second run sends nothing
    waited = jobsctl(env, "wait", "--batch", "b", "--timeout", "30")
    assert waited.returncode == 0, waited.stderr
    listed = [json.loads(x) for x in jobsctl(env, "list", "--batch", "b").stdout.splitlines()]
    assert sorted(j["state"] for j in listed) == ["succeeded"] * 6
    assert {j["provider"] for j in listed} == {"replicate"}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("not/a/model/name",), "is not owner/name"),
        ((APP, "--path", "/x"), "Replicate has no sub-paths"),
        ((APP, "--priority", "low"), "Replicate has no queue priority"),
        (("acme/echo:v1",), "is not 64"),
    ],
)
def test_mistakes_record_nothing_and_send_nothing(
    env: dict[str, str], emulator: Emulator, args: tuple[str, ...], says: str
) -> None:
    app, *rest = args
    done = jobsctl(env, "submit", app, *rest, "--provider", "replicate", "--input", "{}")
    assert done.returncode != 0 and says in one_line_error(done)
    assert rows(env) == [] and emulator.stats()["create_attempts"] == 0


def test_no_token_is_one_clear_line(env: dict[str, str], emulator: Emulator) -> None:
    without = {k: v for k, v in env.items() if k != "REPLICATE_API_TOKEN"}
    done = jobsctl(without, "submit", APP, "--provider", "replicate", "--input", "{}")
    assert done.returncode != 0 and "REPLICATE_API_TOKEN is not set" in one_line_error(done)
    assert rows(without) == [] and emulator.stats()["create_attempts"] == 0


def test_served_jobs_finish_by_webhook_without_a_poll(
    env: dict[str, str], emulator: Emulator, tmp_path: Path
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    # No FAL_KEY anywhere: a Replicate user's server starts with REPLICATE_API_TOKEN alone.
    assert "FAL_KEY" not in env
    served = {**env, "JOBS_PUBLIC_URL": public}
    with ServeProcess(served, tmp_path / "serve.log", "--tick", "0.1", port=port) as serve:
        job = ok(served, "submit", APP, "--provider", "replicate", "--input", '{"prompt": "w"}')
        assert job["webhook"] is True

        def finished() -> bool:
            state: str = ok(served, "status", job["id"])["state"]
            return state == "succeeded"

        wait_for(finished, 30, "the webhook to finish the job", every=0.3)
        stats = emulator.stats()
        counters = stats["predictions"][job["request_id"]]
        assert counters["webhook_deliveries"] == 1
        assert counters["gets"] == 0, "finished by its webhook: no poll was needed"
        assert ok(served, "result", job["id"]) == {"echo": {"prompt": "w"}}
        # The same through the HTTP API: "provider" in POST /v1/jobs.
        body = {"application": APP, "arguments": {"prompt": "api"}, "provider": "replicate"}
        posted = httpx.post(f"{serve.url}/v1/jobs", json=body, timeout=10)
        assert posted.status_code == 202, posted.text
        answer = posted.json()
        assert answer["request_id"] and answer["result_url"].startswith(public)

        def answered() -> bool:
            return httpx.get(answer["result_url"], timeout=10).status_code == 200

        wait_for(answered, 30, "the API job's result", every=0.3)
        result = httpx.get(answer["result_url"], timeout=10).json()
        assert result == {"echo": {"prompt": "api"}}, result
        assert serve.running
