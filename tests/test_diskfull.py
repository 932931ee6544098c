"""Disk full for real: the database on a small tmpfs (4 or 8 MiB) that another file fills,
then frees.

The daemon runs as a subprocess (`webhookd run`), as in production. Ingest on a full disk must
answer 503 and queue nothing; what was acknowledged before stays intact and is delivered, a
backlog of megabytes included, with not a byte left on the volume; control calls answer; once
space is back, ingest recovers without a restart; the database passes `integrity_check` and
the acknowledged sequences have no gap. The store itself is tested on the volume too: what
it does so as never to need space it does not have.

Mounting needs root (CAP_SYS_ADMIN). Where the mount is refused, the tests fall back to
SQLite's `max_page_count` on the writer connection, which only an in-process daemon or store
exposes: the same assertions, with a cap on the database in place of a full volume, except
where a cap behaves otherwise (each test says where).
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
from webhookd.records import Delivered, Failure, HistoryQuery, NewWebhook, StoreError, TenantRecord
from webhookd.store.sqlite import SqliteStore

EVENT = "CHECK_COMPLETED"
VOLUME_SIZE = "4m"
LEFT_FREE = 200 * 1024  # what the filler leaves on the volume
BEFORE_FILL = 20  # webhooks queued before the volume is filled
ProcessFactory = Callable[..., Process]

# Rows of `webhooks` that are neither queued (above acked_sequence) nor a delivered record
# (covered by a deliveries row): what an acknowledgement on a full disk leaves to delete.
LEFT_ROWS = """SELECT count(*) FROM webhooks AS w JOIN tenant_state AS t USING (tenant)
    WHERE w.sequence <= t.acked_sequence AND NOT EXISTS (
        SELECT 1 FROM deliveries AS d WHERE d.tenant = w.tenant
        AND d.first_sequence <= w.sequence AND d.last_sequence >= w.sequence)"""


# -- a volume that fills up ----------------------------------------------------------------------


def mount_tmpfs(volume: Path, size: str = VOLUME_SIZE) -> bool:
    """Mount a small tmpfs on `volume`. False when this machine does not permit it."""
    volume.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(volume)],
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


FILLER = "filler"


def fill_volume(volume: Path, leave: int, name: str = FILLER) -> None:
    """Write a file that leaves `leave` bytes free on the volume."""
    stats = os.statvfs(volume)
    size = stats.f_bavail * stats.f_frsize - leave
    assert size > 0 or leave == 0, "the database alone has filled the volume"
    chunk = b"\0" * (1 << 16)
    with (volume / name).open("wb") as out:
        while size > 0:
            size -= out.write(chunk[: min(size, len(chunk))])


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

    async def fill_up(self) -> None:
        """Take what room is left too (another program writing to the volume)."""
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
        self.session = session

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.process.base + path, json=body) as response:
            return response.status, await response.json(content_type=None)

    async def fill(self) -> None:
        await asyncio.to_thread(fill_volume, self.volume, LEFT_FREE)

    async def fill_up(self) -> None:
        await asyncio.to_thread(fill_volume, self.volume, 0, FILLER + "-2")

    async def free(self) -> None:
        (self.volume / FILLER).unlink()
        (self.volume / (FILLER + "-2")).unlink(missing_ok=True)

    async def stop(self) -> int:
        return await asyncio.to_thread(self.process.terminate, 30.0)


class PageCapRig(Rig):
    """Fallback: a cap on the database's pages stands in for the full volume."""

    kind = "max_page_count"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.database = daemon.sqlite_store.path

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.daemon.request(method, path, json=body)

    async def _pragma(self, statement: str) -> int:
        # SqliteStore.pragma runs on the writer's connection, in its thread, between commits.
        return int(await self.daemon.sqlite_store.pragma(statement.removeprefix("PRAGMA ")))

    async def fill(self) -> None:
        pages = await self._pragma("PRAGMA page_count")
        size = await self._pragma("PRAGMA page_size")
        await self._pragma(f"PRAGMA max_page_count = {pages + LEFT_FREE // size}")

    async def fill_up(self) -> None:
        await self._pragma(f"PRAGMA max_page_count = {await self._pragma('PRAGMA page_count')}")

    async def free(self) -> None:
        await self._pragma("PRAGMA max_page_count = 4294967294")

    async def stop(self) -> int:
        await self.daemon.server.stop()
        return 0


