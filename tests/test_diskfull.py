"""Disk full for real: the database on a 4 MB tmpfs that another file fills, then frees.

The daemon runs as a subprocess (`webhookd run`), as in production. Ingest on a full disk must
answer 503 and queue nothing; what was acknowledged before stays intact and is delivered; once
space is back, ingest recovers without a restart; the database passes `integrity_check` and
the acknowledged sequences have no gap.

Mounting needs root (CAP_SYS_ADMIN). Where the mount is refused, the test falls back to
SQLite's `max_page_count` on the daemon's writer connection, which only an in-process daemon
exposes: the same assertions, with a cap on the database in place of a full volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Daemon, Process, Receiver, StartDaemon, tenant, wait_for, write_config

EVENT = "CHECK_COMPLETED"
VOLUME_SIZE = "4m"
LEFT_FREE = 200 * 1024  # what the filler leaves on the volume
BEFORE_FILL = 20  # webhooks queued before the volume is filled
ProcessFactory = Callable[..., Process]


# -- a volume that fills up ----------------------------------------------------------------------


def mount_tmpfs(volume: Path) -> bool:
    """Mount a small tmpfs on `volume`. False when this machine does not permit it."""
    volume.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_SIZE}", "tmpfs", str(volume)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return True
    refusal = done.stderr.lower()
    if any(
        words in refusal
        for words in ("permission denied", "operation not permitted", "must be superuser")
    ):
        return False
    raise AssertionError(f"mount failed: {done.stderr.strip()}")


def unmount(volume: Path) -> None:
    done = subprocess.run(["umount", str(volume)], capture_output=True, check=False)
    if done.returncode != 0:  # still busy after a failed test: detach it anyway
        subprocess.run(["umount", "-l", str(volume)], capture_output=True, check=False)


class Rig:
    """The daemon with its database on a volume that the test can fill and free."""

    database: Path
    kind: str

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raise NotImplementedError

    async def fill(self) -> None:
        raise NotImplementedError

    async def free(self) -> None:
        raise NotImplementedError

    async def stop(self) -> int:
        """Stop the daemon as systemd would; its exit code."""
        raise NotImplementedError

    async def ingest(self, items: Any) -> tuple[int, Any]:
        return await self.request("POST", "/v1/tenants/acme/webhooks", items)

    async def status(self) -> dict[str, Any]:
        code, body = await self.request("GET", "/v1/tenants/acme/status")
        assert code == 200, body
        return body  # type: ignore[no-any-return]


class TmpfsRig(Rig):
    kind = "tmpfs"

    def __init__(self, process: Process, volume: Path, session: aiohttp.ClientSession) -> None:
        self.process = process
        self.volume = volume
        self.database = volume / "webhookd.db"
        self.filler = volume / "filler"
        self.session = session

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.process.base + path, json=body) as response:
            return response.status, await response.json(content_type=None)

    def _fill(self) -> None:
        stat = os.statvfs(self.volume)
        size = stat.f_bavail * stat.f_frsize - LEFT_FREE
        assert size > 0, "the database alone has filled the volume"
        chunk = b"\0" * (1 << 16)
        with self.filler.open("wb") as out:
            while size > 0:
                size -= out.write(chunk[: min(size, len(chunk))])

    async def fill(self) -> None:
        await asyncio.to_thread(self._fill)

    async def free(self) -> None:
        self.filler.unlink()

    async def stop(self) -> int:
        return await asyncio.to_thread(self.process.terminate, 30.0)


class PageCapRig(Rig):
    """Fallback: a cap on the database's pages stands in for the full volume."""

    kind = "max_page_count"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.database = daemon.service.store.path

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.daemon.request(method, path, json=body)

    async def _pragma(self, statement: str) -> int:
        # Store.pragma runs on the writer's connection, in its thread, between commits.
        return int(await self.daemon.service.store.pragma(statement.removeprefix("PRAGMA ")))

    async def fill(self) -> None:
        pages = await self._pragma("PRAGMA page_count")
        size = await self._pragma("PRAGMA page_size")
        await self._pragma(f"PRAGMA max_page_count = {pages + LEFT_FREE // size}")

    async def free(self) -> None:
        await self._pragma("PRAGMA max_page_count = 4294967294")

    async def stop(self) -> int:
        await self.daemon.service.stop()
        return 0


