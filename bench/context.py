"""What every scenario shares: the receiver, the producer's client, the report, and a fresh
daemon per scenario (its own database), optionally sampled with py-spy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from bench.harness import CpuMeter, Daemon, Pid, ProcTree, Receiver, scratch_dir
from bench.profile import Sampler, format_summary, summarise
from bench.report import Report

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

MS = 1000.0


@dataclass
class Context:
    quick: bool
    receiver: Receiver
    client: aiohttp.ClientSession  # the producer's client and the /stats poller
    report: Report
    results_dir: Path
    profile: str | None = None  # py-spy mode: "wall", "gil" or "native"
    sustained_s: float | None = None  # the sustained scenario's main phase, if not 60 s
    me: Pid = field(default_factory=lambda: Pid(os.getpid()))
    # The store the next daemon uses: "sqlite" (a file in its folder) or "postgres" (a fresh
    # database on `postgres`, the server this run started).
    engine: str = "sqlite"
    postgres: PostgresServer | None = None

    def size(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def say(self, text: str) -> None:
        print(text, flush=True)

    def cpu(self, daemon: Daemon | None = None) -> CpuMeter:
        procs: dict[str, Pid] = {"receiver": self.receiver.proc, "producer": self.me}
        if daemon is not None:
            procs["daemon"] = daemon.proc
        if self.engine == "postgres" and self.postgres is not None:
            procs["postgres"] = ProcTree(postmaster_pid(self.postgres))
        return CpuMeter(procs).start()

    @contextlib.asynccontextmanager
    async def daemon(
        self,
        name: str,
        tenants: dict[str, dict[str, Any]],
        *,
        env: dict[str, str] | None = None,
        prepare: Callable[[Path, str], Awaitable[None]] | None = None,
        expected: frozenset[str] = frozenset(),
        **config: Any,
    ) -> AsyncIterator[Daemon]:
        """A fresh daemon for one scenario; its warnings and errors go into the details.

        `prepare(directory, database)` runs before the daemon starts, to build its database
        (a SQLite file's path in `directory`, or the postgresql:// URL of a fresh database);
        `env` is added to the daemon's environment; log events named in `expected` (a
        scenario's failing endpoints: `delivery_failed`) are counted, not shown as problems.
        """
        await self.receiver.reset(self.client)
        database: str | None = None
        with scratch_dir(name) as directory:
            if self.engine == "postgres":
                assert self.postgres is not None
                database = await asyncio.to_thread(self.postgres.create_database)
                config["database"] = self.postgres.database_url(database)
            if prepare is not None:
                try:
                    await prepare(directory, config.get("database", str(directory / "webhookd.db")))
                except BaseException:
                    if database is not None:
                        await asyncio.to_thread(self._drop, database)
                    raise
            try:
                daemon = await asyncio.to_thread(Daemon, directory, tenants, env, **config)
            except BaseException:
                if database is not None:
                    await asyncio.to_thread(self._drop, database)
                raise
            try:
                yield daemon
            finally:
                problems = daemon.problems()
                await asyncio.to_thread(daemon.stop)
                if database is not None:
                    await asyncio.to_thread(self._drop, database)
                counted = expected_events(problems, expected)
                problems = [line for line in problems if log_event(line) not in expected]
                if counted:
                    self.say(f"  daemon logged, as expected: {counted}")
                    self.report.details.setdefault(name, {})["daemon_log_expected"] = counted
                if problems:
                    self.say(f"  ! daemon logged {len(problems)} warning/error line(s), e.g.:")
                    for line in problems[:3]:
                        self.say(f"    {line[:300]}")
                self.report.details.setdefault(name, {})["daemon_log_problems"] = {
                    "count": len(problems),
                    "first": problems[:5],
                }

    def _drop(self, database: str) -> None:
        assert self.postgres is not None
        self.postgres.drop_database(database)

    @contextlib.asynccontextmanager
    async def sampled(self, name: str, daemon: Daemon) -> AsyncIterator[None]:
        """py-spy on the daemon for the body of the block, when --profile is given."""
        if not self.profile:
            yield
            return
        out = self.results_dir / f"profile-{name}-{self.profile}.txt"
        sampler = Sampler(daemon.proc.pid, out, mode=self.profile)
        try:
            yield
        finally:
            await asyncio.to_thread(sampler.stop)
            summary = summarise(out)
            self.report.details.setdefault(name, {})["profile"] = summary
            self.say(format_summary(name, summary))


def log_event(line: str) -> str | None:
    """The `event` of one of the daemon's JSON log lines (None for anything else)."""
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("event") if isinstance(parsed, dict) else None


def expected_events(lines: list[str], expected: frozenset[str]) -> dict[str, int]:
    """How often each expected event was logged, by its error ("delivery_failed: HTTP 503"),
    so that an unexpected kind of failure (a timeout, say) still stands out."""
    counted: dict[str, int] = {}
    if expected:
        for line in lines:
            if log_event(line) not in expected:
                continue
            parsed = orjson.loads(line)
            key = f"{parsed['event']}: {parsed.get('error', '')}"
            counted[key] = counted.get(key, 0) + 1
    return counted


async def mean_attempt_ms(client: aiohttp.ClientSession, daemon: Daemon) -> float:
    """Mean delivery request duration from the daemon's /metrics histogram."""
    async with client.get(f"{daemon.base}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (
            "webhookd_delivery_duration_seconds_sum",
            "webhookd_delivery_duration_seconds_count",
        ):
            values[name.rsplit("_", 1)[1]] = float(value)
    return MS * values.get("sum", 0.0) / values["count"] if values.get("count") else 0.0


def postmaster_pid(server: PostgresServer) -> int:
    """The server's main process, from the first line of its data folder's postmaster.pid."""
    return int((server.data / "postmaster.pid").read_text().split()[0])


def per_item_us(meter: CpuMeter, items: int, proc: str = "daemon") -> float | None:
    """A process's (the daemon's) CPU microseconds per item over the meter's window."""
    seconds = meter.seconds.get(proc)
    return None if seconds is None or not items else 1e6 * seconds / items


def system_share(meter: CpuMeter) -> float | None:
    """How much of the daemon's CPU time was spent in the kernel."""
    total = meter.seconds.get("daemon")
    return None if not total else round(meter.system["daemon"] / total, 2)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
