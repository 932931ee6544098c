"""`python -m bench [--only NAME[,NAME]] [--quick] [--profile]`: webhookd's benchmark.

The daemon and the receiver each run in their own process; this process is the producer.
All three share the machine, so every figure is "on this box, with the load generator
beside it". Results go to stdout (a table at the end) and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench.context import Context
from bench.harness import ROOT, Daemon, Receiver, background_cpu, scratch_dir
from bench.load import session
from bench.report import Report
from bench.scenarios import SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results"
# Which scenarios' figures are ratios to which ceiling; --only adds the ceilings they need.
NEEDS_CEILINGS = {"ingest", "drain", "e2e", "unbatched1", "unbatched1000", "latency"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help="run only these scenarios: " + ", ".join(SCENARIOS),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="wall",
        choices=["wall", "gil", "native"],
        help="sample the daemon with py-spy while it ingests, drains and runs end to end: "
        "wall (default: every busy thread), gil (the GIL holder only) or native (wall with C "
        "frames); pip install py-spy",
    )
    parser.add_argument(
        "--sustained-seconds",
        type=float,
        default=None,
        metavar="S",
        help="length of the sustained scenario's main phase (default 60; longer shows whether "
        "memory has settled)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        metavar="S",
        help="before each scenario, wait up to S s for other processes to go quiet (default 30)",
    )
    parser.add_argument(
        "--daemon-prelude",
        metavar="CODE",
        help="experiment: Python to run in the daemon's interpreter before it starts, e.g. "
        "'import gc; gc.set_threshold(50000)' (the daemon's code is unchanged)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "latest.json", help="where to write the JSON"
    )
    args = parser.parse_args(argv)
    if args.only:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {list(SCENARIOS)}")
        if NEEDS_CEILINGS.intersection(chosen) and "ceilings" not in chosen:
            chosen.append("ceilings")
    else:
        chosen = list(SCENARIOS)
    args.chosen = [name for name in SCENARIOS if name in chosen]  # always in run order
    return args


def meta(args: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "daemon"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "quick": args.quick,
        "scenarios": args.chosen,
        "daemon_prelude": args.daemon_prelude,
    }


QUIET_PERCENT = 15.0  # of one core: more than this from other processes skews the figures


async def wait_quiet(limit: float) -> float:
    """Wait (up to `limit` s) until other processes use < QUIET_PERCENT; their last use."""
    deadline = time.monotonic() + limit
    while True:
        busy = await asyncio.to_thread(background_cpu, 0.5)
        if busy < QUIET_PERCENT:
            return busy
        if time.monotonic() >= deadline:
            print(
                f"  ! other processes use {busy:.0f} % of a core: figures will be low", flush=True
            )
            return busy
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> Report:
    report = Report(meta(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(
        f"webhookd bench ({'quick' if args.quick else 'full'}) on {report.meta['cpus']} cores "
        f"{report.meta['cpu_model']}, commit {report.meta['commit']}; "
        "daemon, receiver and producer share the machine",
        flush=True,
    )
    with scratch_dir("receiver") as workdir:
        receiver = Receiver(workdir)
        client = session(1200)
        try:
            ctx = Context(
                quick=args.quick,
                receiver=receiver,
                client=client,
                report=report,
                results_dir=RESULTS,
                profile=args.profile,
                sustained_s=args.sustained_seconds,
            )
            started = time.monotonic()
            for name in args.chosen:
                title, scenario = SCENARIOS[name]
                print(f"\n== {name}: {title}", flush=True)
                quiet = await wait_quiet(args.quiet_wait)
                report.details.setdefault(name, {})["background_cpu_before"] = quiet
                began = time.monotonic()
                await scenario(ctx)
                report.details.setdefault(name, {})["wall_s"] = round(time.monotonic() - began, 1)
            report.meta["wall_s"] = round(time.monotonic() - started, 1)
        finally:
            await client.close()
            receiver.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Daemon.prelude = args.daemon_prelude
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(run(args))
    report.write(args.output)
    print(f"\n== results (targets are design goals, not assertions; {report.meta['wall_s']} s)")
    print(report.table())
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
