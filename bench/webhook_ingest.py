"""Webhook ingest: signed fal callbacks per second that ``jobs serve`` verifies (ED25519 over
the body, against keys fetched from a JWKS URL) and applies (compare-and-set, result stored,
group commit), sustained, with ``wrk`` as the load generator in its own process.

Baseline: :mod:`bench.ingest_baseline`, a bare Starlette endpoint on the same server stack
doing one raw ``sqlite3`` insert per request. Both get the very same pre-signed requests
from the same ``wrk`` command (1 thread, 64 connections), one after the other, on the same
machine; the ratio is the median over runs. Every job is in flight before the run and each
callback is sent once, so every request of ours is a real "finished with this result"
delivery (no duplicates), and afterwards every job must be ``succeeded`` with its result
stored.

Latency "from callback to result stored" is wrk's request latency: ``jobs serve`` answers a
callback only after the transaction holding the result has committed. It is reported at
saturation (64 connections, queueing included) and at a light load (4 connections).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import (
    HOST,
    PYTHON,
    ROOT,
    Figure,
    Proc,
    Result,
    Seeded,
    clean_env,
    db_scalar,
    free_port,
    median,
    processes,
    ratio,
    say,
    seed_jobs,
    serve_env,
    sqlite_url,
    start_serve,
    wait_for,
)
from jobs.providers.signatures import public_jwk, sign_fal

TARGET = 0.8
TARGET_CPU_MS = 0.8  # CPU the jobs serve process spends per callback
LUA = ROOT / "bench" / "webhooks.lua"
USER_ID = "bench-user"


@contextmanager
def jwks_server(key: Ed25519PrivateKey) -> Iterator[str]:
    """Serve ``{"keys": [key's public half]}`` on 127.0.0.1; yields its URL."""
    body = json.dumps({"keys": [public_jwk(key, "bench")]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="jwks", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def payload(request_id: str) -> bytes:
    """A success callback shaped like the emulator's (spec 2.3), about 500 bytes."""
    images = [
        {
            "url": f"https://v3.fal.media/files/bench/{request_id}-0.png",
            "content_type": "image/png",
            "file_name": f"{request_id}-0.png",
            "file_size": 2048,
            "width": 64,
            "height": 64,
        }
    ]
    body = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK",
        "payload": {"images": images, "seed": 42, "prompt": "bench", "input": {"prompt": "b"}},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def write_requests(key: Ed25519PrivateKey, jobs: list[Seeded], path: Path) -> None:
    """One signed callback per job, as the emulator would send it, for ``bench/webhooks.lua``."""
    now = int(time.time())
    with open(path, "w") as out:
        for job in jobs:
            body = payload(job.request_id)
            headers = sign_fal(key, job.request_id, USER_ID, now, body)
            out.write(
                "\t".join(
                    [
                        f"/v1/webhooks/fal?job={job.job_id}",
                        job.request_id,
                        USER_ID,
                        headers["X-Fal-Webhook-Timestamp"],
                        headers["X-Fal-Webhook-Signature"],
                        body.decode(),
                    ]
                )
                + "\n"
            )


def wrk(
    url: str, requests: Path, connections: int, seconds: int, *, wrap: bool = False
) -> dict[str, Any]:
    """Send the prepared callbacks for ``seconds`` (each once unless ``wrap``)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"]
    command += ["-s", str(LUA), url, "--", str(requests), "wrap" if wrap else "once"]
    with open(requests) as handle:
        prepared = sum(1 for _ in handle)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 90)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    report: dict[str, Any] = json.loads(lines[-1])
    report["per_s"] = round(report["requests"] / (report["duration_us"] / 1e6), 1)
    report["errors"] = sum(v for k, v in report.items() if k.startswith("errors_"))
    if not wrap and report["requests"] >= prepared:
        raise Exhausted(requests, prepared, seconds)
    return report


class Exhausted(RuntimeError):
    """Every prepared callback of a pass went out before its time was up: the rate would be
    underestimated, so the run is repeated with more (the benchmark sizes itself)."""

    def __init__(self, requests: Path, prepared: int, seconds: int) -> None:
        super().__init__(f"all {prepared} callbacks went out before {seconds} s passed")
        self.requests = requests


def start_baseline(tmp: Path, name: str) -> tuple[Proc, str]:
    port = free_port()
    env = clean_env(BENCH_BASELINE_DB=str(tmp / f"{name}.db"))
    command = [PYTHON, "-m", "uvicorn", "bench.ingest_baseline:app", "--host", HOST]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    proc = Proc(name, command, tmp, env).start()
    url = f"http://{HOST}:{port}"

    def ready() -> bool:
        proc.check_alive()
        import httpx

        try:
            httpx.get(url + "/", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, "baseline server")
    return proc, url


def one_run(
    key: Ed25519PrivateKey, jwks_url: str, tmp: Path, sizes: dict[str, int], tag: str
) -> dict[str, Any]:
    """Ours then the baseline, the same requests; then a light-load latency pass of each."""
    heavy, light = sizes["heavy"], sizes["light"]
    db = tmp / f"ingest-{tag}.db"
    pairs = [(str(uuid.uuid4()), "http://127.0.0.1:9") for _ in range(heavy + light)]
    jobs = seed_jobs(sqlite_url(db), pairs, next_poll_at=time.time() + 3600, webhook=True)
    heavy_file, light_file = tmp / f"heavy-{tag}.txt", tmp / f"light-{tag}.txt"
    write_requests(key, jobs[:heavy], heavy_file)
    write_requests(key, jobs[heavy:], light_file)
    env = serve_env(sqlite_url(db), "http://127.0.0.1:9", jwks_url)
    serve = start_serve(tmp, env, name=f"serve-ingest-{tag}")
    try:
        cpu0 = serve.proc.cpu_seconds()
        ours = wrk(serve.url, heavy_file, 64, sizes["seconds"])
        cpu = serve.proc.cpu_seconds() - cpu0
        ours["cpu_ms_per_callback"] = round(1000 * cpu / max(1, ours["requests"]), 3)
        ours_light = wrk(serve.url, light_file, 4, sizes["light_seconds"])
        ours["rss_mb"] = round(serve.proc.rss_mb(), 1)
    finally:
        serve.proc.stop()
    url = sqlite_url(db)
    stored = db_scalar(url, "SELECT count(*) FROM results")
    succeeded = db_scalar(url, "SELECT count(*) FROM jobs WHERE state = 'succeeded'")
    proc, base_url = start_baseline(tmp, f"baseline-{tag}")
    try:
        cpu0 = proc.cpu_seconds()
        base = wrk(base_url, heavy_file, 64, sizes["seconds"], wrap=True)
        cpu = proc.cpu_seconds() - cpu0
        base["cpu_ms_per_callback"] = round(1000 * cpu / max(1, base["requests"]), 3)
        base_light = wrk(base_url, light_file, 4, sizes["light_seconds"], wrap=True)
    finally:
        proc.stop()
    answered = ours["requests"] + ours_light["requests"]
    # A callback in flight when wrk stops is still applied: at most one per connection.
    clean = answered <= stored == succeeded <= answered + 64 + 4
    if ours["errors"] or ours_light["errors"] or base["errors"] or not clean:
        raise RuntimeError(
            f"ingest run not clean: ours errors {ours['errors']}+{ours_light['errors']}, "
            f"baseline errors {base['errors']}, {answered} answered, {stored} results stored, "
            f"{succeeded} jobs succeeded"
        )
    return {
        "ours": ours,
        "ours_light": ours_light,
        "baseline": base,
        "baseline_light": base_light,
        "ratio": ratio(ours["per_s"], base["per_s"]),
        "results_stored": stored,
    }


MAX_GROWTH = 8  # times a run may double a pass's prepared callbacks (up to 256x)


def sized_run(
    key: Ed25519PrivateKey, jwks_url: str, tmp: Path, sizes: dict[str, int], run: int
) -> dict[str, Any]:
    """:func:`one_run`, doubling the prepared callbacks of the pass that ran out (the
    saturated or the light one; for this and later runs) while a faster machine sends them
    all before the time is up. Bounded: after MAX_GROWTH doublings it says so and stops."""
    for _ in range(MAX_GROWTH):
        tag = f"{run}-{sizes['heavy']}-{sizes['light']}"
        try:
            return one_run(key, jwks_url, tmp, sizes, tag)
        except Exhausted as exc:
            which = "light" if exc.requests.name.startswith("light") else "heavy"
            sizes[which] *= 2
            say(f"ingest run {run}: {exc}; again with {sizes[which]} {which} callbacks")
    raise RuntimeError(
        f"the machine sent {sizes} prepared callbacks before the time was up "
        f"{MAX_GROWTH} times over; raise the sizes in bench/webhook_ingest.py"
    )


def run(quick: bool, runs: int | None = None) -> Result:
    sizes = {
        "heavy": 12_000 if quick else 45_000,  # prepared: more than wrk can send in time
        "light": 1_500 if quick else 3_000,
        "seconds": 5 if quick else 15,
        "light_seconds": 2 if quick else 5,
    }
    runs = runs or (1 if quick else 5)
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is needed: apt-get install -y wrk")
    result = Result("webhook_ingest", "Webhook ingest", "quick" if quick else "full")
    result.details.update(sizes=sizes, runs=runs, connections=64)
    key = Ed25519PrivateKey.generate()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as name, processes():
        tmp = Path(name)
        with jwks_server(key) as jwks_url:
            for i in range(runs):
                row = sized_run(key, jwks_url, tmp, sizes, i)
                say(
                    f"ingest run {i}: ours {row['ours']['per_s']}/s, baseline "
                    f"{row['baseline']['per_s']}/s, ratio {row['ratio']}"
                )
                rows.append(row)
    result.details["runs_detail"] = rows
    ours = median([r["ours"]["per_s"] for r in rows])
    base = median([r["baseline"]["per_s"] for r in rows])
    r = median([r["ratio"] or 0.0 for r in rows])
    cpu_ours = median([r["ours"]["cpu_ms_per_callback"] for r in rows])
    cpu_base = median([r["baseline"]["cpu_ms_per_callback"] for r in rows])
    result.figures.append(
        Figure(
            figure="Signed webhooks verified and applied /s",
            ours=ours,
            baseline=base,
            unit="callbacks/s",
            ratio=r,
            target=f">= {TARGET} x raw sqlite3 endpoint",
            met=r >= TARGET,
            notes=f"wrk, 64 connections, {sizes['seconds']} s per run; every callback distinct "
            f"and its result stored; runs {runs}, ratios "
            + ", ".join(str(r["ratio"]) for r in rows),
        )
    )
    result.figures.append(
        Figure(
            figure="CPU per webhook, jobs serve",
            ours=cpu_ours,
            baseline=cpu_base,
            unit="ms",
            ratio=ratio(cpu_ours, cpu_base, lower_is_better=True),
            target=f"<= {TARGET_CPU_MS} ms",
            met=cpu_ours <= TARGET_CPU_MS,
            notes="CPU time of the jobs serve process over the saturated pass / callbacks "
            "answered; baseline: the raw sqlite3 endpoint's process",
        )
    )
    for conns, key_ours, key_base in (
        (64, "ours", "baseline"),
        (4, "ours_light", "baseline_light"),
    ):
        for q in ("p50", "p99"):
            ours_ms = median([r[key_ours][f"{q}_us"] / 1000 for r in rows])
            base_ms = median([r[key_base][f"{q}_us"] / 1000 for r in rows])
            result.figures.append(
                Figure(
                    figure=f"Callback to result stored, {q}, {conns} connections",
                    ours=round(ours_ms, 2),
                    baseline=round(base_ms, 2),
                    unit="ms",
                    ratio=ratio(ours_ms, base_ms, lower_is_better=True),
                    target="report",
                    met=None,
                    notes="saturated: includes queueing" if conns == 64 else "light load",
                )
            )
    return result
