"""Shared plumbing of the benchmarks: processes, the emulator, seeding, results, the machine.

Every process a benchmark starts goes through :class:`Proc`: its own session, its output in
a log file under the run's temporary folder, and it is stopped (SIGTERM, then SIGKILL) by
its pid when the benchmark ends, whatever happens. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
APP = "fal-ai/flux/dev"
APP_BASE = "fal-ai/flux"
FAL_KEY = "bench-key-id:bench-key-secret"
HOST = "127.0.0.1"
# A database of our own on the shared server: other engineers' tests use "test".
PG_SERVER = os.environ.get(
    "JOBS_BENCH_POSTGRES_SERVER", "postgresql+psycopg://postgres@127.0.0.1:5432"
)
PG_DATABASE = os.environ.get("JOBS_BENCH_POSTGRES_DATABASE", "jobs_bench")

_LIVE: list[Proc] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Poll ``check`` until it is true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready within {timeout:g} s")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[index])


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A child process in its own session, logging to a file; stopped by pid, never by name."""

    def __init__(self, name: str, command: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.command = command
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _LIVE.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(10)
        if self in _LIVE:
            _LIVE.remove(self)
        return self.popen.returncode

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        """Current resident memory (VmRSS) in MB."""
        return _status_kb(self.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) in MB."""
        return _status_kb(self.pid, "VmHWM") / 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of every child this process has waited for (the raw client's, say)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return 0.0


def stop_all() -> None:
    """Stop every process still running (called when a benchmark ends, even on error)."""
    for proc in list(reversed(_LIVE)):
        proc.stop()


@contextlib.contextmanager
def processes() -> Iterator[None]:
    try:
        yield
    finally:
        stop_all()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no stray JOBS_/FAL_ variables, no proxies."""
    drop = ("JOBS_", "FAL_", "REPLICATE_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# --- the emulator and jobs serve -------------------------------------------------------------


@dataclass
class Emulator:
    """``jobs fake-fal`` in its own process, so it never shares our process's CPU or GIL."""

    proc: Proc
    url: str

    def stats(self, per_request: bool = False) -> dict[str, Any]:
        flag = "1" if per_request else "0"
        reply = httpx.get(f"{self.url}/_fake/stats?per_request={flag}", timeout=60)
        reply.raise_for_status()
        data: dict[str, Any] = reply.json()
        return data

    def configure(self, **changes: Any) -> None:
        httpx.post(f"{self.url}/_fake/config", json=changes, timeout=10).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", timeout=10).raise_for_status()


def start_emulator(
    log_dir: Path,
    *,
    latency: float = 0.0,
    duration: float = 3600.0,
    name: str = "fake-fal",
    **config: Any,
) -> Emulator:
    port = free_port()
    command = [PYTHON, "-m", "jobs", "fake-fal", "--host", HOST, "--port", str(port)]
    command += ["--latency", str(latency), "--duration", str(duration)]
    proc = Proc(name, command, log_dir, clean_env()).start()
    emulator = Emulator(proc, f"http://{HOST}:{port}")

    def ready() -> bool:
        proc.check_alive()
        try:
            return httpx.get(f"{emulator.url}/_fake/config", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, "jobs fake-fal")
    config.setdefault("key", FAL_KEY)
    emulator.configure(**config)
    return emulator


@dataclass
class Serve:
    proc: Proc
    url: str

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0.0 when absent); labels in any order."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            metric, _, raw = head.partition("{")
            if metric != name:
                continue
            found = dict(pair.split("=", 1) for pair in raw.rstrip("}").split(",") if "=" in pair)
            if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(value)
        return 0.0


def serve_env(
    database_url: str, fal_url: str, jwks_url: str | None = None, **extra: str
) -> dict[str, str]:
    return clean_env(
        JOBS_DATABASE_URL=database_url,
        JOBS_FAL_QUEUE_URL=fal_url,
        JOBS_FAL_JWKS_URL=jwks_url or f"{fal_url}/.well-known/jwks.json",
        FAL_KEY=FAL_KEY,
        **extra,
    )


def start_serve(
    log_dir: Path,
    env: dict[str, str],
    *args: str,
    name: str = "serve",
    port: int | None = None,
    wait: bool = True,
) -> Serve:
    port = port or free_port()
    command = [PYTHON, "-m", "jobs", "serve", "--host", HOST, "--port", str(port), *args]
    proc = Proc(name, command, log_dir, env).start()
    serve = Serve(proc, f"http://{HOST}:{port}")
    if wait:
        wait_serve(serve)
    return serve


def wait_serve(serve: Serve, timeout: float = 60) -> None:
    def ready() -> bool:
        serve.proc.check_alive()
        try:
            return httpx.get(f"{serve.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, serve.proc.name, every=0.02)


# --- the database ----------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def fresh_postgres() -> str:
    """A clean ``jobs_bench`` database (``JOBS_BENCH_POSTGRES_DATABASE``) on the local
    PostgreSQL server: created once, every table dropped on each call; returns its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": PG_DATABASE}
            ).first()
            if found is None:
                conn.execute(text(f"CREATE DATABASE {PG_DATABASE}"))
    finally:
        admin.dispose()
    url = f"{PG_SERVER}/{PG_DATABASE}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            # Every table, whichever migrations made them (naming them went stale once a
            # migration added one: the next run's upgrade found it and stopped).
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
    return url


@dataclass(frozen=True)
class Seeded:
    job_id: str
    request_id: str


def seed_jobs(
    database_url: str,
    remote: Sequence[tuple[str, str]],
    *,
    next_poll_at: float,
    webhook: bool = False,
    state: str = "in_progress",
    chunk: int = 5000,
) -> list[Seeded]:
    """Insert one active job per ``(request_id, base_url)`` straight into ``jobs``, as if
    each had been submitted: the quick way to put 100,000 jobs in flight. Runs the
    migrations first. The rows look exactly like what ``mark_submitted`` writes."""
    from sqlalchemy import insert

    from jobs.db import jobs
    from jobs.migrate import upgrade
    from jobs.store import Store, new_job_id

    store = Store.open(database_url)
    try:
        upgrade(store.engine)
        now = time.time()
        seeded: list[Seeded] = []
        rows: list[dict[str, Any]] = []
        for request_id, base in remote:
            job_id = new_job_id()
            seeded.append(Seeded(job_id, request_id))
            url = f"{base}/{APP_BASE}/requests/{request_id}"
            rows.append(
                {
                    "id": job_id,
                    "provider": "fal",
                    "application": APP,
                    "arguments": {"prompt": "bench"},
                    "request_id": request_id,
                    "gateway_request_id": request_id,
                    "status_url": f"{url}/status",
                    "response_url": url,
                    "cancel_url": f"{url}/cancel",
                    "state": state,
                    "webhook": webhook,
                    "download_files": False,
                    "attempts": 1,
                    "polls": 0,
                    "next_poll_at": next_poll_at,
                    "created_at": now,
                    "updated_at": now,
                    "submitted_at": now,
                    "started_at": now if state == "in_progress" else None,
                    "last_change_at": now,
                }
            )
        with store.engine.begin() as conn:
            for start in range(0, len(rows), chunk):
                conn.execute(insert(jobs), rows[start : start + chunk])
        return seeded
    finally:
        store.close()


def db_scalar(database_url: str, sql: str) -> Any:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


# --- results ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on: they only compare within one machine."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "commit": _commit(),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _commit() -> str:
    """The code measured: HEAD, marked ``+dirty`` when ``jobs/`` has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "jobs"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclass
class Figure:
    """One row of the table: ``ratio`` is ours relative to the baseline, oriented so that
    higher is better (a time is divided the other way round)."""

    figure: str
    ours: float
    baseline: float | None
    unit: str
    ratio: float | None
    target: str
    met: bool | None
    measured: str = "measured"  # or "derived"
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "ours": self.ours,
            "baseline": self.baseline,
            "unit": self.unit,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "measured": self.measured,
            "notes": self.notes,
        }


@dataclass
class Result:
    name: str
    title: str
    mode: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        data = {
            "name": self.name,
            "title": self.title,
            "mode": self.mode,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "peak_rss_runner_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
            "figures": [f.to_json() for f in self.figures],
            "details": self.details,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


def ratio(ours: float, baseline: float, *, lower_is_better: bool = False) -> float | None:
    if ours <= 0 or baseline <= 0:
        return None
    return round(baseline / ours if lower_is_better else ours / baseline, 3)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
