"""Poll throughput: status polls per second that ``jobs serve``'s tick sustains against the
emulator with N jobs due at once, at 0 and at 200 ms added latency.

Baseline: the raw client (:mod:`bench.rawclient`: aiohttp on uvloop, no database) sending the
same N status GETs at the same concurrency to the same emulator, in its own process as
``jobs serve`` is. That is the fastest client measured on this machine, so the ratio says how
much of what the machine and the emulator allow the product delivers, while it also claims
each job under a lease, decodes the reply, applies it through the store and schedules the
next poll. Both runs alternate on the same emulator; the ratio is the median over runs.

Ours is measured at the emulator (its status-poll counter, sampled at 20 Hz) between 5 % and
95 % of the N first-round polls, i.e. the sustained rate, without start-up.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    Emulator,
    Figure,
    Result,
    children_cpu_seconds,
    clean_env,
    median,
    processes,
    ratio,
    say,
    seed_jobs,
    serve_env,
    sqlite_url,
    start_emulator,
    start_serve,
)

# The targets: the ratio to raw aiohttp at each latency, and the CPU one poll costs
# the jobs serve process (measured from its CPU time over the run).
TARGETS = {0.0: 0.4, 0.2: 0.9}
TARGET_CPU_MS = 0.35


def seed_emulator(emulator: Emulator, count: int, out: Path, concurrency: int = 64) -> list[Any]:
    """Create ``count`` requests in the emulator (at its current latency) with the raw
    client; returns ``[request_id, base_url]`` pairs, also written to ``out``."""
    command = [PYTHON, "-m", "bench.rawclient", "submit", emulator.url, "--count", str(count)]
    command += ["--concurrency", str(concurrency), "--out", str(out)]
    done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"seeding the emulator failed:\n{done.stderr[-3000:]}")
    pairs: list[Any] = json.loads(out.read_text())
    return pairs


def raw_poll(pairs_file: Path, concurrency: int) -> dict[str, Any]:
    cpu0 = children_cpu_seconds()
    command = [PYTHON, "-m", "bench.rawclient", "poll", str(pairs_file)]
    command += ["--concurrency", str(concurrency)]
    done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"raw client failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    report["cpu_ms_per_poll"] = round(1000 * (children_cpu_seconds() - cpu0) / report["count"], 3)
    return report


def sample_until(
    emulator: Emulator, key: str, target: int, timeout: float, every: float = 0.05
) -> list[tuple[float, int]]:
    """``(monotonic time, counter)`` samples of an emulator counter until it reaches
    ``target`` (or ``timeout`` passes)."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = int(emulator.stats()[key])
        samples.append((time.monotonic(), value))
        if value >= target:
            break
        time.sleep(every)
    return samples


def crossing(samples: list[tuple[float, int]], level: float) -> float | None:
    """When the sampled counter crossed ``level`` (linear interpolation)."""
    previous: tuple[float, int] | None = None
    for at, value in samples:
        if value >= level:
            if previous is None or value == previous[1]:
                return at
            t0, v0 = previous
            return t0 + (at - t0) * (level - v0) / (value - v0)
        previous = (at, value)
    return None


def sustained_rate(samples: list[tuple[float, int]], count: int) -> float:
    """Polls per second between 5 % and 95 % of ``count``."""
    lo, hi = crossing(samples, 0.05 * count), crossing(samples, 0.95 * count)
    if lo is None or hi is None or hi <= lo:
        return 0.0
    return 0.9 * count / (hi - lo)


