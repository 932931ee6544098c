"""Replay (issue 13): delivered webhooks put back at the tail by sequence or time range,
optionally one event type, in their original order under new sequences; a dry run only
counts; over replay_max it is refused with how to split it; a replay_id makes a retried
replay safe; without kept payloads it is refused; bad bodies are 400s that change nothing.

Real receiver, the daemon in-process (or as a subprocess for the CLI), real SQLite or
PostgreSQL; no mocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests import test_cluster, test_history, test_operator
from tests.conftest import Daemon, Process, Receiver, StartDaemon, tenant, wait_for, write_config
from tests.test_cluster import StartInstance, two_instances
from tests.test_operator import run_cli, start_process

# The fixtures: the daemon in-process on each engine, instances on PostgreSQL, a client.
start_daemon = test_history.start_daemon
start_instance = test_cluster.start_instance
session = test_operator.session

EVENT = "CHECK_COMPLETED"
OTHER = "TASK_CREATED"


async def replay(daemon: Daemon, name: str, body: Any) -> tuple[int, Any]:
    return await daemon.request("POST", f"/v1/tenants/{name}/replay", json=body)


async def delivered(daemon: Daemon, receiver: Receiver, name: str, count: int) -> None:
    await wait_for(lambda: len(receiver.sequences(f"/{name}")) == count, timeout=10)
    await wait_for(lambda: daemon.service.workers[name].waiting == 0, timeout=5)


def ids(receiver: Receiver, name: str) -> list[str]:
    return [w["id"] for r in receiver.at(f"/{name}", ok_only=True) for w in r.webhooks]


async def test_replay_by_sequence_range_and_event_in_original_order(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    items = [
        {"event": EVENT if n % 2 else OTHER, "id": f"r-{n}", "data": {"n": n}} for n in range(1, 9)
    ]
    await daemon.ingest("acme", items)
    await delivered(daemon, receiver, "acme", 8)

    status, answer = await replay(
        daemon, "acme", {"from_sequence": 2, "to_sequence": 7, "event": EVENT}
    )
    assert (status, answer) == (
        200,
        {
            "tenant": "acme",
            "count": 3,
            "first_sequence": 9,
            "last_sequence": 11,
            "dry_run": False,
            "repeated": False,
            "replay_id": None,
        },
    ), answer
    await delivered(daemon, receiver, "acme", 11)
    # New sequences, the same ids and data, in their original order.
    assert receiver.sequences("/acme")[8:] == [9, 10, 11]
    again = [w for r in receiver.at("/acme", ok_only=True)[8:] for w in r.webhooks]
    assert [(w["id"], w["data"]) for w in again] == [
        ("r-3", {"n": 3}),
        ("r-5", {"n": 5}),
        ("r-7", {"n": 7}),
    ]
    # The original record points at its replay; a lookup follows it to the newest copy.
    status, body = await daemon.request("GET", "/v1/tenants/acme/history?to_sequence=3&limit=1")
    assert body["records"][0]["next_sequence"] == 9
    status, found = await daemon.request("GET", "/v1/tenants/acme/webhooks/r-3")
    assert (found["state"], found["sequence"]) == ("delivered", 9)

    # Webhooks not delivered (still queued) are not replayed.
    await daemon.request("POST", "/v1/tenants/acme/pause")
    await daemon.ingest("acme", {"event": EVENT, "id": "waiting"})
    status, answer = await replay(daemon, "acme", {"from_sequence": 12})
    assert (status, answer["count"], answer["first_sequence"]) == (200, 0, None), answer


async def test_replay_by_time_range_and_dry_run(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    await daemon.ingest("acme", [{"event": EVENT, "id": f"old-{n}"} for n in range(3)])
    await delivered(daemon, receiver, "acme", 3)
    since = time.time()
    await asyncio.sleep(0.05)
    await daemon.ingest("acme", [{"event": EVENT, "id": f"new-{n}"} for n in range(4)])
    await delivered(daemon, receiver, "acme", 7)
    until = time.time()
    await asyncio.sleep(0.05)
    await daemon.ingest("acme", {"event": EVENT, "id": "later"})
    await delivered(daemon, receiver, "acme", 8)

    # A dry run counts and queues nothing.
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since)) + f"{since % 1:.6f}"[1:] + "Z"
    status, answer = await replay(daemon, "acme", {"since": stamp, "until": until, "dry_run": True})
    assert (status, answer["count"], answer["dry_run"]) == (200, 4, True), answer
    assert answer["first_sequence"] is None
    await asyncio.sleep(0.2)
    assert len(receiver.sequences("/acme")) == 8
    assert daemon.service.workers["acme"].row.last_sequence == 8

    status, answer = await replay(daemon, "acme", {"since": since, "until": until})
    assert (status, answer["count"], answer["first_sequence"], answer["last_sequence"]) == (
        200,
        4,
        9,
        12,
    ), answer
    await delivered(daemon, receiver, "acme", 12)
    assert ids(receiver, "acme")[8:] == [f"new-{n}" for n in range(4)]


async def test_replay_over_replay_max_is_refused_with_how_to_split_it(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/acme"))}, daemon={"replay_max": 4}
    )
    await daemon.ingest("acme", [{"event": EVENT} for _ in range(10)])
    await delivered(daemon, receiver, "acme", 10)

    for body in ({"from_sequence": 1, "to_sequence": 10}, {"since": 0, "dry_run": True}):
        status, answer = await replay(daemon, "acme", body)
        assert status == 400 and answer["error"] == "replay_too_large", answer
        detail = answer["detail"]
        assert "matches 10 webhooks (sequences 1 to 10), more than replay_max (4)" in detail
        assert "from_sequence 1 to_sequence 4, then from_sequence 5" in detail
        assert "the last ending at to_sequence 10 (3 replays" in detail
    await asyncio.sleep(0.2)
    assert daemon.service.workers["acme"].row.last_sequence == 10  # nothing queued

    # Split as it says: each part goes through.
    for first in (1, 5, 9):
        status, answer = await replay(
            daemon, "acme", {"from_sequence": first, "to_sequence": min(first + 3, 10)}
        )
        assert status == 200, answer
    await delivered(daemon, receiver, "acme", 20)
    assert receiver.sequences("/acme")[10:] == list(range(11, 21))


async def test_a_replay_id_makes_a_retried_replay_safe(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    await daemon.ingest("acme", [{"event": EVENT, "id": f"i-{n}"} for n in range(3)])
    await delivered(daemon, receiver, "acme", 3)
    body = {"from_sequence": 1, "to_sequence": 3, "replay_id": "ticket-123"}
    status, first = await replay(daemon, "acme", body)
    assert (status, first["count"], first["repeated"]) == (200, 3, False), first
    await delivered(daemon, receiver, "acme", 6)
    status, second = await replay(daemon, "acme", body)
    assert status == 200, second
    assert second["repeated"] is True
    assert (second["count"], second["first_sequence"], second["last_sequence"]) == (3, 4, 6)
    await asyncio.sleep(0.2)
    assert len(receiver.sequences("/acme")) == 6  # queued once
    assert daemon.service.workers["acme"].row.last_sequence == 6


async def test_replay_without_kept_payloads_is_refused(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"lean": tenant(receiver.url("/lean"), history_payloads=False)}
    )
    await daemon.ingest("lean", [{"event": EVENT, "data": {"n": n}} for n in range(2)])
    await delivered(daemon, receiver, "lean", 2)
    status, body = await daemon.request("GET", "/v1/tenants/lean/history")
    assert [r["data"] for r in body["records"]] == [None, None]
    status, answer = await replay(daemon, "lean", {"from_sequence": 1})
    assert status == 409 and answer["error"] == "payloads_not_kept", answer
    assert "history_payloads = false" in answer["detail"]
    assert daemon.service.workers["lean"].row.last_sequence == 2


async def test_bad_replay_bodies_are_400s_that_change_nothing(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    await daemon.ingest("acme", {"event": EVENT})
    await delivered(daemon, receiver, "acme", 1)
    cases: list[tuple[Any, str]] = [
        ({}, "name what to replay"),
        ([1, 2], "send a JSON object"),
        ("everything", "send a JSON object"),
        ({"from_sequence": "1"}, "from_sequence must be a sequence number"),
        ({"from_sequence": -1}, "from_sequence must be a sequence number"),
        ({"to_sequence": 1.5}, "to_sequence must be a sequence number"),
        ({"from_sequence": 5, "to_sequence": 2}, "is after to_sequence"),
        ({"since": "last monday"}, "since must be an RFC 3339 time"),
        ({"since": "2026-12-01T00:00:00"}, "no time zone"),
        ({"since": 100, "until": 50}, "since must be before until"),
        ({"since": True}, "since must be"),
        ({"from_sequence": 1, "dry_run": "yes"}, "dry_run must be true or false"),
        ({"from_sequence": 1, "event": ""}, "event must be"),
        ({"from_sequence": 1, "replay_id": 7}, "replay_id must be a string"),
        ({"from_sequence": 1, "everything": True}, "unknown key 'everything'"),
    ]
    for body, says in cases:
        status, answer = await replay(daemon, "acme", body)
        assert status == 400, (body, answer)
        assert answer["error"] == "bad_request" and says in answer["detail"], (body, answer)
    status, answer = await daemon.request(
        "POST", "/v1/tenants/acme/replay", data=b"{not json", headers={"Content-Type": "x"}
    )
    assert status == 400 and "not JSON" in answer["detail"], answer
    status, answer = await replay(daemon, "nobody", {"from_sequence": 1})
    assert status == 404 and answer["error"] == "not_found", answer
    await asyncio.sleep(0.2)
    assert daemon.service.workers["acme"].row.last_sequence == 1
    assert len(receiver.sequences("/acme")) == 1


async def test_cli_replay_against_a_subprocess(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    remote = await start_process(process_factory, path, session)
    for n in range(1, 4):
        await remote.call(
            "POST",
            "/v1/tenants/acme/webhooks",
            json={"event": EVENT if n != 2 else OTHER, "id": f"c-{n}"},
        )
    await remote.until("acme", lambda s: s["waiting"] == 0)

    async def run(*args: str) -> str:
        code, out, err = await run_cli("replay", "acme", *args, "-c", str(path))
        assert (code, err) == (0, ""), (args, err)
        return out

    out = await run("--from-sequence", "1", "--to-sequence", "3", "--event", EVENT, "--dry-run")
    assert out == "acme: would replay 2 webhooks (dry run: nothing queued)\n"
    out = await run("--from-sequence", "1", "--event", EVENT, "--replay-id", "t-1")
    assert out == "acme: replayed 2 webhooks as sequences 4-5\n"
    out = await run("--from-sequence", "1", "--event", EVENT, "--replay-id", "t-1")
    assert (
        out
        == "acme: replayed 2 webhooks as sequences 4-5 (already done: this replay_id's result)\n"
    )
    out = await run("--since", str(time.time() + 3600))
    assert out == "acme: nothing to replay (no delivered webhook matches)\n"
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3, 4, 5], timeout=5)
    assert ids(receiver, "acme")[3:] == ["c-1", "c-3"]

    code, _, err = await run_cli("replay", "acme", "-c", str(path))
    assert code == 1 and "--from-sequence" in err, err
    code, _, err = await run_cli("replay", "acme", "--since", "monday", "-c", str(path))
    assert code == 1 and "since must be an RFC 3339 time" in err, err


async def test_replay_through_a_non_owner_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    """B does not hold the tenant: it replays from the database, and A, the owner, learns
    of the new webhooks as of ingest through B and delivers them."""
    a, b, name = await two_instances(tmp_path, receiver, postgres_url, start_instance)
    await a.ingest(name, [{"event": EVENT, "id": f"x-{n}"} for n in range(3)])
    await wait_for(lambda: receiver.sequences(f"/{name}") == [1, 2, 3], timeout=5)
    await wait_for(lambda: a.service.workers[name].waiting == 0, timeout=5)
    status, answer = await replay(b, name, {"from_sequence": 2, "replay_id": "r"})
    assert (status, answer["count"], answer["first_sequence"]) == (200, 2, 4), answer
    await wait_for(lambda: receiver.sequences(f"/{name}") == [1, 2, 3, 4, 5], timeout=5)
    assert ids(receiver, name)[3:] == ["x-1", "x-2"]
    status, again = await replay(a, name, {"from_sequence": 2, "replay_id": "r"})
    assert (status, again["repeated"], again["first_sequence"]) == (200, True, 4), again
