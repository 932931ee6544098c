"""The PostgreSQL engine of the `Store`: one database, owned by one daemon (for now).

- `engine.py`: `PostgresStore`, the writer task, group commits, reads on a pool, reconnection
- `writes.py`: the write operations applied inside a group commit, one class each
- `schema.py`: versioned migrations (the `webhookd_schema` table) and what start-up reads back
- `connection.py`: sessions, the instance lock that keeps a second daemon off the database,
  and what a connection error means for the operator
"""

from webhookd.store.postgres.engine import PostgresStore
from webhookd.store.postgres.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "PostgresStore"]
