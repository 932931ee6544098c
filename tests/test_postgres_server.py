"""The PostgreSQL test server (tests/postgres.py): a real server from Debian's binaries that
keeps its data across restarts, with a separate empty database for each test."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from tests.postgres import PostgresServer


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_test_gets_an_empty_database_on_a_durable_local_server(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    async with connect(postgres_url) as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
        assert await conn.fetchval("SELECT 40 + $1::int", 2) == 42
        # Durability is what the store's tests check: the server must not cut corners.
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        socket_dir = await conn.fetchval("SHOW unix_socket_directories")
    assert socket_dir == str(postgres_server.socket_dir)
    assert stat.S_ISSOCK(os.stat(f"{socket_dir}/.s.PGSQL.{postgres_server.port}").st_mode)


async def test_committed_rows_survive_a_restart_and_a_crash(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with connect(postgres_url) as conn:
        await conn.execute("CREATE TABLE kept (n INTEGER PRIMARY KEY)")
        await conn.execute("INSERT INTO kept VALUES (1)")

    postgres_server.restart()
    async with connect(postgres_url) as conn:
        await conn.execute("INSERT INTO kept VALUES (2)")

    # "immediate": no shutdown checkpoint, the start recovers from the WAL as after a crash.
    postgres_server.restart(mode="immediate")
    async with connect(postgres_url) as conn:
        assert [r["n"] for r in await conn.fetch("SELECT n FROM kept ORDER BY n")] == [1, 2]


async def test_a_stopped_server_refuses_connections_until_started(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    postgres_server.stop()
    with pytest.raises(OSError):
        await asyncpg.connect(postgres_url)
    postgres_server.start()
    async with connect(postgres_url) as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_each_test_database_is_separate(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    other = postgres_server.create_database()
    try:
        other_url = postgres_server.database_url(other)
        assert other_url != postgres_url
        async with connect(postgres_url) as conn:
            await conn.execute("CREATE TABLE mine (n INTEGER)")
        async with connect(other_url) as conn:
            exists = await conn.fetchval("SELECT to_regclass('mine') IS NOT NULL")
        assert exists is False
    finally:
        postgres_server.drop_database(other)
    # What postgres_url does after each test: the database is gone.
    assert other not in postgres_server.psql("SELECT datname FROM pg_database").split()
