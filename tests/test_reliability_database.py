"""Database trouble.

SQLite: several ``jobs submit`` processes (JSONL batches and single jobs) and ``jobs list``
readers write and read one database file while ``jobs serve`` polls it. No user sees
'database is locked' (every process exits 0 and says nothing of the kind, the server logs
nothing of the kind), nothing is lost (every input reached the queue exactly once) and every
job reaches its end.

PostgreSQL: the server is restarted (``pg_ctlcluster … restart``) in the middle of a run
with the poller in-process and a client still submitting. Store calls made while it is down
retry a bounded number of times and then raise promptly; no job is marked failed because of
it; the poller goes on afterwards and every job, including those whose submit was cut off,
ends succeeded. The test database is a fresh one of its own (the ``postgres_url`` fixture);
the server is started again in a ``finally`` should the restart leave it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from support.serve import JOBS, ServeProcess, jobs_env
from support.waiting import async_wait_for, wait_for

from jobs import AsyncJobManager, Settings, State
from jobs.backoff import PollPolicy
from jobs.config import Secret
from jobs.poller import Poller
from jobs.store import DB_RETRIES
from jobs.testing import FakeFalConfig, FakeFalServer, input_hash

APP = "fal-ai/flux/dev"
LOCKED = "database is locked"


@pytest.fixture
def fal() -> Iterator[FakeFalServer]:
    with FakeFalServer(FakeFalConfig(duration=0.4, queue_time=0.05, seed=23)) as server:
        yield server


# --- SQLite: many processes, one file ------------------------------------------------------

BATCHES = 4  # `jobs submit --inputs` processes
LINES = 30  # lines per batch file
SINGLES = 6  # `jobs submit --input` processes
READERS = 2  # `jobs list` processes


def _start(args: list[str], env: dict[str, str], out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [*JOBS, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, out


def _jobs_by_state(db: Path) -> dict[str, int]:
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
    conn.close()
    return dict(rows)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_many_processes_share_one_sqlite_file(tmp_path: Path, fal: FakeFalServer) -> None:
    db = tmp_path / "jobs.db"
    env = jobs_env(f"sqlite:///{db}", fal.url)
    inputs: list[dict[str, Any]] = []
    batch_files = []
    for b in range(BATCHES):
        lines = [
            {"prompt": f"batch {b} line {n}", "_fake": {"duration": 0.2 + (n % 4) * 0.2}}
            for n in range(LINES)
        ]
        inputs += lines
        path = tmp_path / f"batch-{b}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        batch_files.append(path)
    singles = [{"prompt": f"single {n}"} for n in range(SINGLES)]
    inputs += singles

    serve = ServeProcess(env, tmp_path / "serve.log", "--tick", "0.05", "--ambiguous-grace", "5")
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        with serve:
            for b, path in enumerate(batch_files):
                args = ["submit", APP, "--inputs", str(path), "--batch", f"b{b}"]
                processes.append(_start(args, env, tmp_path / f"batch-{b}.out"))
            for n, data in enumerate(singles):
                args = ["submit", APP, "--input", json.dumps(data)]
                processes.append(_start(args, env, tmp_path / f"single-{n}.out"))
            for n in range(READERS):
                processes.append(
                    _start(["list", "--limit", "500"], env, tmp_path / f"list-{n}.out")
                )
            for proc, out in processes:
                code = proc.wait(timeout=90)
                output = out.read_text(errors="replace")
                assert code == 0, (proc.args, output)
                assert LOCKED not in output.lower() and "Traceback" not in output, output

            def all_finished() -> bool:
                counts = _jobs_by_state(db)
                return sum(counts.values()) == len(inputs) and set(counts) == {"succeeded"}

            wait_for(all_finished, 60, "every job to succeed", every=0.2)
            code, _ = serve.stop()
            assert code == 0, serve.log()
    finally:
        for proc, _ in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    log = serve.log()
    assert LOCKED not in log.lower() and "Traceback" not in log, log[-3000:]
    # Nothing lost, nothing doubled: every input reached the queue exactly once.
    assert fal.stats.submits_by_input == {input_hash(data): 1 for data in inputs}
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM results").fetchone()[0]
    conn.close()
    assert stored == len(inputs)


# --- PostgreSQL: a restart mid-run ---------------------------------------------------------

POLICY = PollPolicy(initial=0.3, factor=1.6, ceiling=1.0, retention_cap=5.0)
PING_BOUND = 15.0  # seconds: DB_RETRIES attempts with their backoff, plus connect attempts
DOWNTIME = 3.0  # seconds the server stays down: twice what the store's retries wait


def _local_cluster(url: str) -> tuple[str, str]:
    """(version, name) of the local cluster serving ``url``; skips when there is none."""
    host = make_url(url).host or "localhost"
    if host not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip(f"PostgreSQL at {host} is not local: cannot restart it")
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        pytest.skip("pg_ctlcluster (postgresql-common) is needed to restart the server")
    clusters = [
        (version, name)
        for version in sorted(os.listdir("/etc/postgresql"))
        for name in sorted(os.listdir(f"/etc/postgresql/{version}"))
    ]
    if len(clusters) != 1:
        pytest.skip(f"expected one local cluster, found {clusters}")
    return clusters[0]


def _ctl(cluster: tuple[str, str], action: str) -> None:
    version, name = cluster
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action, "--mode", "fast"]
        if action in ("restart", "stop")
        else ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _restart(cluster: tuple[str, str]) -> None:
    """Stop the server (fast: sessions are cut), keep it down for DOWNTIME, start it: longer
    than the store's retries last, so some calls run out of them."""
    _ctl(cluster, "stop")
    time.sleep(DOWNTIME)
    _ctl(cluster, "start")


