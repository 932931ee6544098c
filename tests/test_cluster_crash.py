"""A seeded crash oracle: three `webhookd run` processes on one PostgreSQL database, ingest
spread over them, while at random moments one of them is killed (kill -9, then started
again) or frozen past its lease (SIGSTOP, then SIGCONT), or the PostgreSQL server is
restarted under them.

The seed is printed; WEBHOOKD_CRASH_SEED=<seed> replays the run's choices (not the
machine's timing). WEBHOOKD_CRASH_SECONDS runs longer (`make fuzz`: several minutes).

What the oracle checks, from what the producers were answered, what the receiver got (each
request noted as it arrives, before it is answered) and the instances' own logs:

1. Every webhook whose ingest was acknowledged (202) arrived, with the id, sequence and data
   it was given. No ingest got another answer than 202, none (a killed or frozen
   instance), or 503 `unavailable` while the database was away: no acknowledgement.
2. Per tenant, first deliveries run 1..N in arrival order: no gap, nothing out of order.
3. Re-sends are only of requests in flight at a lease loss. A request is a re-send when it
   holds a sequence that had arrived before. Only a *forced* claim may cause one: a
   tenant's lease taken by an instance (its `lease_claimed` line) when the previous owner
   had not handed it over (no `lease_handed_over` from it since its own claim), because it
   was killed, frozen or cut off. Its request in flight may have reached the receiver and
   gone unrecorded (the new owner sends it again), or, picked just before a freeze, may
   leave after it (the new owner sent it first). So each re-send is matched to a forced
   claim of its tenant made before the re-send arrived, each claim used once, and the
   sequences it repeats must lie in the tenant's head at that claim: from the first
   sequence of the last request that had arrived (perhaps unrecorded) to the highest
   sequence delivered plus one batch (a batch picked before a freeze). A re-send with no
   such claim, a second one for the same claim, or one repeating older sequences fails.
4. The delivery history (read through an instance's API, from the shared database) never
   says "delivered" for a webhook the receiver never got, and has a record, with the id and
   data the receiver got, for each one it got: the record is written in the
   acknowledgement's transaction, whichever instance made it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.conftest import Process, Receiver, tenant, wait_for, write_config
from tests.postgres import PostgresServer

EVENT = "CHECK_COMPLETED"
LEASE_S = 2.0
BATCH = 20
SEED = int(os.environ.get("WEBHOOKD_CRASH_SEED") or random.randrange(2**32))
RUN_S = float(os.environ.get("WEBHOOKD_CRASH_SECONDS") or 16)
# Tenant: its batch size (1: unbatched).
TENANTS = {"b0": BATCH, "b1": BATCH, "u0": 1, "u1": 1, "u2": 1, "u3": 1}

ProcessFactory = Callable[..., Process]


# -- instances -----------------------------------------------------------------------------------


class Instance(Process):
    """One `webhookd run` of the cluster, in a folder of its own (its config and log)."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def events(self) -> list[dict[str, Any]]:
        """Its log's JSON lines, every run of it (a restart appends)."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by kill -9
        return found


def tenant_tables(receiver: Receiver, names: dict[str, int]) -> dict[str, dict[str, Any]]:
    tables = {}
    for name, size in names.items():
        if size > 1:
            tables[name] = tenant(
                receiver.url(f"/{name}"), batching=True, batch_size=size, batch_window=0.05
            )
        else:
            tables[name] = tenant(receiver.url(f"/{name}"))
    return tables


@pytest.fixture
def cluster(
    tmp_path: Path, postgres_url: str
) -> Iterator[Callable[[dict[str, dict[str, Any]], int], list[Instance]]]:
    """Make `count` instances of a configuration on the test's database (not started);
    killed at teardown (SIGKILL ends a frozen one too)."""
    made: list[Instance] = []

    def make(
        tables: dict[str, dict[str, Any]],
        count: int = 3,
        env: Callable[[int], dict[str, str]] | None = None,
        **daemon: Any,
    ) -> list[Instance]:
        instances = []
        for n in range(count):
            directory = tmp_path / f"instance{len(made) + n}"
            directory.mkdir()
            path = write_config(
                directory,
                tables,
                daemon={
                    "database": postgres_url,
                    "lease_seconds": LEASE_S,
                    "log_level": "info",
                    "log_format": "json",
                    **daemon,
                },
            )
            instances.append(Instance(path, env(n) if env is not None else None))
        made.extend(instances)
        return instances

    yield make
    for instance in made:
        instance.stop()


async def start_all(instances: list[Instance]) -> None:
    await asyncio.gather(*(asyncio.to_thread(i.start, 30.0) for i in instances))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Long enough for a request to an instance frozen past its lease to be answered after.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


async def waiting_in_database(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value = await conn.fetchval(
            "SELECT coalesce(sum(c.last_sequence - s.acked_sequence), 0) "
            "FROM tenant_state AS s JOIN counters AS c USING (tenant)"
        )
        return int(value)
    finally:
        await conn.close()


# -- what the receiver got -----------------------------------------------------------------------


@dataclass
class Arrival:
    at: float  # wall clock, as the instances' log lines have it
    webhooks: list[dict[str, Any]]

    @property
    def sequences(self) -> list[int]:
        return [w["sequence"] for w in self.webhooks]


def recording(arrivals: list[Arrival], rng: random.Random) -> Any:
    """Note each request as it arrives (before answering: a request counts as arrived even
    if its sender is killed before the answer), then answer 200 after a few milliseconds."""

    async def answer(request: web.Request) -> web.StreamResponse:
        document = json.loads(await request.read())
        arrivals.append(
            Arrival(time.time(), document if isinstance(document, list) else [document])
        )
        await asyncio.sleep(rng.uniform(0.0, 0.01))
        return web.Response(text="ok")

    return answer


# -- producers -----------------------------------------------------------------------------------


@dataclass
class Acked:
    tenant: str
    id: str
    sequence: int
    n: int


@dataclass
class Producers:
    """Producers ingesting into random instances; what was acknowledged (202) is owed."""

    session: aiohttp.ClientSession
    instances: list[Instance]
    rng: random.Random
    acked: list[Acked] = field(default_factory=list)
    unanswered: int = 0
    unexpected: list[tuple[str, int, Any]] = field(default_factory=list)
    # A 503 "unavailable": (instance, when, detail).
    refused: list[tuple[str, float, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    async def run(self) -> None:
        while not self.stop.is_set():
            name = self.rng.choice(list(TENANTS))
            instance = self.rng.choice(self.instances)
            batched = TENANTS[name] > 1
            items = []
            for _ in range(self.rng.randint(1, 30) if batched else self.rng.randint(1, 3)):
                n = next(self.counter)
                item: dict[str, Any] = {"event": EVENT, "data": {"n": n}}
                if self.rng.random() < 0.5:
                    item["id"] = f"producer-{n}"
                items.append(item)
            single = len(items) == 1 and self.rng.random() < 0.5
            url = f"{instance.base}/v1/tenants/{name}/webhooks"
            try:
                async with self.session.post(url, json=items[0] if single else items) as response:
                    status, body = response.status, await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError):
                # Killed mid-request or not started yet: no answer, nothing owed. Pace the
                # next try (the producer's retry rhythm, not a synchronisation).
                self.unanswered += 1
                await asyncio.sleep(0.05)
                continue
            if status == 503 and body.get("error") == "unavailable":
                self.refused.append((instance.base, time.monotonic(), body.get("detail")))
                await asyncio.sleep(0.05)
                continue
            if status != 202:
                self.unexpected.append((instance.base, status, body))
                continue
            for item, webhook in zip(items, body["webhooks"], strict=True):
                if webhook["status"] != "queued" or webhook["id"] != item.get("id", webhook["id"]):
                    self.unexpected.append((instance.base, status, webhook))
                    continue
                self.acked.append(
                    Acked(name, webhook["id"], webhook["sequence"], item["data"]["n"])
                )
            await asyncio.sleep(self.rng.uniform(0.0, 0.03))


# -- faults --------------------------------------------------------------------------------------


@dataclass
class Faults:
    """What was done, for the failure message, and when the database was away."""

    log: list[str] = field(default_factory=list)
    # (instance's API, or "" for the database: every instance; start, end), monotonic.
    outages: list[tuple[str, float, float]] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.log.append(f"{time.time():.3f} {what}")

    def excuse(self, base: str, at: float) -> bool:
        """Whether a 503 from `base` at `at` came from the database being away, or from
        its own freeze: the server ended its session, idle inside a transaction (its group
        commit rolled back, the ingests in it refused). Reconnecting after either takes a
        few seconds more."""
        return any(
            who in ("", base) and start <= at <= end + RECONNECT_S
            for who, start, end in self.outages
        )


RECONNECT_S = 5.0  # the writer reconnects within 2 s of the server's return (engine.py)


async def inject_faults(
    instances: list[Instance],
    server: PostgresServer,
    rng: random.Random,
    seconds: float,
    faults: Faults,
) -> None:
    """One fault after another, at random moments: an instance killed or frozen, or now
    and then the database server restarted (fast, or immediate as after a crash)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        victim = rng.randrange(len(instances))
        instance = instances[victim]
        dice = rng.random()
        if dice < 0.15:
            mode = rng.choice(("fast", "immediate"))
            started = time.monotonic()
            await asyncio.to_thread(server.stop, mode)
            faults.note(f"PostgreSQL stopped ({mode})")
            await asyncio.sleep(rng.uniform(0.2, 1.5 * LEASE_S))
            await asyncio.to_thread(server.start)
            faults.outages.append(("", started, time.monotonic()))
            faults.note("PostgreSQL started")
        elif dice < 0.55:
            instance.kill9()
            faults.note(f"kill -9 instance{victim}")
            await asyncio.sleep(rng.uniform(0.0, LEASE_S))
            await asyncio.to_thread(instance.start, 30.0)
            faults.note(f"instance{victim} started again")
        else:
            instance.signal(signal.SIGSTOP)
            started = time.monotonic()
            faults.note(f"SIGSTOP instance{victim}")
            await asyncio.sleep(LEASE_S + rng.uniform(0.3, 1.5))
            instance.signal(signal.SIGCONT)
            faults.outages.append((instance.base, started, time.monotonic()))
            faults.note(f"SIGCONT instance{victim}")


