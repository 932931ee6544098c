"""The operator's view: status and its queue states, control calls, access, metrics, CLI,
and the README's stalled-tenant walk-through (its table and its CLI equivalents).

Real receiver, real SQLite, the daemon in-process or as a subprocess; no mocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from secrets import token_hex
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ROOT,
    Daemon,
    Process,
    Receiver,
    StartDaemon,
    free_port,
    tenant,
    wait_for,
    write_config,
)
from tests.test_faults import RawEndpoint
from tests.test_terminal import BIDI, C0, C1, UNSAFE, escaped, shown
from webhookd import config as config_mod
from webhookd import views
from webhookd.__main__ import build_parser
from webhookd.events import CURRENT
from webhookd.metrics import Metrics
from webhookd.records import HistorySize
from webhookd.scheduler import Clock
from webhookd.sender import Outcome
from webhookd.status import iso

EVENT = "CHECK_COMPLETED"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
STATES = ("orphaned", "disabled", "paused", "stalled", "waiting", "empty")

# docs/http-api.md#get-v1tenantststatus, tenant status: field -> expected kind.
STATUS_FIELDS = {
    "tenant": "str",
    "enabled": "bool",
    "paused": "bool",
    "batching": "bool",
    "queue": "str",
    "waiting": "int",
    "oldest_waiting_at": "time?",
    "last_processed_at": "time?",
    "seconds_since_last_processed": "number?",
    "attempts": "int",
    "next_attempt_at": "time?",
    "recent_failures": "list",
}
FAILURE_FIELDS = {
    "at": "time",
    "attempt": "int",
    "first_sequence": "int",
    "last_sequence": "int",
    "count": "int",
    "status": "int?",
    "error": "str",
    "duration_ms": "number",
}


def is_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or is_kind(value, kind[:-1])
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "time":
        return isinstance(value, str) and ISO.match(value) is not None
    if kind == "list":
        return isinstance(value, list)
    raise AssertionError(kind)


def assert_status_shape(status: dict[str, Any]) -> None:
    for key, kind in STATUS_FIELDS.items():
        assert key in status, (key, status)
        assert is_kind(status[key], kind), (key, kind, status[key])
    assert status["queue"] in STATES, status
    for failure in status["recent_failures"]:
        for key, kind in FAILURE_FIELDS.items():
            assert key in failure, (key, failure)
            assert is_kind(failure[key], kind), (key, kind, failure[key])


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def state_of(daemon: Daemon, name: str) -> dict[str, Any]:
    """The status the API would answer, read in-process (for polling with wait_for)."""
    return daemon.service.tenant_status(name)


async def raw(
    daemon: Daemon, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, str, str]:
    """A request without the fixture's default headers: (status, content type, body text)."""
    async with daemon.session.request(
        method, daemon.base + path, headers=headers or {}, **kwargs
    ) as response:
        return response.status, response.content_type, await response.text()


def assert_error(body: Any, code: str) -> None:
    assert isinstance(body, dict), body
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body


def is_poison(request_body: dict[str, Any]) -> bool:
    return bool(request_body.get("data", {}).get("poison"))


# -- 1. queue states ----------------------------------------------------------------------------


async def test_every_queue_state_in_tenant_and_daemon_status(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.always("/stalled", 503)
    daemon = await start_daemon(
        tenants={
            # Names chosen so that name order differs from the order of the states.
            "d-empty": tenant(receiver.url("/empty")),
            "a-waiting": tenant(
                receiver.url("/waiting"), batching=True, batch_size=100, batch_window=10.0
            ),
            "e-stalled": tenant(
                receiver.url("/stalled"), batching=True, batch_window=0.0, retry_base=30.0
            ),
            "c-paused": tenant(receiver.url("/paused")),
            "b-disabled": tenant(receiver.url("/disabled"), enabled=False),
        }
    )
    before = time.time()

    await daemon.ingest("d-empty", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "d-empty")["last_processed_at"] is not None)

    await daemon.ingest("a-waiting", [{"event": EVENT}, {"event": EVENT}])
    await daemon.ingest("e-stalled", [{"event": EVENT} for _ in range(3)])
    status, body = await daemon.request("POST", "/v1/tenants/c-paused/pause")
    assert (status, body["paused"]) == (200, True)
    await daemon.ingest("c-paused", [{"event": EVENT} for _ in range(4)])
    await daemon.ingest("b-disabled", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "e-stalled")["attempts"] >= 1, timeout=5)
    after = time.time()

    empty = await daemon.status("d-empty")
    assert_status_shape(empty)
    assert (empty["queue"], empty["waiting"], empty["attempts"]) == ("empty", 0, 0)
    assert empty["oldest_waiting_at"] is None
    assert empty["next_attempt_at"] is None
    assert empty["recent_failures"] == []
    assert empty["last_processed_at"] is not None
    assert before - 1 <= stamp(empty["last_processed_at"]) <= time.time() + 1
    assert isinstance(empty["seconds_since_last_processed"], float)
    assert 0 <= empty["seconds_since_last_processed"] < 10

    waiting = await daemon.status("a-waiting")
    assert_status_shape(waiting)
    assert (waiting["queue"], waiting["waiting"], waiting["batching"]) == ("waiting", 2, True)
    assert waiting["attempts"] == 0
    assert waiting["next_attempt_at"] is None
    assert waiting["oldest_waiting_at"] is not None
    assert before - 1 <= stamp(waiting["oldest_waiting_at"]) <= after + 1
    assert waiting["last_processed_at"] is None
    assert waiting["seconds_since_last_processed"] is None
    assert receiver.at("/waiting") == []  # the partial batch is being held

    stalled = await daemon.status("e-stalled")
    assert_status_shape(stalled)
    assert (stalled["queue"], stalled["waiting"]) == ("stalled", 3)
    assert stalled["attempts"] >= 1
    assert stalled["next_attempt_at"] is not None
    # retry_base 30: the next attempt is ~30 s after the failure (ISO drops the fraction).
    assert 25 <= stamp(stalled["next_attempt_at"]) - time.time() <= 31
    assert stalled["oldest_waiting_at"] is not None
    assert before - 1 <= stamp(stalled["oldest_waiting_at"]) <= after + 1
    failure = stalled["recent_failures"][0]
    assert failure["status"] == 503
    assert failure["error"] == "HTTP 503"
    assert failure["attempt"] == 1
    assert (failure["first_sequence"], failure["last_sequence"], failure["count"]) == (1, 3, 3)
    assert failure["duration_ms"] >= 0
    assert before - 1 <= stamp(failure["at"]) <= after + 1

    paused = await daemon.status("c-paused")
    assert_status_shape(paused)
    assert (paused["queue"], paused["waiting"], paused["paused"]) == ("paused", 4, True)
    assert paused["next_attempt_at"] is None
    assert paused["oldest_waiting_at"] is not None

    disabled = await daemon.status("b-disabled")
    assert_status_shape(disabled)
    assert (disabled["queue"], disabled["waiting"], disabled["enabled"]) == ("disabled", 0, False)
    assert disabled["next_attempt_at"] is None

    status, everything = await daemon.request("GET", "/v1/status")
    assert status == 200
    assert set(everything) >= {"tenants", "totals"}
    names = [t["tenant"] for t in everything["tenants"]]
    assert names == ["a-waiting", "b-disabled", "c-paused", "d-empty", "e-stalled"]
    for one in everything["tenants"]:
        assert_status_shape(one)
    assert {t["tenant"]: t["queue"] for t in everything["tenants"]} == {
        "a-waiting": "waiting",
        "b-disabled": "disabled",
        "c-paused": "paused",
        "d-empty": "empty",
        "e-stalled": "stalled",
    }
    totals = everything["totals"]
    assert totals["tenants"] == 5
    assert totals["stalled"] == 1
    for state in ("paused", "disabled"):
        assert totals[state] == 1, (state, totals)
    assert totals["orphaned"] == 0
    # Tenants per queue state, every state present.
    assert totals["queues"] == {
        "empty": 1,
        "waiting": 1,
        "stalled": 1,
        "paused": 1,
        "disabled": 1,
        "orphaned": 0,
    }
    # "waiting" in totals is the webhooks waiting across tenants (as in the systemd status
    # line, "N tenants, N waiting, N stalled"), the sum of each tenant's `waiting`.
    assert sum(t["waiting"] for t in everything["tenants"]) == 2 + 3 + 4
    assert totals["waiting"] == 2 + 3 + 4, totals


async def test_removed_tenant_is_orphaned_keeps_its_queue_and_resumes_when_added_back(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    tenants = {
        "acme": tenant(receiver.url("/acme"), retry_base=0.2),
        "other": tenant(receiver.url("/other")),
    }
    receiver.always("/acme", 503)
    path = write_config(tmp_path, tenants)
    daemon = await start_daemon(path)
    items = [{"event": EVENT, "id": f"w{n}", "data": {"n": n}} for n in range(3)]
    await daemon.ingest("acme", items)
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] >= 1, timeout=5)

    write_config(tmp_path, {"other": tenants["other"]}, daemon=_daemon_table(daemon))
    assert await daemon.service.reload() is True

    worker = daemon.service.workers["acme"]
    await wait_for(lambda: worker.in_flight is None, timeout=5)
    sent = len(receiver.at("/acme"))

    orphaned = await daemon.status("acme")
    assert_status_shape(orphaned)
    assert (orphaned["queue"], orphaned["waiting"]) == ("orphaned", 3)
    status, everything = await daemon.request("GET", "/v1/status")
    assert status == 200
    assert [t["tenant"] for t in everything["tenants"]] == ["acme", "other"]
    assert everything["tenants"][0]["queue"] == "orphaned"
    assert everything["totals"]["orphaned"] == 1
    assert everything["totals"]["waiting"] == 3
    status, peeked = await daemon.request("GET", "/v1/tenants/acme/webhooks?limit=10")
    assert status == 200
    assert [w["id"] for w in peeked["webhooks"]] == ["w0", "w1", "w2"]
    # Not configured: ingest is refused, and nothing is attempted (short negative check).
    await daemon.ingest("acme", {"event": EVENT}, expect=404)
    await asyncio.sleep(0.6)
    assert len(receiver.at("/acme")) == sent

    receiver.always("/acme", 200)
    write_config(tmp_path, tenants, daemon=_daemon_table(daemon))
    assert await daemon.service.reload() is True
    await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 3, timeout=5)
    await wait_for(lambda: state_of(daemon, "acme")["waiting"] == 0, timeout=5)
    assert receiver.sequences("/acme") == [1, 2, 3]
    assert [r.json["id"] for r in receiver.at("/acme", ok_only=True)] == ["w0", "w1", "w2"]
    resumed = await daemon.status("acme")
    assert (resumed["queue"], resumed["waiting"], resumed["attempts"]) == ("empty", 0, 0)


