"""Connecting to PostgreSQL, and what an error means for the operator."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import asyncpg

from webhookd.config import PostgresURL

if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]

# Seconds a connection attempt may take: a server that does not answer is down.
CONNECT_TIMEOUT_S = 10.0

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
