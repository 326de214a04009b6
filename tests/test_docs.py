"""The docs agree with the code: every variable the settings read is in the configuration
reference, docs/serve.md states the backoff that jobs/backoff.py implements, and the guides'
walk-throughs run as written against the emulator."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

from jobs import backoff
from jobs.testing import FakeFalConfig, FakeFalServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE_TIMEOUT = 90


def test_every_variable_the_code_reads_is_documented() -> None:
    source = (ROOT / "jobs" / "config.py").read_text()
    read = set(re.findall(r"env(?:\.get\(|\[)\"([A-Z][A-Z0-9_]+)\"", source))
    assert {"JOBS_DATABASE_URL", "FAL_KEY", "JOBS_API_TOKEN"} <= read
    reference = (DOCS / "reference" / "configuration.md").read_text()
    missing = sorted(name for name in read if f"`{name}`" not in reference)
    assert not missing, f"add to docs/reference/configuration.md: {missing}"


def test_serve_md_states_the_backoff_in_the_code() -> None:
    text = (DOCS / "serve.md").read_text()
    times = "\N{MULTIPLICATION SIGN}"
    stated = f"{backoff.INITIAL:g} s, {times}{backoff.FACTOR:g}, ceiling {backoff.CEILING:g} s"
    assert stated in text
    assert f"{times}1.6" not in text and "ceiling 30 s" not in text


def guide_block(name: str) -> str:
    """The fenced block after ``<!-- guide-test: NAME -->`` in a guide."""
    for path in (DOCS / "guides").glob("*.md"):
        text = path.read_text()
        marker = f"<!-- guide-test: {name} -->"
        if marker in text:
            after = text.split(marker, 1)[1]
            return after.split("```", 2)[1].split("\n", 1)[1]
    raise AssertionError(f"no guide has {name!r}")


def run_guide(name: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a guide's block with bash in ``tmp_path``, this venv's ``jobsctl`` first on the
    PATH, for at most GUIDE_TIMEOUT seconds; whatever it started is stopped afterwards (it
    runs in a process group of its own)."""
    bin_dir = str(Path(sys.executable).parent)
    environment = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        **env,
    }
    process = subprocess.Popen(
        ["bash", "-c", guide_block(name)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=GUIDE_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_the_overnight_guide_runs(tmp_path: Path) -> None:
    done = run_guide("overnight", tmp_path, N="40")
    assert done.returncode == 0, done.stderr[-2000:]
    submitted = (tmp_path / "submitted.jsonl").read_text().splitlines()
    assert len(submitted) == 40
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert {job["id"] for job in again} == {json.loads(line)["id"] for line in submitted}
    lines = [
        json.loads(x) for x in (tmp_path / "night-1" / "results.jsonl").read_text().split("\n") if x
    ]
    assert [line["batch_index"] for line in lines] == list(range(1, 41))  # line numbers
    assert {line["state"] for line in lines} <= {"succeeded", "failed"}
    assert sum(line["state"] == "succeeded" for line in lines) >= 30


def test_the_lora_guide_resumes_after_a_restart_without_a_second_submit(tmp_path: Path) -> None:
    with FakeFalServer(FakeFalConfig(duration=2.0, queue_time=0.0, seed=21)) as fal:
        env = {
            "JOBS_DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db",
            "JOBS_FAL_QUEUE_URL": fal.url,
            "JOBS_FAL_REST_URL": fal.url,
            "FAL_KEY": "any-key",
        }
        (tmp_path / "training-images").mkdir()
        for n in range(3):
            (tmp_path / "training-images" / f"{n}.jpg").write_bytes(bytes([n]) * 1000)
        code = guide_block("lora").replace('"duration": 20', '"duration": 3')
        run = partial(
            subprocess.run,
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=GUIDE_TIMEOUT,
        )
        # The "kernel" gives up waiting (as a restart would) while the training runs...
        first = run(env={**os.environ, **env, "WAIT_SECONDS": "0.5"})
        assert first.returncode != 0 and "WaitTimeout" in first.stderr
        assert "queued as" in first.stdout and "(uploaded)" in first.stdout
        # ... and the same cell, run again, waits for the same training.
        second = run(env={**os.environ, **env})
        assert second.returncode == 0, second.stderr[-2000:]
        assert "queued as" in second.stdout and "(reused)" in second.stdout
        assert fal.stats.submits == 1 and fal.stats.cdn_uploads == 1


def test_the_replicas_guide_runs_three_servers_on_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    done = run_guide("replicas", tmp_path, JOBS_DATABASE_URL=postgres_url)
    assert done.returncode == 0, done.stderr[-2000:]
    batch = json.loads((tmp_path / "batch.json").read_text())
    assert (batch["total"], batch["counts"]["succeeded"]) == (30, 30)
    assert 'jobs_by_state{state="succeeded"} 30.0' in (tmp_path / "metrics.txt").read_text()