def measure_ours(
    emulator: Emulator,
    pairs: list[Any],
    tmp: Path,
    run: str,
    concurrency: int,
    extra_args: tuple[str, ...] = (),
    timeout: float = 300,
) -> dict[str, Any]:
    """One ``jobs serve`` on a fresh SQLite file holding every request as a due job."""
    db = tmp / f"poll-{run}.db"
    seed_jobs(sqlite_url(db), [(rid, base) for rid, base in pairs], next_poll_at=time.time() - 1)
    emulator.reset()
    env = serve_env(sqlite_url(db), emulator.url)
    serve = start_serve(
        tmp, env, "--concurrency", str(concurrency), *extra_args, name=f"serve-poll-{run}"
    )
    try:
        cpu0 = serve.proc.cpu_seconds()
        samples = sample_until(emulator, "status_polls", len(pairs), timeout)
        cpu = serve.proc.cpu_seconds() - cpu0
        rss = serve.proc.rss_mb()
    finally:
        serve.proc.stop()
    rate = sustained_rate(samples, len(pairs))
    first = crossing(samples, 1)
    last = crossing(samples, len(pairs))
    return {
        "per_s": round(rate, 1),
        "first_round_seconds": round(last - first, 3) if first and last else None,
        "rss_mb": round(rss, 1),
        "cpu_ms_per_poll": round(1000 * cpu / max(1, samples[-1][1] if samples else 1), 3),
        "polls": samples[-1][1] if samples else 0,
    }


def run(quick: bool, runs: int | None = None) -> Result:
    jobs = 2_000 if quick else 10_000
    runs = runs or (1 if quick else 3)
    concurrency = 64
    result = Result("poll_throughput", "Poll throughput", "quick" if quick else "full")
    result.details.update(jobs=jobs, concurrency=concurrency, runs=runs)
    with tempfile.TemporaryDirectory(prefix="bench-poll-") as name, processes():
        tmp = Path(name)
        emulator = start_emulator(tmp, latency=0.0, duration=7200)
        pairs_file = tmp / "requests.json"
        pairs = seed_emulator(emulator, jobs, pairs_file)
        for latency in (0.0, 0.2):
            emulator.configure(latency=latency)
            rows: list[dict[str, Any]] = []
            for i in range(runs):
                ours = measure_ours(emulator, pairs, tmp, f"{latency:g}-{i}", concurrency)
                emulator.reset()
                raw = raw_poll(pairs_file, concurrency)
                row = {"ours": ours, "raw": raw, "ratio": ratio(ours["per_s"], raw["per_s"])}
                say(f"poll latency={latency}: {row}")
                rows.append(row)
            ours_rate = median([r["ours"]["per_s"] for r in rows])
            raw_rate = median([r["raw"]["per_s"] for r in rows])
            r = median([r["ratio"] or 0.0 for r in rows])
            ideal = concurrency / latency if latency else None
            cpu_ours = median([r["ours"]["cpu_ms_per_poll"] for r in rows])
            cpu_raw = median([r["raw"]["cpu_ms_per_poll"] for r in rows])
            note = f"{jobs:,} due jobs, concurrency {concurrency}; runs {runs}, ratios "
            note += ", ".join(f"{row['ratio']}" for row in rows)
            if ideal:
                note += f"; ideal {ideal:.0f}/s, ours {ours_rate / ideal:.2f} of it"
            target = TARGETS[latency]
            ms = f"{latency * 1000:.0f} ms latency"
            result.figures.append(
                Figure(
                    figure=f"Status polls/s, {ms}",
                    ours=ours_rate,
                    baseline=raw_rate,
                    unit="polls/s",
                    ratio=r,
                    target=f">= {target} x raw aiohttp",
                    met=r >= target,
                    notes=note,
                )
            )
            result.figures.append(
                Figure(
                    figure=f"CPU per poll, jobs serve, {ms}",
                    ours=cpu_ours,
                    baseline=cpu_raw,
                    unit="ms",
                    ratio=ratio(cpu_ours, cpu_raw, lower_is_better=True),
                    target=f"<= {TARGET_CPU_MS} ms",
                    met=cpu_ours <= TARGET_CPU_MS,
                    notes="CPU time of the jobs serve process over the round / polls; "
                    "baseline: the raw client's process",
                )
            )
            result.details[f"latency_{int(latency * 1000)}ms"] = rows
    return result
