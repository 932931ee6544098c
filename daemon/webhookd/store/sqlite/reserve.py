"""A ballast file beside the database, so a full disk stops ingest but not delivery.

Recording a delivery needs room in SQLite's write-ahead log. On a disk that ingest has
filled, that room is gone, and without it no 200 can be recorded: the head webhook would be
sent again and again and nothing behind it would move. So the store keeps a reserve file;
when a commit fails for lack of space it releases the reserve, refuses ingest, and goes on
recording outcomes in the space it freed. Once the reserve can be made again (someone freed
space), ingest resumes.

What the freed space must hold, and so the reserve's size (a fixed number of pages, not a
share of the volume: a small volume needs it as much as a large one):

- the checkpoint of the WAL as it stands when the disk fills. Until the WAL is copied into
  the database file it cannot start over, and every later commit would need it to grow; the
  copy must extend the database file by as many pages as the WAL holds that the file does
  not. `wal_autocheckpoint` keeps that under WAL_PAGES, and the store refuses an ingest
  whose own checkpoint would not fit in the free space (engine.py, `_check_room`), so a big
  ingest cannot leave more than that behind;
- the outcomes recorded while full (OUTCOME_PAGES): in-place writes of a page or two each
  (an acknowledgement only moves `acked_sequence`, see writes.py), which the WAL, restarted
  after every commit while full, takes again and again from the same space; the margin also
  covers the odd page a state-row update splits and the WAL frames the ingest check counts
  loosely.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# `PRAGMA wal_autocheckpoint`: the WAL is copied into the database once it holds this many
# pages (1 MiB at the 4 KiB default). SQLite's own default, 1000, let the WAL reach 4 MB on
# an 8 MiB volume, more than any reserve it could spare.
WAL_PAGES = 256
OUTCOME_PAGES = 64
# A WAL frame is a page plus this header; the file has a 32-byte header of its own.
WAL_FRAME_HEADER = 24


def size_for(page_size: int) -> int:
    """The reserve: a checkpoint of a WAL at its bound, plus room for outcomes."""
    return (WAL_PAGES + OUTCOME_PAGES) * page_size


def wal_limit(page_size: int) -> int:
    """`PRAGMA journal_size_limit`: the size the WAL file is cut back to once restarted,
    so that one big transaction does not leave a WAL file that big for good."""
    return 32 + WAL_PAGES * (page_size + WAL_FRAME_HEADER)


class Reserve:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        return self.path.exists()

    def room(self) -> bool:
        """Whether the filesystem has space for the reserve (and then some)."""
        if self.held:
            return True
        return free_bytes(self.path.parent) > 2 * self.size

    def make(self) -> bool:
        """Create the reserve (if missing); False when the disk has no room for it."""
        if self.held:
            return True
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _allocate(fd, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        return True

    def release(self) -> bool:
        """Delete the reserve; True if there was one to give back."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


def free_bytes(directory: Path) -> int:
    """Bytes this process may still write on the filesystem holding `directory`."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def _allocate(fd: int, size: int) -> None:
    """Really take the blocks (a sparse file would reserve nothing)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        chunk = b"\0" * 65536
        for _ in range(0, size, len(chunk)):
            os.write(fd, chunk)
