"""Replicas: one versus two ``jobs serve`` processes on one PostgreSQL database finishing N
jobs (5,000 in the full run), at 0 and at 200 ms emulator latency.

Every job is already finished at the emulator when the replicas start, so finishing it
takes exactly one status poll and one result fetch: the emulator's per-request counters
then prove that the work was shared without overlap (no request polled or fetched twice),
and each replica's ``/metrics`` shows its share. The time is measured at the emulator, from
the first status poll to the last result fetch. The baseline of the two-replica run is the
one-replica run on the same machine: the figure is the speed-up, reported as it is on a
2-core machine that also runs PostgreSQL, the emulator and the load of other users.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Emulator,
    Figure,
    Result,
    db_scalar,
    fresh_postgres,
    median,
    processes,
    say,
    seed_jobs,
    serve_env,
    start_emulator,
    start_serve,
    wait_serve,
)
from bench.poll_throughput import crossing, seed_emulator


def one_run(
    tmp: Path, emulator: Emulator, n: int, replicas: int, latency: float, tag: str
) -> dict[str, Any]:
    emulator.configure(latency=0.0, duration=0.2, queue_time=0.0)
    emulator.reset()
    pairs = seed_emulator(emulator, n, tmp / f"requests-{tag}.json")
    time.sleep(0.5)  # every request is COMPLETED at the emulator from here on
    emulator.configure(latency=latency)
    url = fresh_postgres()
    seed_jobs(url, [(rid, base) for rid, base in pairs], next_poll_at=time.time() - 1)
    before = emulator.stats()
    serves = [
        start_serve(tmp, serve_env(url, emulator.url), name=f"serve-{tag}-{i}", wait=False)
        for i in range(replicas)
    ]
    samples: list[tuple[float, int]] = []
    polls0 = int(before["status_polls"])
    fetches0 = int(before["result_fetches"])
    first_poll: float | None = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        stats = emulator.stats()
        now = time.monotonic()
        if first_poll is None and int(stats["status_polls"]) > polls0:
            first_poll = now
        samples.append((now, int(stats["result_fetches"]) - fetches0))
        if samples[-1][1] >= n:
            break
        for serve in serves:
            serve.proc.check_alive()
        time.sleep(0.05)
    for serve in serves:
        wait_serve(serve)
    settle = time.monotonic() + 30  # the last applies land just after the last fetch
    while time.monotonic() < settle:
        if db_scalar(url, "SELECT count(*) FROM jobs WHERE state = 'succeeded'") >= n:
            break
        time.sleep(0.1)
    shares = [serve.metric("jobs_polls_total", provider="fal", outcome="ok") for serve in serves]
    for serve in serves:
        serve.proc.stop()
    done = crossing(samples, n)
    stats = emulator.stats(per_request=True)
    counters = [stats["requests"][rid] for rid, _ in pairs]
    twice = sum(1 for c in counters if c["status_polls"] > 1 or c["result_fetches"] > 1)
    terminal = db_scalar(url, "SELECT count(*) FROM jobs WHERE state = 'succeeded'")
    seconds = round(done - first_poll, 2) if done and first_poll else None
    return {
        "replicas": replicas,
        "latency": latency,
        "seconds": seconds,
        "jobs_per_s": round(n / seconds, 1) if seconds else None,
        "succeeded": terminal,
        "polled_or_fetched_twice": twice,
        "status_polls": sum(c["status_polls"] for c in counters),
        "result_fetches": sum(c["result_fetches"] for c in counters),
        "polls_per_replica": shares,
    }


def run(quick: bool, runs: int | None = None) -> Result:
    n = 1_000 if quick else 5_000
    runs = runs or (1 if quick else 2)
    result = Result("replicas", "Replicas", "quick" if quick else "full")
    result.details.update(jobs=n, runs=runs)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as name, processes():
        tmp = Path(name)
        emulator = start_emulator(tmp)
        for latency in (0.0, 0.2):
            rows = []
            for i in range(runs):
                pair = {}
                for replicas in (1, 2):
                    tag = f"{replicas}r-{latency:g}-{i}"
                    out = one_run(tmp, emulator, n, replicas, latency, tag)
                    say(f"replicas: {out}")
                    pair[replicas] = out
                rows.append(pair)
            result.details[f"latency_{int(latency * 1000)}ms"] = rows
            one = round(median([r[1]["jobs_per_s"] or 0.0 for r in rows]), 1)
            two = round(median([r[2]["jobs_per_s"] or 0.0 for r in rows]), 1)
            clean = all(
                r[k]["polled_or_fetched_twice"] == 0 and r[k]["succeeded"] == n
                for r in rows
                for k in (1, 2)
            )
            shares = rows[-1][2]["polls_per_replica"]
            result.figures.append(
                Figure(
                    figure=f"Jobs finished/s, 2 replicas vs 1, PostgreSQL, "
                    f"{latency * 1000:.0f} ms latency",
                    ours=two,
                    baseline=one,
                    unit="jobs/s",
                    ratio=round(two / one, 3) if one else None,
                    target="report; no job polled twice",
                    met=clean,
                    notes=f"{n:,} jobs; polls per replica {[int(s) for s in shares]}; "
                    f"polled or fetched twice: "
                    f"{sum(r[k]['polled_or_fetched_twice'] for r in rows for k in (1, 2))}",
                )
            )
    return result