def _started_at(url: str) -> Any:
    """When the server started (``pg_postmaster_start_time``), or None while it is down."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT pg_postmaster_start_time()")).scalar_one()
    except DBAPIError:
        return None
    finally:
        engine.dispose()


def _ensure_up(cluster: tuple[str, str], url: str) -> None:
    if _started_at(url) is not None:
        return
    with contextlib.suppress(subprocess.CalledProcessError):  # already starting: wait below
        _ctl(cluster, "start")
    wait_for(lambda: _started_at(url) is not None, 60, "PostgreSQL to accept connections", 0.5)


class Pinger:
    """Calls ``store.ping`` in a thread, one call at a time, recording how long each took
    and whether it raised. Bounded: at most ``limit`` calls."""

    def __init__(self, manager: AsyncJobManager, limit: int = 400) -> None:
        self.manager = manager
        self.limit = limit
        self.calls: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pinger", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.calls) < self.limit:
            started = time.monotonic()
            try:
                self.manager.store.ping()
                ok = True
            except DBAPIError:
                ok = False
            self.calls.append((time.monotonic() - started, ok))
            self._stop.wait(0.05)

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(PING_BOUND * 2)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_postgres_restart_mid_run_fails_no_job(
    postgres_url: str, fal: FakeFalServer
) -> None:
    cluster = _local_cluster(postgres_url)
    settings = Settings.from_env(
        {}, database_url=postgres_url, fal_queue_url=fal.url, fal_key=Secret("fal-key-pg-0001")
    )
    manager = AsyncJobManager(settings, poll_policy=POLICY)
    poller = Poller(manager, tick=0.05, lease=3, ambiguous_grace=1.0, ambiguous_period=0.5)
    refused: list[BaseException] = []
    try:
        for i in range(20):  # running across the restart: 1 to 5 s each
            await manager.submit(APP, {"n": i, "_fake": {"duration": 1.0 + (i % 5)}})
        poller.start()

        async def keep_submitting() -> None:
            for i in range(25):  # about 5 s of submits, through the restart
                try:
                    await manager.submit(APP, {"n": 100 + i, "_fake": {"duration": 0.3}})
                except DBAPIError as exc:  # the database is down: said plainly, at once
                    refused.append(exc)
                await asyncio.sleep(0.2)

        before = await asyncio.to_thread(_started_at, postgres_url)
        await asyncio.sleep(1.0)
        with Pinger(manager) as pinger:
            submitter = asyncio.create_task(keep_submitting())
            await asyncio.to_thread(_restart, cluster)
            await submitter
        after_restart = await asyncio.to_thread(_started_at, postgres_url)
        assert before is not None and after_restart is not None and after_restart > before

        # The poller goes on: a job submitted now runs through it.
        late = await manager.submit(APP, {"n": "after the restart", "_fake": {"duration": 0.3}})

        async def all_terminal() -> bool:
            counts = await manager.count_by_state()
            return all(counts[state] == 0 for state in State if not state.terminal)

        await async_wait_for(all_terminal, 60, "every job to finish", every=0.2)
        assert (await manager.status(late.id)).state is State.SUCCEEDED
    finally:
        try:  # the server first: whatever failed, it must be up for everyone else
            await asyncio.to_thread(_ensure_up, cluster, postgres_url)
        finally:
            await poller.stop()
            await manager.aclose()
            manager.store.close()

    counts = await asyncio.to_thread(_count_states, postgres_url)
    assert set(counts) == {"succeeded"} and counts["succeeded"] >= 21, counts
    # Store calls while the server was down were retried, then raised, promptly.
    durations = [took for took, _ in pinger.calls]
    assert max(durations) < PING_BOUND, max(durations)
    failed = [took for took, ok in pinger.calls if not ok]
    assert failed and refused  # the outage was felt: some calls ran out of retries
    backoff = sum(min(2.0, 0.05 * 2**attempt) for attempt in range(1, DB_RETRIES))
    assert all(took >= backoff * 0.9 for took in failed), failed  # each retried, then raised
    assert all(isinstance(exc, DBAPIError) for exc in refused)


def _count_states(url: str) -> dict[str, int]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all()
            failed = conn.execute(
                text("SELECT count(*) FROM jobs WHERE failure_reason IS NOT NULL")
            ).scalar_one()
    finally:
        engine.dispose()
    assert failed == 0
    return {state: n for state, n in rows}
