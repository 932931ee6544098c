"""A ballast file beside the database, so a full disk stops ingest but not delivery.

Recording a delivery (a DELETE) needs room in SQLite's write-ahead log. On a disk that
ingest has filled, that room is gone, and without it no 200 can be recorded: the head
webhook would be sent again and again and nothing behind it would move. So the store keeps
a reserve file; when a commit fails for lack of space it releases the reserve, refuses
ingest, and goes on recording deliveries in the space it freed. Once the reserve can be
made again (someone freed space), ingest resumes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

MIN_BYTES = 256 * 1024
MAX_BYTES = 8 * 1024 * 1024


def size_for(directory: Path) -> int:
    """1/64 of the filesystem, between 256 KiB and 8 MiB."""
    stats = os.statvfs(directory)
    return max(MIN_BYTES, min(MAX_BYTES, stats.f_blocks * stats.f_frsize // 64))


class Reserve:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0

    @property
    def held(self) -> bool:
        return self.path.exists()

    def room(self) -> bool:
        """Whether the filesystem has space for the reserve (and then some)."""
        if self.held:
            return True
        stats = os.statvfs(self.path.parent)
        size = self.size or size_for(self.path.parent)
        return stats.f_bavail * stats.f_frsize > 2 * size

    def make(self) -> bool:
        """Create the reserve (if missing); False when the disk has no room for it."""
        if self.held:
            return True
        if not self.size:
            self.size = size_for(self.path.parent)
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
