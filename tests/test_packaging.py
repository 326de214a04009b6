"""A normal install works: the wheel carries the migrations, and the command is reachable
from an interactive shell. Built and installed for real (non-editable, fresh venv), then
used from an empty directory against the emulator, as a new user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def sh(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,  # type: ignore[call-overload]
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed (not editable)."""
    base = tmp_path_factory.mktemp("wheel")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", ROOT)
    (wheel,) = (base / "dist").glob("jobs-*.whl")
    sh(sys.executable, "-m", "venv", base / "venv")
    sh(base / "venv" / "bin" / "pip", "install", "-q", wheel)
    return base / "venv" / "bin"


def test_wheel_runs_from_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_"))}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "empty"
    work.mkdir()
    jobsctl = str(installed / "jobsctl")
    upgraded = sh(jobsctl, "db", "upgrade", cwd=work, env=env)
    assert "database at revision" in upgraded.stderr and (work / "jobs.db").exists()

    fake = subprocess.Popen(
        [jobsctl, "fake-fal", "--port", "0", "--duration", "0.3"],
        cwd=work,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stderr is not None
        url = fake.stderr.readline().split("JOBS_FAL_QUEUE_URL=")[1].rstrip(")\n")
        env.update(JOBS_FAL_QUEUE_URL=url, FAL_KEY="wheel-test")
        job = json.loads(
            sh(
                jobsctl,
                "submit",
                "fal-ai/flux/dev",
                "--input",
                '{"prompt": "w"}',
                cwd=work,
                env=env,
            ).stdout
        )
        result = sh(jobsctl, "result", job["id"], "--wait", "--timeout", "1m", cwd=work, env=env)
        assert json.loads(result.stdout)["prompt"] == "w"
        # The alias and python -m jobs name the same program.
        assert (
            json.loads(sh(installed / "jobs", "status", job["short_id"], cwd=work, env=env).stdout)[
                "state"
            ]
            == "succeeded"
        )
        version = sh(installed / "python", "-m", "jobs", "--version", cwd=work, env=env)
        assert "jobsctl, version" in version.stdout
        demo = sh(jobsctl, "demo", "--duration", "0.5", cwd=work, env=env)
        assert demo.stdout.count('"prompt"') >= 4
    finally:
        fake.terminate()
        fake.wait(timeout=10)
        if fake.stderr is not None:
            fake.stderr.close()


def test_an_interactive_shell_reaches_jobsctl(installed: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{installed}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["HOME"] = str(tmp_path)  # no user bashrc in the way
    done = sh("bash", "-ic", "jobsctl --version", env=env, stdin=subprocess.DEVNULL)
    assert "jobsctl, version" in done.stdout
