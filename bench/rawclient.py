"""The raw client: plain aiohttp on uvloop, no database, no httpx: the fastest client measured
on this machine (design.md part 3), and so the baseline the poller and batch submit are
divided by. It runs in its own process, exactly like ``jobs serve`` does, and sends the very
same requests (same URLs, ``?logs=1`` on status, the same ``Authorization`` header, the
body read and decoded as JSON).

    python -m bench.rawclient submit URL --count N --concurrency C --out FILE [--webhook URL]
    python -m bench.rawclient poll FILE --concurrency C        # GET each status URL once

Each prints one JSON object: count, seconds, per_s (and errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from bench.common import APP, APP_BASE, FAL_KEY

T = TypeVar("T")
HEADERS = {"Authorization": f"Key {FAL_KEY}"}


async def _run(count: int, concurrency: int, one: Any) -> dict[str, Any]:
    """Call ``one(session, i)`` for i in range(count), ``concurrency`` at a time."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    errors = 0
    next_index = 0
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < count:
                i = next_index
                next_index += 1
                try:
                    await one(session, i)
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "count": count,
        "errors": errors,
        "seconds": round(seconds, 4),
        "per_s": round(count / seconds, 1),
        "concurrency": concurrency,
    }


async def submit(
    url: str, count: int, concurrency: int, webhook: str | None, distinct: bool
) -> tuple[dict[str, Any], list[list[str]]]:
    target = f"{url}/{APP}"
    if webhook:
        target += "?fal_webhook=" + quote(webhook, safe="")
    made: list[list[str]] = [[] for _ in range(count)]

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": f"bench {i}" if distinct else "bench"}
        async with session.post(target, json=body) as response:
            data = await response.json(content_type=None)
            made[i] = [data["request_id"], url]

    report = await _run(count, concurrency, one)
    return report, made


async def poll(urls: list[str], concurrency: int) -> dict[str, Any]:
    async def one(session: aiohttp.ClientSession, i: int) -> None:
        async with session.get(urls[i], params={"logs": "1"}) as response:
            await response.json(content_type=None)
            if response.status not in (200, 202):
                raise ValueError(response.status)

    return await _run(len(urls), concurrency, one)


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop, the loop uvicorn (and so ``jobs serve``) uses."""
    import uvloop

    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_submit = sub.add_parser("submit")
    p_submit.add_argument("url")
    p_submit.add_argument("--count", type=int, required=True)
    p_submit.add_argument("--concurrency", type=int, default=64)
    p_submit.add_argument("--webhook")
    p_submit.add_argument("--distinct", action="store_true", help="a different input each")
    p_submit.add_argument("--out", type=Path)
    p_poll = sub.add_parser("poll")
    p_poll.add_argument("file", type=Path, help="JSON list of [request_id, base_url]")
    p_poll.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "submit":
        report, made = run_fast(
            submit(args.url, args.count, args.concurrency, args.webhook, args.distinct)
        )
        if args.out is not None:
            args.out.write_text(json.dumps(made))
    else:
        pairs = json.loads(args.file.read_text())
        urls = [f"{base}/{APP_BASE}/requests/{rid}/status" for rid, base in pairs]
        report = run_fast(poll(urls, args.concurrency))
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
