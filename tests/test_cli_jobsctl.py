"""The command line as a new user meets it: no phantom rows from bad input, status that is
true without a server, jobs named as people name them, waiting with progress, and the
commands people look for (run, show, retry, export's warnings, fake-fal --port 0)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.testing import FakeFalConfig, FakeFalServer

JOBSCTL = [sys.executable, "-m", "jobs"]
APP = "fal-ai/flux/dev"


@pytest.fixture(scope="module")
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.3, queue_time=0.1)) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path, fal: FakeFalServer) -> dict[str, str]:
    fal.fake.stats.reset()
    fal.fake.update_config({"cdn_refuse_status": 0})
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_"))}
    return {
        **keep,
        "JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "JOBS_FAL_QUEUE_URL": fal.url,
        "JOBS_FAL_REST_URL": fal.url,
        "JOBS_CACHE_DIR": str(tmp_path / "cache"),
        "JOBS_CACHE_ALLOW_HOSTS": "127.0.0.1",  # the emulator serves the result files
        "FAL_KEY": "cli-test-key",
    }


def jobsctl(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JOBSCTL, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(env: dict[str, str], *args: str) -> Any:
    done = jobsctl(env, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def rows(env: dict[str, str]) -> list[tuple[Any, ...]]:
    path = env["JOBS_DATABASE_URL"].removeprefix("sqlite:///")
    if not Path(path).exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT id, state, application FROM jobs").fetchall()
        except sqlite3.OperationalError:  # no schema yet: nothing was recorded
            return []


def wait_finished(fal: FakeFalServer, request_id: str) -> None:
    """Until the emulator has finished the request (bounded: 10 s)."""
    deadline = time.monotonic() + 10
    request = fal.fake.get_request(request_id)
    assert request is not None
    while time.monotonic() < request.finish_at + 0.05:
        assert time.monotonic() < deadline, "the emulator did not finish the request"
        time.sleep(0.05)


def sent_input(fal: FakeFalServer, request_id: str) -> Any:
    """The input the emulator received for ``request_id``."""
    request = fal.fake.get_request(request_id)
    assert request is not None
    return request.input


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# --- no phantom rows ------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(("submit", "flux", "--input", "{}"), "endpoint id", id="submit-bad-app"),
    pytest.param(("submit", APP, "--input", "{nope"), "not valid JSON", id="submit-bad-json"),
    pytest.param(("submit", APP, "--input", "[1]"), "JSON object", id="submit-not-object"),
    pytest.param(("submit", APP, "--input", "@missing.json"), "cannot read", id="submit-no-file"),
    pytest.param(("submit", APP, "--input", "@latin1"), "UTF-8", id="submit-not-utf8"),
    pytest.param(("submit", APP, "--input", "[" * 100_000), "nested", id="submit-deep-json"),
    pytest.param(("submit", APP, "--input", "{}", "--label", "x"), "key=value", id="submit-label"),
    pytest.param(("submit", APP, "--input", "{}", "--hint", "a\nb"), "printable", id="submit-hint"),
    pytest.param(("submit", APP), "--input", id="submit-no-input"),
    pytest.param(("run", "flux", "--input", "{}"), "endpoint id", id="run-bad-app"),
    pytest.param(("run", APP, "--input", "{nope"), "not valid JSON", id="run-bad-json"),
    pytest.param(("run", APP, "--input", "{}", "--timeout", "soon"), "duration", id="run-timeout"),
    pytest.param(("track", "flux", "abc"), "endpoint id", id="track-bad-app"),
    pytest.param(("track", APP, "a/b"), "request id", id="track-bad-request-id"),
    pytest.param(("track", APP, "x" * 200), "request id", id="track-long-request-id"),
    pytest.param(("submit", APP, "--inputs", "missing.jsonl"), "cannot read", id="inputs-no-file"),
    pytest.param(("submit", APP, "--inputs", "latin1"), "UTF-8", id="inputs-not-utf8"),
]


@pytest.mark.parametrize(("args", "says"), BAD_INPUTS)
def test_bad_input_records_nothing_and_sends_nothing(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    (tmp_path / "latin1").write_bytes(b'{"prompt": "caf\xe9"}\n')
    done = subprocess.run(
        [*JOBSCTL, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert says in one_line_error(done)
    assert rows(env) == []
    assert fal.fake.stats.submit_attempts == 0


def test_no_fal_key_records_nothing(env: dict[str, str], fal: FakeFalServer) -> None:
    del env["FAL_KEY"]
    for args in (
        ("submit", APP, "--input", "{}"),
        ("track", APP, "abc"),
        ("run", APP, "--input", "{}"),
    ):
        done = jobsctl(env, *args)
        assert done.returncode == 2 and "FAL_KEY" in one_line_error(done)
    assert rows(env) == []
    assert fal.fake.stats.submit_attempts == 0


def test_corrected_track_after_a_mistyped_one_is_clean(
    env: dict[str, str], fal: FakeFalServer
) -> None:
    submitted = ok(env, "submit", APP, "--input", '{"prompt": "elsewhere"}')
    other = {**env, "JOBS_DATABASE_URL": env["JOBS_DATABASE_URL"] + "-other"}
    assert jobsctl(other, "track", "flux", submitted["request_id"]).returncode == 2
    tracked = ok(other, "track", APP, submitted["request_id"])
    assert tracked["application"] == APP and tracked["tracked"] is True
    assert tracked["state"] == "queued" and tracked["attempts"] == 0
    assert ok(other, "track", APP, submitted["request_id"])["id"] == tracked["id"]
    assert rows(other) == [(tracked["id"], "queued", APP)]


def test_a_tracked_job_is_never_sent(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path
) -> None:
    """Whatever happens to it, nobody POSTs a tracked job's (unknown) input."""
    import asyncio

    from support.managers import local_settings, open_manager

    from jobs.poller import Poller

    request_id = ok(env, "submit", APP, "--input", '{"prompt": "x"}')["request_id"]
    sends = fal.fake.stats.submit_attempts
    tracked = ok(env, "track", APP, request_id)
    assert tracked["id"] != request_id

    async def resolve() -> None:
        settings = local_settings(tmp_path, fal.url)
        async with open_manager(settings) as manager:
            await Poller(manager, ambiguous_grace=0).resolve_ambiguous()

    asyncio.run(resolve())
    assert ok(env, "result", tracked["id"], "--wait", "--timeout", "30")["prompt"] == "x"
    assert fal.fake.stats.submit_attempts == sends