RigFactory = Callable[[dict[str, Any]], Awaitable[Rig]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


@pytest.fixture
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """A mounted 4 MB tmpfs (another size by indirect parametrization), or None where
    mounting is not permitted."""
    path = tmp_path / "vol"
    if not mount_tmpfs(path, getattr(request, "param", VOLUME_SIZE)):
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
        assert db.execute(LEFT_ROWS).fetchone() == (0,)
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


# -- a backlog on a small volume -----------------------------------------------------------------

SMALL_VOLUME = "8m"
BACKLOG = 500  # webhooks queued behind the failing endpoint before the volume fills
BACKLOG_PAD = 4000  # bytes of data each: about 2 MB queued in all
DRAIN_TIMEOUT = 30.0  # a bound for a failing run; a passing one drains in about a second


def wal_bytes(rig: Rig) -> int:
    wal = rig.database.with_name(rig.database.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def free_bytes(rig: Rig) -> int:
    stats = os.statvfs(rig.database.parent)
    return stats.f_bavail * stats.f_frsize


async def control(rig: Rig, path: str) -> Any:
    """A control call on the full disk: it must answer 200, not 503."""
    code, body = await rig.request("POST", path)
    assert code == 200, (path, code, body)
    return body


async def skip_head(rig: Rig) -> dict[str, Any]:
    """Park the head. An attempt that started before the pause may still be in flight (409)."""

    async def attempt() -> dict[str, Any] | None:
        code, body = await rig.request("POST", "/v1/tenants/acme/skip")
        if code == 409 and "in flight" in body["detail"]:
            return None
        assert code == 200, body
        return body["parked"]  # type: ignore[no-any-return]

    return await wait_for(attempt, timeout=10)  # type: ignore[no-any-return]


def all_recorded(rig: Rig) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await rig.status())["waiting"] == 0)

    return check


@pytest.mark.parametrize("volume", [SMALL_VOLUME], indirect=True)
async def test_a_backlog_drains_on_a_full_small_volume(
    receiver: Receiver, make_rig: RigFactory
) -> None:
    """~2 MB queued behind a failing endpoint on an 8 MiB volume; the volume fills up. While
    it is full every control call answers, and once the endpoint heals the whole backlog
    goes out, each webhook once (at most the request in flight is sent again)."""
    receiver.always("/acme", 500)
    rig = await make_rig(
        {"acme": tenant(receiver.url("/acme"), retry_doublings=2, retry_after_doublings=0.2)}
    )
    acked: list[tuple[str, int]] = []
    for start in range(0, BACKLOG, 50):
        code, body = await rig.ingest(items(start, 50, BACKLOG_PAD))
        assert code == 202, body
        acked += queued(body)
    await rig.fill()
    for _ in range(400):
        code, body = await rig.ingest(items(len(acked), 5, BACKLOG_PAD))
        if code != 202:
            break
        acked += queued(body)
    assert code == 503, body
    assert "database is full" in body["detail"], body
    assert_consecutive(acked)
    assert receiver.at("/acme"), "the endpoint was never tried: no failures were recorded"
    # The space the reserve gave back goes too: not a byte left.
    await rig.fill_up()
    assert rig.kind != "tmpfs" or free_bytes(rig) == 0

    # Full: every control call is recorded and answers.
    assert (await rig.request("GET", "/v1/status"))[1]["totals"]["disk_full"] is True
    await control(rig, "/v1/tenants/acme/pause")
    parked = await skip_head(rig)
    assert parked["sequence"] == 1, parked
    code, listed = await rig.request("GET", "/v1/tenants/acme/parked")
    assert code == 200 and [p["id"] for p in listed["parked"]] == ["w-0"], listed
    requeued = await control(rig, "/v1/tenants/acme/parked/w-0/requeue")
    assert requeued["sequence"] == len(acked) + 1, requeued
    await control(rig, "/v1/tenants/acme/refresh")
    await control(rig, "/v1/tenants/acme/resume")
    receiver.always("/acme", 200)  # the endpoint heals
    await control(rig, "/v1/tenants/acme/retry")
    await control(rig, "/v1/retry")

    # Still full, the whole backlog goes out: sequence 1 is a gap (parked), w-0 comes last.
    expected = [s for _, s in acked[1:]] + [requeued["sequence"]]
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: sorted(set(receiver.sequences("/acme"))) == expected, DRAIN_TIMEOUT)
    delivered = receiver.sequences("/acme")
    resent = len(delivered) - len(set(delivered))
    assert sorted(set(delivered)) == expected and resent <= 1, (
        f"on the full volume ({rig.kind}) {len(set(delivered))} of {len(expected)} webhooks "
        f"drained in {DRAIN_TIMEOUT:.0f} s, {resent} sent again; free {free_bytes(rig)} "
        f"bytes, WAL {wal_bytes(rig)} bytes"
    )
    assert delivered == sorted(delivered), "out of order"
    status = await rig.status()
    assert (status["waiting"], status["queue"]) == (0, "empty"), status
    code, peek = await rig.request("GET", "/v1/tenants/acme/webhooks?limit=10")
    assert (code, peek["webhooks"]) == (200, []), peek
    assert (await rig.request("GET", "/v1/status"))[1]["totals"]["disk_full"] is True

    # Space back: ingest resumes, and it is delivered after the rest.
    await rig.free()
    if rig.kind == "tmpfs":
        await wait_for(daemon_reports_space_back(rig), timeout=10)
    code, body = await rig.ingest(items(BACKLOG * 2, 3, 10))
    assert code == 202, body
    later = [s for _, s in queued(body)]
    assert later == list(range(requeued["sequence"] + 1, requeued["sequence"] + 4))
    await wait_for(lambda: receiver.sequences("/acme")[-3:] == later, timeout=10)
    await wait_for(all_recorded(rig), timeout=10)

    assert await rig.stop() == 0
    with sqlite3.connect(rig.database) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        state = db.execute(
            "SELECT last_sequence, acked_sequence FROM tenant_state WHERE tenant = 'acme'"
        ).fetchone()
        assert state == (later[-1], later[-1]), state
        # What was acknowledged on the full disk without its record is gone by now; the
        # rows left are the delivered records (history is kept by default).
        assert db.execute(LEFT_ROWS).fetchone() == (0,)
    db.close()