# -- the oracle ----------------------------------------------------------------------------------


def stamp(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def forced_claims(instances: list[Instance]) -> dict[str, list[float]]:
    """Per tenant, when its lease was claimed from an owner that had not handed it over."""
    moves = sorted(
        (stamp(entry), slot, entry["event"], entry["tenant"])
        for slot, instance in enumerate(instances)
        for entry in instance.events()
        if entry.get("event") in ("lease_claimed", "lease_handed_over")
    )
    owners: dict[str, tuple[int, bool]] = {}  # tenant: (slot, handed over since)
    forced: dict[str, list[float]] = {name: [] for name in TENANTS}
    for at, slot, event, name in moves:
        if event == "lease_claimed":
            previous = owners.get(name)
            if previous is not None and not previous[1]:
                forced[name].append(at)
            owners[name] = (slot, False)
        elif owners.get(name, (-1, False))[0] == slot:
            owners[name] = (slot, True)
    return forced


def head_at(arrivals: list[Arrival], at: float, size: int) -> set[int]:
    """The sequences a request in flight at `at` may hold: from the first of the last
    request arrived by then to the highest arrived plus one batch."""
    before = [a for a in arrivals if a.at < at]
    if not before:
        return set(range(1, size + 1))
    highest = max(max(a.sequences) for a in before)
    return set(range(before[-1].sequences[0], highest + size + 1))


def match(resends: list[tuple[float, set[int]]], claims: list[tuple[float, set[int]]]) -> bool:
    """Whether every re-send can have a claim of its own (made before it, whose head holds
    what it repeats): a bipartite matching, found by augmenting paths."""
    taken: dict[int, int] = {}  # claim: re-send

    def place(r: int, seen: set[int]) -> bool:
        at, repeated = resends[r]
        for c, (claimed_at, head) in enumerate(claims):
            if c in seen or claimed_at > at or not repeated <= head:
                continue
            seen.add(c)
            if c not in taken or place(taken[c], seen):
                taken[c] = r
                return True
        return False

    return all(place(r, set()) for r in range(len(resends)))


async def delivered_history(
    session: aiohttp.ClientSession, instance: Instance, name: str
) -> dict[int, dict[str, Any]]:
    """The tenant's history records that say delivered, by sequence, every page."""
    found: dict[int, dict[str, Any]] = {}
    cursor = ""
    while True:
        url = f"{instance.base}/v1/tenants/{name}/history?order=oldest&limit=1000{cursor}"
        async with session.get(url) as response:
            assert response.status == 200, (url, response.status, await response.text())
            page = await response.json()
        found.update({r["sequence"]: r for r in page["records"] if r["outcome"] == "delivered"})
        if page["next_cursor"] is None:
            return found
        cursor = f"&cursor={page['next_cursor']}"


def check_history(
    name: str, arrivals: list[Arrival], delivered: dict[int, dict[str, Any]], context: str
) -> None:
    got = {w["sequence"]: w for arrival in arrivals for w in arrival.webhooks}
    never = sorted(set(delivered) - set(got))
    assert never == [], f"{name}: history says delivered, never received: {never}; {context}"
    for sequence, record in delivered.items():
        webhook = got[sequence]
        assert (record["id"], record["data"]) == (webhook["id"], webhook["data"]), (
            f"{name}: the history's record differs from what arrived: {record} {webhook}; {context}"
        )
    unrecorded = sorted(set(got) - set(delivered))
    assert unrecorded == [], f"{name}: received, no history record: {unrecorded}; {context}"


def check_tenant(
    name: str, arrivals: list[Arrival], acked: list[Acked], claims: list[float], context: str
) -> str:
    size = TENANTS[name]
    seen: dict[int, dict[str, Any]] = {}
    firsts: list[int] = []
    resends: list[tuple[float, set[int]]] = []
    for arrival in arrivals:
        sequences = arrival.sequences
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), (
            f"{name}: a request with sequences out of order {sequences}; {context}"
        )
        assert len(sequences) <= size, f"{name}: a batch above {size}: {sequences}; {context}"
        repeated = {s for s in sequences if s in seen}
        for webhook in arrival.webhooks:
            first = seen.setdefault(webhook["sequence"], webhook)
            if first is webhook:
                firsts.append(webhook["sequence"])
            assert webhook["id"] == first["id"], (name, "same sequence, other id", webhook, first)
        if repeated:
            resends.append((arrival.at, repeated))
    # 2. First deliveries are exactly 1..N, in order.
    assert firsts == list(range(1, len(firsts) + 1)), (
        f"{name}: first deliveries not 1..N in order: "
        f"{[s for i, s in enumerate(firsts) if s != i + 1][:20]}; {context}"
    )
    # 1. Every acknowledged webhook arrived as it was given.
    for owed in acked:
        got = seen.get(owed.sequence)
        assert got is not None, f"{name}: acknowledged {owed} never arrived; {context}"
        assert (got["id"], got["data"]) == (owed.id, {"n": owed.n}), (owed, got, context)
    # 3. Each re-send has a forced claim of its own, and repeats only that claim's head.
    heads = [(at, head_at(arrivals, at, size)) for at in claims]
    assert match(resends, heads), (
        f"{name}: re-sends not explained by a lease lost with a request in flight: "
        f"re-sent {[(round(at, 3), min(r), max(r)) for at, r in resends]}, forced claims at "
        f"{[round(at, 3) for at in claims]} with heads "
        f"{[(min(h), max(h)) for _, h in heads]}; {context}"
    )
    spans = ", ".join(f"{min(r)}-{max(r)}" for _, r in resends)
    return (
        f"{name}: {len(firsts)} in {len(arrivals)} requests, {len(claims)} forced claims, "
        f"re-sent {spans or '-'}"
    )


