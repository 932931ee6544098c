"""Connecting to PostgreSQL, the instance lock, and what an error means for the operator.

One webhookd per database for now: the store holds `pg_try_advisory_lock(INSTANCE_LOCK)` on
a connection of its own for as long as it is open, and refuses to open while another
session holds it. PostgreSQL drops the lock with the session that took it, so a crashed
daemon (or a restarted server) leaves no stale lock behind.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from webhookd.config import PostgresURL

if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]

# Seconds a connection attempt may take: a server that does not answer is down.
CONNECT_TIMEOUT_S = 10.0

# The advisory lock key of "one webhookd per database": b"webhookd" as a bigint.
INSTANCE_LOCK = int.from_bytes(b"webhookd", "big")

# What connecting raises when the server cannot be reached, refuses the session or ends
# it (a wrong password, a missing database, a server starting or stopping).
CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError)


# What a statement raises when the session is gone rather than the statement refused: the
# socket closed, or the server ending every session (stopping, crashing, starting).
SESSION_ENDED = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)


def application_name(role: str) -> str:
    """What pg_stat_activity shows for each session (at most 63 bytes): the role, the host
    and the process, so an operator (and the lock's refusal) can tell who holds it."""
    return f"webhookd {role} {socket.gethostname()} pid {os.getpid()}"[:63]


async def connect(
    database: PostgresURL, role: str, settings: dict[str, str] | None = None
) -> Connection:
    """A new session; `settings` are set at its start (e.g. synchronous_commit)."""
    return await asyncpg.connect(
        database.url,
        password=database.password.reveal() or None,
        timeout=CONNECT_TIMEOUT_S,
        server_settings={"application_name": application_name(role), **(settings or {})},
    )


@dataclass(frozen=True)
class Session:
    """A server session, known by its backend pid and start time (pids are reused)."""

    pid: int
    started: object  # backend_start, compared only

    @classmethod
    async def of(cls, conn: Connection) -> Session:
        row = await conn.fetchrow(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        assert row is not None
        return cls(row["pid"], row["backend_start"])


@dataclass(frozen=True)
class Holder:
    """The session that holds the instance lock, as the refusal names it."""

    session: Session
    application: str
    client: str

    def __str__(self) -> str:
        # The address is empty for a local socket, or hidden from another role.
        where = f" connected from {self.client}" if self.client else ""
        pid = f", server pid {self.session.pid}" if self.session.pid else ""
        return f"{self.application or 'a session'}{where}{pid}"


async def take_lock(conn: Connection) -> Holder | None:
    """Take the instance lock on `conn` for as long as its session lasts; None once taken,
    else who holds it."""
    for _ in range(3):  # a holder that lets go between the two queries: try again
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", INSTANCE_LOCK):
            return None
        # A bigint advisory key shows in pg_locks as its high and low halves, objsubid 1.
        row = await conn.fetchrow(
            """SELECT a.pid, a.backend_start, a.application_name, host(a.client_addr) AS client
               FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid""",
            INSTANCE_LOCK >> 32,
            INSTANCE_LOCK & 0xFFFFFFFF,
        )
        if row is not None:
            session = Session(row["pid"], row["backend_start"])
            return Holder(session, row["application_name"] or "", row["client"] or "")
    return Holder(Session(0, None), "", "")


def in_use(database: PostgresURL, holder: Holder) -> str:
    return (
        f"the database {database} is in use by another webhookd ({holder}); stop that one "
        "first, or give this one its own database in [daemon] (for now, one webhookd runs "
        "on a PostgreSQL database at a time)"
    )


def reason(exc: BaseException) -> str:
    """The cause of a connection or statement error, in a few words for a sentence."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def cannot_open(database: PostgresURL, exc: BaseException) -> str:
    """Why the store could not open the database, and what to do, in one sentence."""
    why = reason(exc)
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # a password too
        hint = "check the user in the URL and the database password"
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        hint = "create the database (createdb), or set database in [daemon] to one that exists"
    elif isinstance(exc, asyncpg.InsufficientPrivilegeError):
        hint = "webhookd's user must be allowed to create tables in the database"
    elif isinstance(exc, asyncpg.PostgresError):
        hint = "see the server's log"
    else:
        hint = "check that PostgreSQL runs there and that database in [daemon] names it"
    return f"cannot open the database {database} ({why}); {hint}"


def unreachable(database: PostgresURL, exc: BaseException | None) -> str:
    why = reason(exc) if exc is not None else CLOSED
    return (
        f"the database {database} is unreachable ({why}); webhookd reconnects by itself "
        "once it answers"
    )


CLOSED = "the server closed the connection"