RigFactory = Callable[[dict[str, Any]], Awaitable[Rig]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path | None]:
    """A mounted 4 MB tmpfs, or None where mounting is not permitted."""
    path = tmp_path / "vol"
    if not mount_tmpfs(path):
        yield None
        return
    yield path
    unmount(path)


@pytest.fixture
async def make_rig(
    tmp_path: Path,
    volume: Path | None,
    process_factory: ProcessFactory,
    start_daemon: StartDaemon,
    session: aiohttp.ClientSession,
) -> AsyncIterator[RigFactory]:
    processes: list[Process] = []

    async def make(tenants: dict[str, Any]) -> Rig:
        if volume is None:
            daemon = await start_daemon(tenants=tenants)
            return PageCapRig(daemon)
        # The config and the daemon's log stay off the volume: only the database fills it.
        config = write_config(tmp_path, tenants, daemon={"database": str(volume / "webhookd.db")})
        process = process_factory(config)
        processes.append(process)
        await asyncio.to_thread(process.start)
        return TmpfsRig(process, volume, session)

    yield make
    for process in processes:  # before the volume is unmounted
        process.stop()


# -- the scenario --------------------------------------------------------------------------------


class Gate:
    """The tenant's endpoint, held shut: the first delivery waits, the rest pile up behind."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.opened = asyncio.Event()
        self.held = 0
        receiver.always("/acme", self._hold)

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        self.held += 1
        await self.opened.wait()
        return web.Response(text="ok")

    def open(self) -> None:
        self.receiver.always("/acme", 200)
        self.opened.set()

    def delivered(self) -> list[int]:
        """Sequences the endpoint took, first deliveries only, in the order they came."""
        return list(dict.fromkeys(self.receiver.sequences("/acme")))


@dataclass
class Filled:
    acked: list[tuple[str, int]]  # (id, sequence) of every webhook answered 202
    refused: list[dict[str, Any]]  # the items of the request that got 503


def items(start: int, count: int, size: int) -> list[dict[str, Any]]:
    return [
        {"event": EVENT, "id": f"w-{n}", "data": {"n": n, "pad": "x" * size}}
        for n in range(start, start + count)
    ]


def queued(body: Any) -> list[tuple[str, int]]:
    assert all(w["status"] == "queued" for w in body["webhooks"]), body
    return [(w["id"], w["sequence"]) for w in body["webhooks"]]


def assert_consecutive(acked: list[tuple[str, int]]) -> None:
    assert [s for _, s in acked] == list(range(1, len(acked) + 1)), acked
    assert [i for i, _ in acked] == [f"w-{n}" for n in range(len(acked))], acked


async def fill_until_refused(rig: Rig, gate: Gate) -> Filled:
    """Queue some webhooks, fill the volume, then ingest until the daemon answers 503."""
    acked: list[tuple[str, int]] = []
    for start in range(0, BEFORE_FILL, 5):
        code, body = await rig.ingest(items(start, 5, 1000))
        assert code == 202, body
        acked += queued(body)
    await wait_for(lambda: gate.held == 1, timeout=5)  # sequence 1 is in flight, held
    await rig.fill()

    refused: list[dict[str, Any]] | None = None
    for _ in range(400):
        batch = items(len(acked), 5, 4000)
        before = await rig.status()
        code, body = await rig.ingest(batch)
        if code == 202:
            acked += queued(body)
            continue
        assert code == 503, body
        assert set(body) == {"error", "detail"}, body
        assert body["error"] == "unavailable", body
        assert "database is full" in body["detail"], body
        assert "nothing was queued" in body["detail"], body
        # Nothing of the refused request was queued, and it used up no sequence.
        after = await rig.status()
        assert after["waiting"] == before["waiting"] == len(acked), (before, after)
        refused = batch
        break
    assert refused is not None, f"{len(acked)} webhooks queued and the volume never filled"
    assert len(acked) > BEFORE_FILL, "the filler left no room at all: nothing to compare"
    assert_consecutive(acked)

    # Still full: the same request is refused again.
    code, body = await rig.ingest(refused)
    assert code == 503, body
    # What was acknowledged is intact and readable, in order.
    code, peek = await rig.request("GET", "/v1/tenants/acme/webhooks?limit=1000")
    assert code == 200, peek
    assert [(w["id"], w["sequence"]) for w in peek["webhooks"]] == acked
    code, health = await rig.request("GET", "/healthz")
    assert code == 200, health
    return Filled(acked, refused)


def daemon_reports_space_back(rig: Rig) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        code, status = await rig.request("GET", "/v1/status")
        assert code == 200, status
        return status["totals"]["disk_full"] is False

    return check


async def recover_and_stop(rig: Rig, gate: Gate, filled: Filled) -> None:
    """Free the volume: ingest recovers without a restart; everything delivers; clean stop."""
    acked = list(filled.acked)
    await rig.free()
    if rig.kind == "tmpfs":
        # Seen without an ingest to try: the store looks for room while the disk is full.
        # (max_page_count is SQLite's own limit, which statvfs cannot see.)
        await wait_for(daemon_reports_space_back(rig), timeout=10)
    code, body = await rig.ingest(filled.refused)
    assert code == 202, body
    acked += queued(body)
    assert_consecutive(acked)

    gate.open()
    every = [s for _, s in acked]
    await wait_for(lambda: gate.delivered() == every, timeout=20)
    for request in gate.receiver.at("/acme", ok_only=True):
        webhook = request.webhooks[0]
        assert webhook["id"] == f"w-{webhook['data']['n']}", webhook
    deadline = time.monotonic() + 10
    while (await rig.status())["waiting"]:
        assert time.monotonic() < deadline, await rig.status()
        await asyncio.sleep(0.02)

    assert await rig.stop() == 0
    with sqlite3.connect(rig.database) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        state = db.execute(
            "SELECT last_sequence, acked_sequence FROM tenant_state WHERE tenant = 'acme'"
        ).fetchone()
        assert state == (len(acked), len(acked)), state
        assert db.execute("SELECT count(*) FROM webhooks").fetchone() == (0,)
        ids = db.execute("SELECT id, sequence FROM webhook_ids ORDER BY sequence").fetchall()
        assert ids == acked
    db.close()


async def test_full_disk_refuses_ingest_and_delivery_goes_on(
    receiver: Receiver, make_rig: RigFactory
) -> None:
    gate = Gate(receiver)
    rig = await make_rig({"acme": tenant(receiver.url("/acme"), timeout=60.0)})
    filled = await fill_until_refused(rig, gate)

    # The disk is still full; the endpoint opens. What was acknowledged goes out.
    gate.open()
    every = [s for _, s in filled.acked]
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: gate.delivered() == every, timeout=10)
    sent = receiver.sequences("/acme")
    assert gate.delivered() == every, (
        f"on the full disk ({rig.kind}) the endpoint got sequences {gate.delivered()} "
        f"of 1..{len(every)}, in {len(sent)} requests: {sent[:12]}…"
    )

    await recover_and_stop(rig, gate, filled)


async def test_ingest_recovers_without_a_restart_and_the_database_stays_sound(
    receiver: Receiver, make_rig: RigFactory
) -> None:
    # The endpoint stays shut until space is back: delivery on a full disk is the other test.
    gate = Gate(receiver)
    rig = await make_rig({"acme": tenant(receiver.url("/acme"), timeout=60.0)})
    filled = await fill_until_refused(rig, gate)
    await recover_and_stop(rig, gate, filled)
