"""The store: every byte of SQL webhookd runs lives in this package.

`Store` is the one interface the scheduler, service and API use (enqueue, acknowledge,
record_failure, park, requeue, read_queue, ...); `sqlite.py` implements it on SQLite.
A shared engine (PostgreSQL with per-tenant advisory locks, say) would be another module
behind the same methods, without touching the scheduler.

The rows that cross this boundary, and the store's errors, are in `webhookd.records`; the
generated ids in `webhookd.ids`: neither is SQL, and the sender and the views use them
without importing the store.

- `schema.py`: versioned migrations and what start-up reads back
- `writes.py`: the write operations applied inside a group commit
- `reserve.py`: the ballast file that keeps deliveries recordable on a full disk
"""

from webhookd.store.schema import SCHEMA_VERSION
from webhookd.store.sqlite import Store

__all__ = ["SCHEMA_VERSION", "Store"]
