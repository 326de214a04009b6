"""Tracking scale: N in-flight jobs (100,000 in the full run), all due, in SQLite and in
PostgreSQL, as after a restart that found every job overdue.

Figures, per database:

- time to claim a batch of 1,000 due jobs with ``Store.claim_due`` (median of 5), against
  the same claim written as one raw driver statement (``UPDATE … WHERE id IN (SELECT …
  WHERE next_poll_at <= now ORDER BY next_poll_at LIMIT 1000 [FOR UPDATE SKIP LOCKED])
  RETURNING`` the columns a poll needs, through ``sqlite3``/``psycopg`` directly; only active
  jobs have a ``next_poll_at``): what the store adds on top of the database's own work;
- the time from starting ``jobs serve`` until every due job has been polled once (counted
  at the emulator), against the raw client (:mod:`bench.rawclient`) polling the same N
  status URLs at the same concurrency with no database;
- peak resident memory of ``jobs serve`` during that round (VmHWM), against the same
  ``jobs serve`` idle on an empty database.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Emulator,
    Figure,
    Result,
    fresh_postgres,
    processes,
    ratio,
    say,
    seed_jobs,
    serve_env,
    sqlite_url,
    start_emulator,
    start_serve,
)
from bench.poll_throughput import crossing, raw_poll, seed_emulator

CLAIM = 1000
CLAIMS = 5
TARGET_RSS_MB = 250.0
TARGET_CLAIM_MS = 30.0
# Restart of 100,000 due jobs: seconds on each database (scaled for a smaller run), and at
# least this share of the raw client's rate.
TARGET_RESTART_S = {"sqlite": 100.0, "postgres": 120.0}
TARGET_RESTART_RATIO = 0.5
COLUMNS = (
    "id, application, request_id, status_url, response_url, state, queue_position, "
    "poll_interval, webhook"
)


def raw_claim_sqlite(path: str, owner: str, limit: int) -> int:
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "UPDATE jobs SET lease_owner = ?, lease_expires_at = ?, next_poll_at = ?, "
            "polls = polls + 1 WHERE id IN (SELECT id FROM jobs WHERE next_poll_at <= ? "
            f"ORDER BY next_poll_at LIMIT ?) RETURNING {COLUMNS}",
            (owner, now + 60, now + 60, now, limit),
        ).fetchall()
        conn.execute("COMMIT")
        return len(rows)
    finally:
        conn.close()


def raw_claim_postgres(url: str, owner: str, limit: int) -> int:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        now = time.time()
        rows = conn.execute(
            "WITH picked AS (SELECT id FROM jobs WHERE next_poll_at <= %s "
            "ORDER BY next_poll_at LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE jobs SET lease_owner = %s, lease_expires_at = %s, next_poll_at = %s, "
            "polls = jobs.polls + 1 FROM picked WHERE jobs.id = picked.id RETURNING "
            + ", ".join(f"jobs.{c.strip()}" for c in COLUMNS.split(",")),
            (now, limit, owner, now + 60, now + 60),
        ).fetchall()
        return len(rows)


def claim_times(database_url: str) -> dict[str, Any]:
    """Ours and the raw statement, alternately, each claim released before the next."""
    from jobs.store import Store

    store = Store.open(database_url)
    ours, raw = [], []
    try:
        for i in range(CLAIMS):
            started = time.perf_counter()
            got = store.claim_due(f"bench-ours-{i}", limit=CLAIM, lease_seconds=60)
            ours.append(1000 * (time.perf_counter() - started))
            store.release_leases(f"bench-ours-{i}")
            assert len(got) == CLAIM, len(got)
            started = time.perf_counter()
            if store.sqlite:
                n = raw_claim_sqlite(database_url.removeprefix("sqlite:///"), f"raw-{i}", CLAIM)
            else:
                n = raw_claim_postgres(database_url, f"raw-{i}", CLAIM)
            raw.append(1000 * (time.perf_counter() - started))
            store.release_leases(f"raw-{i}")
            assert n == CLAIM, n
        plan = None
        if store.sqlite:
            import sqlite3

            conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
            plan = [
                row[3]
                for row in conn.execute(
                    "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE next_poll_at <= ? "
                    "ORDER BY next_poll_at LIMIT 1000",
                    (time.time(),),
                )
            ]
            conn.close()
    finally:
        store.close()
    return {
        "ours_ms": [round(x, 2) for x in ours],
        "raw_ms": [round(x, 2) for x in raw],
        "ours_median_ms": round(statistics.median(ours), 2),
        "raw_median_ms": round(statistics.median(raw), 2),
        "sqlite_claim_plan": plan,
    }


def idle_rss(tmp: Path, database_url: str, emulator: Emulator, name: str) -> float:
    serve = start_serve(tmp, serve_env(database_url, emulator.url), name=name)
    try:
        time.sleep(3)
        return round(serve.proc.peak_rss_mb(), 1)
    finally:
        serve.proc.stop()


def restart_round(
    tmp: Path, database_url: str, emulator: Emulator, n: int, timeout: float, name: str
) -> dict[str, Any]:
    """Start ``jobs serve`` on N overdue jobs; time until each was polled once."""
    emulator.reset()
    started = time.monotonic()
    serve = start_serve(tmp, serve_env(database_url, emulator.url), name=name, wait=False)
    samples: list[tuple[float, int]] = []
    peak_rss = 0.0
    try:
        deadline = started + timeout
        while time.monotonic() < deadline:
            serve.proc.check_alive()
            polls = int(emulator.stats()["status_polls"])
            samples.append((time.monotonic(), polls))
            peak_rss = max(peak_rss, serve.proc.rss_mb())
            if polls >= n:
                break
            time.sleep(0.25)
        hwm = serve.proc.peak_rss_mb()
    finally:
        serve.proc.stop()
    done = crossing(samples, n)
    first = crossing(samples, 1)
    polled = samples[-1][1] if samples else 0
    elapsed = samples[-1][0] - started if samples else timeout
    rate = polled / (samples[-1][0] - first) if first and samples[-1][0] > first else 0.0
    return {
        "complete": done is not None,
        "seconds": round(done - started, 1) if done else None,
        "first_poll_after_s": round(first - started, 2) if first else None,
        "polled": polled,
        "polls_per_s": round(rate, 1),
        "projected_seconds": round(done - started, 1)
        if done
        else round(elapsed + (n - polled) / rate, 1)
        if rate
        else None,
        "peak_rss_mb": round(max(peak_rss, hwm), 1),
    }


def one_database(
    kind: str, tmp: Path, emulator: Emulator, pairs: list[Any], pairs_file: Path, timeout: float
) -> dict[str, Any]:
    url = sqlite_url(tmp / "scale.db") if kind == "sqlite" else fresh_postgres()
    base_rss = idle_rss(tmp, url, emulator, f"serve-idle-{kind}")
    started = time.monotonic()
    seed_jobs(url, [(rid, base) for rid, base in pairs], next_poll_at=time.time() - 1)
    seed_seconds = time.monotonic() - started
    claims = claim_times(url)
    say(f"scale {kind}: claims {claims}")
    restart = restart_round(tmp, url, emulator, len(pairs), timeout, f"serve-scale-{kind}")
    say(f"scale {kind}: restart {restart}")
    emulator.reset()
    raw = raw_poll(pairs_file, 64)
    return {
        "idle_rss_mb": base_rss,
        "seed_seconds": round(seed_seconds, 1),
        "claims": claims,
        "restart": restart,
        "raw_poll": raw,
    }


def run(quick: bool, runs: int | None = None) -> Result:
    n = 10_000 if quick else 100_000
    timeout = 300.0 if quick else 1200.0
    result = Result("tracking_scale", "Tracking scale", "quick" if quick else "full")
    result.details.update(jobs=n, claim_batch=CLAIM, restart_timeout_s=timeout)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as name, processes():
        tmp = Path(name)
        emulator = start_emulator(tmp, latency=0.0, duration=86_400)
        pairs_file = tmp / "requests.json"
        pairs = seed_emulator(emulator, n, pairs_file)
        for kind in ("sqlite", "postgres"):
            out = one_database(kind, tmp, emulator, pairs, pairs_file, timeout)
            result.details[kind] = out
            label = "SQLite" if kind == "sqlite" else "PostgreSQL"
            claims, restart, raw = out["claims"], out["restart"], out["raw_poll"]
            result.figures.append(
                Figure(
                    figure=f"Resident memory of jobs serve, {n:,} jobs in flight, {label}",
                    ours=restart["peak_rss_mb"],
                    baseline=out["idle_rss_mb"],
                    unit="MB",
                    ratio=ratio(restart["peak_rss_mb"], out["idle_rss_mb"], lower_is_better=True),
                    target=f"<= {TARGET_RSS_MB:g} MB",
                    met=restart["peak_rss_mb"] <= TARGET_RSS_MB,
                    notes="peak during the restart round; baseline: idle on an empty database",
                )
            )
            result.figures.append(
                Figure(
                    figure=f"Claim 1,000 due jobs of {n:,}, {label}",
                    ours=claims["ours_median_ms"],
                    baseline=claims["raw_median_ms"],
                    unit="ms",
                    ratio=ratio(
                        claims["ours_median_ms"], claims["raw_median_ms"], lower_is_better=True
                    ),
                    target=f"<= {TARGET_CLAIM_MS:g} ms" if kind == "sqlite" else "report",
                    met=claims["ours_median_ms"] <= TARGET_CLAIM_MS if kind == "sqlite" else None,
                    notes="Store.claim_due vs one raw UPDATE … RETURNING; median of 5"
                    + (
                        f"; SQLite plan: {' / '.join(claims['sqlite_claim_plan'])}"
                        if kind == "sqlite"
                        else ""
                    ),
                )
            )
            seconds = restart["seconds"] or restart["projected_seconds"] or 0.0
            state = "" if restart["complete"] else f" (projected: {restart['polled']:,} "
            state += "" if restart["complete"] else f"polled in {timeout:g} s)"
            limit = TARGET_RESTART_S[kind] * n / 100_000
            share = ratio(seconds, raw["seconds"], lower_is_better=True)
            result.figures.append(
                Figure(
                    figure=f"Restart until all {n:,} due jobs polled once, {label}",
                    ours=seconds,
                    baseline=raw["seconds"],
                    unit="s",
                    ratio=share,
                    target=f"<= {limit:g} s and >= {TARGET_RESTART_RATIO} x raw client",
                    met=seconds <= limit and (share or 0.0) >= TARGET_RESTART_RATIO,
                    notes=f"{restart['polls_per_s']} polls/s; raw client, no database, same "
                    f"concurrency: {raw['per_s']}/s{state}",
                )
            )
    return result