def _daemon_table(daemon: Daemon) -> dict[str, Any]:
    """The [daemon] keys of a running in-process daemon, so a rewritten file keeps them."""
    d = daemon.service.config.daemon
    return {"database": str(d.database), "listen": f"{d.listen_host}:{d.listen_port}"}


# -- 2. retry -----------------------------------------------------------------------------------


async def test_retry_during_a_long_backoff_attempts_at_once_and_keeps_counting(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.always("/acme", 503)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=30.0)})
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 1, timeout=5)

    posted = time.monotonic()
    status, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert status == 200
    assert body["retrying"] is True
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=3)
    took = receiver.at("/acme")[1].at - posted
    # docs/delivery.md#retries-and-backoff: within 100 ms; up to 300 ms tolerated on a loaded
    # machine, never the 30 s backoff.
    assert took < 0.3, took

    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 2, timeout=3)
    after = await daemon.status("acme")
    assert after["queue"] == "stalled"
    assert [f["attempt"] for f in after["recent_failures"]] == [2, 1]
    # attempts was not reset: the second failure backs off 30 × 2 = 60 s.
    assert 55 <= stamp(after["next_attempt_at"]) - time.time() <= 61


async def test_retry_answers_the_state_it_leaves_not_the_one_it_found(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """Right after "retry", a stalled tenant is no longer in backoff: the answer says
    `waiting` with the next attempt now, not `stalled` with the old backoff's time."""
    receiver.always("/acme", 503)
    daemon = await start_daemon(
        tenants={
            "acme": tenant(receiver.url("/acme"), retry_base=30.0),
            "held": tenant(receiver.url("/held")),
            "idle": tenant(receiver.url("/idle")),
        }
    )
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 1, timeout=5)
    found = await daemon.status("acme")
    assert found["queue"] == "stalled"
    assert stamp(found["next_attempt_at"]) - time.time() > 20

    asked = time.time()
    status, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert status == 200, body
    assert {k: body[k] for k in ("tenant", "retrying", "queue", "waiting", "attempts")} == {
        "tenant": "acme",
        "retrying": True,
        "queue": "waiting",
        "waiting": 1,
        "attempts": 1,
    }
    assert abs(stamp(body["next_attempt_at"]) - asked) <= 2, body
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 2, timeout=5)
    assert state_of(daemon, "acme")["queue"] == "stalled"  # that attempt failed too

    # Nothing to retry: the answer is the state as it is.
    status, _ = await daemon.request("POST", "/v1/tenants/held/pause")
    await daemon.ingest("held", {"event": EVENT})
    for name, queue in (("held", "paused"), ("idle", "empty")):
        status, body = await daemon.request("POST", f"/v1/tenants/{name}/retry")
        assert status == 200, body
        assert (body["retrying"], body["queue"], body["next_attempt_at"]) == (False, queue, None)


async def test_a_retry_during_an_attempt_does_not_outlive_a_pause(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """Retry asked while an attempt is in flight, then pause before it fails: the failure
    backs off as usual, so resuming within the backoff does not send at once."""
    release = asyncio.Event()

    async def held_then_503(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=503)

    receiver.script("/acme", held_then_503)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=30.0)})
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: daemon.service.workers["acme"].in_flight, timeout=5)
    status, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert (status, body["retrying"]) == (200, True)
    status, _ = await daemon.request("POST", "/v1/tenants/acme/pause")
    assert status == 200
    release.set()
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 1, timeout=5)
    paused = await daemon.status("acme")
    assert 25 <= stamp(paused["next_attempt_at"]) - time.time() <= 31, paused

    status, _ = await daemon.request("POST", "/v1/tenants/acme/resume")
    assert status == 200
    resumed = await daemon.status("acme")
    assert (resumed["queue"], resumed["attempts"]) == ("stalled", 1)
    assert len(receiver.at("/acme")) == 1


