"""`python -m bench [--only NAME[,NAME]] [--quick] [--profile] [--engine E]`: webhookd's
benchmark.

The daemon and the receiver each run in their own process; this process is the producer.
All three share the machine, so every figure is "on this box, with the load generator
beside it". Results go to stdout (a table at the end) and bench/results/latest.json.

With `--engine postgres` or `both`, the bench starts its own PostgreSQL server (Debian's
binaries, tests/postgres.py, fsync on), measures its commit rates beside SQLite's, and runs
the scenarios in POSTGRES_SCENARIOS again with each daemon on a fresh database there, and
those in POSTGRES_ONLY (two instances on one database: throughput and CPU per webhook,
wake-ups across instances, failover after kill -9).
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

from bench.ceilings import postgres_ceilings
from bench.context import Context
from bench.harness import ROOT, Daemon, Receiver, background_cpu, scratch_dir
from bench.load import session
from bench.report import Report
from bench.scenarios import POSTGRES_ONLY, POSTGRES_SCENARIOS, SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results"
# Which scenarios' figures are ratios to which ceiling; --only adds the ceilings they need.
NEEDS_CEILINGS = {
    "ingest",
    "drain",
    "e2e",
    "unbatched1",
    "unbatched1000",
    "latency",
    "cluster",
}
# On PostgreSQL a figure's ceiling is PostgreSQL's (None: no such ceiling measured there).
POSTGRES_CEILING = {
    "sqlite_rows": "pg_rows",
    "sqlite_commits": "pg_commits",
    "commit_p50": None,
    "commit_p99": None,
}
# One instance on PostgreSQL, on this 2-core box shared with the server (issue 9's targets).
POSTGRES_TARGET = {"e2e_batched": (">=", 20000.0), "unbatched_1000": (">=", 3000.0)}


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
        "--engine",
        choices=["sqlite", "postgres", "both"],
        default=None,
        help="the store the daemon runs on; both (the default when PostgreSQL's server "
        "binaries are installed) runs the scenarios PostgreSQL supports on each, side by side",
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
    if args.engine is None:
        args.engine = "both" if postgres_installed() else "sqlite"
        if args.engine == "sqlite":
            print(
                "note: PostgreSQL's server binaries are not installed "
                "(/usr/lib/postgresql/*/bin/initdb): SQLite only",
                flush=True,
            )
    args.engines = ["sqlite", "postgres"] if args.engine == "both" else [args.engine]
    return args


def postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


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
        "engines": args.engines,
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
    postgres = None
    if "postgres" in args.engines:
        from tests.postgres import started_server

        # PostgreSQL's default shared_buffers (the tests' server is smaller); fsync on.
        postgres = await asyncio.to_thread(started_server, {"shared_buffers": "128MB"})
        version = postgres.psql("SHOW server_version").strip()
        report.meta["postgres"] = version
        print(f"PostgreSQL {version} on 127.0.0.1:{postgres.port}, fsync on", flush=True)
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
                postgres=postgres,
            )
            started = time.monotonic()
            for name in args.chosen:
                if name in POSTGRES_ONLY and "postgres" not in args.engines:
                    print(f"\n== {name}: skipped (PostgreSQL only)", flush=True)
                    continue
                for engine in args.engines:
                    if engine == "postgres" and name not in POSTGRES_SCENARIOS | POSTGRES_ONLY:
                        continue
                    if engine == "sqlite" and name in POSTGRES_ONLY:
                        continue
                    await run_scenario(ctx, name, engine, args.quiet_wait)
            report.meta["wall_s"] = round(time.monotonic() - started, 1)
        finally:
            await client.close()
            receiver.stop()
            if postgres is not None:
                await asyncio.to_thread(postgres.remove)
    return report


async def run_scenario(ctx: Context, name: str, engine: str, quiet_wait: float) -> None:
    """One scenario on one engine; on PostgreSQL its figures and details are marked so."""
    report = ctx.report
    title, scenario = SCENARIOS[name]
    on_postgres = engine == "postgres"
    print(f"\n== {name}{' [postgresql]' if on_postgres else ''}: {title}", flush=True)
    ctx.engine = engine
    saved, first = report.details, len(report.figures)
    if on_postgres:
        report.details = {}
    try:
        quiet = await wait_quiet(quiet_wait)
        report.details.setdefault(name, {})["background_cpu_before"] = quiet
        began = time.monotonic()
        if on_postgres and name == "ceilings":
            await postgres_ceilings(ctx)
        else:
            await scenario(ctx)
        report.details.setdefault(name, {})["wall_s"] = round(time.monotonic() - began, 1)
    finally:
        ctx.engine = "sqlite"
        if on_postgres:
            for key, value in report.details.items():
                saved[f"{key} [postgresql]"] = value
            report.details = saved
    for figure in report.figures[first:]:
        figure.engine = engine
        if on_postgres:
            figure.target = POSTGRES_TARGET.get(figure.key, figure.target)
            figure.key += "_pg"
            figure.ceiling = POSTGRES_CEILING.get(figure.ceiling or "", figure.ceiling)


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
