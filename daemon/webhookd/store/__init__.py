"""The store: every byte of SQL webhookd runs lives in this package.

`Store` (protocol.py) is the one interface the service, the scheduler and the metrics use
(enqueue, acknowledge, record_failure, park, requeue, read_queue, ...), with the guarantees
each method keeps; `make_store` builds the engine for the configured database. `sqlite.py`
implements it on SQLite. A shared engine (PostgreSQL with per-tenant advisory locks, say)
would be another module behind the same methods, without touching the scheduler.

The rows that cross this boundary, and the store's errors, are in `webhookd.records`; the
generated ids in `webhookd.ids`: neither is SQL, and the sender and the views use them
without importing the store.

- `schema.py`: versioned migrations and what start-up reads back
- `writes.py`: the write operations applied inside a group commit
- `reserve.py`: the ballast file that keeps deliveries recordable on a full disk
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from webhookd.store.protocol import Store
from webhookd.store.schema import SCHEMA_VERSION
from webhookd.store.sqlite import SqliteStore

__all__ = ["SCHEMA_VERSION", "Store", "make_store"]


def make_store(database: Path, durability: Literal["full", "normal"] = "full") -> Store:
    """The engine for `database` (unopened: `await store.open()`). Typed as `Store`, so the
    type checker holds each engine to the interface."""
    return SqliteStore(database, durability=durability)
