"""Delivery history seen from outside (issue 13): looking a webhook up by id in every state
it can be in, listing a tenant's history page by page with every filter, the text views and
the CLI, retention and the idempotency window, and the same from a non-owner instance.

Real receiver, the daemon in-process (or as a subprocess for the CLI), real SQLite or
PostgreSQL; no mocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests import test_cluster, test_operator
from tests.conftest import Daemon, Process, Receiver, StartDaemon, tenant, wait_for, write_config
from tests.test_cluster import StartInstance, two_instances
from tests.test_operator import run_cli, start_process
from webhookd import config as config_mod
from webhookd.config import PostgresURL
from webhookd.ids import generated_id, id_tag
from webhookd.scheduler import Clock
from webhookd.serve import Server
from webhookd.service import Service

# The fixtures: in-process instances on PostgreSQL, a client session.
start_instance = test_cluster.start_instance
session = test_operator.session

EVENT = "CHECK_COMPLETED"
OTHER = "TASK_CREATED"


@pytest.fixture(params=["sqlite", "postgres"])
async def start_daemon(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StartDaemon]:
    """conftest's in-process daemon, on each engine: SQLite, and PostgreSQL (one instance)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    started: list[Daemon] = []
    session = aiohttp.ClientSession()

    async def start(
        config_path: Path | None = None, *, clock: Clock | None = None, **kwargs: Any
    ) -> Daemon:
        config = config_mod.load(config_path or write_config(tmp_path, **kwargs))
        if url is not None:
            on_postgres = dataclasses.replace(config.daemon, database=PostgresURL(url))
            config = dataclasses.replace(config, daemon=on_postgres)
        server = Server(Service(config, clock=clock))
        try:
            await server.start()
        except BaseException:
            await server.stop()
            raise
        daemon = Daemon(server, session)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.server.stop()
    await session.close()


async def lookup(daemon: Daemon, name: str, webhook_id: str) -> tuple[int, Any]:
    return await daemon.request("GET", f"/v1/tenants/{name}/webhooks/{webhook_id}")


