"""``jobs serve`` and the ``jobs`` CLI as real subprocesses, always stopped by the test.

Every process gets a clean environment (no stray ``JOBS_*``/``FAL_*`` from the developer's
shell), writes its output to a file under the test's ``tmp_path`` (a pipe nobody reads would
block it), and is started in its own session so a kill never reaches pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from .waiting import free_port, wait_for

START_TIMEOUT = 30.0
JOBS = [sys.executable, "-m", "jobs"]


def jobs_env(
    database_url: str,
    fal_url: str,
    *,
    fal_key: str = "dummy-fal-key-0123456789",
    public_url: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a ``jobs`` process talking to the emulator at ``fal_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBS_", "FAL_", "REPLICATE_"))}
    env.update(
        JOBS_DATABASE_URL=database_url,
        JOBS_FAL_QUEUE_URL=fal_url,
        JOBS_FAL_JWKS_URL=f"{fal_url}/.well-known/jwks.json",
        FAL_KEY=fal_key,
        JOBS_CACHE_ALLOW_HOSTS="127.0.0.1",  # the emulator's result files
        **extra,
    )
    if public_url is not None:
        env["JOBS_PUBLIC_URL"] = public_url
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run one ``jobs`` command to completion (killed if it outlives ``timeout``)."""
    return subprocess.run(
        [*JOBS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


class ServeProcess:
    """``jobs serve`` on 127.0.0.1 and a free port; a context manager that kills it."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *args: str, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> Self:
        command = [*JOBS, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"jobs serve exited early:\n{self.log()}")
            return self.healthy()

        wait_for(ready, timeout, f"jobs serve on {self.url}", every=0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, float]:
        """Send ``sig`` and wait for the exit; returns (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as in a crash."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (``--log-format json``); other lines are skipped."""
        records = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class Processes:
    """Every subprocess the test starts, so each one is killed at the end whatever happens."""

    def __init__(self) -> None:
        self._all: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def start(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*JOBS, *args], env=env, stdout=out, stderr=out, start_new_session=True
            )
        with self._lock:
            self._all.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self._all:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# The crash storms' jobsctl serve: short leases and grace, so kills are recovered from in
# seconds (tests/test_crash.py, tests/test_replicate_crash.py).
CRASH_SERVE_ARGS = (
    "--tick",
    "0.1",
    "--lease",
    "3",
    "--ambiguous-grace",
    "3",
    "--ambiguous-period",
    "1",
    "--stop-timeout",
    "2",
)
