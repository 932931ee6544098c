"""One daemon per database: an exclusive lock held for as long as the store is open.

Two daemons on one SQLite file would each think they own every queue: both would send
the same heads, and each would record the other's sequences as its own. SQLite's own
locks only serialise transactions, so the store takes `flock` on a file beside the
database (`webhookd.db-lock`, holding the owner's pid) and refuses to open when another
process holds it. The kernel drops the lock when its holder exits, `kill -9` included,
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from webhookd.records import StoreError


class DatabaseLock:
    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + "-lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StoreError naming the process that has it."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"the database {self.database} is in use by another webhookd (pid {holder}); "
                "stop that one first, or give this one its own database in [daemon]"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: removing it would race with another daemon taking it.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
