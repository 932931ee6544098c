"""The store: every byte of SQL webhookd runs lives in this package.

`Store` is the one interface the scheduler, service and API use (enqueue, acknowledge,
record_failure, park, requeue, read_queue, ...); `sqlite.py` implements it on SQLite.
A shared engine (PostgreSQL with per-tenant advisory locks, say) would be another module
behind the same methods, without touching the scheduler.

- `records.py`: the immutable rows that cross this boundary, and the store's errors
- `schema.py`: versioned migrations and what start-up reads back
- `writes.py`: the write operations applied inside a group commit
- `reserve.py`: the ballast file that keeps deliveries recordable on a full disk
"""

from webhookd.store.records import (
    Failure,
    IngestResult,
    IngestStatus,
    NewWebhook,
    ParkedWebhook,
    SchemaTooNew,
    StoreError,
    TenantRecord,
    TenantRow,
    Webhook,
)
from webhookd.store.schema import SCHEMA_VERSION
from webhookd.store.sqlite import Store
from webhookd.store.writes import generated_id, generated_sequence, id_tag

__all__ = [
    "SCHEMA_VERSION",
    "Failure",
    "IngestResult",
    "IngestStatus",
    "NewWebhook",
    "ParkedWebhook",
    "SchemaTooNew",
    "Store",
    "StoreError",
    "TenantRecord",
    "TenantRow",
    "Webhook",
    "generated_id",
    "generated_sequence",
    "id_tag",
]
