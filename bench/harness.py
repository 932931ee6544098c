"""The processes a benchmark runs against: the daemon and the receiver, each a subprocess.

Both are started with this interpreter, so they use the project's venv. CPU time and RSS
come from /proc, so a scenario can say which process was busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
EVENT = "PRODUCT_STATUS_CHANGED"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g} s")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder on the root disk (ext4 here: fsync is real), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"webhookd-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Pid:
    """CPU-time and memory readings of a process from /proc/<pid>."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU time so far (fields 14 and 15 of /proc/<pid>/stat)."""
        text = Path(f"/proc/{self.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def cpu_seconds(self) -> float:
        user, system = self.cpu_times()
        return user + system

    def rss_bytes(self) -> int:
        pages = Path(f"/proc/{self.pid}/statm").read_text().split()[1]
        return int(pages) * PAGE_SIZE


class Proc(Pid):
    """A child process whose output goes to a log file."""

    def __init__(
        self, args: list[str], log_path: Path, what: str, env: dict[str, str] | None = None
    ) -> None:
        self.what = what
        self.log_path = log_path
        environment = {**os.environ, **env} if env else None
        with log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=ROOT, env=environment)
        super().__init__(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Group(Pid):
    """Several processes (the instances of a cluster) as one: their CPU time summed."""

    def __init__(self, members: Iterable[Pid]) -> None:
        self.members = list(members)
        super().__init__(self.members[0].pid)

    def cpu_times(self) -> tuple[float, float]:
        user = system = 0.0
        for member in self.members:
            with contextlib.suppress(OSError, ValueError):  # one killed meanwhile
                member_user, member_system = member.cpu_times()
                user, system = user + member_user, system + member_system
        return user, system

    def rss_bytes(self) -> int:
        return sum(member.rss_bytes() for member in self.members)


class ProcTree(Pid):
    """A server and its children (PostgreSQL's postmaster and backends): their CPU time.

    The parent's own time, the time of the children it has reaped (cutime and cstime: a
    backend that has exited), and the time of the children alive now.
    """

    def cpu_times(self) -> tuple[float, float]:
        user, system = self._stat(self.pid, children=True)
        for child in self.children():
            with contextlib.suppress(OSError, ValueError):  # it may exit meanwhile
                child_user, child_system = self._stat(child, children=False)
                user, system = user + child_user, system + child_system
        return user, system

    def children(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError):
                text = (entry / "stat").read_text()
                if int(text[text.rindex(")") + 2 :].split()[1]) == self.pid:
                    found.append(int(entry.name))
        return found

    @staticmethod
    def _stat(pid: int, *, children: bool) -> tuple[float, float]:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = [int(f) for f in text[text.rindex(")") + 2 :].split()[11:15]]
        user, system = fields[0], fields[1]
        if children:
            user, system = user + fields[2], system + fields[3]
        return user / CLOCK_TICKS, system / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (from /proc/stat), steal
    included: time the hypervisor gave this machine's cores to another guest."""
    return machine_seconds()[0]


def machine_seconds() -> tuple[float, float]:
    """(busy, of which stolen) CPU seconds since boot, all cores, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS, values[7] / CLOCK_TICKS


class CpuMeter:
    """CPU % of some processes between `start()` and `stop()` (100 % = one core).

    `others` is what the rest of the machine used meanwhile: on a shared box, a busy
    neighbour explains a low figure. `steal`, part of `others`, is what the hypervisor gave
    to other guests: on a virtual machine, a latency tail can be that alone.
    """

    def __init__(self, procs: dict[str, Pid]) -> None:
        self.procs = procs
        self.started: dict[str, float] = {}
        self.machine = 0.0
        self.stolen = 0.0
        self.at = 0.0
        self.result: dict[str, float] = {}
        self.seconds: dict[str, float] = {}  # CPU seconds each process used
        self.system_started: dict[str, float] = {}
        self.system: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self.at = time.monotonic()
        self.started = {name: p.cpu_seconds() for name, p in self.procs.items()}
        self.system_started = {name: p.cpu_times()[1] for name, p in self.procs.items()}
        self.machine, self.stolen = machine_seconds()
        return self

    def stop(self) -> dict[str, float]:
        elapsed = max(1e-9, time.monotonic() - self.at)
        used = {name: p.cpu_seconds() - self.started[name] for name, p in self.procs.items()}
        self.seconds = used
        # The kernel's share (syscalls: sockets, fsync): what Python-level profiles miss.
        self.system = {
            name: p.cpu_times()[1] - self.system_started[name] for name, p in self.procs.items()
        }
        machine, stolen = machine_seconds()
        machine, stolen = machine - self.machine, stolen - self.stolen
        self.result = {name: round(100 * seconds / elapsed, 2) for name, seconds in used.items()}
        others = max(0.0, machine - sum(used.values()))
        self.result["others"] = round(100 * others / elapsed, 2)
        self.result["steal"] = round(100 * stolen / elapsed, 2)
        return self.result


def background_cpu(seconds: float = 1.0) -> float:
    """CPU % (100 = one core) the machine spends over `seconds` while this process sleeps."""
    me = Pid(os.getpid())
    meter = CpuMeter({"me": me}).start()
    time.sleep(seconds)
    return meter.stop()["others"]


# -- the receiver --------------------------------------------------------------------------------


class Receiver:
    """`python -m bench.receiver` in its own process, and a client for its /stats."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc = Proc(
            [sys.executable, "-m", "bench.receiver", str(self.port)],
            workdir / "receiver.log",
            "receiver",
        )
        wait_listening(self.port, self.proc.proc, "receiver", 15.0)
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    async def stats(
        self,
        session: aiohttp.ClientSession,
        paths: bool = False,
        *,
        groups: bool = False,
        latency: bool = True,
        arrivals: bool = False,
    ) -> dict[str, Any]:
        """GET /stats; `latency=False` skips sorting every latency sample (for polling),
        `arrivals=True` adds the first arrival of each paced request ([k, time] pairs)."""
        query = {"paths": "1" if paths else "0", "groups": "1" if groups else "0"}
        if arrivals:
            query["arrivals"] = "1"
        if not latency:
            query["latency"] = "0"
        async with session.get(self.base + "/stats", params=query) as response:
            response.raise_for_status()
            result: dict[str, Any] = await response.json()
            return result

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(self.base + "/reset") as response:
            response.raise_for_status()

    async def behave(
        self, session: aiohttp.ClientSession, *, fail_status: int, slow_s: float
    ) -> None:
        """What paths under /fail/ answer, and how late paths under /slow/ answer."""
        body = {"fail_status": fail_status, "slow_s": slow_s}
        async with session.post(self.base + "/behaviour", json=body) as response:
            response.raise_for_status()

    async def wait_total(
        self,
        session: aiohttp.ClientSession,
        total: int,
        timeout: float,
        interval: float = 0.1,
        *,
        latency: bool = True,
    ) -> dict[str, Any]:
        """Poll /stats until `total` webhooks arrived or `timeout` passed; the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats(session, latency=latency)
            if stats["total"] >= total or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(interval)

    def stop(self) -> None:
        self.proc.stop()


# -- the daemon ----------------------------------------------------------------------------------


def tenant_names(count: int, prefix: str = "t") -> list[str]:
    width = len(str(count - 1))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def write_config(
    directory: Path,
    port: int,
    tenants: dict[str, dict[str, Any]],
    *,
    durability: str = "full",
    delivery: dict[str, Any] | None = None,
    database: str = "webhookd.db",
    lease_seconds: float | None = None,
    daemon: dict[str, Any] | None = None,
) -> Path:
    """`database`: a SQLite file's path (relative to `directory`) or a postgresql:// URL;
    `lease_seconds`: the cluster's lease (PostgreSQL), when not the default; `daemon`: more
    `[daemon]` keys."""
    raw: dict[str, Any] = {
        "daemon": {
            "database": database,
            "listen": f"127.0.0.1:{port}",
            "log_level": "warning",
            "log_format": "json",
            "allow_private_endpoints": True,
            "durability": durability,
            "tenants_dir": "",
            "shutdown_grace": 2.0,
        },
        # A short retry base, so a transient failure shows in the log without stalling a run.
        "delivery": {"retry_base": 1.0, **(delivery or {})},
        "tenants": tenants,
    }
    if lease_seconds is not None:
        raw["daemon"]["lease_seconds"] = lease_seconds
    raw["daemon"].update(daemon or {})
    path = directory / "config.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def tenant_tables(
    names: Iterable[str], receiver: Receiver, prefix: str, **options: Any
) -> dict[str, dict[str, Any]]:
    """One table per tenant, each pointed at its own receiver path `/<prefix>/<name>`."""
    return {
        name: {
            "endpoint": receiver.url(f"/{prefix}/{name}"),
            "secret": "bench-secret",
            "events": ["*"],
            **options,
        }
        for name in names
    }


class Daemon:
    """`webhookd run -c CONFIG` as a subprocess, plus the API calls the benchmarks make."""

    # An experiment knob (--daemon-prelude): Python run in the daemon's interpreter before
    # webhookd starts, e.g. "import gc; gc.set_threshold(50000)". The daemon's code is unchanged.
    prelude: str | None = None

    def __init__(
        self,
        directory: Path,
        tenants: dict[str, dict[str, Any]],
        env: dict[str, str] | None = None,
        **config: Any,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.config_path = write_config(directory, self.port, tenants, **config)
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "webhookd", "run", "-c", str(self.config_path)]
        if self.prelude:
            command[1:3] = [
                "-c",
                f"{self.prelude}\nimport runpy, sys\nsys.argv[0] = 'webhookd'\n"
                "runpy.run_module('webhookd', run_name='__main__', alter_sys=True)",
            ]
        self.started_at = started = time.monotonic()  # just before the process starts
        self.proc = Proc(command, directory / "daemon.log", "daemon", env)
        wait_listening(self.port, self.proc.proc, "daemon", 120.0)
        self.startup_s = time.monotonic() - started

    def ingest_url(self, tenant: str) -> str:
        return f"{self.base}/v1/tenants/{tenant}/webhooks"

    async def control(
        self, session: aiohttp.ClientSession, tenants: Iterable[str], action: str
    ) -> None:
        """POST /v1/tenants/{t}/{action} for every tenant, concurrently."""

        async def one(name: str) -> None:
            async with session.post(f"{self.base}/v1/tenants/{name}/{action}") as response:
                if response.status != 200:
                    raise RuntimeError(f"{action} {name}: HTTP {response.status}")
                await response.read()

        await asyncio.gather(*(one(name) for name in tenants))

    def problems(self) -> list[str]:
        """Warning and error lines the daemon logged (log_level is warning)."""
        return [line for line in self.proc.log().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.stop()