async def test_kill9_and_freezes_of_instances_lose_nothing_keep_order_and_resend_only_in_flight(
    receiver: Receiver,
    postgres_server: PostgresServer,
    postgres_url: str,
    cluster: Callable[..., list[Instance]],
    session: aiohttp.ClientSession,
) -> None:
    print(f"cluster crash seed {SEED} (rerun with WEBHOOKD_CRASH_SEED={SEED})")
    rng = random.Random(SEED)
    arrivals: dict[str, list[Arrival]] = {name: [] for name in TENANTS}
    for name in TENANTS:
        receiver.always(f"/{name}", recording(arrivals[name], random.Random(rng.random())))
    instances = cluster(tenant_tables(receiver, TENANTS), 3)
    await start_all(instances)

    producers = Producers(session, instances, random.Random(rng.random()))
    producing = [asyncio.create_task(producers.run()) for _ in range(4)]
    faults = Faults()
    try:
        await inject_faults(instances, postgres_server, random.Random(rng.random()), RUN_S, faults)
    finally:
        producers.stop.set()
        await asyncio.gather(*producing)

    async def drained() -> bool:
        delivered = all(
            any(s == a.sequence for r in arrivals[a.tenant] for s in r.sequences)
            for a in producers.acked[-50:]
        )
        return delivered and await waiting_in_database(postgres_url) == 0

    logs = "\n".join(f"--- instance{n}:\n{i.log()[-2000:]}" for n, i in enumerate(instances))
    context = f"seed {SEED}; faults: {faults.log}"
    try:
        await wait_for(drained, timeout=30, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not drained within 30 s; {context}\n{logs}") from None
    assert producers.unexpected == [], f"{producers.unexpected[:5]}; {context}"
    # 503 only while the database was away, or from a frozen instance.
    refused = [r for r in producers.refused if not faults.excuse(r[0], r[1])]
    assert refused == [], f"ingests refused with no outage to explain it: {refused}; {context}"
    assert len(producers.acked) > 300, f"too little ingested to mean anything; {context}"

    claims = forced_claims(instances)
    assert sum(len(c) for c in claims.values()) > 0, f"no lease was ever taken over; {context}"
    for name in TENANTS:
        acked = [a for a in producers.acked if a.tenant == name]
        print(check_tenant(name, arrivals[name], acked, claims[name], context))
        delivered = await delivered_history(session, instances[0], name)
        check_history(name, arrivals[name], delivered, context)
    print(
        f"{len(producers.acked)} acknowledged, {producers.unanswered} ingest requests "
        f"unanswered, {len(producers.refused)} refused (503); faults: {faults.log}"
    )
