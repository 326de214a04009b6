"""Replicate: every result captured within its one-hour retention when webhooks are lost, and
the requests one prediction costs, against replicate-python's ``wait()``.

Measured, with the two clocks moved in step (the product has no scaled clock; the emulator
has ``advance``): predictions of 10 s to 30 min, each with an output file, submitted with a
webhook that the emulator always loses, under the default backoff (``PollPolicy()``, what
``jobsctl serve`` uses). The driver repeatedly takes the earliest scheduled poll, moves the
emulator's clock and our schedule forward by the same gap (every active job's
``next_poll_at`` less the gap: our side's time passing) and lets a real ``wait_batch``-style
claim poll what is due over HTTP. Once all are done the emulator is moved past the hour: its
outputs and files are gone, ours must all be in the store and the file cache.

Measured in real time: 30 s predictions with a webhook that arrives (the emulator's clock
jumps the 30 s) and without one (clocks in step), counted by the emulator per prediction;
and the real ``replicate`` client's ``predictions.create(...).wait()`` on the same
emulator, its poll interval and the prediction's time both scaled down tenfold.

Derived: the product's pure backoff replayed (``bench.request_economy.replay``) for 30 min
predictions with the webhook lost, against Replicate's 3,600 s retention.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Figure, Result, ratio, say
from bench.request_economy import replay_many

APP = "acme/echo"
TOKEN = "r8_bench-token-0001"
RETENTION = 3600.0
SCALE = 10.0  # replicate-python's runs are time scaled down by this
JOB_SECONDS = 30.0
QUEUE = 0.2
SHORTEST, LONGEST = 10.0, 1800.0  # the lost-webhook predictions' running times
MAX_STEPS = 20_000


def _settings(db: Path, url: str, secret: str, cache: Path, public_url: str | None) -> Any:
    from jobs import Settings
    from jobs.config import Secret

    return Settings.from_env(
        {},
        database_url=f"sqlite:///{db}",
        replicate_api_url=url,
        replicate_api_token=Secret(TOKEN),
        replicate_webhook_secret=Secret(secret),
        cache_dir=str(cache),
        cache_allow_hosts=("127.0.0.1",),
        public_url=public_url,
    )


def _advance(url: str, seconds: float) -> None:
    httpx.post(f"{url}/_fake/advance", json={"seconds": seconds}, timeout=30).raise_for_status()


async def _shift_schedule(manager: Any, seconds: float) -> None:
    """Our side's time passing: every scheduled poll comes ``seconds`` closer."""
    from sqlalchemy import update

    from jobs.db import jobs

    def shift() -> None:
        with manager.store.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.next_poll_at.is_not(None))
                .values(next_poll_at=jobs.c.next_poll_at - seconds)
            )

    await manager.store.aio.run(shift)


async def _lost_webhooks(tmp: Path, count: int) -> dict[str, Any]:
    """``count`` predictions whose webhooks are all lost, driven with clocks in step."""
    from jobs import AsyncJobManager, State
    from jobs.testing import FakeReplicateConfig, FakeReplicateServer, expected_file_bytes

    rng = random.Random(11)
    config = FakeReplicateConfig(token=TOKEN, queue_time=QUEUE, webhook_loss_rate=1.0, seed=11)
    with FakeReplicateServer(config) as server:
        fake = server.fake
        # Webhooks are asked for (so polling is only the safety net); none is ever sent.
        settings = _settings(
            tmp / "lost.db",
            server.url,
            config.webhook_secret,
            tmp / "cache",
            "http://127.0.0.1:9",
        )
        manager = AsyncJobManager(settings)
        try:
            ids = []
            for i in range(count):
                seconds = math.exp(rng.uniform(math.log(SHORTEST), math.log(LONGEST)))
                arguments = {"prompt": f"lost {i}", "_fake": {"duration": seconds, "files": 1}}
                handle = await manager.submit(APP, arguments, provider="replicate", download=True)
                ids.append(handle.id)
            late: dict[str, float] = {}
            gaps: list[float] = []
            for _ in range(MAX_STEPS):
                active = [j for j in await manager.list_jobs(limit=count + 1) if not j.terminal]
                if not active:
                    break
                due = min(j.next_poll_at for j in active if j.next_poll_at is not None)
                gap = max(0.0, due - time.time())
                gaps.append(gap)
                _advance(server.url, gap)
                await _shift_schedule(manager, gap)
                for claimed in await manager.claims.claim_due(count):
                    after = await manager.claims.poll(claimed)
                    if after is not None and after.terminal:
                        prediction = fake.get_prediction(after.request_id or "")
                        assert prediction is not None
                        late[after.id] = fake.now() - prediction.finish_at
            await manager.files.drain()
            finals = [await manager.status(i) for i in ids]
            outputs = {j.id: await manager.stored_result(j.id) for j in finals}
            _advance(server.url, RETENTION + 1)  # the emulator forgets every output
            kept = 0
            for job in finals:
                files = await manager.job_files(job.id)
                cached = [manager.files.cached(f) for f in files]
                ok = (
                    job.state is State.SUCCEEDED
                    and await manager.stored_result(job.id) == outputs[job.id]
                    and outputs[job.id][0]
                    and len(files) == 1
                    and cached[0] is not None
                    and cached[0].read_bytes()
                    == expected_file_bytes(job.request_id or "", 0, config.file_size)
                )
                kept += bool(ok)
            gets = [fake.stats.predictions[j.request_id or ""].gets for j in finals if j.request_id]
            return {
                "predictions": count,
                "captured_with_files": kept,
                "webhooks_lost": fake.stats.webhooks_lost,
                "known_late_max_s": round(max(late.values()), 1),
                "known_late_median_s": round(statistics.median(late.values()), 1),
                "safety_gap_max_s": round(max(gaps), 1),
                "status_polls_mean": round(statistics.mean(gets), 2),
                "status_polls_max": max(gets),
            }
        finally:
            await manager.aclose()
            manager.store.close()