# --- status that is true --------------------------------------------------------------------


def test_status_and_logs_refresh_without_a_server(env: dict[str, str], fal: FakeFalServer) -> None:
    job = ok(
        env, "submit", APP, "--input", '{"prompt": "p", "_fake": {"duration": 0.2, "logs": 2}}'
    )
    wait_finished(fal, job["request_id"])
    stale = ok(env, "status", job["id"], "--no-refresh")
    assert stale["state"] == "queued" and stale["polls"] == 0
    fresh = ok(env, "status", job["id"])
    assert fresh["state"] == "succeeded" and fresh["polls"] >= 1
    logs = jobsctl(env, "logs", job["id"])
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 2


def test_logs_refresh_a_due_job(env: dict[str, str], fal: FakeFalServer) -> None:
    job = ok(
        env, "submit", APP, "--input", '{"prompt": "p", "_fake": {"duration": 0.2, "logs": 3}}'
    )
    wait_finished(fal, job["request_id"])
    assert jobsctl(env, "logs", job["id"], "--no-refresh").stdout == ""
    assert len(jobsctl(env, "logs", job["id"]).stdout.splitlines()) == 3


# --- naming a job ---------------------------------------------------------------------------


def test_a_job_is_named_by_id_prefix_short_id_request_id_or_key(env: dict[str, str]) -> None:
    first = ok(env, "submit", APP, "--input", '{"prompt": "a"}', "--idempotency-key", "lora-run-7")
    second = ok(env, "submit", APP, "--input", '{"prompt": "b"}')
    for ref in (
        first["id"],
        first["id"][:-3],
        first["short_id"],
        first["short_id"][:6],
        first["request_id"],
        "lora-run-7",
    ):
        assert ok(env, "status", ref, "--no-refresh")["id"] == first["id"], ref
    assert first["short_id"] != second["short_id"]
    assert len(first["short_id"]) == 10 and first["short_id"] in first["id"][12:]

    shared = ""
    for a, b in zip(first["id"], second["id"], strict=True):
        if a != b:
            break
        shared += a
    if len(shared) >= 6:  # made in the same second or so: the timestamp prefix is shared
        done = jobsctl(env, "status", shared[:6])
        message = one_line_error(done)
        assert done.returncode == 2 and "more than one job" in message
        assert first["short_id"] in message and second["short_id"] in message
    unknown = jobsctl(env, "status", "ffffffffff")
    assert unknown.returncode == 4 and "no job" in one_line_error(unknown)
    short = jobsctl(env, "status", "abc")  # too short to be a prefix
    assert short.returncode == 4


