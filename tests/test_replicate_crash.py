"""Crash storm on Replicate: ``jobsctl serve`` is SIGKILLed five times at random moments (and
restarted on the same port, which Replicate's webhooks are sent to) while ``jobsctl submit
--provider replicate`` processes, some of them killed too, record about 240 predictions.
The twin of tests/test_crash.py, with a stronger promise: Replicate lets a lost create be
found by listing, so afterwards every job is terminal with its own prediction's outcome, no
input was created twice (the emulator's per-input create counts are all exactly 1), and no
input was lost.

Slow (about a minute): runs with ``JOBS_TEST_SLOW=1``. ``JOBS_TEST_SEED`` replays a run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import replicate as rp
from support.serve import CRASH_SERVE_ARGS, Processes, ServeProcess, run_cli
from support.waiting import free_port, wait_for

from jobs.states import State
from jobs.store import Job, Store
from jobs.testing import FakeReplicate, FakeReplicateServer, input_hash

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BULK = 110  # lines per bulk submitter (two of them)
SINGLES = 16  # one-job `jobsctl submit` processes
SERVE_KILLS = 5
LIFETIME = (1.0, 5.0)  # seconds each killed `jobsctl serve` runs once ready (uniform)
# Creates that were made, then answered late (a kill in that second and a half leaves a
# prediction its job never heard of) or never answered: what listing must settle.
CREATE_FAULTS: dict[str, Any] = {
    "slow_rate": 0.15,
    "slow_seconds": 1.5,
    "drop_rate": 0.05,
    "fault_kinds": ["create"],
}


def _input(rng: random.Random, name: str) -> dict[str, Any]:
    fake: dict[str, Any] = {"duration": round(rng.uniform(0.3, 3.0), 2)}
    if rng.random() < 0.05:
        fake["fail"] = "out of memory (on purpose)"
    return {"prompt": name, "_fake": fake}


def _single(i: int, inputs: list[dict[str, Any]]) -> list[str]:
    return [
        "submit",
        rp.APP,
        "--provider",
        "replicate",
        "--input",
        json.dumps(inputs[i]),
        "--idempotency-key",
        f"s{i}",
    ]


def _run_singles(
    processes: Processes,
    env: dict[str, str],
    tmp_path: Path,
    inputs: list[dict[str, Any]],
    rng: random.Random,
    errors: list[str],
) -> None:
    """One `jobsctl submit --input` per job, two at a time; about a third killed at a random
    moment (before, while or after recording), then re-run with the same idempotency key."""
    killed: list[int] = []
    for start in range(0, len(inputs), 2):
        running = []
        for i in range(start, min(start + 2, len(inputs))):
            proc = processes.start(_single(i, inputs), env, tmp_path / f"single-{i}.log")
            running.append((i, proc, rng.uniform(0.5, 2.5) if rng.random() < 0.35 else None))
        for i, proc, kill_after in running:
            if kill_after is None:
                proc.wait(60)
                continue
            try:
                proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                killed.append(i)
    for i in killed:
        done = run_cli(_single(i, inputs), env)
        # 1: recorded, but its submit was ambiguous; `jobsctl serve` resolves it.
        if done.returncode not in (0, 1) or not done.stdout.strip():
            errors.append(f"single {i} re-run: {done.returncode} {done.stderr}")


def test_kill_storm_creates_each_prediction_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("JOBS_TEST_SEED") or time.time())
    print(f"JOBS_TEST_SEED={seed}")
    rng = random.Random(seed)
    server = FakeReplicateServer(
        rp.config(
            duration=1.0,
            queue_time=0.2,
            latency=0.02,
            seed=seed,
            webhook_retries=6,
            **CREATE_FAULTS,
        )
    )
    processes = Processes()
    db_url = f"sqlite:///{tmp_path}/jobs.db"
    bulk = {name: [_input(rng, f"{name}{i}") for i in range(BULK)] for name in ("a", "b")}
    singles = [_input(rng, f"s{i}") for i in range(SINGLES)]
    for name, lines in bulk.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    serves: list[ServeProcess] = []
    errors: list[str] = []
    port = free_port()  # every restart listens here: webhooks to a dead one are retried

    def new_serve() -> ServeProcess:
        serve = ServeProcess(
            env, tmp_path / f"serve-{len(serves)}.log", *CRASH_SERVE_ARGS, port=port
        )
        serves.append(serve)
        return serve.start()

    with server:
        env = rp.env(db_url, server, public_url=f"http://127.0.0.1:{port}")
        store: Store | None = None
        try:
            began = time.monotonic()
            serve = new_serve()  # migrates the database
            store = Store.open(db_url)
            bulk_args = {
                n: [
                    "submit",
                    rp.APP,
                    "--provider",
                    "replicate",
                    "--inputs",
                    str(tmp_path / f"{n}.jsonl"),
                    "--batch",
                    n,
                ]
                for n in bulk
            }
            procs = {
                n: processes.start(a, env, tmp_path / f"bulk-{n}.log") for n, a in bulk_args.items()
            }
            singles_thread = threading.Thread(
                target=_run_singles,
                args=(processes, env, tmp_path, singles, random.Random(seed + 1), errors),
            )
            singles_thread.start()

            # Bulk submitter "a" dies part-way through its file, with creates in flight.
            def bulk_a_part_way() -> bool:
                assert store is not None
                counts = store.count_by_state(batch="a")
                return sum(counts.values()) - counts[State.SUBMITTING] >= BULK // 4

            wait_for(lambda: bulk_a_part_way() or procs["a"].poll() is not None, 60, "bulk a")
            procs["a"].kill()
            procs["a"].wait(10)
            print(f"bulk a killed with {store.count_by_state(batch='a')}")
            # Then `jobsctl serve` dies, over and over.
            for _ in range(SERVE_KILLS):
                time.sleep(rng.uniform(*LIFETIME))
                serve.kill()
                time.sleep(rng.uniform(0, 0.5))
                serve = new_serve()
            # Everyone re-runs what was interrupted; nothing is created twice by that.
            for name in bulk:
                procs[name].wait(120)
                again = run_cli(bulk_args[name], env, timeout=120)
                if again.returncode not in (0, 1):
                    errors.append(f"bulk {name} re-run: {again.returncode} {again.stderr}")
            singles_thread.join(180)
            assert not errors, errors
            total = 2 * BULK + SINGLES

            def all_terminal() -> bool:
                assert store is not None
                counts = store.count_by_state()
                return sum(counts.values()) == total and all(
                    counts[s] == 0 for s in State if not s.terminal
                )

            wait_for(all_terminal, 90, f"{total} jobs to finish", every=0.5)
            code, _ = serve.stop(signal.SIGTERM)
            assert code == 0, serve.log()
            _check(store, server.fake, store.list_jobs(limit=10 * total), bulk, singles)
            print(f"kill storm: {total} jobs in {time.monotonic() - began:.1f}s")
        finally:
            for each in serves:
                each.kill()
            processes.kill_all()
            if store is not None:
                store.close()


def _check(
    store: Store,
    fake: FakeReplicate,
    jobs: list[Job],
    bulk: dict[str, list[dict[str, Any]]],
    singles: list[dict[str, Any]],
) -> None:
    every_input = [x for lines in bulk.values() for x in lines] + singles
    # None lost, none recorded twice.
    assert sorted(input_hash(j.arguments) for j in jobs) == sorted(map(input_hash, every_input))
    # None created twice: Replicate's listing settled every create whose answer was lost.
    assert fake.stats.duplicate_inputs() == {}
    assert len(fake.stats.creates_by_input) == len(every_input)
    settled: Counter[str] = Counter()
    for job in jobs:
        assert fake.stats.creates_by_input[input_hash(job.arguments)] == 1, job.id
        prediction = fake.get_prediction(job.request_id or "")
        assert prediction is not None and prediction.input == job.arguments, job.id
        if job.arguments["_fake"].get("fail"):
            assert job.state is State.FAILED and job.failure_reason == "remote_error", job
        else:
            assert job.state is State.SUCCEEDED, job
            assert store.result(job.id) == (True, fake.prediction_json(prediction)["output"])
        settled.update(
            e["reason"] for e in store.events(job.id) if e["kind"] == "ambiguous_resolved"
        )
    # lookup: adopted from the listing; webhook: named by its callback; not created: sent.
    print(f"{len(jobs)} jobs, each created once; lost creates settled: {dict(settled)}")
    assert settled["lookup"] > 0, "no create was lost: the storm checked nothing of the listing"