async def state(daemon: Daemon, name: str, webhook_id: str) -> dict[str, Any]:
    status, body = await lookup(daemon, name, webhook_id)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def page(daemon: Daemon, name: str, query: str = "") -> dict[str, Any]:
    status, body = await daemon.request("GET", f"/v1/tenants/{name}/history{query}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def sequences(body: dict[str, Any]) -> list[int]:
    return [r["sequence"] for r in body["records"]]


def fields(text: str) -> dict[str, str]:
    """The `key  value` lines of a text view, up to its first blank line."""
    lines = text.split("\n")
    head = lines[: lines.index("")] if "" in lines else lines
    pairs = {}
    for line in head:
        key, _, value = line.partition("  ")
        pairs[key.strip()] = value.strip()
    return pairs


class Hold:
    """A receiver answer that holds each request until released."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.arrived.set()
        await self.release.wait()
        return web.Response(text="ok")


# -- lookup --------------------------------------------------------------------------------------


async def test_lookup_follows_a_webhook_through_every_state(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    assert (await daemon.request("POST", "/v1/tenants/acme/pause"))[0] == 200
    answer = await daemon.ingest(
        "acme", [{"event": EVENT, "id": "q-1", "data": {"n": 1}}, {"event": EVENT, "id": "q/2"}]
    )
    assert [w["sequence"] for w in answer["webhooks"]] == [1, 2]

    # queued: where in the queue, and the head's attempts and next attempt.
    first = await state(daemon, "acme", "q-1")
    assert first["state"] == "queued"
    assert (first["sequence"], first["position"], first["attempts"]) == (1, 1, 0)
    assert first["event"] == EVENT and first["data"] == {"n": 1}
    second = await state(daemon, "acme", "q%2F2")  # an id with a slash, escaped in the path
    assert (second["state"], second["id"], second["position"]) == ("queued", "q/2", 2)
    assert second["next_attempt_at"] is None

    # in_flight: the receiver holds the request.
    hold = Hold()
    receiver.script("/acme", hold)
    assert (await daemon.request("POST", "/v1/tenants/acme/resume"))[0] == 200
    await asyncio.wait_for(hold.arrived.wait(), 5)
    flying = await state(daemon, "acme", "q-1")
    assert (flying["state"], flying["sequence"], flying["attempt"]) == ("in_flight", 1, 1)
    assert (await state(daemon, "acme", "q/2".replace("/", "%2F")))["state"] == "queued"
    hold.release.set()

    # delivered: when, after how many attempts, how long it took, the answer's status.
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2], timeout=5)
    done = await wait_for(lambda: _state_is(daemon, "acme", "q-1", "delivered"), timeout=5)
    assert (done["sequence"], done["attempts"], done["status"]) == (1, 1, 200)
    assert done["duration_ms"] > 0 and done["delivered_at"].endswith("Z")
    assert done["data"] == {"n": 1} and done["failures"] == []

    # A failed attempt first: the lookup shows it.
    receiver.script("/acme", 503)
    await daemon.ingest("acme", {"event": EVENT, "id": "f-1"})
    retried = await wait_for(lambda: _state_is(daemon, "acme", "f-1", "delivered"), timeout=5)
    assert retried["attempts"] == 2
    assert [(f["attempt"], f["status"]) for f in retried["failures"]] == [(1, 503)]

    # parked (skipped), then requeued: the lookup follows it to its new copy.
    await daemon.request("POST", "/v1/tenants/acme/pause")
    await daemon.ingest("acme", {"event": EVENT, "id": "p-1"})
    status, body = await daemon.request("POST", "/v1/tenants/acme/skip")
    assert status == 200, body
    parked = await state(daemon, "acme", "p-1")
    assert (parked["state"], parked["sequence"]) == ("parked", 4)
    assert parked["parked_at"].endswith("Z")
    status, body = await daemon.request("POST", "/v1/tenants/acme/parked/p-1/requeue")
    assert (status, body["sequence"]) == (200, 5)
    requeued = await state(daemon, "acme", "p-1")
    assert (requeued["state"], requeued["sequence"], requeued["position"]) == ("queued", 5, 1)
    await daemon.request("POST", "/v1/tenants/acme/resume")
    delivered = await wait_for(lambda: _state_is(daemon, "acme", "p-1", "delivered"), timeout=5)
    assert delivered["sequence"] == 5

    # A generated id resolves through its sequence.
    answer = await daemon.ingest("acme", {"event": EVENT})
    generated = answer["webhooks"][0]["id"]
    found = await wait_for(lambda: _state_is(daemon, "acme", generated, "delivered"), timeout=5)
    assert found["sequence"] == 6

    # 404s that say which: a generated id never given out, a producer id never seen (the
    # tenant has forgotten no id yet: forgotten ones are the next test's).
    status, body = await lookup(daemon, "acme", generated_id(id_tag("acme"), 99))
    assert status == 404 and body["error"] == "unknown_webhook", body
    assert "never had" in body["detail"]
    status, body = await lookup(daemon, "acme", "never-sent")
    assert status == 404 and body["error"] == "unknown_webhook", body
    assert "was never seen (the tenant has forgotten none)" in body["detail"]
    status, body = await lookup(daemon, "nobody", "q-1")
    assert status == 404 and body["error"] == "not_found", body
    status, body = await lookup(daemon, "acme", "x" * 256)
    assert status == 400 and body["error"] == "bad_request", body


async def _state_is(daemon: Daemon, name: str, webhook_id: str, wanted: str) -> Any:
    status, body = await lookup(daemon, name, webhook_id)
    return body if status == 200 and body["state"] == wanted else None


async def test_a_discarded_queue_is_looked_up_as_discarded(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """A tenant made through the API, removed with its queue dropped, then made again: the
    webhooks it dropped say `discarded`."""
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    body = {"endpoint": receiver.url("/api"), "secret": "s3cr3t", "events": ["*"]}
    status, answer = await daemon.request("PUT", "/v1/tenants/api", json=body)
    assert status in (200, 201), answer
    await daemon.request("POST", "/v1/tenants/api/pause")
    await daemon.ingest("api", [{"event": EVENT, "id": "d-1"}, {"event": EVENT, "id": "d-2"}])
    status, answer = await daemon.request("DELETE", "/v1/tenants/api?discard=true")
    assert (status, answer["discarded"]) == (200, 2), answer
    status, answer = await daemon.request("PUT", "/v1/tenants/api", json=body)
    assert status in (200, 201), answer
    gone = await state(daemon, "api", "d-2")
    assert (gone["state"], gone["sequence"]) == ("discarded", 2)
    assert gone["discarded_at"].endswith("Z")
    listed = await page(daemon, "api", "?outcome=discarded")
    assert sequences(listed) == [2, 1]
    assert receiver.at("/api") == []


async def test_expired_after_retention_forgotten_after_the_window_and_sizes_shown(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """A record older than its tenant's retention is pruned (lookup: `expired` for a
    generated id; a producer id once also forgotten after idempotency_window: 404
    `forgotten`, and it may be used again). Status and /metrics show the sizes and the
    pruning."""
    daemon = await start_daemon(
        tenants={
            "short": tenant(receiver.url("/short"), history_retention="1s"),
            "kept": tenant(receiver.url("/kept")),
        },
        daemon={"idempotency_window": "1s"},
    )
    daemon.service.prune_interval = 0.2
    answer = await daemon.ingest("short", [{"event": EVENT}, {"event": EVENT, "id": "mine"}])
    generated = answer["webhooks"][0]["id"]
    await daemon.ingest("kept", [{"event": EVENT, "id": "k-1"}, {"event": EVENT, "id": "k-2"}])
    await wait_for(lambda: _state_is(daemon, "kept", "k-2", "delivered"), timeout=5)

    expired = await wait_for(lambda: _state_is(daemon, "short", generated, "expired"), timeout=10)
    assert expired["sequence"] == 1 and "history_retention (1s)" in expired["detail"]

    async def forgotten() -> bool:
        status, body = await lookup(daemon, "short", "mine")
        return status == 404 and body["error"] == "forgotten"

    await wait_for(forgotten, timeout=10)
    status, body = await lookup(daemon, "short", "never-sent")  # it may have been, now
    assert status == 404 and body["error"] == "forgotten", body
    assert "never seen, or accepted before 20" in body["detail"], body
    again = await daemon.ingest("short", {"event": EVENT, "id": "mine"})
    assert again["webhooks"][0] == {"id": "mine", "sequence": 3, "status": "queued"}

    # The kept tenant's records stay; the sizes say so.
    assert sequences(await page(daemon, "kept")) == [2, 1]
    await wait_for(lambda: _state_is(daemon, "short", "mine", "delivered"), timeout=5)
    status, shown = await daemon.request("GET", "/v1/status")
    assert status == 200
    assert shown["totals"]["history_records"] >= 2
    assert shown["totals"]["history_bytes"] > 0
    status, text = await daemon.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    records = families["webhookd_history_records"].samples[0].value
    assert records == shown["totals"]["history_records"] or records >= 2
    assert families["webhookd_history_bytes"].samples[0].value > 0
    pruned = {
        s.labels["reason"]: s.value
        for s in families["webhookd_history_pruned"].samples
        if s.name.endswith("_total")
    }
    assert pruned["age"] >= 2 and pruned["size"] == 0
    forgot = [s for s in families["webhookd_ids_forgotten"].samples if s.name.endswith("_total")]
    assert forgot[0].value >= 1
    dropped = families["webhookd_history_dropped"].samples
    assert [s.value for s in dropped if s.name.endswith("_total")] == [0]


async def test_no_history_when_retention_is_zero(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"off": tenant(receiver.url("/off"), history_retention="0")}
    )
    answer = await daemon.ingest("off", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/off") == [1], timeout=5)
    await wait_for(lambda: daemon.service.workers["off"].waiting == 0, timeout=5)
    assert (await page(daemon, "off"))["records"] == []
    found = await state(daemon, "off", answer["webhooks"][0]["id"])
    assert (found["state"], found["sequence"]) == ("expired", 1)


# -- listing -------------------------------------------------------------------------------------


async def test_history_pages_both_ways_and_filters(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    early = [{"event": EVENT if n % 2 else OTHER, "id": f"e-{n}"} for n in range(1, 11)]
    await daemon.ingest("acme", early)
    await wait_for(lambda: len(receiver.sequences("/acme")) == 10, timeout=10)
    between = time.time()
    await asyncio.sleep(0.05)
    await daemon.ingest("acme", [{"event": EVENT, "id": f"l-{n}"} for n in range(11, 26)])
    await wait_for(lambda: len(receiver.sequences("/acme")) == 25, timeout=10)
    await wait_for(lambda: daemon.service.workers["acme"].waiting == 0, timeout=5)

    # Newest first (the default), 10 a page, the cursor to the next.
    one = await page(daemon, "acme", "?limit=10")
    assert (sequences(one), one["next_cursor"], one["order"]) == (
        list(range(25, 15, -1)),
        16,
        "newest",
    )
    record = one["records"][0]
    assert (record["id"], record["event"], record["outcome"]) == ("l-25", EVENT, "delivered")
    assert (record["attempts"], record["status"], record["next_sequence"]) == (1, 200, None)
    assert record["accepted_at"].endswith("Z") and record["finished_at"].endswith("Z")
    two = await page(daemon, "acme", "?limit=10&cursor=16")
    assert sequences(two) == list(range(15, 5, -1))
    three = await page(daemon, "acme", "?limit=10&cursor=6")
    assert (sequences(three), three["next_cursor"]) == ([5, 4, 3, 2, 1], None)

    # Oldest first.
    up = await page(daemon, "acme", "?limit=10&order=oldest")
    assert (sequences(up), up["next_cursor"]) == (list(range(1, 11)), 10)
    up = await page(daemon, "acme", "?limit=10&order=oldest&cursor=20")
    assert (sequences(up), up["next_cursor"]) == (list(range(21, 26)), None)

    # Every filter, alone and together.
    assert sequences(await page(daemon, "acme", f"?event={OTHER}")) == [10, 8, 6, 4, 2]
    ranged = await page(daemon, "acme", "?from_sequence=3&to_sequence=7&order=oldest")
    assert sequences(ranged) == [3, 4, 5, 6, 7]
    assert sequences(await page(daemon, "acme", f"?until={between}")) == list(range(10, 0, -1))
    late = await page(daemon, "acme", f"?since={between}&order=oldest")
    assert sequences(late) == list(range(11, 26))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(between + 3600))
    assert sequences(await page(daemon, "acme", f"?since={stamp}")) == []
    both = await page(daemon, "acme", f"?event={EVENT}&to_sequence=9&from_sequence=2&limit=2")
    assert (sequences(both), both["next_cursor"]) == ([9, 7], 7)
    assert sequences(await page(daemon, "acme", "?outcome=parked,discarded")) == []
    assert len((await page(daemon, "acme", "?outcome=delivered"))["records"]) == 25

    # Bad input: a 400 that says what is wrong, and nothing changes.
    for query, says in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?order=sideways", "order"),
        ("?outcome=lost", "outcome"),
        ("?since=yesterday", "since"),
        ("?until=2026-12-01T00:00:00", "time zone"),
        ("?from_sequence=9&to_sequence=3", "from_sequence"),
        ("?cursor=-1", "cursor"),
        ("?since=2&until=1", "since"),
        ("?colour=blue", "unknown query parameter"),
    ]:
        status, body = await daemon.request("GET", f"/v1/tenants/acme/history{query}")
        assert status == 400, (query, body)
        assert body["error"] == "bad_request" and says in body["detail"], (query, body)
    status, body = await daemon.request("GET", "/v1/tenants/nobody/history")
    assert status == 404 and body["error"] == "not_found"


async def test_text_views_of_lookup_and_history(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    receiver.script("/acme", 503)
    await daemon.ingest("acme", [{"event": EVENT, "id": "t-" + "x" * 120}, {"event": OTHER}])
    await wait_for(lambda: daemon.service.workers["acme"].waiting == 0, timeout=5)

    status, text = await daemon.request(
        "GET", "/v1/tenants/acme/history", headers={"Accept": "text/plain"}
    )
    assert status == 200 and isinstance(text, str)
    lines = text.splitlines()
    assert lines[0].split() == [
        "SEQUENCE",
        "OUTCOME",
        "AGE",
        "ATTEMPTS",
        "STATUS",
        "TOOK",
        "EVENT",
        "ID",
    ]
    assert lines[1].split()[:2] == ["2", "delivered"]
    assert lines[2].split()[:2] == ["1", "delivered"] and lines[2].split()[3:5] == ["2", "200"]
    assert lines[-1] == "acme: 2 records, newest first; no more"
    assert all(len(line) <= 80 for line in lines), text

    status, text = await daemon.request("GET", "/v1/tenants/acme/history?limit=1&format=text")
    assert text.splitlines()[-1] == "acme: 1 record, newest first; next page: cursor=2"

    status, text = await daemon.request(
        "GET", f"/v1/tenants/acme/webhooks/t-{'x' * 120}?format=text"
    )
    assert status == 200
    pairs = fields(text)
    assert pairs["state"] == "delivered" and pairs["sequence"] == "1"
    assert (pairs["attempts"], pairs["answer"]) == ("2", "HTTP 200")
    assert "failed attempts (newest first, 1):" in text and "HTTP 503" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text


async def test_cli_show_and_history_against_a_subprocess(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"))})
    remote = await start_process(process_factory, path, session)
    for n in range(1, 4):
        await remote.call(
            "POST", "/v1/tenants/acme/webhooks", json={"event": EVENT, "id": f"c/{n}"}
        )
    await remote.until("acme", lambda s: s["waiting"] == 0)

    async def run(*args: str) -> str:
        code, out, err = await run_cli(*args, "-c", str(path))
        assert (code, err) == (0, ""), (args, err)
        return out

    shown = fields(await run("show", "acme", "c/2"))
    assert (shown["state"], shown["sequence"], shown["id"]) == ("delivered", "2", "c/2")
    as_json = json.loads(await run("show", "acme", "c/2", "--json"))
    assert (as_json["state"], as_json["sequence"]) == ("delivered", 2)

    listed = await run("history", "acme", "--limit", "2")
    assert [line.split()[0] for line in listed.splitlines()[1:3]] == ["3", "2"]
    assert listed.splitlines()[-1] == "acme: 2 records, newest first; next page: cursor=2"
    listed = await run("history", "acme", "--oldest", "--cursor", "1", "--to-sequence", "2")
    assert [line.split()[0] for line in listed.splitlines()[1:2]] == ["2"]
    as_json = json.loads(await run("history", "acme", "--json", "--outcome", "delivered"))
    assert [r["id"] for r in as_json["records"]] == ["c/3", "c/2", "c/1"]

    code, _, err = await run_cli("show", "acme", "never", "-c", str(path))
    assert code == 1 and err.startswith("error: acme never had a webhook"), err
    code, _, err = await run_cli("history", "acme", "--since", "monday", "-c", str(path))
    assert code == 1 and "since must be an RFC 3339 time" in err, err


# -- several instances (PostgreSQL) --------------------------------------------------------------


async def test_lookup_and_history_answer_on_a_non_owner_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    """B does not hold the tenant: its listing comes from the database, and a lookup that
    must say in_flight asks A, the owner (forwarded as the controls are)."""
    a, b, name = await two_instances(tmp_path, receiver, postgres_url, start_instance)
    await b.ingest(name, [{"event": EVENT, "id": f"n-{n}"} for n in range(3)])
    await wait_for(lambda: receiver.sequences(f"/{name}") == [1, 2, 3], timeout=5)
    await wait_for(lambda: a.service.workers[name].waiting == 0, timeout=5)

    assert sequences(await page(b, name)) == [3, 2, 1]
    done = await state(b, name, "n-1")
    assert (done["state"], done["sequence"], done["status"]) == ("delivered", 2, 200)

    hold = Hold()
    receiver.script(f"/{name}", hold)
    await b.ingest(name, [{"event": EVENT, "id": "held"}, {"event": EVENT, "id": "behind"}])
    await asyncio.wait_for(hold.arrived.wait(), 5)
    status, body = await lookup(b, name, "held")
    assert (status, body["state"], body["sequence"]) == (200, "in_flight", 4), body
    behind = await state(b, name, "behind")
    assert (behind["state"], behind["position"]) == ("queued", 2)
    hold.release.set()
    await wait_for(lambda: _state_is(b, name, "behind", "delivered"), timeout=5)
