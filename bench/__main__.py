"""Run the benchmarks: ``python -m bench [NAME ...] [--quick] [--runs N]``.

NAME is ``all`` (the default) or any of the benchmarks below; ``report`` only rebuilds the
table in ``docs/benchmarks.md`` from ``bench/results/*.json``. Each benchmark writes
``bench/results/<name>.json`` and the table is rebuilt after each one.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import traceback
from types import FrameType

from bench.common import say, stop_all
from bench.report import update_docs

BENCHMARKS = {
    "webhook_ingest": "bench.webhook_ingest",
    "poll_throughput": "bench.poll_throughput",
    "request_economy": "bench.request_economy",
    "tracking_scale": "bench.tracking_scale",
    "batch_submit": "bench.batch",
    "replicas": "bench.replicas",
    "replicate_retention": "bench.replicate_retention",
}


def _exit_on_signal(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + sig)  # unwinds through every ``finally``: children are stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["all"], metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--runs", type=int, help="repetitions where a benchmark repeats")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if "all" in args.names else args.names
    unknown = [n for n in names if n not in BENCHMARKS and n != "report"]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    signal.signal(signal.SIGTERM, _exit_on_signal)
    failed = []
    for name in names:
        if name == "report":
            continue
        say(f"{name}: starting ({'quick' if args.quick else 'full'})")
        started = time.monotonic()
        try:
            module = importlib.import_module(BENCHMARKS[name])
            result = module.run(args.quick, args.runs)
            path = result.write()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        finally:
            stop_all()
        for figure in result.figures:
            say(
                f"  {figure.figure}: ours {figure.ours} {figure.unit}, baseline "
                f"{figure.baseline}, ratio {figure.ratio}, target {figure.target}, "
                f"met {figure.met}"
            )
        say(f"{name}: done in {time.monotonic() - started:.0f} s -> {path}")
        update_docs()
    update_docs()
    if failed:
        say(f"failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
