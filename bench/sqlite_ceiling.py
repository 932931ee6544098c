"""SQLite's own limits on this disk, measured with a bare sqlite3 loop (no daemon).

Rows have the shape the store writes (tenant, sequence, id, event, accepted_at, data) into a
table with the same unique queue index, with the pragmas the store sets at connect.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

import orjson

from bench.harness import EVENT
from bench.load import sample_data

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA cache_size = -65536",
)
SCHEMA = (
    """CREATE TABLE webhooks (
        tenant TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        id TEXT NOT NULL,
        event TEXT NOT NULL,
        accepted_at REAL NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE UNIQUE INDEX webhooks_queue ON webhooks (tenant, sequence)",
    """CREATE TABLE tenant_state (
        tenant TEXT PRIMARY KEY,
        acked_sequence INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in (*PRAGMAS, *SCHEMA):
        conn.execute(statement)
    return conn


def group_commit_rows_per_s(path: Path, *, rows_per_tx: int, duration: float) -> float:
    """Rows/s inserting `rows_per_tx` rows per transaction (synchronous=FULL, WAL)."""
    conn = _connect(path)
    tenants = [f"t{i:02d}" for i in range(100)]
    sequences = dict.fromkeys(tenants, 0)
    data = orjson.dumps(sample_data(1)).decode()
    inserted = 0
    started = time.perf_counter()
    deadline = started + duration
    tx = 0
    try:
        while time.perf_counter() < deadline:
            tenant = tenants[tx % len(tenants)]
            tx += 1
            first = sequences[tenant]
            sequences[tenant] = first + rows_per_tx
            now = time.time()
            rows = [
                (tenant, first + i + 1, str(uuid.uuid4()), EVENT, now, data)
                for i in range(rows_per_tx)
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
            inserted += rows_per_tx
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    return inserted / elapsed


def commits(path: Path, *, duration: float) -> tuple[float, list[float]]:
    """Durable one-row transactions: per second, and each one's duration in seconds.

    The rate bounds one unbatched tenant (an ack commit per webhook); the durations are the
    floor under ingest latency (an ingest answers after its commit).
    """
    conn = _connect(path)
    conn.execute("INSERT INTO tenant_state (tenant) VALUES ('t')")
    durations: list[float] = []
    started = time.perf_counter()
    deadline = started + duration
    try:
        while (now := time.perf_counter()) < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE tenant_state SET acked_sequence = acked_sequence + 1")
            conn.execute("COMMIT")
            durations.append(time.perf_counter() - now)
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    return len(durations) / elapsed, durations