# -- the store itself on a small volume ----------------------------------------------------------


class StoreVolume:
    """Stores with their database on the volume; where mounting is refused, under a cap on
    the database's pages instead (which counts pages, not the WAL or the checkpoint)."""

    def __init__(self, volume: Path | None, tmp_path: Path) -> None:
        self.volume = volume
        self.kind = "tmpfs" if volume is not None else "max_page_count"
        self.path = (volume or tmp_path) / "webhookd.db"
        self.opened: list[SqliteStore] = []

    async def open(self) -> tuple[SqliteStore, dict[str, TenantRecord]]:
        store = SqliteStore(self.path)
        self.opened.append(store)
        records = await store.open()
        return store, {record.name: record for record in records}

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL into the database file and restart it, from a connection of our own:
        (busy, frames in the WAL, frames copied)."""
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            db.execute("PRAGMA busy_timeout = 5000")
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return busy, frames, copied

    async def fill(self, store: SqliteStore, leave: int) -> None:
        if self.volume is not None:
            await asyncio.to_thread(fill_volume, self.volume, leave)
        else:
            pages, size = await store.pragma("page_count"), await store.pragma("page_size")
            await store.pragma(f"max_page_count = {pages + leave // size}")

    async def free(self, store: SqliteStore) -> None:
        if self.volume is not None:
            (self.volume / FILLER).unlink()
        else:
            await store.pragma("max_page_count = 4294967294")

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture
async def store_volume(volume: Path | None, tmp_path: Path) -> AsyncIterator[StoreVolume]:
    made = StoreVolume(volume, tmp_path)
    yield made
    await made.close()  # before the volume is unmounted


def webhook(data_bytes: int = 0, webhook_id: str | None = None) -> NewWebhook:
    return NewWebhook(webhook_id, EVENT, '{"pad": "' + "x" * data_bytes + '"}')


def store_is_full(store: SqliteStore) -> bool:
    return store.disk_full  # read through a call: the flag changes behind mypy's narrowing


async def test_on_a_full_volume_a_failure_that_needs_a_new_page_is_not_stored(
    store_volume: StoreVolume,
) -> None:
    store, _ = await store_volume.open()
    tenants = [f"t{n:02}" for n in range(60)]
    for name in tenants:
        await store.enqueue(name, [webhook()], 0.0)
    await store_volume.fill(store, leave=0)
    with pytest.raises(StoreError) as caught:
        await store.enqueue("t00", [webhook(100_000)], 0.0)
    assert caught.value.disk_full and store_is_full(store)

    # Sixty failures, a few hundred bytes each: more than the page the table has.
    failure = Failure(1.0, 1, 1, 1, 1, 500, "HTTP 500 " + "x" * 200, 5.0)
    outcomes = await asyncio.gather(
        *(store.record_failure(name, failure, 2.0, keep=10) for name in tenants),
        return_exceptions=True,
    )
    if store_volume.kind == "tmpfs":
        # Seen only at commit, where the store finds the pages it would take and undoes them.
        assert outcomes == [None] * len(tenants)
    else:
        # SQLite's cap refuses the page in the statement: those failures fail, alone.
        assert all(o is None or (isinstance(o, StoreError) and o.disk_full) for o in outcomes)
    assert store_is_full(store)

    await store_volume.free(store)
    await store.close()
    store, records = await store_volume.open()
    assert await store.pragma("integrity_check") == "ok"
    stored = sum(len(records[name].failures) for name in tenants)
    assert 0 < stored < len(tenants), stored
    if store_volume.kind == "tmpfs":
        # Not stored, the attempt count and the backoff were all the same.
        assert all(records[name].row.attempts == 1 for name in tenants)


@pytest.mark.parametrize("volume", [SMALL_VOLUME], indirect=True)
async def test_an_ingest_whose_checkpoint_would_not_fit_is_refused(
    store_volume: StoreVolume,
) -> None:
    """2 MB with 3 MB free: it fits in the WAL, but copying it into the database file would
    need 2 MB more. Taken, it would leave a WAL that can never start over."""
    store, _ = await store_volume.open()
    await store.enqueue("acme", [webhook(10, "first")], 0.0)
    await store_volume.fill(store, leave=3 << 20)
    big = [webhook(10_000, f"big-{n}") for n in range(200)]
    if store_volume.kind == "tmpfs":
        with pytest.raises(StoreError) as caught:
            await store.enqueue("acme", big, 0.0)
        assert caught.value.disk_full
        # The disk is not full for smaller ingest: accepted.
        [later] = await store.enqueue("acme", [webhook(10, "later")], 0.0)
        assert (later.sequence, later.status) == (2, "queued")
        assert not store_is_full(store)
    else:
        await store.enqueue("acme", big, 0.0)  # the cap counts pages, not the checkpoint
    await store.acknowledge("acme", 2, 1.0)
    # The WAL can be copied into the database file whole, and start over.
    busy, frames, copied = await asyncio.to_thread(store_volume.checkpoint)
    assert busy == 0 and frames == copied, (busy, frames, copied)
    assert await store.pragma("integrity_check") == "ok"


async def test_on_a_full_volume_history_gives_way_to_deliveries(
    store_volume: StoreVolume,
) -> None:
    """Three hundred tenants' webhooks of 2 KB acknowledged on a full volume: every
    acknowledgement is recorded, and the history records that do not fit (each a small
    deliveries row: a few pages for them all) are dropped and counted."""
    store, _ = await store_volume.open()
    tenants = [f"t{n:03}" for n in range(300)]
    for name in tenants:
        await store.enqueue(name, [webhook(2000, f"{name}-1")], 0.0)
    await store_volume.fill(store, leave=0)
    with pytest.raises(StoreError) as caught:
        await store.enqueue("t00", [webhook(100_000)], 0.0)
    assert caught.value.disk_full and store_is_full(store)

    delivered = Delivered(200, 5.0, 1)
    outcomes = await asyncio.gather(
        *(store.acknowledge(name, 1, 1.0, delivered) for name in tenants),
        return_exceptions=True,
    )
    assert outcomes == [None] * len(tenants)  # no delivery held back for its record
    kept = [name for name in tenants if await store.history(name, HistoryQuery())]
    assert store.history_dropped == len(tenants) - len(kept) > 0
    for name in tenants:
        assert await store.read_queue(name, 1, 10) == []

    await store_volume.free(store)
    await store.close()
    store, records = await store_volume.open()
    assert await store.pragma("integrity_check") == "ok"
    assert all(records[name].row.acked_sequence == 1 for name in tenants)
    assert [n for n in tenants if await store.history(n, HistoryQuery())] == kept