# --- waiting with progress -----------------------------------------------------------------


def test_wait_shows_progress_only_when_asked_on_a_pipe(env: dict[str, str]) -> None:
    job = ok(
        env, "submit", APP, "--input", '{"prompt": "p", "_fake": {"duration": 0.5, "logs": 2}}'
    )
    quiet = jobsctl(env, "result", job["id"], "--wait", "--timeout", "10m")
    assert quiet.returncode == 0 and quiet.stderr == ""

    job = ok(
        env, "submit", APP, "--input", '{"prompt": "q", "_fake": {"duration": 0.5, "logs": 2}}'
    )
    loud = jobsctl(env, "result", job["id"], "--wait", "--progress")
    assert loud.returncode == 0, loud.stderr
    assert json.loads(loud.stdout)["prompt"] == "q"
    assert f"{job['short_id']} succeeded" in loud.stderr
    assert loud.stderr.count("  log: ") == 2


# --- commands users look for ---------------------------------------------------------------


def test_run_prints_the_result_and_exits_like_result(env: dict[str, str]) -> None:
    done = jobsctl(env, "run", APP, "--input", '{"prompt": "ran"}', "--timeout", "1m")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompt"] == "ran"
    failed = jobsctl(env, "run", APP, "--input", '{"prompt": "x", "_fake": {"fail": 500}}')
    assert failed.returncode == 1 and "failed" in one_line_error(failed)
    listed = [json.loads(line) for line in jobsctl(env, "list").stdout.splitlines()]
    assert sorted(j["state"] for j in listed) == ["failed", "succeeded"]


def test_show_has_events_logs_and_files(env: dict[str, str]) -> None:
    job = ok(env, "submit", APP, "--input", '{"prompt": "s", "_fake": {"logs": 2}}', "--download")
    ok(env, "result", job["id"], "--wait", "--files", str(Path(env["JOBS_CACHE_DIR"]) / "out"))
    shown = ok(env, "show", job["short_id"])
    assert shown["job"]["id"] == job["id"] and shown["job"]["state"] == "succeeded"
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds[:3] == ["created", "submit_sent", "submitted"]
    assert len(shown["logs"]) == 2 and shown["log_lines"] == 2
    assert [f["state"] for f in shown["files"]] == ["downloaded"]
    table = jobsctl(env, "show", job["id"], "--output", "table")
    assert table.returncode == 0 and "submit_sent" in table.stdout and "log lines" in table.stderr


def test_retry_makes_one_linked_attempt(env: dict[str, str], fal: FakeFalServer) -> None:
    body = '{"prompt": "flaky", "_fake": {"fail": 500}}'
    failed = jobsctl(env, "run", APP, "--input", body, "--idempotency-key", "flaky-1")
    assert failed.returncode == 1
    old = ok(env, "status", "flaky-1")
    sends = fal.fake.stats.submits
    retried = ok(env, "retry", "flaky-1")
    assert retried["retry_of"] == old["id"] and retried["id"] != old["id"]
    assert retried["state"] == "queued" and fal.fake.stats.submits == sends + 1
    again = ok(env, "retry", old["id"])
    assert again["id"] == retried["id"] and fal.fake.stats.submits == sends + 1
    events = ok(env, "show", old["id"])["events"]
    assert [e["detail"] for e in events if e["kind"] == "retried"] == [{"job": retried["id"]}]

    done = ok(env, "status", old["id"])
    assert done["state"] == "failed"
    queued = jobsctl(env, "retry", retried["id"])
    assert queued.returncode == 1 and "only failed or cancelled" in one_line_error(queued)