async def test_retry_all_retries_every_waiting_tenant(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/s1", 503)
    receiver.script("/s2", 503)
    daemon = await start_daemon(
        tenants={
            "s1": tenant(receiver.url("/s1"), retry_base=30.0),
            "s2": tenant(receiver.url("/s2"), retry_base=30.0),
            "w": tenant(receiver.url("/w"), batching=True, batch_window=10.0),
            "p": tenant(receiver.url("/p")),
            "e": tenant(receiver.url("/e")),
            "d": tenant(receiver.url("/d"), enabled=False),
        }
    )
    await daemon.request("POST", "/v1/tenants/p/pause")
    for name in ("s1", "s2", "w", "p"):
        await daemon.ingest(name, {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "s1")["attempts"] == 1, timeout=5)
    await wait_for(lambda: state_of(daemon, "s2")["attempts"] == 1, timeout=5)
    assert state_of(daemon, "w")["queue"] == "waiting"

    posted = time.monotonic()
    status, body = await daemon.request("POST", "/v1/retry")
    assert status == 200
    assert sorted(body["retrying"]) == ["s1", "s2", "w"]
    assert body["count"] == 3
    await wait_for(
        lambda: all(receiver.at(f"/{n}", ok_only=True) for n in ("s1", "s2", "w")), timeout=3
    )
    for name in ("s1", "s2", "w"):
        assert receiver.at(f"/{name}", ok_only=True)[0].at - posted < 1.0, name
    assert receiver.at("/p") == []
    assert receiver.at("/e") == []
    # The 200 is recorded just after it arrives.
    await wait_for(
        lambda: all(state_of(daemon, n)["queue"] == "empty" for n in ("s1", "s2", "w")),
        timeout=3,
    )
    assert state_of(daemon, "p")["queue"] == "paused"


# -- subprocess helpers -------------------------------------------------------------------------


async def run_cli(
    *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`python -m webhookd ARGS` without blocking the loop the receiver runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "webhookd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Remote:
    """An HTTP client for a subprocess daemon."""

    def __init__(self, process: Process, session: aiohttp.ClientSession) -> None:
        self.process = process
        self.session = session
        token = process.config.daemon.api_token.reveal()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await self.call("GET", path, **kwargs)

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(
            method, self.process.base + path, headers=headers, **kwargs
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def status(self, name: str) -> dict[str, Any]:
        status, body = await self.get(f"/v1/tenants/{name}/status")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def until(
        self, name: str, condition: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(name)
            if condition(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: condition not met within {timeout}s: {status}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start_process(
    process_factory: Callable[..., Process], path: Path, session: aiohttp.ClientSession
) -> Remote:
    process = process_factory(path)
    await asyncio.to_thread(process.start)
    return Remote(process, session)


async def test_cli_retry_tenant_and_all_against_a_subprocess(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    receiver.script("/a", 503)
    receiver.script("/b", 503)
    path = write_config(
        tmp_path,
        {"a": tenant(receiver.url("/a")), "b": tenant(receiver.url("/b"))},
        delivery={"retry_base": 30.0},
    )
    remote = await start_process(process_factory, path, session)
    await remote.call("POST", "/v1/tenants/a/webhooks", json={"event": EVENT})
    await remote.call("POST", "/v1/tenants/b/webhooks", json={"event": EVENT})
    await remote.until("a", lambda s: s["attempts"] == 1)
    await remote.until("b", lambda s: s["attempts"] == 1)

    code, out, err = await run_cli("retry", "a", "-c", str(path))
    assert (code, err) == (0, ""), err
    assert out.strip() == "a: retrying now (1 waiting, 1 failed attempt so far)"
    await wait_for(lambda: receiver.at("/a", ok_only=True), timeout=5)
    await remote.until("a", lambda s: s["waiting"] == 0)
    assert receiver.at("/b", ok_only=True) == []  # only the named tenant was retried

    code, out, err = await run_cli("retry", "--all", "-c", str(path))
    assert (code, err) == (0, ""), err
    assert out.strip() == "retrying 1 tenant: b"
    await wait_for(lambda: receiver.at("/b", ok_only=True), timeout=5)
    await remote.until("b", lambda s: s["waiting"] == 0)

    code, out, _ = await run_cli("retry", "--all", "-c", str(path))
    assert (code, out.strip()) == (0, "retrying 0 tenants: -")
    code, out, _ = await run_cli("retry", "a", "-c", str(path))
    assert (code, out.strip()) == (0, "a: nothing to retry (empty)")
    code, _, err = await run_cli("retry", "-c", str(path))
    assert code == 2
    assert "TENANT" in err


async def test_cli_pause_peek_skip_parked_requeue_resume_against_a_subprocess(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    """The walk-through's steps by name: hold a tenant, look at the head, park it, list
    what is parked, put it back at the tail, let it flow again."""
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    remote = await start_process(process_factory, path, session)

    async def run(*args: str) -> str:
        code, out, err = await run_cli(*args, "-c", str(path))
        assert (code, err) == (0, ""), (args, err)
        return out

    assert await run("pause", "acme") == "acme: paused\n"
    for n in (1, 2):
        await remote.call(
            "POST", "/v1/tenants/acme/webhooks", json={"event": EVENT, "id": f"p/{n}"}
        )
    head = json.loads(await run("peek", "acme", "--limit", "1"))
    assert [(w["id"], w["sequence"]) for w in head["webhooks"]] == [("p/1", 1)]
    assert await run("skip", "acme") == "acme: parked id p/1 sequence 1\n"
    assert [w["id"] for w in json.loads(await run("parked", "acme"))["parked"]] == ["p/1"]
    assert await run("requeue", "acme", "p/1") == "acme: requeued id p/1 as sequence 3\n"
    assert await run("resume", "acme") == "acme: resumed\n"
    await wait_for(lambda: receiver.sequences("/acme") == [2, 3], timeout=5)
    assert [r.json["id"] for r in receiver.at("/acme")] == ["p/2", "p/1"]
    code, _, err = await run_cli("skip", "acme", "-c", str(path))  # nothing left to park
    assert (code, err) == (1, "error: acme has no webhook waiting to skip\n")


# -- 3. recent failures -------------------------------------------------------------------------


async def test_recent_failures_are_capped_newest_first_and_refresh_clears_them(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.always("/ten", 503)
    receiver.always("/three", 503)
    # Fail fast and steadily: 10 ms between attempts from the first one on.
    fast = {"retry_base": 0.01, "retry_doublings": 0, "retry_after_doublings": 0.01}
    daemon = await start_daemon(
        tenants={
            "ten": tenant(receiver.url("/ten"), **fast),
            "three": tenant(receiver.url("/three"), recent_failures=3, **fast),
        }
    )
    await daemon.ingest("ten", {"event": EVENT})
    await daemon.ingest("three", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "ten")["attempts"] >= 13, timeout=10)
    await wait_for(lambda: state_of(daemon, "three")["attempts"] >= 5, timeout=10)
    for name in ("ten", "three"):
        status, body = await daemon.request("POST", f"/v1/tenants/{name}/pause")
        assert status == 200
        worker = daemon.service.workers[name]
        await wait_for(lambda w=worker: w.in_flight is None, timeout=5)  # type: ignore[misc]

    for name, cap in (("ten", 10), ("three", 3)):
        shown = await daemon.status(name)
        assert_status_shape(shown)
        attempts = [f["attempt"] for f in shown["recent_failures"]]
        newest = shown["attempts"]
        assert attempts == list(range(newest, newest - cap, -1)), (name, attempts)
        assert all(f["status"] == 503 for f in shown["recent_failures"])
        stamps = [stamp(f["at"]) for f in shown["recent_failures"]]
        assert stamps == sorted(stamps, reverse=True)

    status, body = await daemon.request("POST", "/v1/tenants/ten/refresh")
    assert status == 200
    assert body["cleared"] == 10
    cleared = await daemon.status("ten")
    assert cleared["recent_failures"] == []
    assert cleared["attempts"] >= 13  # refresh clears the list, not the backoff
    assert cleared["queue"] == "paused"
    assert (await daemon.status("three"))["recent_failures"] != []
    status, body = await daemon.request("POST", "/v1/tenants/ten/refresh")
    assert (status, body["cleared"]) == (200, 0)


@pytest.mark.usefixtures("restore_structlog")
async def test_lowering_recent_failures_by_reload_keeps_the_newest_failures(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """An operator lowers `recent_failures` (5 -> 2) and reloads (SIGHUP) while a tenant is
    stalled; the same happens when a PUT lowers it or an orphan comes back with a lower one.

    docs/http-api.md / README status fields: `recent_failures` is newest first, at most
    `recent_failures` entries ("the 10 most recent failures"). The shortened list keeps the
    newest: rebuilding the newest-first deque as `deque(old, maxlen=n)` would keep its LAST
    n items, the oldest failures, and the status would show attempts [2, 1] instead of
    [5, 4], disagreeing with the database (which keeps the newest, as a restart shows).
    """
    receiver.always("/acme", 503)
    backoff = {"retry_base": 0.02, "retry_doublings": 1, "retry_after_doublings": 0.02}
    acme = tenant(receiver.url("/acme"), recent_failures=5, **backoff)
    path = write_config(tmp_path, {"acme": acme})
    daemon = await start_daemon(path)
    worker = daemon.service.workers["acme"]
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: worker.row.attempts >= 5)
    status, _ = await daemon.request("POST", "/v1/tenants/acme/pause")  # no more attempts
    assert status == 200
    await wait_for(lambda: worker.in_flight is None)
    before = [f["attempt"] for f in (await daemon.status("acme"))["recent_failures"]]
    assert before == sorted(before, reverse=True) and len(before) == 5, before

    lowered = {**acme, "recent_failures": 2}
    write_config(tmp_path, {"acme": lowered}, daemon=_daemon_table(daemon))
    assert await daemon.service.reload() is True
    after = [f["attempt"] for f in (await daemon.status("acme"))["recent_failures"]]
    assert after == before[:2], f"newest two were {before[:2]}, status shows {after}"


async def test_paused_flag_and_failures_survive_a_restart(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    receiver.always("/acme", 503)
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"), retry_base=30.0)})
    remote = await start_process(process_factory, path, session)
    await remote.call("POST", "/v1/tenants/acme/webhooks", json={"event": EVENT})
    await remote.until("acme", lambda s: s["attempts"] == 1)
    status, _ = await remote.call("POST", "/v1/tenants/acme/retry")
    assert status == 200
    await remote.until("acme", lambda s: s["attempts"] == 2)
    status, _ = await remote.call("POST", "/v1/tenants/acme/pause")
    assert status == 200
    before = await remote.status("acme")
    assert (before["queue"], before["paused"], before["waiting"]) == ("paused", True, 1)
    assert [f["attempt"] for f in before["recent_failures"]] == [2, 1]

    assert await asyncio.to_thread(remote.process.terminate) == 0
    sent = len(receiver.at("/acme"))
    again = await start_process(process_factory, path, session)
    after = await again.status("acme")
    assert_status_shape(after)
    assert (after["queue"], after["paused"], after["waiting"]) == ("paused", True, 1)
    assert after["attempts"] == 2
    assert after["recent_failures"] == before["recent_failures"]
    await asyncio.sleep(0.3)  # negative check: paused, nothing is sent after the restart
    assert len(receiver.at("/acme")) == sent


# -- 4. skip, parked, requeue, peek -------------------------------------------------------------


async def test_skip_parks_the_poison_head_and_requeue_puts_it_at_the_tail(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    accept_poison = False

    async def refuse_poison(request: web.Request) -> web.Response:
        body = await request.json()
        if is_poison(body) and not accept_poison:
            return web.Response(status=400, text="cannot take this one")
        return web.Response(text="ok")

    receiver.always("/acme", refuse_poison)
    secret = "skip-secret-4b1d9e"
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/acme"), secret=secret, retry_base=30.0)}
    )
    status, body = await daemon.request("POST", "/v1/tenants/acme/skip")
    assert status == 409, body
    assert_error(body, "conflict")

    await daemon.ingest(
        "acme",
        [
            {"event": EVENT, "data": {"n": 1}},
            {"event": EVENT, "id": "poison-1", "data": {"n": 2, "poison": True}},
            {"event": EVENT, "data": {"n": 3}},
            {"event": EVENT, "data": {"n": 4}},
        ],
    )
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 1, timeout=5)
    stuck = await daemon.status("acme")
    assert (stuck["queue"], stuck["waiting"]) == ("stalled", 3)
    assert stuck["recent_failures"][0]["status"] == 400
    assert stuck["recent_failures"][0]["first_sequence"] == 2

    status, body = await daemon.request("POST", "/v1/tenants/acme/skip")
    assert status == 200, body
    assert body["parked"] == {"id": "poison-1", "sequence": 2}
    await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 3, timeout=3)
    await wait_for(lambda: state_of(daemon, "acme")["waiting"] == 0, timeout=3)
    # The rest flowed in order; sequence 2 is the visible gap.
    assert receiver.sequences("/acme") == [1, 3, 4]
    flowed = await daemon.status("acme")
    assert (flowed["queue"], flowed["waiting"], flowed["attempts"]) == ("empty", 0, 0)
    assert flowed["next_attempt_at"] is None

    status, body = await daemon.request("POST", "/v1/tenants/acme/skip")
    assert status == 409, body
    assert_error(body, "conflict")

    code, content_type, text = await raw(
        daemon, "GET", "/v1/tenants/acme/parked", headers=daemon.headers
    )
    assert (code, content_type) == (200, "application/json")
    assert secret not in text
    status, body = await daemon.request("GET", "/v1/tenants/acme/parked")
    assert status == 200
    assert [(p["id"], p["sequence"]) for p in body["parked"]] == [("poison-1", 2)]
    assert body["parked"][0]["data"] == {"n": 2, "poison": True}
    assert body["parked"][0]["event"] == EVENT

    # Requeue while paused, behind a newer webhook, to see where it lands.
    await daemon.request("POST", "/v1/tenants/acme/pause")
    await daemon.ingest("acme", {"event": EVENT, "data": {"n": 5}})
    status, body = await daemon.request("POST", "/v1/tenants/acme/parked/poison-1/requeue")
    assert status == 200, body
    assert (body["id"], body["sequence"]) == ("poison-1", 6)
    status, body = await daemon.request("GET", "/v1/tenants/acme/webhooks?limit=10")
    assert status == 200
    assert [(w["sequence"], w["id"]) for w in body["webhooks"]][1:] == [(6, "poison-1")]
    assert body["webhooks"][1]["data"] == {"n": 2, "poison": True}
    status, body = await daemon.request("GET", "/v1/tenants/acme/parked")
    assert (status, body["parked"]) == (200, [])

    for unknown in ("poison-1", "never-seen"):
        status, body = await daemon.request("POST", f"/v1/tenants/acme/parked/{unknown}/requeue")
        assert status == 404, (unknown, body)
        assert_error(body, "not_found")

    accept_poison = True
    await daemon.request("POST", "/v1/tenants/acme/resume")
    await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 5, timeout=3)
    assert receiver.sequences("/acme") == [1, 3, 4, 5, 6]
    last = receiver.at("/acme", ok_only=True)[-1].json
    assert (last["id"], last["data"]) == ("poison-1", {"n": 2, "poison": True})


async def test_peek_shows_the_head_in_order_without_the_secret(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    secret = "peek-secret-7c3a51"
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), secret=secret)})
    await daemon.request("POST", "/v1/tenants/acme/pause")
    await daemon.ingest(
        "acme", [{"event": EVENT, "id": f"id-{n}", "data": {"n": n}} for n in range(15)]
    )

    code, content_type, text = await raw(
        daemon, "GET", "/v1/tenants/acme/webhooks?limit=4", headers=daemon.headers
    )
    assert (code, content_type) == (200, "application/json")
    assert secret not in text
    status, body = await daemon.request("GET", "/v1/tenants/acme/webhooks?limit=4")
    assert status == 200
    webhooks = body["webhooks"]
    assert [w["sequence"] for w in webhooks] == [1, 2, 3, 4]
    assert [w["id"] for w in webhooks] == ["id-0", "id-1", "id-2", "id-3"]
    assert [w["data"] for w in webhooks] == [{"n": n} for n in range(4)]
    assert all(w["event"] == EVENT and "secret" not in w for w in webhooks)

    status, body = await daemon.request("GET", "/v1/tenants/acme/webhooks")
    assert status == 200
    assert [w["sequence"] for w in body["webhooks"]] == list(range(1, 11))  # default 10
    status, body = await daemon.request("GET", "/v1/tenants/acme/webhooks?limit=1000")
    assert status == 200
    assert len(body["webhooks"]) == 15
    # Peeking takes nothing off the queue.
    assert (await daemon.status("acme"))["waiting"] == 15

    for bad in ("0", "1001", "x", "-1", "2.5", ""):
        status, body = await daemon.request("GET", f"/v1/tenants/acme/webhooks?limit={bad}")
        assert status == 400, (bad, body)
        assert_error(body, "bad_request")


# -- 5. access ----------------------------------------------------------------------------------

TOKEN = "tok-e41f0c9a7b"

PROTECTED: list[tuple[str, str, Any]] = [
    ("GET", "/v1/status", None),
    ("GET", "/v1/tenants/acme/status", None),
    ("POST", "/v1/tenants/acme/webhooks", {"event": EVENT}),
    ("GET", "/v1/tenants/acme/webhooks", None),
    ("POST", "/v1/tenants/acme/retry", None),
    ("POST", "/v1/retry", None),
    ("POST", "/v1/tenants/acme/refresh", None),
    ("POST", "/v1/tenants/acme/pause", None),
    ("POST", "/v1/tenants/acme/resume", None),
    ("POST", "/v1/tenants/acme/skip", None),
    ("GET", "/v1/tenants/acme/parked", None),
    ("POST", "/v1/tenants/acme/parked/x/requeue", None),
    ("GET", "/v1/tenants", None),
    ("GET", "/v1/tenants/acme", None),
    ("PUT", "/v1/tenants/newone", {"endpoint": "http://127.0.0.1:9/x", "events": ["*"]}),
    ("DELETE", "/v1/tenants/acme", None),
    ("GET", "/metrics", None),
    ("GET", "/no/such/path", None),
]


async def test_api_token_guards_every_path_but_healthz(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    path = write_config(
        tmp_path, {"acme": tenant(receiver.url("/acme"))}, daemon={"api_token": TOKEN}
    )
    daemon = await start_daemon(path)
    bodies: list[str] = []
    refusals = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer{TOKEN}"},
    ]
    for method, route, body in PROTECTED:
        for headers in refusals:
            code, content_type, text = await raw(daemon, method, route, headers, json=body)
            assert code == 401, (method, route, headers, code, text)
            assert content_type == "application/json", (method, route)
            assert_error(json.loads(text), "unauthorized")
            bodies.append(text)
    # Nothing the refused calls asked for happened.
    acme = await daemon.status("acme")
    assert (acme["paused"], acme["waiting"]) == (False, 0)
    assert "newone" not in daemon.service.config.tenants

    for headers in refusals:
        code, _, text = await raw(daemon, "GET", "/healthz", headers)
        assert code == 200, (headers, text)
        bodies.append(text)

    # The scheme is case-insensitive (RFC 9110 §11.1).
    for scheme in ("bearer", "BEARER"):
        code, _, text = await raw(
            daemon, "GET", "/v1/status", {"Authorization": f"{scheme} {TOKEN}"}
        )
        assert code == 200, (scheme, text)
    authorised = {"Authorization": f"Bearer {TOKEN}"}
    for method, route in (
        ("GET", "/v1/status"),
        ("GET", "/v1/status?format=text"),
        ("GET", "/v1/tenants/acme/status"),
        ("GET", "/v1/tenants/acme/status?format=text"),
        ("GET", "/v1/tenants"),
        ("GET", "/v1/tenants/acme"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/v1/tenants/nobody/status"),
        ("GET", "/no/such/path"),
    ):
        code, _, text = await raw(daemon, method, route, authorised)
        assert code != 401, (route, text)
        bodies.append(text)
    for text in bodies:
        assert TOKEN not in text


async def test_non_loopback_listen_without_token_is_refused(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {"acme": tenant("http://127.0.0.1:9/acme")},
        daemon={"listen": f"0.0.0.0:{free_port()}"},
    )
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(path)
    assert any("api_token" in error for error in caught.value.errors), caught.value.errors

    code, out, err = await run_cli("run", "-c", str(path), timeout=20)
    assert code == 1, (out, err)
    assert "api_token" in err


async def test_a_two_line_api_token_file_never_shows_the_token(
    tmp_path: Path, process_factory: Callable[..., Process]
) -> None:
    """docs/cli.md#common-rules: "Secrets and tokens never appear in logs, errors or status
    output." README (Configuration): a secret is refused when it holds a control character ("a line
    break from a two-line secret file, say"), because it travels as a header value.

    An operator writes the token file with two lines (a pasted token wrapped in two, or
    `echo $OLD >> api.token` while rotating). Taken as it is, the daemon would start, and
    `webhookd status -c config.toml` would die with a traceback ending `ValueError: Invalid
    header value b'Bearer <token>'`: the whole API token, printed to the terminal (and to
    whatever captures it: CI logs, a ticket). No client could ever send that token either,
    so the config refuses it; whatever happens, the token shows nowhere.
    """
    first, second = "tok-" + token_hex(12), "tok-" + token_hex(12)
    token_file = tmp_path / "api.token"
    token_file.write_text(f"{first}\n{second}\n")
    token_file.chmod(0o600)
    config = write_config(tmp_path, {}, daemon={"api_token_file": "api.token"})

    outputs = {}
    code, out, err = await run_cli("check", "-c", str(config))
    outputs["check"] = out + err
    if code == 0:  # accepted: then the daemon runs with it
        process = process_factory(config)
        await asyncio.to_thread(process.start)
        _, out, err = await run_cli("status", "-c", str(config))
        outputs["status"] = out + err
        outputs["daemon log"] = process.log()
    leaks = [
        f"{part} in {where}: {text!r}"
        for where, text in outputs.items()
        for part in (first, second)
        if part in text
    ]
    assert not leaks, leaks


@pytest.mark.parametrize(
    "token",
    ["tok-5f0c2a9e71d4b6 ", "tök-5f0c2a9e71d4b6"],
    ids=["trailing-space", "non-ascii"],
)
async def test_the_cli_can_use_the_api_token_the_config_accepts(
    tmp_path: Path, process_factory: Callable[..., Process], token: str
) -> None:
    """README (Command line): "The client commands read `listen` and `api_token` from the same
    config file the daemon uses." docs/configuration.md#validation: bad values are errors that stop
    startup; README: `webhookd check` validates a file.

    An operator writes `api_token = "…"` inline with a trailing space (a paste) or with a
    non-ASCII letter. If `check` said OK and the daemon started, `webhookd status` (and
    every other client command) would get `HTTP 401` from its own daemon: the API strips the
    token it is sent, and urllib sends the header as Latin-1 while the daemon compares UTF-8
    bytes. So either the config refuses the token, naming the key, or the CLI can use it.
    """
    config = write_config(tmp_path, {}, daemon={"api_token": token})
    code, _, err = await run_cli("check", "-c", str(config))
    if code != 0:  # refused with a key path: fine
        assert f"{config}: daemon.api_token:" in err, err
        return
    process = process_factory(config)
    await asyncio.to_thread(process.start)
    code, _, err = await run_cli("status", "-c", str(config))
    assert code == 0, f"check accepted the token, but the CLI cannot use it: {err}"


# -- 6. metrics ---------------------------------------------------------------------------------


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample values of one sample name, keyed by their sorted labels."""
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text, name).get(tuple(sorted(labels.items())))


@pytest.mark.parametrize(
    ("durations_ms", "expected"),
    [
        # A duration exactly on a bound counts in that bucket (Prometheus "le").
        ([4.0, 5.0, 10.0, 10.1, 999.0, 40_000.0], {"0.005": 2, "0.01": 3, "0.025": 4, "1.0": 5}),
        ([], {"0.005": 0, "30.0": 0}),
    ],
)
def test_duration_histogram_buckets_are_cumulative(
    durations_ms: list[float], expected: dict[str, int]
) -> None:
    # A service with no tenants: only the counters and the histogram have samples.
    service = SimpleNamespace(
        store=SimpleNamespace(disk_full=False, history_dropped=0),
        clock=Clock(),
        history_seen=HistorySize(0, 0, 0),
        visible_workers=list,
        connections=None,
        cluster=None,
        problem=None,
    )
    metrics = Metrics(cast(Any, service))
    for duration in durations_ms:
        metrics.attempted("t", [], Outcome(True, 200, None, duration))
    text = metrics.render().decode()
    buckets = samples(text, "webhookd_delivery_duration_seconds_bucket")
    for bound, count in expected.items():
        assert buckets[(("le", bound),)] == count, (bound, buckets)
    assert buckets[(("le", "+Inf"),)] == len(durations_ms)
    assert value(text, "webhookd_delivery_duration_seconds_count") == len(durations_ms)
    assert value(text, "webhookd_delivery_duration_seconds_sum") == pytest.approx(
        sum(durations_ms) / 1000
    )


async def test_metrics_in_prometheus_format(receiver: Receiver, start_daemon: StartDaemon) -> None:
    receiver.script("/flaky", 503)
    receiver.always("/dead", 503)
    secrets = {"ok": "ok-secret-19ab", "flaky": "flaky-secret-28cd", "dead": "dead-secret-37ef"}
    daemon = await start_daemon(
        tenants={
            "ok": tenant(receiver.url("/ok"), secret=secrets["ok"], events=[EVENT]),
            "flaky": tenant(receiver.url("/flaky"), secret=secrets["flaky"], retry_base=0.05),
            "dead": tenant(receiver.url("/dead"), secret=secrets["dead"], retry_base=30.0),
            "off": tenant(receiver.url("/off"), enabled=False),
        }
    )
    await daemon.ingest(
        "ok",
        [
            {"event": EVENT, "id": "a"},
            {"event": EVENT, "id": "b"},
            {"event": EVENT, "id": "c"},
            {"event": EVENT, "id": "a"},
            {"event": "TASK_CREATED"},
        ],
    )
    await daemon.ingest("flaky", {"event": EVENT})
    await daemon.ingest("dead", [{"event": EVENT}, {"event": EVENT}])
    await daemon.ingest("off", {"event": EVENT})
    # Each 200 is recorded (and counted) just after the receiver has answered it.
    await wait_for(lambda: len(receiver.at("/ok", ok_only=True)) == 3, timeout=5)
    await wait_for(lambda: len(receiver.at("/flaky", ok_only=True)) == 1, timeout=5)
    await wait_for(lambda: state_of(daemon, "ok")["waiting"] == 0, timeout=5)
    await wait_for(lambda: state_of(daemon, "flaky")["waiting"] == 0, timeout=5)
    await wait_for(lambda: state_of(daemon, "dead")["attempts"] == 1, timeout=5)

    code, content_type, text = await raw(daemon, "GET", "/metrics")
    assert code == 200
    assert content_type == "text/plain"
    for secret in secrets.values():
        assert secret not in text
    list(text_string_to_metric_families(text))  # parses

    depth = samples(text, "webhookd_queue_depth")
    assert depth == {
        (("tenant", "dead"),): 2.0,
        (("tenant", "flaky"),): 0.0,
        (("tenant", "off"),): 0.0,
        (("tenant", "ok"),): 0.0,
    }
    oldest = samples(text, "webhookd_oldest_waiting_seconds")
    assert set(oldest) == set(depth)
    assert 0 <= oldest[(("tenant", "dead"),)] < 30
    assert oldest[(("tenant", "ok"),)] == 0

    assert value(text, "webhookd_deliveries_total", tenant="ok", outcome="success") == 3
    assert value(text, "webhookd_deliveries_total", tenant="ok", outcome="failure") in (None, 0)
    assert value(text, "webhookd_deliveries_total", tenant="flaky", outcome="success") == 1
    assert value(text, "webhookd_deliveries_total", tenant="flaky", outcome="failure") == 1
    assert value(text, "webhookd_deliveries_total", tenant="dead", outcome="failure") == 1
    assert value(text, "webhookd_deliveries_total", tenant="dead", outcome="success") in (None, 0)

    assert value(text, "webhookd_webhooks_delivered_total", tenant="ok") == 3
    assert value(text, "webhookd_webhooks_delivered_total", tenant="flaky") == 1

    assert value(text, "webhookd_delivery_duration_seconds_count") == 6
    buckets = samples(text, "webhookd_delivery_duration_seconds_bucket")
    assert buckets[(("le", "+Inf"),)] == 6
    assert (value(text, "webhookd_delivery_duration_seconds_sum") or 0) > 0

    assert value(text, "webhookd_ingested_total", tenant="ok", status="queued") == 3
    assert value(text, "webhookd_ingested_total", tenant="ok", status="duplicate") == 1
    assert value(text, "webhookd_ingested_total", tenant="ok", status="not_subscribed") == 1
    assert value(text, "webhookd_ingested_total", tenant="dead", status="queued") == 2
    assert value(text, "webhookd_ingested_total", tenant="off", status="disabled") == 1

    attempts = samples(text, "webhookd_backoff_attempts")
    assert attempts[(("tenant", "dead"),)] == 1
    assert attempts[(("tenant", "ok"),)] == 0

    # The history: ok's 3 and flaky's 1 delivered webhooks, nothing pruned or dropped yet.
    assert value(text, "webhookd_history_records") == 4
    assert (value(text, "webhookd_history_bytes") or 0) > 0
    assert value(text, "webhookd_history_pruned_total", reason="age") == 0
    assert value(text, "webhookd_history_pruned_total", reason="size") == 0
    assert value(text, "webhookd_history_dropped_total") == 0
    assert value(text, "webhookd_ids_forgotten_total") == 0
    code, shown = await daemon.request("GET", "/v1/status")
    assert code == 200
    assert shown["totals"]["history_records"] == 4
    assert shown["totals"]["history_bytes"] == value(text, "webhookd_history_bytes")
    # The health check /healthz runs, made for the scrape; the ingest calls above, all 202.
    assert value(text, "webhookd_healthy") == 1
    assert value(text, "webhookd_disk_full") == 0
    assert samples(text, "webhookd_ingest_responses_total") == {(("code", "202"),): 4}
    # The process's own: a restart shows as a new start time. In-process, that process is
    # the test run's, which may have started many minutes before this test (the whole
    # suite runs in it): a time in the past, but the same day, not zero or the epoch.
    assert 0 < time.time() - (value(text, "process_start_time_seconds") or 0) < 86400


async def test_metrics_count_ingest_answers_by_status(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """Every answer ingest gives is counted by its status, refusals included: those of the
    handler, those of the `Expect: 100-continue` check before the body is sent, and the 503
    of a daemon on its way down (what the 5xx alert watches)."""
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    await daemon.ingest("acme", {"event": EVENT})
    await daemon.ingest("acme", [{"event": EVENT}, {"event": EVENT}])
    await daemon.ingest("nobody", {"event": EVENT}, expect=404)
    status, _ = await daemon.request(
        "POST",
        "/v1/tenants/acme/webhooks",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    # Refused before the body is sent: a 404 by the Expect check, not the handler.
    async with daemon.session.post(
        f"{daemon.base}/v1/tenants/nobody/webhooks", json={"event": EVENT}, expect100=True
    ) as response:
        assert response.status == 404
    # Other paths are not ingest's answers.
    assert (await daemon.request("GET", "/v1/tenants/nobody/status"))[0] == 404

    await daemon.service.drain()  # the first step of a stop: ingest is refused from now on
    await daemon.ingest("acme", {"event": EVENT}, expect=503)

    _, text = await daemon.request("GET", "/metrics")
    assert samples(text, "webhookd_ingest_responses_total") == {
        (("code", "202"),): 2,
        (("code", "400"),): 1,
        (("code", "404"),): 2,
        (("code", "503"),): 1,
    }


# -- 7. text views ------------------------------------------------------------------------------


def table_rows(text: str) -> tuple[str, list[str]]:
    """The header line and the tenant rows of a status table (up to the first blank line)."""
    lines = text.split("\n")
    end = lines.index("") if "" in lines else len(lines)
    return lines[0], lines[1:end]


def assert_status_table(text: str, expected: dict[str, str]) -> list[str]:
    """One line per tenant, each showing its queue state in an aligned QUEUE column."""
    header, rows = table_rows(text)
    assert "TENANT" in header and "QUEUE" in header, header
    assert [row.split()[0] for row in rows] == sorted(expected), text
    queue_at = header.index("QUEUE")
    # Each column starts where its header starts: after two spaces, on every row.
    starts = [m.start() for m in re.finditer(r"(?:(?<=  )|^)\S", header)]
    assert queue_at in starts
    for row in rows:
        name = row.split()[0]
        assert row[queue_at:].split()[0] == expected[name], (name, row)
        for start in starts[1:]:
            assert row[start - 1] == " " and row[start] != " ", (start, row, text)
    return rows


async def test_status_as_text_table(receiver: Receiver, start_daemon: StartDaemon) -> None:
    receiver.always("/stalled", 503)
    daemon = await start_daemon(
        tenants={
            "a": tenant(receiver.url("/a")),
            "b-rather-long-tenant-name": tenant(receiver.url("/stalled"), retry_base=30.0),
            "c": tenant(receiver.url("/c")),
            "d": tenant(receiver.url("/d"), enabled=False),
        }
    )
    await daemon.ingest("a", {"event": EVENT})
    await daemon.ingest("b-rather-long-tenant-name", [{"event": EVENT} for _ in range(12)])
    await daemon.request("POST", "/v1/tenants/c/pause")
    await daemon.ingest("c", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "a")["last_processed_at"], timeout=5)
    await wait_for(
        lambda: state_of(daemon, "b-rather-long-tenant-name")["attempts"] == 1, timeout=5
    )
    await daemon.request("POST", "/v1/tenants/b-rather-long-tenant-name/retry")
    await wait_for(
        lambda: state_of(daemon, "b-rather-long-tenant-name")["attempts"] == 2, timeout=5
    )
    expected = {
        "a": "empty",
        "b-rather-long-tenant-name": "stalled",
        "c": "paused",
        "d": "disabled",
    }

    for headers, query in (({}, "?format=text"), ({"Accept": "text/plain"}, "")):
        code, content_type, text = await raw(
            daemon, "GET", f"/v1/status{query}", {**daemon.headers, **headers}
        )
        assert (code, content_type) == (200, "text/plain"), text
        rows = assert_status_table(text, expected)
        stalled = next(r for r in rows if r.startswith("b-rather-long-tenant-name"))
        assert "stalled" in stalled and "HTTP 503" in stalled, stalled
        assert "12" in stalled.split()

    code, content_type, text = await raw(
        daemon, "GET", "/v1/tenants/b-rather-long-tenant-name/status?format=text", daemon.headers
    )
    assert (code, content_type) == (200, "text/plain")
    assert "stalled" in text
    assert "recent failures" in text
    assert text.count("HTTP 503") == 2, text
    code, content_type, same = await raw(
        daemon,
        "GET",
        "/v1/tenants/b-rather-long-tenant-name/status",
        {**daemon.headers, "Accept": "text/plain"},
    )
    assert (code, content_type) == (200, "text/plain")
    assert "recent failures" in same
    # Without asking for text, status stays JSON.
    status, body = await daemon.request("GET", "/v1/status")
    assert status == 200
    assert isinstance(body, dict)


def normalised(text: str) -> list[str]:
    """Table lines with times and counts masked, so two renderings seconds apart compare."""
    return [" ".join(re.sub(r"\d+", "N", line).split()) for line in text.splitlines()]


async def test_cli_status_and_refresh_against_a_subprocess_with_a_token(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    receiver.always("/acme", 503)
    port = free_port()
    path = write_config(
        tmp_path,
        {"acme": tenant(receiver.url("/acme"), retry_base=30.0), "zed": tenant(receiver.url("/z"))},
        daemon={"api_token": TOKEN, "listen": f"127.0.0.1:{port}"},
    )
    remote = await start_process(process_factory, path, session)
    await remote.call("POST", "/v1/tenants/acme/webhooks", json={"event": EVENT})
    await remote.until("acme", lambda s: s["attempts"] == 1)

    code, out, err = await run_cli("status", "-c", str(path))
    assert (code, err) == (0, ""), err
    assert TOKEN not in out
    assert_status_table(out, {"acme": "stalled", "zed": "empty"})
    status, served = await remote.get("/v1/status?format=text")
    assert status == 200
    assert normalised(out) == normalised(served)
    acme_row = next(line for line in out.splitlines() if line.startswith("acme"))
    assert "HTTP 503" in acme_row

    code, out, err = await run_cli("status", "acme", "-c", str(path))
    assert (code, err) == (0, ""), err
    status, served = await remote.get("/v1/tenants/acme/status?format=text")
    assert normalised(out) == normalised(served)
    assert "stalled" in out and "HTTP 503" in out and "recent failures" in out

    code, out, err = await run_cli("refresh", "acme", "-c", str(path))
    assert (code, err) == (0, ""), err
    assert "cleared 1" in out
    assert (await remote.status("acme"))["recent_failures"] == []

    # The CLI sends the config's token; a config with another token is refused.
    other = write_config(
        tmp_path,
        {"acme": tenant(receiver.url("/acme"))},
        daemon={"api_token": "not-the-token", "listen": f"127.0.0.1:{port}"},
        name="other.toml",
    )
    code, out, err = await run_cli("status", "-c", str(other))
    assert code == 1
    assert err == (
        f"error: the daemon refused the API token (api_token / api_token_file in {other}); "
        "is it the file the daemon runs with?\n"
    )
    assert TOKEN not in err


SECRET_VARIABLE = "WEBHOOKD_TEST_ACME_SECRET"


async def test_client_commands_work_without_the_daemons_tenant_secrets(
    tmp_path: Path,
    receiver: Receiver,
    start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README, Command line: "The client commands read `listen` and `api_token` from the
    same config file the daemon uses." docs/configuration.md#secret_env offers `secret_env =
    "ACME_SECRET"` for a tenant (the variable set in the service's environment, as systemd does),
    and docs/cli.md#common-rules gives `webhookd status [TENANT] [-c CONFIG]`, `retry`, `refresh`
    against that file.

    In an operator's shell the service's variable is not set: client commands that loaded
    the whole configuration, tenant secrets included, would exit 1 with
    "tenants.acme.secret_env: environment variable … is not set or empty" instead of
    showing the status of a running daemon.
    """
    receiver.always("/acme", 503)
    monkeypatch.setenv(SECRET_VARIABLE, "acme-secret-from-the-unit")  # the daemon's environment
    table = tenant(receiver.url("/acme"), retry_base=30.0, secret_env=SECRET_VARIABLE)
    del table["secret"]
    path = write_config(tmp_path, {"acme": table})
    daemon = await start_daemon(path)
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: daemon.service.tenant_status("acme")["attempts"] == 1, timeout=5)

    operator_shell = {k: v for k, v in os.environ.items() if k != SECRET_VARIABLE}
    results = {}
    for command in (("status",), ("status", "acme"), ("retry", "acme"), ("refresh", "acme")):
        results[command] = await run_cli(*command, "-c", str(path), env=operator_shell)
    failed = {" ".join(c): (code, err.strip()) for c, (code, _, err) in results.items() if code}
    assert failed == {}, failed
    assert "stalled" in results[("status",)][1]
    assert results[("retry", "acme")][1].startswith("acme: retrying now (1 waiting")


async def test_a_token_changed_by_a_reload_is_refused_until_a_restart_and_the_cli_says_why(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    """api_token applies at restart. After a reload that changed it, the file's new token
    is refused with its own 401 ("restart_needed"), and the CLI says what to do; any other
    token is refused as before, and the token the daemon started with still works."""
    old, new, stranger = "old-" + "a" * 30, "new-" + "b" * 30, "strange-" + "c" * 30
    tenants = {"acme": tenant(receiver.url("/acme"))}
    listen = f"127.0.0.1:{free_port()}"
    path = write_config(tmp_path, tenants, daemon={"listen": listen, "api_token": old})
    remote = await start_process(process_factory, path, session)
    code, _, err = await run_cli("status", "-c", str(path))
    assert (code, err) == (0, "")

    write_config(tmp_path, tenants, daemon={"listen": listen, "api_token": new})
    assert remote.process.proc is not None
    remote.process.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: "restart_needed" in remote.process.log(), timeout=10)

    code, out, err = await run_cli("status", "-c", str(path))
    assert (code, out) == (1, "")
    assert err == (
        f"error: the daemon refused the API token in {path}: the token was changed after the "
        "daemon started, and the daemon keeps its old token until it is restarted "
        "(systemctl restart webhookd); a reload does not change it\n"
    )
    other = write_config(
        tmp_path, tenants, daemon={"listen": listen, "api_token": stranger}, name="other.toml"
    )
    code, _, err = await run_cli("status", "-c", str(other))
    assert code == 1
    assert "refused the API token (api_token / api_token_file in" in err
    answers = {}
    for token in (old, new, stranger):
        status, body = await remote.get("/v1/status", headers={"Authorization": f"Bearer {token}"})
        answers[token] = (status, body.get("error"))
    assert answers == {
        old: (200, None),
        new: (401, "restart_needed"),
        stranger: (401, "unauthorized"),
    }
    assert not any(t in remote.process.log() for t in (old, new, stranger))

    assert remote.process.terminate() == 0
    await start_process(process_factory, path, session)
    code, _, err = await run_cli("status", "-c", str(path))
    assert (code, err) == (0, "")


async def test_an_unknown_event_type_is_answered_with_the_near_miss_and_the_catalogue_command(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    path = write_config(
        tmp_path, {"acme": tenant(receiver.url("/acme"))}, events={"custom": ["INVOICE_PAID"]}
    )
    remote = await start_process(process_factory, path, session)
    items = [{"event": e} for e in ("check_completed", "INVOICE_PAYED", "ORDER_SHIPPED")]
    status, body = await remote.call("POST", "/v1/tenants/acme/webhooks", json=items)
    assert status == 422, body
    assert body == {
        "error": "unknown_event",
        "detail": "unknown event type INVOICE_PAYED (did you mean INVOICE_PAID?), "
        "ORDER_SHIPPED, check_completed (did you mean CHECK_COMPLETED?); nothing was queued "
        "(`webhookd events` lists the catalogue)",
    }

    code, out, err = await run_cli("send", "acme", "check_completed", "-c", str(path))
    assert (code, out) == (1, "")
    assert err == (
        "error: unknown event type check_completed (did you mean CHECK_COMPLETED?); nothing "
        "was queued (`webhookd events` lists the catalogue)\n"
    )
    assert (await remote.status("acme"))["waiting"] == 0
    code, out, err = await run_cli("send", "acme", "CHECK_COMPLETED", "-c", str(path))
    assert (code, err) == (0, ""), err
    assert out.startswith("queued: id ")


def run_events(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOKD_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "webhookd", "events", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def test_cli_events_lists_the_catalogue_with_the_configs_custom_types(tmp_path: Path) -> None:
    path = write_config(tmp_path, {}, events={"custom": ["INVOICE_PAID", "INVOICE_VOIDED"]})
    deprecated = [
        "deprecated (still delivered to tenants of the main file that list them):",
        "  PROFILE_STATUS_CHANGED",
        "  TASK_IS_COMPLETE_CHANGED",
        "  COLLECTION_STEPS_COMPLETED",
        "  COLLECTED_DATA_UPDATED (use COLLECTED_DATA_CHANGED)",
    ]
    current = ["current:", *(f"  {name}" for name in CURRENT)]
    assert run_events("-c", str(path), cwd=tmp_path).splitlines() == [
        *current,
        f"custom ([events] custom in {path}):",
        "  INVOICE_PAID",
        "  INVOICE_VOIDED",
        *deprecated,
    ]
    # With no config file at all, what is built in is still listed.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_events(cwd=empty).splitlines() == [
        *current,
        "custom (none: no config.toml):",
        "  -",
        *deprecated,
    ]


def test_cli_errors_name_the_flag_or_the_config_key(tmp_path: Path) -> None:
    """A bad --limit is the command line's error (exit 2, naming the flag), not a 400 from
    the API about a query string; a daemon nobody answers for is named with the key that
    set its address."""
    result = subprocess.run(
        [sys.executable, "-m", "webhookd", "peek", "acme", "--limit", "0", "-c", "none.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "argument --limit: '0': expected a whole number from 1 to 1000" in result.stderr

    port = free_port()  # nobody listens there
    path = write_config(tmp_path, {}, daemon={"listen": f"127.0.0.1:{port}"})
    result = subprocess.run(
        [sys.executable, "-m", "webhookd", "status", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach webhookd at 127.0.0.1:{port}: ")
    assert result.stderr.endswith(f" (listen in {path}); is the daemon running?\n")


async def test_outside_text_reaches_no_terminal_raw(
    tmp_path: Path, process_factory: Callable[..., Process], session: aiohttp.ClientSession
) -> None:
    """Endpoints answer a redirect whose Location (and reason phrase) hold every C0 and C1
    control and every bidirectional control; a producer sends them in an id and in data.
    Text views, the CLI and the log lines show each as an escape, and never the character
    (a view cut to 80 columns shows the escapes up to its cut); the JSON answers keep the
    exact text."""
    sets = {"c0": [c for c in C0 if c != "\n"], "c1": C1, "bidi": BIDI}  # \n ends a header
    locations = {name: f"https://evil.example/{''.join(chars)}FAKE" for name, chars in sets.items()}
    endpoints = {}
    for name, location in locations.items():

        async def redirect(writer: asyncio.StreamWriter, location: str = location) -> None:
            reason = "".join(c for c in UNSAFE if c != "\n")  # http1 reads no reason phrase
            writer.write(
                f"HTTP/1.1 302 {reason}\r\nLocation: {location}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()

        endpoints[name] = RawEndpoint(redirect)
    try:
        tenants = {name: tenant(await e.start(), retry_base=30.0) for name, e in endpoints.items()}
        path = write_config(tmp_path, tenants)
        remote = await start_process(process_factory, path, session)
        webhook_id = "id-" + "".join(C1 + BIDI)  # ingest refuses C0 in ids, not these
        data = {"note": "".join(UNSAFE), "name": "café"}
        for name in sets:
            await remote.call("POST", f"/v1/tenants/{name}/webhooks", json={"event": EVENT})
        await remote.call(
            "POST", "/v1/tenants/c0/webhooks", json={"event": EVENT, "id": webhook_id, "data": data}
        )
        for name, location in locations.items():
            status = await remote.until(name, lambda s: s["attempts"] == 1)
            # JSON keeps the exact text: JSON's own escaping is all it needs.
            assert status["recent_failures"][0]["error"] == (
                f"redirect to {location} not followed (HTTP 302)"
            )

        def assert_shown_escaped(text: str, chars: list[str]) -> None:
            assert not set(text) & (set(UNSAFE) - {"\n"}), text
            for char in chars:
                assert escaped(char) in text, (char, text)

        def assert_cut_after_escaping(text: str, error: str) -> None:
            """A view cuts the error to fit 80 columns: what it shows is the beginning of
            the escaped sentence, never a raw control."""
            assert_shown_escaped(text, [])
            row = next(line for line in text.splitlines() if "redirect to" in line)
            cell = row[row.index("redirect to") :]
            assert cell.endswith("…") and shown(error).startswith(cell[:-1]), (cell, error)

        _, served = await remote.get("/v1/status?format=text")
        assert_shown_escaped(served, [])
        code, out, err = await run_cli("status", "-c", str(path))
        assert (code, err) == (0, ""), err
        assert_shown_escaped(out, [])
        assert normalised(out) == normalised(served)
        for name, chars in sets.items():
            error = f"redirect to {locations[name]} not followed (HTTP 302)"
            _, served = await remote.get(f"/v1/tenants/{name}/status?format=text")
            assert_cut_after_escaping(served, error)
            assert_shown_escaped(served, chars[:1])
            code, out, err = await run_cli("status", name, "-c", str(path))
            assert (code, err) == (0, ""), err
            assert_cut_after_escaping(out, error)

        # The producer's id and data: peek and parked print JSON that is harmless and exact.
        code, out, err = await run_cli("peek", "c0", "-c", str(path))
        assert (code, err) == (0, ""), err
        assert_shown_escaped(out, [])
        assert [(w["id"], w["data"]) for w in json.loads(out)["webhooks"]][1:] == [
            (webhook_id, data)
        ]
        assert "café" in out
        assert (await remote.call("POST", "/v1/tenants/c0/pause"))[0] == 200
        assert (await remote.call("POST", "/v1/tenants/c0/skip"))[0] == 200  # the plain head
        code, out, err = await run_cli("skip", "c0", "-c", str(path))
        assert (code, err) == (0, ""), err
        assert out == f"c0: parked id {shown(webhook_id)} sequence 2\n"
        code, out, err = await run_cli("parked", "c0", "-c", str(path))
        assert (code, err) == (0, ""), err
        assert_shown_escaped(out, [])
        assert webhook_id in [w["id"] for w in json.loads(out)["parked"]]

        # The daemon's JSON log lines: escaped in every value, for a terminal showing them.
        log = remote.process.log()
        assert_shown_escaped(log, [c for chars in sets.values() for c in chars])
        failed = {
            e["tenant"]: e["error"]
            for e in map(json.loads, log.splitlines())
            if e["event"] == "delivery_failed"
        }
        for name, location in locations.items():
            assert failed[name] == f"redirect to {shown(location)} not followed (HTTP 302)"
        skipped = [e for e in map(json.loads, log.splitlines()) if e["event"] == "skipped"]
        assert skipped[-1]["id"] == shown(webhook_id)
    finally:
        for endpoint in endpoints.values():
            await endpoint.close()


def walkthrough() -> str:
    """README's "When a tenant is stalled" section, up to the next top-level heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## When a tenant is stalled")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_walkthrough_status_table_is_what_the_text_view_prints() -> None:
    """README, "When a tenant is stalled", step 1: "The text view puts each tenant on a
    line; the stalled one says so, with its last error", followed by the output of
    `curl -s 'localhost:8787/v1/status?format=text'`:

        acme    stalled  137      12m ago   13m ago   5         in 7m58s  HTTP 503
        globex  empty    0        -         2s ago    0         -         -

    Rendered by the text view for exactly that state (oldest webhook 12 minutes old, last
    success 13 minutes ago, next attempt in 7m58s), the table matches the walk-through cell
    for cell: a view that always printed seconds below an hour ("12m00s ago") would not.
    """
    section = walkthrough()
    block = section[section.index("TENANT  QUEUE") :]
    shown = [line for line in block[: block.index("```")].splitlines() if line.strip()]
    assert len(shown) == 4, shown  # header, acme, globex, the totals line

    now = 1_764_064_800.0  # any whole second
    failure = {
        "at": iso(now - 30),
        "attempt": 5,
        "first_sequence": 1,
        "last_sequence": 100,
        "count": 100,
        "status": 503,
        "error": "HTTP 503",
        "duration_ms": 12.0,
    }
    acme = {
        "tenant": "acme",
        "queue": "stalled",
        "waiting": 137,
        "oldest_waiting_at": iso(now - 12 * 60),
        "last_processed_at": iso(now - 13 * 60),
        "attempts": 5,
        "next_attempt_at": iso(now + 7 * 60 + 58),
        "recent_failures": [failure],
    }
    globex = {
        "tenant": "globex",
        "queue": "empty",
        "waiting": 0,
        "oldest_waiting_at": None,
        "last_processed_at": iso(now - 2),
        "attempts": 0,
        "next_attempt_at": None,
        "recent_failures": [],
    }
    totals = {"tenants": 2, "waiting": 137, "stalled": 1, "paused": 0, "disabled": 0}
    text = views.status_table({"tenants": [acme, globex], "totals": totals}, now=now)
    printed = [line for line in text.splitlines() if line.strip()]
    # Cells compared, not the padding (the README's columns are laid out by hand).
    assert [line.split() for line in printed] == [line.split() for line in shown], text


def test_every_walkthrough_step_has_the_cli_equivalent_it_promises() -> None:
    """README, "When a tenant is stalled": "Everything here is curl against the API (…);
    each step has a CLI equivalent." Every curl line names a command that parses."""
    section = walkthrough()
    assert "each step has a CLI equivalent" in section
    parser = build_parser()
    missing = []
    for line in section.splitlines():
        if "curl " not in line or "Bearer" in line or "the same as JSON" in line:
            continue  # the JSON form of step 2 shares that step's `webhookd status acme`
        curl = re.search(r"curl [^`#]*", line)
        assert curl is not None, line
        # "# or: webhookd …", "…: webhookd …" after a code line, "(or `webhookd …`)" in prose.
        equivalent = re.search(r"(?:# or: |: |\(or `)(webhookd [^`)]*)", line)
        if equivalent is None:
            missing.append(curl.group(0).strip())
            continue
        words = shlex.split(equivalent.group(1).strip().replace("<id>", "ID"))[1:]
        parser.parse_args(words)  # the named equivalent exists (SystemExit 2 otherwise)
    assert missing == [], "API calls of the walk-through with no CLI equivalent: " + "; ".join(
        missing
    )


async def test_every_text_view_fits_80_columns_and_the_json_keeps_the_whole_text(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """Tenant names of 64 characters that differ at their end, a DNS error naming a long host,
    an HTTP 503: every line of the overview and of the tenant view (its failures table too)
    fits 80 columns, long cells cut with "…"; the JSON has every sentence whole."""
    receiver.always("/dead", 503)
    host = "hooks-of-a-customer-with-a-rather-long-name." + "x" * 40 + ".invalid"
    names = ["acme-" + "x" * 49 + "-eu-west-" + str(n) for n in (1, 2)]
    assert all(len(name) == 64 for name in names)
    daemon = await start_daemon(
        tenants={
            names[0]: tenant(f"https://{host}/webhooks", retry_base=30.0),
            names[1]: tenant(receiver.url("/dead"), retry_base=30.0),
            "ok": tenant(receiver.url("/ok")),
        }
    )
    for name in (*names, "ok"):
        await daemon.ingest(name, [{"event": EVENT} for _ in range(3)])
    for name in names:

        def failed_once(name: str = name) -> bool:
            return bool(state_of(daemon, name)["attempts"] == 1)

        await wait_for(failed_once, timeout=15)
    await wait_for(lambda: state_of(daemon, "ok")["waiting"] == 0, timeout=5)

    status, body = await daemon.request("GET", "/v1/status")
    assert status == 200
    errors = [t["recent_failures"][0]["error"] for t in body["tenants"][:2]]
    assert errors == [f"DNS: cannot resolve {host}", "HTTP 503"]  # whole, in JSON

    code, _, overview = await raw(daemon, "GET", "/v1/status?format=text", daemon.headers)
    assert code == 200
    assert max(len(line) for line in overview.splitlines()) <= 80, overview
    dns_row, dead_row, ok_row = table_rows(overview)[1]
    # Cut in the middle, the two names stay apart.
    assert dns_row.split()[0] != dead_row.split()[0]
    assert dns_row.split()[0].endswith("west-1") and dead_row.split()[0].endswith("west-2")
    assert re.search(r"  DNS: [^…]+…, \d+s ago$", dns_row), dns_row  # the age stays
    assert re.search(r"  HTTP 503, \d+s ago$", dead_row), dead_row
    assert ok_row.split()[:3] == ["ok", "empty", "0"] and ok_row.endswith("  -")

    for name, error in zip(names, errors, strict=True):
        code, _, text = await raw(
            daemon, "GET", f"/v1/tenants/{name}/status?format=text", daemon.headers
        )
        assert code == 200
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert text.splitlines()[0] == f"tenant          {name}"
        failure = text.splitlines()[-1]  # the one row of the failures table
        cell = failure[failure.index(error[:8]) :]
        assert cell == error or (cell.endswith("…") and error.startswith(cell[:-1])), text


async def test_last_error_shows_its_age_and_clears_once_a_success_follows(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """An empty queue does not read as failing: the overview's LAST ERROR is "-" once a
    success came after the newest failure. The tenant's failures list stays until Refresh,
    as the reference product's does."""
    receiver.script("/acme", 503)  # then 200
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=30.0)})
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "acme")["attempts"] == 1, timeout=5)

    async def overview_row() -> str:
        _, _, text = await raw(daemon, "GET", "/v1/status?format=text", daemon.headers)
        return table_rows(text)[1][0]

    assert re.search(r"^acme +stalled +1 .*  HTTP 503, \d+s ago$", await overview_row())
    await daemon.request("POST", "/v1/tenants/acme/retry")
    await wait_for(lambda: state_of(daemon, "acme")["queue"] == "empty", timeout=5)

    name, queue, waiting, last_ok, after, last_error = (await overview_row()).split()
    # LAST OK is whole seconds ago: 1s when a second turned since the success.
    assert (name, queue, waiting, after, last_error) == ("acme", "empty", "0", "-", "-")
    assert re.fullmatch(r"[01]s", last_ok), last_ok
    _, _, text = await raw(daemon, "GET", "/v1/tenants/acme/status?format=text", daemon.headers)
    assert "recent failures (newest first, 1):" in text and "HTTP 503" in text, text
    await daemon.request("POST", "/v1/tenants/acme/refresh")
    _, _, text = await raw(daemon, "GET", "/v1/tenants/acme/status?format=text", daemon.headers)
    assert text.endswith("recent failures: none\n"), text


def test_last_error_on_a_tie_of_whole_seconds_trusts_attempts() -> None:
    """Stamps have whole seconds: a failure and a success in the same second are told apart
    by `attempts`, which a success resets."""
    now = 1_764_064_800.0
    failure = {
        "at": iso(now - 5),
        "attempt": 1,
        "first_sequence": 7,
        "last_sequence": 7,
        "count": 1,
        "status": 503,
        "error": "HTTP 503",
        "duration_ms": 3.0,
    }
    row = {"last_processed_at": iso(now - 5), "recent_failures": [failure]}
    assert views.last_error({**row, "attempts": 0}, now) == "-"  # failed, then succeeded
    assert views.last_error({**row, "attempts": 1}, now) == views.Cell("HTTP 503", ", 5s ago")
    assert views.last_error({**row, "attempts": 0, "last_processed_at": iso(now - 9)}, now) == (
        views.Cell("HTTP 503", ", 5s ago")
    )
    assert views.last_error({**row, "attempts": 0, "recent_failures": []}, now) == "-"


def test_counts_in_text_agree_with_their_noun() -> None:
    assert [views.counted(n, "tenant") for n in (0, 1, 2)] == ["0 tenants", "1 tenant", "2 tenants"]
    one = {"tenants": [], "totals": {"tenants": 1, "waiting": 1, "stalled": 0, "parked": 1}}
    assert views.status_table(one).endswith("\n\n1 tenant, 1 waiting, 0 stalled, 1 parked\n")


def test_a_cut_cell_keeps_its_tail_and_a_name_its_end() -> None:
    assert views.fit("DNS: cannot resolve hooks.example", 20, tail=", 3m ago") == (
        "DNS: cannot…, 3m ago"
    )
    assert views.fit("acme-production-eu-west-1", 15, middle=True) == "acme-pr…-west-1"
    assert views.fit("https://hooks.example/path", 12) == "https://hoo…"
    assert views.fit("short", 13, tail=", 1s ago") == "short, 1s ago"
    assert views.fit("short", 12, tail=", 1s ago") == "sho…, 1s ago"


# -- 8. scale -----------------------------------------------------------------------------------


async def test_status_of_10000_tenants_is_one_fast_pass(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    names = [f"t{n:05d}" for n in range(10_000)]
    tenants = {name: tenant(receiver.url(f"/{name}")) for name in reversed(names)}
    daemon = await start_daemon(write_config(tmp_path, tenants))
    await daemon.ingest("t00042", {"event": EVENT})
    await wait_for(lambda: state_of(daemon, "t00042")["last_processed_at"], timeout=5)

    # Timed: the request and reading the answer (about 4 MB), not parsing it here.
    started = time.monotonic()
    code, _, text = await raw(daemon, "GET", "/v1/status")
    took = time.monotonic() - started
    assert code == 200
    assert took < 2.0, took
    body = json.loads(text)
    assert [t["tenant"] for t in body["tenants"]] == names
    assert body["totals"]["tenants"] == 10_000
    assert body["totals"]["queues"]["empty"] == 10_000
    assert body["tenants"][42]["last_processed_at"] is not None

    started = time.monotonic()
    code, _, text = await raw(daemon, "GET", "/v1/status?format=text")
    took = time.monotonic() - started
    assert code == 200
    assert took < 2.0, took
    assert len(table_rows(text)[1]) == 10_000


async def test_a_wrong_method_is_a_json_405_that_says_what_is_allowed(
    start_daemon: StartDaemon, receiver: Receiver
) -> None:
    """RFC 9110 §15.5.6: a 405 carries an Allow header; a script reads the detail."""
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    code, content_type, text = await raw(daemon, "DELETE", "/v1/tenants/acme/webhooks", {})
    assert (code, content_type) == (405, "application/json"), text
    assert_error(json.loads(text), "method_not_allowed")
    detail = json.loads(text)["detail"]
    assert detail.startswith("DELETE is not allowed on /v1/tenants/acme/webhooks; use "), detail
    async with daemon.session.request("DELETE", daemon.base + "/v1/tenants/acme/webhooks") as r:
        assert "POST" in r.headers["Allow"]


def test_a_command_whose_output_is_cut_short_stops_quietly(tmp_path: Path) -> None:
    """`webhookd check | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    config = write_config(
        tmp_path, {f"t{n}": tenant(f"https://hooks.example/{n}") for n in range(2000)}
    )
    done = subprocess.run(
        f"{sys.executable} -m webhookd check -c {config} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith(f"{config}: OK"), done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
