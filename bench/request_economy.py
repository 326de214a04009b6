"""Request economy: remote requests spent per finished job, with webhooks on and off, against
``fal_client``'s default behaviour (poll status, sleep 0.1 s, repeat; then fetch the result).

Measured (30 s jobs): one ``jobs serve`` with ``JOBS_PUBLIC_URL`` set to itself (so the
emulator calls back), default poller and backoff; N jobs submitted with a webhook and N
without, all at once; the emulator (retention 360 s, fal's shortest) counts every request
per request id. At the same time, in another process, the real ``fal_client`` runs 10 jobs of
the same length against an emulator of its own (:mod:`bench.fal_client_baseline`).

Derived (10 min jobs; running them would take 10 real minutes and the product has no
scaled clock): the product's own pure backoff, ``jobs.backoff.next_poll`` with the default
``PollPolicy`` called exactly as ``AsyncJobManager`` calls it, replayed over the job's
timeline with the poller's tick (:func:`replay`). The same replay is run for the 30 s case
and printed next to the measurement, which is what makes the derived figures credible.
fal_client's 10 min count is its measured 30 s rate of polls per second of job, scaled.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    APP,
    FAL_KEY,
    PYTHON,
    Figure,
    Proc,
    Result,
    clean_env,
    free_port,
    processes,
    ratio,
    say,
    serve_env,
    sqlite_url,
    start_emulator,
    start_serve,
)
from jobs.backoff import PollPolicy, next_poll
from jobs.poller import TICK

TARGET_FEWER = 20.0
TARGET_WEBHOOK_REQUESTS = 3.0
RETENTION = 360.0  # fal's shortest result retention (spec/queue-protocols.md)
QUEUE_TIME = 0.2
# fal_client runs its jobs in one process with its emulator: more than a few at once and
# they slow each other down (one httpx pool, one GIL), which would understate its per-job
# polling; its per-job behaviour does not depend on how many jobs we run.
FAL_CLIENT_JOBS = 10


def replay(
    duration: float,
    *,
    webhook: bool,
    delivered: bool = True,
    queue_time: float = QUEUE_TIME,
    tick: float = TICK,
    latency: float = 0.005,
    webhook_delay: float = 0.05,
    rng: random.Random,
) -> dict[str, float]:
    """One job's remote requests under the product's backoff, on a simulated clock.

    Submit at 0; the job runs from ``queue_time`` to ``queue_time + duration``. The first
    poll is scheduled as ``AsyncJobManager._submitted`` does, each next one as
    ``AsyncJobManager._schedule`` does (``changed`` = a new state), each with a uniform
    jitter draw as ``AsyncJobManager._next_poll`` makes; a due job is polled at
    the poller's next tick (random phase); a poll that sees COMPLETED fetches the result.
    With a webhook, the callback lands ``webhook_delay`` after the finish (unless not
    ``delivered``) and ends the polling."""
    policy = PollPolicy()
    start, finish = queue_time, queue_time + duration
    phase = rng.random() * tick

    def next_tick(t: float) -> float:
        return phase + math.ceil((t - phase) / tick) * tick

    step = next_poll(policy, previous=None, changed=False, webhook=webhook, rand=rng.random())
    due, interval, state = latency + step.delay, step.interval, "queued"
    polls = fetches = 0
    longest_gap, last = 0.0, 0.0
    while True:
        at = next_tick(due)
        if webhook and delivered and finish + webhook_delay <= at:
            known = finish + webhook_delay
            break
        polls += 1
        longest_gap, last = max(longest_gap, at - last), at
        seen = "queued" if at < start else "in_progress" if at < finish else "completed"
        if seen == "completed":
            fetches += 1
            known = at + 2 * latency
            break
        changed, state = seen != state, seen
        step = next_poll(
            policy, previous=interval, changed=changed, webhook=webhook, rand=rng.random()
        )
        due, interval = at + latency + step.delay, step.interval
    callbacks = 1 if webhook and delivered else 0
    return {
        "status_polls": polls,
        "result_fetches": fetches,
        "requests": 1 + polls + fetches + callbacks,
        "known_late": known - finish,
        "longest_gap": longest_gap,
    }


def replay_many(
    duration: float, *, webhook: bool, delivered: bool = True, n: int = 10_000
) -> dict[str, float]:
    rng = random.Random(5)
    runs = [replay(duration, webhook=webhook, delivered=delivered, rng=rng) for _ in range(n)]
    out: dict[str, float] = {
        "jobs": n,
        "share_over_3_requests": round(sum(r["requests"] > 3 for r in runs) / n, 4),
    }
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[f"{key}_mean"] = round(statistics.mean(values), 2)
        out[f"{key}_max"] = round(max(values), 2)
    return out


async def _submit(settings: Any, jobs: int) -> list[str]:
    from jobs import AsyncJobManager

    manager = AsyncJobManager(settings)
    try:
        made = await asyncio.gather(
            *(
                manager.submit(APP, {"prompt": f"economy {i}"}, webhook=i % 2 == 0)
                for i in range(2 * jobs)
            )
        )
        return [job.id for job in made]
    finally:
        await manager.aclose()
        manager.store.close()


def _rows(database_url: str) -> list[dict[str, Any]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT j.id, j.request_id, j.webhook, j.state, j.finished_at, "
                    "r.job_id IS NOT NULL AS stored FROM jobs j "
                    "LEFT JOIN results r ON r.job_id = j.id"
                )
            ).mappings()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def measure(tmp: Path, jobs: int, duration: float) -> dict[str, Any]:
    """N webhook jobs and N polled jobs through one ``jobs serve``; fal_client alongside."""
    from jobs import Settings
    from jobs.config import Secret

    emulator = start_emulator(tmp, duration=duration)
    emulator.configure(retention=RETENTION, queue_time=QUEUE_TIME)
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    db_url = sqlite_url(tmp / "economy.db")
    env = serve_env(db_url, emulator.url, JOBS_PUBLIC_URL=public)
    serve = start_serve(tmp, env, port=port, name="serve-economy")
    command = [PYTHON, "-m", "bench.fal_client_baseline", "--jobs", str(FAL_CLIENT_JOBS)]
    command += ["--duration", str(duration), "--retention", str(RETENTION)]
    baseline = Proc("fal-client", command, tmp, clean_env()).start()
    settings = Settings.from_env(
        {},
        database_url=db_url,
        fal_queue_url=emulator.url,
        fal_key=Secret(FAL_KEY),
        public_url=public,
    )
    started = time.time()
    ids = asyncio.run(_submit(settings, jobs))
    deadline = time.monotonic() + duration + 180
    while time.monotonic() < deadline:
        serve.proc.check_alive()
        rows = _rows(db_url)
        if len(rows) == len(ids) and all(r["finished_at"] is not None for r in rows):
            break
        time.sleep(0.5)
    else:
        raise TimeoutError("request economy: jobs did not all finish in time")
    seconds = time.time() - started
    stats = emulator.stats(per_request=True)
    lateness: dict[bool, list[float]] = {True: [], False: []}
    for row in rows:
        info = httpx.get(f"{emulator.url}/_fake/requests/{row['request_id']}", timeout=10).json()
        remote_end = info["submitted_at"] + info["queue_time"] + info["run_time"]
        lateness[bool(row["webhook"])].append(row["finished_at"] - remote_end)
    serve.proc.stop()
    assert baseline.popen is not None
    baseline.popen.wait(timeout=duration + 180)
    fal_client = json.loads(baseline.log_path.read_text().strip().splitlines()[-1])
    out: dict[str, Any] = {"seconds": round(seconds, 1), "fal_client": fal_client}
    for webhook in (True, False):
        mine = [r for r in rows if bool(r["webhook"]) is webhook]
        counters = [stats["requests"][r["request_id"]] for r in mine]
        polls = [c["status_polls"] for c in counters]
        fetches = [c["result_fetches"] for c in counters]
        callbacks = [c["webhook_attempts"] for c in counters]
        total = [1 + p + f + w for p, f, w in zip(polls, fetches, callbacks, strict=True)]
        out["webhooks" if webhook else "polling"] = {
            "jobs": len(mine),
            "succeeded": sum(r["state"] == "succeeded" for r in mine),
            "results_stored": sum(bool(r["stored"]) for r in mine),
            "status_polls_mean": round(statistics.mean(polls), 2),
            "status_polls_max": max(polls),
            "result_fetches_mean": round(statistics.mean(fetches), 2),
            "webhook_attempts_mean": round(statistics.mean(callbacks), 2),
            "requests_mean": round(statistics.mean(total), 2),
            "requests_max": max(total),
            "known_late_median_s": round(statistics.median(lateness[webhook]), 2),
            "known_late_max_s": round(max(lateness[webhook]), 2),
        }
    return out


def run(quick: bool, runs: int | None = None) -> Result:
    jobs = 10 if quick else 40
    duration = 30.0
    long = 600.0
    result = Result("request_economy", "Request economy", "quick" if quick else "full")
    with tempfile.TemporaryDirectory(prefix="bench-economy-") as name, processes():
        measured = measure(Path(name), jobs, duration)
    say(f"economy measured: {json.dumps(measured)}")
    fal = measured["fal_client"]
    polling, hooks = measured["polling"], measured["webhooks"]
    captured = (
        all(m["succeeded"] == m["results_stored"] == m["jobs"] for m in (polling, hooks))
        and fal["results"] == fal["jobs"]
    )
    derived = {
        "replay_30s_polling": replay_many(duration, webhook=False),
        "replay_30s_webhooks": replay_many(duration, webhook=True),
        "replay_10min_polling": replay_many(long, webhook=False),
        "replay_10min_webhooks": replay_many(long, webhook=True),
        "replay_10min_webhook_lost": replay_many(long, webhook=True, delivered=False),
    }
    fal_rate = fal["status_polls_mean"] / (duration + QUEUE_TIME)  # polls per second of job
    fal_long = round(fal_rate * (long + QUEUE_TIME), 1)
    result.details.update(
        jobs_per_mode=jobs,
        job_seconds=duration,
        measured=measured,
        derived=derived,
        fal_client_10min_status_polls=fal_long,
        results_captured=captured,
        retention_s=RETENTION,
    )
    r30 = ratio(fal["status_polls_mean"], polling["status_polls_mean"])
    d10 = derived["replay_10min_polling"]
    r10 = ratio(fal_long, d10["status_polls_mean"])
    lost = derived["replay_10min_webhook_lost"]
    result.figures += [
        Figure(
            figure="Status requests per job, 30 s jobs, no webhooks",
            ours=polling["status_polls_mean"],
            baseline=fal["status_polls_mean"],
            unit="requests",
            ratio=r30,
            target=f">= {TARGET_FEWER:g}x fewer than fal_client",
            met=bool(r30 and r30 >= TARGET_FEWER and captured),
            notes=f"{jobs} jobs each; replay predicts "
            f"{derived['replay_30s_polling']['status_polls_mean']}; all results captured: "
            f"{captured}",
        ),
        Figure(
            figure="Status requests per job, 10 min jobs, no webhooks",
            ours=d10["status_polls_mean"],
            baseline=fal_long,
            unit="requests",
            ratio=r10,
            target=f">= {TARGET_FEWER:g}x fewer than fal_client",
            met=bool(r10 and r10 >= TARGET_FEWER),
            measured="derived",
            notes="replay of jobs.backoff.next_poll; fal_client scaled from its measured 30 s "
            f"rate; longest gap between polls {d10['longest_gap_max']} s",
        ),
        Figure(
            figure="Remote requests per job, 30 s jobs, webhooks",
            ours=hooks["requests_mean"],
            baseline=fal["requests_per_job"],
            unit="requests",
            ratio=ratio(hooks["requests_mean"], fal["requests_per_job"], lower_is_better=True),
            target=f"<= {TARGET_WEBHOOK_REQUESTS:g} (submit, webhook, <= 1 safety poll)",
            met=hooks["requests_max"] <= TARGET_WEBHOOK_REQUESTS and captured,
            notes=f"max {hooks['requests_max']}; status polls {hooks['status_polls_mean']}, "
            f"result fetches {hooks['result_fetches_mean']}",
        ),
        Figure(
            figure="Remote requests per job, 10 min jobs, webhooks",
            ours=derived["replay_10min_webhooks"]["requests_mean"],
            baseline=round(1 + fal_long + 1, 1),
            unit="requests",
            ratio=ratio(
                derived["replay_10min_webhooks"]["requests_mean"],
                1 + fal_long + 1,
                lower_is_better=True,
            ),
            target=f"<= {TARGET_WEBHOOK_REQUESTS:g} (submit, webhook, <= 1 safety poll)",
            met=derived["replay_10min_webhooks"]["requests_max"] <= TARGET_WEBHOOK_REQUESTS
            and lost["known_late_max"] <= RETENTION,
            measured="derived",
            notes=f"max {derived['replay_10min_webhooks']['requests_max']}, "
            f"{100 * derived['replay_10min_webhooks']['share_over_3_requests']:.1f} % of "
            f"{derived['replay_10min_webhooks']['jobs']:,} replayed jobs need more than 3 (a "
            "second safety poll); if the webhook is lost the safety net still has the result "
            f"{lost['known_late_max']} s after the finish (retention {RETENTION:g} s)",
        ),
        Figure(
            figure="Seconds from remote finish to result stored, 30 s jobs, no webhooks (median)",
            ours=polling["known_late_median_s"],
            baseline=None,
            unit="s",
            ratio=None,
            target="report",
            met=None,
            notes=f"max {polling['known_late_max_s']} s; with webhooks median "
            f"{hooks['known_late_median_s']} s, max {hooks['known_late_max_s']} s",
        ),
    ]
    return result
