"""The store: every byte of SQL webhookd runs lives in this package.

`Store` (protocol.py) is the one interface the service, the scheduler and the metrics use
(enqueue, acknowledge, record_failure, park, requeue, read_queue, ...), with the guarantees
each method keeps. Each engine implements it in its own folder, and `make_store` picks the
engine for the configured database:

- `sqlite/`: one SQLite file beside the daemon (`SqliteStore`), the default
- `postgres/`: a PostgreSQL database (`PostgresStore`), when `database` is a URL

The rows that cross this boundary, and the store's errors, are in `webhookd.records`; the
generated ids in `webhookd.ids`: neither is SQL, and the sender and status use them
without importing the store. tests/test_store_contract.py runs the same behaviour against
every engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from webhookd.config import PostgresURL
from webhookd.store.postgres import PostgresStore
from webhookd.store.protocol import Store
from webhookd.store.sqlite import SqliteStore

__all__ = ["Store", "make_store"]


def make_store(
    database: Path | PostgresURL,
    durability: Literal["full", "normal"] = "full",
    lease_seconds: float = 10.0,
) -> Store:
    """The engine for `database` (unopened: `await store.open()`). Typed as `Store`, so the
    type checker holds each engine to the interface."""
    if isinstance(database, PostgresURL):
        return PostgresStore(database, durability=durability, lease_seconds=lease_seconds)
    return SqliteStore(database, durability=durability)
