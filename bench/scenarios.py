"""The scenarios `--only` chooses from, in run order. Each starts its own daemon."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.backlog import backlog
from bench.ceilings import ceilings
from bench.cluster import cluster_throughput, cross_latency, failover
from bench.context import Context
from bench.delivery import drain_batched, e2e_batched, unbatched_many, unbatched_one
from bench.history import history_cost, history_list, history_prune, history_tenants
from bench.history_size import history_size
from bench.ingest import ingest
from bench.steady import idle, latency
from bench.sustained import sustained

Scenario = Callable[[Context], Awaitable[None]]

# In run order; the ceilings come first so every ratio has its denominator.
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "ceilings": ("(d) ceilings: receiver and SQLite (PostgreSQL: its commit rates)", ceilings),
    "ingest": ("(a) durable ingest, tenants paused", ingest),
    "drain": ("(b) batched drain of a backlog, 100 tenants", drain_batched),
    "e2e": ("(b) batched end to end with ingest running, 100 tenants", e2e_batched),
    "unbatched1": ("(b) unbatched drain, 1 tenant", unbatched_one),
    "unbatched1000": ("(b) unbatched drain, 1000 tenants", unbatched_many),
    "latency": ("(c) unbatched ingest→delivery latency at 500/s, 50 tenants", latency),
    "historycost": ("history off and on: batched end to end, unbatched 1000 tenants", history_cost),
    "historylist": ("history: a page of 100 with 10,000,000 records stored", history_list),
    "historyprune": ("history: 1,000,000 records pruned under load at 500/s", history_prune),
    "historysize": ("history: disk per retained webhook, with and without payloads", history_size),
    "historytenants": (
        "history: 10,000 tenants pruned by size under load at 500/s",
        history_tenants,
    ),
    "cluster": (
        "two instances on one PostgreSQL: batched end to end, unbatched over 1000 tenants",
        cluster_throughput,
    ),
    "crosslatency": ("two instances: latency at 500/s, ingested on the non-owner", cross_latency),
    "failover": ("two instances: kill -9 of an owner, until its tenants deliver again", failover),
    "idle": ("(e) idle tenants", idle),
    "backlog": ("large backlogs: 1,000,000 queued across 1,000 tenants", backlog),
    "sustained": ("sustained load: 5,000 events/s for 60 s, 10 % failing, 5 % slow", sustained),
}

# The scenarios that also run with the daemon on PostgreSQL (`--engine postgres|both`). The
# others stay on SQLite: backlog builds its SQLite file directly, idle and sustained measure
# the daemon alone.
POSTGRES_SCENARIOS = frozenset(
    {
        "ceilings",
        "ingest",
        "drain",
        "e2e",
        "unbatched1",
        "unbatched1000",
        "latency",
        "historycost",
        "historylist",
        "historyprune",
        "historysize",
        "historytenants",
    }
)

# Several instances on one database: PostgreSQL only (skipped when only SQLite runs).
POSTGRES_ONLY = frozenset({"cluster", "crosslatency", "failover"})