async def _economy(tmp: Path, count: int) -> dict[str, Any]:
    """``count`` 30 s predictions with a webhook and ``count`` without; replicate-python's
    ``wait()`` on a few scaled ones."""
    import uvicorn

    from jobs import AsyncJobManager, State
    from jobs.testing import FakeReplicateConfig, FakeReplicateServer
    from jobs.web import create_app

    config = FakeReplicateConfig(token=TOKEN, queue_time=QUEUE, duration=JOB_SECONDS, seed=3)
    out: dict[str, Any] = {}
    with FakeReplicateServer(config) as server:
        fake = server.fake
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        public = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = _settings(tmp / "eco.db", server.url, config.webhook_secret, tmp / "c2", public)
        manager = AsyncJobManager(settings)
        app = create_app(manager, settings=settings)
        uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        try:
            while not uv.started:
                await asyncio.sleep(0.01)
            with_hook = [
                await manager.submit(APP, {"prompt": f"hook {i}"}, provider="replicate")
                for i in range(count)
            ]
            # The emulator's clock jumps their 30 s; the callbacks follow.
            _advance(server.url, QUEUE + JOB_SECONDS)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                states = [(await manager.status(j.id)).terminal for j in with_hook]
                if all(states):
                    break
                await asyncio.sleep(0.05)
            # Then, on their own, the ones without a webhook, clocks in step.
            without = [
                await manager.submit(
                    APP, {"prompt": f"poll {i}"}, provider="replicate", webhook=False
                )
                for i in range(count)
            ]
            for _ in range(MAX_STEPS):
                polled = [j for j in await manager.list_jobs(limit=4 * count) if not j.terminal]
                if not polled:
                    break
                due = min(j.next_poll_at for j in polled if j.next_poll_at is not None)
                gap = max(0.0, due - time.time())
                _advance(server.url, gap)
                await _shift_schedule(manager, gap)
                for claimed in await manager.claims.claim_due(4 * count):
                    await manager.claims.poll(claimed)
            finals = [await manager.status(j.id) for j in with_hook + without]
            out["all_succeeded"] = all(j.state is State.SUCCEEDED for j in finals)
        finally:
            uv.should_exit = True
            await task
            sock.close()
            await manager.aclose()
            manager.store.close()
        for name, jobs in (("webhooks", with_hook), ("polling", without)):
            counters = [fake.stats.predictions[j.request_id or ""] for j in jobs]
            requests = [1 + c.gets + c.webhook_attempts for c in counters]
            out[name] = {
                "predictions": len(jobs),
                "status_polls_mean": round(statistics.mean(c.gets for c in counters), 2),
                "status_polls_max": max(c.gets for c in counters),
                "webhook_attempts_mean": round(
                    statistics.mean(c.webhook_attempts for c in counters), 2
                ),
                "requests_mean": round(statistics.mean(requests), 2),
                "requests_max": max(requests),
            }
        out["replicate_python"] = _replicate_python(server.url, max(3, count // 4))
    return out


def _replicate_python(url: str, count: int) -> dict[str, Any]:
    """The real client's ``create(...).wait()``, its 0.5 s interval and the prediction's
    30 s both divided by ``SCALE``; its GETs counted by the emulator."""
    from replicate.client import Client

    client = Client(api_token=TOKEN, base_url=url, trust_env=False)
    client.poll_interval = 0.5 / SCALE
    gets = []
    try:
        for i in range(count):
            prediction = client.models.predictions.create(
                model=APP,
                input={
                    "prompt": f"baseline {i}",
                    "_fake": {"duration": JOB_SECONDS / SCALE, "queue_time": QUEUE / SCALE},
                },
            )
            prediction.wait()
            stats = httpx.get(f"{url}/_fake/stats", timeout=10).json()
            gets.append(stats["predictions"][prediction.id]["gets"])
    finally:
        client._client.close()
    return {
        "predictions": count,
        "poll_interval_s": 0.5,
        "status_polls_mean": round(statistics.mean(gets), 2),
        "requests_mean": round(1 + statistics.mean(gets), 2),
    }


def run(quick: bool, runs: int | None = None) -> Result:
    lost_count = 20 if quick else 100
    eco_count = 10 if quick else 40
    result = Result(
        "replicate_retention", "Replicate retention and economy", "quick" if quick else "full"
    )
    with tempfile.TemporaryDirectory(prefix="bench-replicate-") as name:
        tmp = Path(name)
        lost = asyncio.run(_lost_webhooks(tmp, lost_count))
        say(f"replicate lost webhooks: {lost}")
        economy = asyncio.run(_economy(tmp, eco_count))
        say(f"replicate economy: {economy}")
    derived = replay_many(LONGEST, webhook=True, delivered=False)
    baseline = economy["replicate_python"]
    hooks, polling = economy["webhooks"], economy["polling"]
    result.details.update(
        retention_s=RETENTION, lost_webhooks=lost, economy=economy, replay_30min_lost=derived
    )
    captured = lost["captured_with_files"] == lost["predictions"]
    replicate_30min = round(LONGEST / 0.5, 1)
    result.figures += [
        Figure(
            figure="Replicate results captured with every webhook lost (10 s to 30 min runs)",
            ours=lost["captured_with_files"],
            baseline=lost["predictions"],
            unit="predictions",
            ratio=ratio(lost["captured_with_files"], lost["predictions"]),
            target="all, with their files, before Replicate's 1 h retention removes them",
            met=captured,
            notes=f"safety poll at most {lost['safety_gap_max_s']} s apart; a result known at "
            f"most {lost['known_late_max_s']} s (median {lost['known_late_median_s']} s) after "
            f"its end; {lost['status_polls_mean']} status polls per prediction",
        ),
        Figure(
            figure="Seconds from a Replicate prediction's end to our capture, webhook lost (max)",
            ours=lost["known_late_max_s"],
            baseline=RETENTION,
            unit="s",
            ratio=ratio(lost["known_late_max_s"], RETENTION, lower_is_better=True),
            target=f"< {RETENTION:g} s (Replicate's retention)",
            met=lost["known_late_max_s"] < RETENTION,
            notes=f"replay of the backoff, 30 min runs: max {derived['known_late_max']} s",
        ),
        Figure(
            figure="Remote requests per 30 s Replicate prediction, webhooks",
            ours=hooks["requests_mean"],
            baseline=baseline["requests_mean"],
            unit="requests",
            ratio=ratio(hooks["requests_mean"], baseline["requests_mean"], lower_is_better=True),
            target="<= 3 (create, webhook, <= 1 safety poll)",
            met=hooks["requests_max"] <= 3 and economy["all_succeeded"],
            notes=f"max {hooks['requests_max']}; baseline: replicate-python's wait() every "
            "0.5 s (measured in time scaled tenfold)",
        ),
        Figure(
            figure="Status requests per 30 s Replicate prediction, no webhooks",
            ours=polling["status_polls_mean"],
            baseline=baseline["status_polls_mean"],
            unit="requests",
            ratio=ratio(
                polling["status_polls_mean"], baseline["status_polls_mean"], lower_is_better=True
            ),
            target=">= 5x fewer than replicate-python",
            met=bool(
                polling["status_polls_mean"] * 5 <= baseline["status_polls_mean"]
                and economy["all_succeeded"]
            ),
            notes=f"max {polling['status_polls_max']}; for a 30 min run replicate-python "
            f"would poll about {replicate_30min:g} times",
        ),
    ]
    return result
