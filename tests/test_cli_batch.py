"""The batch pipeline through the real ``jobs`` command, each step in a subprocess, against
the emulator: submit --inputs (bad lines, re-runs, partial runs), wait, export, logs,
result --files and gc."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.testing import FakeFalConfig, FakeFalServer, expected_file_bytes

JOBS = [sys.executable, "-m", "jobs"]
APP = "fal-ai/flux/dev"


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.3, queue_time=0.05, seed=11)) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path, fal: FakeFalServer) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_"))}
    return {
        **keep,
        "JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "JOBS_FAL_QUEUE_URL": fal.url,
        "FAL_KEY": "cli-batch-key",
        "JOBS_CACHE_DIR": str(tmp_path / "cache"),
        "JOBS_CACHE_ALLOW_HOSTS": "127.0.0.1",  # the emulator's result files
    }


def jobs(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JOBS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=90, check=False
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_submit_rerun_wait_export(env: dict[str, str], fal: FakeFalServer, tmp_path: Path) -> None:
    inputs = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            '{"prompt": "a", "num_images": 2}',
            '{"prompt": "b"}',
            "",
            '{"prompt": "c", oops}',
            '{"prompt": "d"}',
            '{"prompt": "e", "num_images": 2}',
            '["not", "an", "object"]',
            '{"prompt": "f"}',
        ],
    )
    first = jobs(env, "submit", APP, "--inputs", str(inputs), "--download", "--concurrency", "4")
    assert first.returncode == 1, first.stderr
    assert "batch 'prompts' (named after the file" in first.stderr
    assert "error: line 4: invalid JSON" in first.stderr
    assert "error: line 7: must be a JSON object (the input), not list" in first.stderr
    assert "not submitted: line(s) 4, 7" in first.stderr
    submitted = json_lines(first.stdout)
    assert sorted(j["line"] for j in submitted) == [1, 2, 5, 6, 8]
    assert {(j["outcome"], j["state"], j["batch"]) for j in submitted} == {
        ("submitted", "queued", "prompts")
    }
    assert all(j["batch_index"] == j["line"] for j in submitted)
    assert fal.fake.stats.submits == 5

    again = jobs(env, "submit", APP, "--inputs", str(inputs), "--batch", "prompts", "--download")
    assert again.returncode == 1 and "not submitted: line(s) 4, 7" in again.stderr
    assert {j["outcome"] for j in json_lines(again.stdout)} == {"existing"}
    assert {j["id"] for j in json_lines(again.stdout)} == {j["id"] for j in submitted}
    assert fal.fake.stats.submits == 5 and not fal.fake.stats.duplicate_inputs()

    waited = jobs(env, "wait", "--batch", "prompts", "--timeout", "60", "--progress")
    assert waited.returncode == 0, waited.stderr
    summary = json.loads(waited.stdout)
    assert summary["jobs"] == 5 and summary["succeeded"] == 5 and not summary["timed_out"]
    assert "succeeded 5" in waited.stderr  # the progress bar's last state

    listed = jobs(env, "list", "--batch", "prompts")
    assert len(json_lines(listed.stdout)) == 5

    out = tmp_path / "export"
    exported = jobs(env, "export", "--batch", "prompts", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    report = json.loads(exported.stdout)
    assert report["jobs"] == 5 and report["files"] == 7 and report["missing_files"] == 0
    rows = json_lines((out / "results.jsonl").read_text())
    assert [r["batch_index"] for r in rows] == [1, 2, 5, 6, 8]
    assert [r["input"]["prompt"] for r in rows] == ["a", "b", "d", "e", "f"]
    for row in rows:
        assert row["state"] == "succeeded" and row["result"]["prompt"] == row["input"]["prompt"]
        assert len(row["files"]) == row["input"].get("num_images", 1)
        for f in row["files"]:
            expected = expected_file_bytes(row["request_id"], f["n"], fal.config.file_size)
            assert (out / f["path"]).read_bytes() == expected
            assert f["sha256"] == hashlib.sha256(expected).hexdigest()
            assert f["state"] == "downloaded" and f["json_path"] == f"$.images[{f['n']}]"


def test_a_rerun_after_a_partial_run(
    env: dict[str, str], fal: FakeFalServer, tmp_path: Path
) -> None:
    rows = [json.dumps({"prompt": f"p{i}"}) for i in range(10)]
    write_jsonl(tmp_path / "part.jsonl", rows[:5])  # as if the first run stopped half-way
    whole = write_jsonl(tmp_path / "whole.jsonl", rows)
    part = jobs(env, "submit", APP, "--inputs", str(tmp_path / "part.jsonl"), "--batch", "p")
    assert part.returncode == 0, part.stderr
    rest = jobs(env, "submit", APP, "--inputs", str(whole), "--batch", "p")
    assert rest.returncode == 0, rest.stderr
    outcomes = {j["line"]: j["outcome"] for j in json_lines(rest.stdout)}
    assert outcomes == {n: "existing" if n <= 5 else "submitted" for n in range(1, 11)}
    assert "5 existing, 5 submitted" in rest.stderr
    assert fal.fake.stats.submits == 10 and not fal.fake.stats.duplicate_inputs()


def test_wait_exit_codes(env: dict[str, str], tmp_path: Path) -> None:
    mixed = write_jsonl(tmp_path / "mixed.jsonl", ['{"p": 1}', '{"p": 2, "_fake": {"fail": 500}}'])
    assert jobs(env, "submit", APP, "--inputs", str(mixed)).returncode == 0
    failed = jobs(env, "wait", "--batch", "mixed", "--timeout", "60")
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["failed"] == 1 and "failed 1" in failed.stderr

    slow = write_jsonl(tmp_path / "slow.jsonl", ['{"_fake": {"duration": 120}}'])
    assert jobs(env, "submit", APP, "--inputs", str(slow)).returncode == 0
    timed_out = jobs(env, "wait", "--batch", "slow", "--timeout", "1")
    assert timed_out.returncode == 3 and "timed out after 1s" in timed_out.stderr
    assert json.loads(timed_out.stdout)["timed_out"] is True

    unknown = jobs(env, "wait", "--batch", "nope")
    assert unknown.returncode == 4 and "no jobs in batch 'nope'" in unknown.stderr
    assert jobs(env, "export", "--batch", "nope", "--out", str(tmp_path / "x")).returncode == 4


def test_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    both = jobs(env, "submit", APP, "--inputs", "x.jsonl", "--input", "{}")
    assert both.returncode == 2 and "--inputs takes neither" in both.stderr
    missing = jobs(env, "submit", APP, "--inputs", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert jobs(env, "gc", "--older-than", "soon").returncode == 2


def test_logs_result_files_and_gc(env: dict[str, str], fal: FakeFalServer, tmp_path: Path) -> None:
    args = '{"prompt": "logged", "num_images": 2, "_fake": {"logs": 3}}'
    sent = jobs(env, "submit", APP, "--input", args, "--download")
    job = json.loads(sent.stdout)

    followed = jobs(env, "logs", job["id"], "--follow")
    assert followed.returncode == 0, followed.stderr
    lines = json_lines(followed.stdout)
    assert [x["message"] for x in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert json_lines(jobs(env, "logs", job["request_id"]).stdout) == lines

    files_dir = tmp_path / "files"
    saved = jobs(env, "result", job["id"], "--files", str(files_dir))
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["prompt"] == "logged"
    assert "2 file(s) copied" in saved.stderr
    for n in range(2):
        expected = expected_file_bytes(job["request_id"], n, fal.config.file_size)
        assert (files_dir / f"{job['request_id']}-{n}.png").read_bytes() == expected

    collected = jobs(env, "gc", "--older-than", "0s")
    assert collected.returncode == 0, collected.stderr
    freed = json.loads(collected.stdout)
    assert freed["jobs"] == 1 and freed["files"] == 2 and freed["file_rows"] == 2
    assert freed["file_bytes"] == 2 * fal.config.file_size and freed["bytes"] > freed["file_bytes"]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]

    removed = jobs(env, "result", job["id"])
    assert removed.returncode == 1 and "result was removed by `jobs gc`" in removed.stderr
    status = json.loads(jobs(env, "status", job["id"]).stdout)
    assert status["state"] == "succeeded"  # the job row stays