def test_retry_batch_and_export_report_what_is_missing(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path
) -> None:
    lines = [
        '{"prompt": "a"}',
        "not json",
        '{"prompt": "b", "_fake": {"fail": 500}}',
        '{"prompt": "c", "_fake": {"duration": 30}}',
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    submitted = jobsctl(env, "submit", APP, "--inputs", str(tmp_path / "in.jsonl"), "--batch", "b1")
    assert submitted.returncode == 1  # line 2
    out = tmp_path / "out"
    early = jobsctl(env, "export", "--batch", "b1", "--out", str(out))
    assert early.returncode == 3, early.stderr
    report = json.loads(early.stdout)
    assert report["missing_lines"] == [2] and report["unfinished"] >= 1
    assert "input lines with no job (invalid or blank when submitted): 2" in early.stderr

    waited = jobsctl(env, "wait", "--batch", "b1", "--timeout", "5")
    assert waited.returncode == 3  # line 4 runs for 30 s
    ok(env, "cancel", json.loads(submitted.stdout.splitlines()[-1])["id"])
    assert jobsctl(env, "wait", "--batch", "b1", "--timeout", "1m").returncode == 1

    retries = [
        json.loads(x)
        for x in jobsctl(env, "retry", "--batch", "b1", "--reason", "cancelled").stdout.splitlines()
    ]
    assert [r["batch_index"] for r in retries] == [4]
    more = [json.loads(x) for x in jobsctl(env, "retry", "--batch", "b1").stdout.splitlines()]
    assert [r["batch_index"] for r in more] == [3]  # line 4's retry exists: not retried twice
    final = jobsctl(env, "export", "--batch", "b1", "--out", str(out))
    report = json.loads(final.stdout)
    assert report["jobs"] == 3  # each line once, as its newest attempt
    assert report["not_downloaded"] >= 1 and "not downloaded" in final.stderr


def test_fake_fal_port_zero_prints_the_port_it_listens_on(tmp_path: Path) -> None:
    import httpx

    proc = subprocess.Popen(
        [*JOBSCTL, "fake-fal", "--port", "0"], stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        url = line.split("JOBS_FAL_QUEUE_URL=")[1].rstrip(")\n")
        assert not url.endswith(":0")
        assert httpx.get(f"{url}/_fake/stats", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


# --- conventions ----------------------------------------------------------------------------


def test_output_table_and_json(env: dict[str, str]) -> None:
    job = ok(env, "submit", APP, "--input", '{"prompt": "t"}')
    table = jobsctl(env, "list", "--output", "table")
    assert table.returncode == 0 and job["short_id"] in table.stdout and "short_id" in table.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(table.stdout)
    assert json.loads(jobsctl(env, "list").stdout)["id"] == job["id"]  # a pipe: JSON


def test_states_take_fal_names(env: dict[str, str]) -> None:
    job = ok(env, "submit", APP, "--input", '{"prompt": "s"}')
    ok(env, "result", job["id"], "--wait")
    done = [
        json.loads(x)["id"]
        for x in jobsctl(env, "list", "--state", "COMPLETED").stdout.splitlines()
    ]
    assert done == [job["id"]]
    assert jobsctl(env, "list", "--state", "IN_QUEUE").stdout == ""
    bad = jobsctl(env, "list", "--state", "running")
    assert bad.returncode == 2 and "IN_PROGRESS" in bad.stderr


@pytest.mark.parametrize(
    "command",
    [
        "submit",
        "run",
        "status",
        "show",
        "list",
        "result",
        "wait",
        "retry",
        "track",
        "cancel",
        "logs",
        "export",
        "gc",
        "serve",
        "fake-fal",
        "demo",
    ],
)
def test_every_help_has_an_example_and_its_environment(command: str) -> None:
    done = subprocess.run([*JOBSCTL, command, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "Examples:" in done.stdout and "Environment:" in done.stdout
    assert "jobsctl " in done.stdout and "Replicate" not in done.stdout


def test_a_reused_key_with_another_input_is_a_one_line_error(
    env: dict[str, str], fal: FakeFalServer
) -> None:
    ok(env, "submit", APP, "--input", '{"prompt": "one"}', "--idempotency-key", "k-reused")
    sends = fal.fake.stats.submits
    other = jobsctl(
        env, "submit", APP, "--input", '{"prompt": "two"}', "--idempotency-key", "k-reused"
    )
    assert other.returncode == 2 and "already names job" in one_line_error(other)
    assert fal.fake.stats.submits == sends and len(rows(env)) == 1


# --- uploads --------------------------------------------------------------------------------


def test_upload_once_then_reuse_files_and_folders(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path
) -> None:
    (tmp_path / "cat.png").write_bytes(b"\x89PNG fake cat")
    first = ok(env, "upload", str(tmp_path / "cat.png"))
    assert set(first) == {"url", "sha256", "size", "content_type", "reused"}
    assert first["reused"] is False and first["content_type"] == "image/png"
    sent = fal.fake.stats.cdn_uploads
    again = ok(env, "upload", str(tmp_path / "cat.png"))
    assert again["reused"] is True and again["url"] == first["url"]
    assert fal.fake.stats.cdn_uploads == sent

    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(3):
        (photos / f"{n}.jpg").write_bytes(bytes([n]) * 100)
    folder = ok(env, "upload", str(photos))
    assert folder["content_type"] == "application/zip" and folder["reused"] is False
    (photos / "0.jpg").touch()  # a new mtime: the zip is the same bytes
    assert ok(env, "upload", str(photos))["sha256"] == folder["sha256"]


def test_upload_bad_input_is_one_line_and_records_nothing(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path
) -> None:
    missing = jobsctl(env, "upload", str(tmp_path / "nope.zip"))
    assert missing.returncode == 2 and "nope.zip" in one_line_error(missing)
    (tmp_path / "f.bin").write_bytes(b"x")
    no_key = jobsctl(
        {k: v for k, v in env.items() if k != "FAL_KEY"}, "upload", str(tmp_path / "f.bin")
    )
    assert no_key.returncode == 2 and "FAL_KEY" in one_line_error(no_key)
    assert fal.fake.stats.cdn_tokens == 0
    fal.fake.update_config({"cdn_refuse_status": 403})
    refused = jobsctl(env, "upload", str(tmp_path / "f.bin"))
    assert refused.returncode == 1, refused.stderr
    one_line_error(refused)
    fal.fake.update_config({"cdn_refuse_status": 0})
    assert ok(env, "upload", str(tmp_path / "f.bin"))["reused"] is False  # nothing was recorded


def test_file_option_sets_the_input_key_to_the_upload(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"a" * 10)
    url = ok(env, "upload", str(photos))["url"]
    job = ok(env, "submit", APP, "--input", '{"prompt": "p"}', "--file", f"data.images={photos}")
    shown = ok(env, "show", job["id"])
    assert sent_input(fal, job["request_id"])["data"] == {"images": url}
    assert shown["job"]["state"] in ("queued", "in_progress", "succeeded")

    ran = jobsctl(env, "run", APP, "--input", "{}", "--file", f"images_data_url={photos}")
    assert ran.returncode == 0, ran.stderr

    lines = tmp_path / "in.jsonl"
    lines.write_text('{"prompt": "a"}\n{"prompt": "b", "data": 5}\n')
    batch = jobsctl(
        env, "submit", APP, "--inputs", str(lines), "--batch", "f", "--file", f"data.z={photos}"
    )
    assert batch.returncode == 1 and "line 2" in batch.stderr  # data is not an object there
    (first,) = [json.loads(x) for x in batch.stdout.splitlines()]
    assert sent_input(fal, first["request_id"])["data"] == {"z": url}


@pytest.mark.parametrize(
    ("file_option", "says"),
    [("nokey", "KEY=PATH"), ("a..b=x", "KEY=PATH"), ("k=missing.zip", "missing.zip")],
)
def test_a_bad_file_option_creates_no_job(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path, file_option: str, says: str
) -> None:
    for command in ("submit", "run"):
        done = subprocess.run(
            [*JOBSCTL, command, APP, "--input", "{}", "--file", file_option],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and says in one_line_error(done)
    assert rows(env) == [] and fal.fake.stats.submit_attempts == 0
    assert fal.fake.stats.cdn_uploads == 0


@pytest.mark.parametrize("args", [(), ("db",)])
def test_a_bare_group_shows_its_help(args: tuple[str, ...]) -> None:
    done = subprocess.run([*JOBSCTL, *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("Usage: jobsctl") and "error:" not in done.stderr


def test_list_filters_by_label_and_search(env: dict[str, str]) -> None:
    tagged = ok(env, "submit", APP, "--input", '{"p": 1}', "--label", "team=vision")
    ok(env, "submit", APP, "--input", '{"p": 2}', "--label", "team=audio")
    keyed = ok(env, "submit", APP, "--input", '{"p": 3}', "--idempotency-key", "lora-x")
    by_label = jobsctl(env, "list", "--label", "team=vision").stdout.splitlines()
    assert [json.loads(x)["id"] for x in by_label] == [tagged["id"]]
    by_key = jobsctl(env, "list", "--search", "lora-x").stdout.splitlines()
    assert [json.loads(x)["id"] for x in by_key] == [keyed["id"]]
    by_short = jobsctl(env, "list", "--search", tagged["short_id"][:7]).stdout.splitlines()
    assert [json.loads(x)["id"] for x in by_short] == [tagged["id"]]
    bad = jobsctl(env, "list", "--label", "novalue")
    assert bad.returncode == 2 and "key=value" in one_line_error(bad)
