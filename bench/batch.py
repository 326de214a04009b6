"""Batch submit: N submits through ``jobs.batch.submit_batch`` (what ``jobs submit --inputs``
runs) at concurrency 64 against the emulator answering after 200 ms, as a fraction of the
ideal ``concurrency / latency`` = 320 submits per second.

The measurement itself is ``bench/batch_submit.py`` (kept by the batch pipeline's owner),
run here as a subprocess with these sizes. The fixed baseline is the ideal; next to it the
raw client (:mod:`bench.rawclient`: aiohttp, no database, same concurrency, same latency,
its own emulator) shows how much of the ideal this machine lets any client reach.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    ROOT,
    Figure,
    Result,
    clean_env,
    median,
    processes,
    ratio,
    say,
    start_emulator,
)

TARGET = 0.9
LATENCY = 0.2
CONCURRENCY = 64


def ours(jobs: int) -> dict[str, Any]:
    command = [PYTHON, str(ROOT / "bench" / "batch_submit.py"), "--jobs", str(jobs)]
    command += ["--concurrency", str(CONCURRENCY), "--latency", str(LATENCY)]
    done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench/batch_submit.py failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def raw(jobs: int, tmp: Path) -> dict[str, Any]:
    with processes():
        emulator = start_emulator(tmp, latency=LATENCY, name="fake-fal-raw")
        command = [PYTHON, "-m", "bench.rawclient", "submit", emulator.url, "--count", str(jobs)]
        command += ["--concurrency", str(CONCURRENCY), "--distinct"]
        done = subprocess.run(command, env=clean_env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"raw submit failed:\n{done.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(done.stdout)
        report["submits_seen_by_emulator"] = emulator.stats()["submits"]
    return report


def run(quick: bool, runs: int | None = None) -> Result:
    jobs = 2_000 if quick else 10_000
    runs = runs or (1 if quick else 3)
    ideal = CONCURRENCY / LATENCY
    result = Result("batch_submit", "Batch submit", "quick" if quick else "full")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as name:
        for i in range(runs):
            mine = ours(jobs)
            theirs = raw(jobs, Path(name))
            row = {"ours": mine, "raw": theirs}
            say(f"batch run {i}: ours {mine['jobs_per_s']}/s, raw {theirs['per_s']}/s")
            rows.append(row)
    rate = median([r["ours"]["jobs_per_s"] for r in rows])
    raw_rate = median([r["raw"]["per_s"] for r in rows])
    result.details.update(
        jobs=jobs, concurrency=CONCURRENCY, latency=LATENCY, ideal_per_s=ideal, runs=rows
    )
    fraction = round(rate / ideal, 3)
    result.figures += [
        Figure(
            figure=f"Batch submits/s, {jobs:,} jobs, 200 ms latency, concurrency 64",
            ours=rate,
            baseline=ideal,
            unit="submits/s",
            ratio=fraction,
            target=f">= {TARGET} x ideal 320/s",
            met=fraction >= TARGET,
            notes=f"raw aiohttp client (no database) reaches {raw_rate}/s "
            f"= {raw_rate / ideal:.2f} of ideal; ours / raw = {ratio(rate, raw_rate)}",
        )
    ]
    return result
