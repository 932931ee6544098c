"""The SQLite engine of the `Store`: one database file, owned by one daemon.

- `engine.py`: `SqliteStore`, the writer thread, group commits, the reads beside it
- `writes.py`: the write operations applied inside a group commit, one class each
- `schema.py`: versioned migrations (`PRAGMA user_version`) and what start-up reads back
- `reserve.py`: the ballast file that keeps deliveries recordable on a full disk
- `lock.py`: the lock file that keeps a second daemon off the database
"""

from webhookd.store.sqlite.engine import SqliteStore
from webhookd.store.sqlite.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SqliteStore"]
