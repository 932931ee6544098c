"""`python -m bench.pg_drivers [--runs N] [--quick]`: asyncpg against psycopg 3 on the
PostgreSQL engine's hot paths, to choose the driver (bench/README-pg-drivers.md).

Both drivers run the same SQL on the same schema (the SQLite store's tables, in PostgreSQL
types) against one server started with tests/postgres.py's helper, `fsync` and
`synchronous_commit` on. Each scenario gets a fresh database. Runs alternate which driver
goes first, and the table shows each figure's range over the runs: the machine is shared,
so a single figure says little. Not part of `make test` or `make bench`; both drivers must
be installed (`.venv/bin/pip install asyncpg "psycopg[binary]"`).

Scenarios, each for both drivers:
  ingest        group commits on one connection, as the store's writer makes them: each
                transaction allocates sequences for 10 tenants (one UPDATE … RETURNING),
                then inserts their 10 rows each (100 rows) and the producer ids, by
                executemany, COPY or one INSERT … SELECT FROM unnest(arrays)
  commit1       one-row INSERT commits (autocommit), 1 connection and 8 concurrent: the
                ceiling for writes that cannot share a commit
  ack           acknowledgements of 20 tenants per transaction (each deletes its 10 oldest
                rows and moves its acked_sequence), by executemany or unnest
  head          queue-head reads (100 rows after a random acked sequence) on one connection
  notify        LISTEN/NOTIFY round trip: pg_notify on one connection until the other's
                listener runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import uvloop
from tests.postgres import PostgresServer, started_server

from bench.harness import EVENT
from bench.load import sample_data

SCHEMA = (
    """CREATE TABLE tenant_state (
        tenant TEXT PRIMARY KEY,
        last_sequence BIGINT NOT NULL DEFAULT 0,
        acked_sequence BIGINT NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION,
        last_processed_at DOUBLE PRECISION,
        paused BOOLEAN NOT NULL DEFAULT false
    )""",
    """CREATE TABLE webhooks (
        tenant TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        id TEXT NOT NULL,
        event TEXT NOT NULL,
        accepted_at DOUBLE PRECISION NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (tenant, sequence)
    )""",
    """CREATE TABLE webhook_ids (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        sequence BIGINT,
        PRIMARY KEY (tenant, id)
    )""",
)
COLUMNS = ("tenant", "sequence", "id", "event", "accepted_at", "data")
ID_COLUMNS = ("tenant", "id", "sequence")
TENANTS = [f"t{i:03d}" for i in range(100)]
DATA = orjson.dumps(sample_data(1)).decode()

ALLOCATE = """UPDATE tenant_state AS s SET last_sequence = s.last_sequence + u.n
    FROM unnest($1::text[], $2::bigint[]) AS u (tenant, n)
    WHERE s.tenant = u.tenant
    RETURNING s.tenant, s.last_sequence"""
INSERT_ROW = (
    "INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
INSERT_ID = "INSERT INTO webhook_ids (tenant, id, sequence) VALUES ($1, $2, $3)"
INSERT_ROWS_UNNEST = """INSERT INTO webhooks (tenant, sequence, id, event, accepted_at, data)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],
                         $5::float8[], $6::text[])"""
INSERT_IDS_UNNEST = """INSERT INTO webhook_ids (tenant, id, sequence)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"""
# The lower bound as the SQLite store has it: the index scan starts at the queue's head,
# not at the dead entries of the rows deleted before.
DELETE_ACKED = "DELETE FROM webhooks WHERE tenant = $1 AND sequence > $2 AND sequence <= $3"
SAVE_ACKED = "UPDATE tenant_state SET acked_sequence = $1 WHERE tenant = $2"
DELETE_ACKED_UNNEST = """DELETE FROM webhooks AS w
    USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS u (tenant, after, through)
    WHERE w.tenant = u.tenant AND w.sequence > u.after AND w.sequence <= u.through"""
SAVE_ACKED_UNNEST = """UPDATE tenant_state AS s SET acked_sequence = u.through
    FROM unnest($1::text[], $2::bigint[]) AS u (tenant, through)
    WHERE s.tenant = u.tenant"""
HEAD = """SELECT sequence, id, event, accepted_at, data FROM webhooks
    WHERE tenant = $1 AND sequence > $2 ORDER BY sequence LIMIT 100"""


def prefill_sql(rows_per_tenant: int) -> str:
    """Fill every tenant's queue without either driver (psql), so both start equal."""
    return f"""
        INSERT INTO webhooks
        SELECT 't' || lpad(t::text, 3, '0'), s, 'evt-' || t || '-' || s, '{EVENT}',
               extract(epoch FROM now()), '{DATA}'
        FROM generate_series(0, 99) AS t, generate_series(1, {rows_per_tenant}) AS s;
        UPDATE tenant_state SET last_sequence = {rows_per_tenant}"""


# -- the two drivers behind one small interface -------------------------------------------------


class Driver:
    name = ""
    ingest_methods: Sequence[str] = ("executemany", "copy", "unnest")

    async def connect(self, url: str) -> Any:
        raise NotImplementedError

    async def close(self, conn: Any) -> None:
        await conn.close()

    def transaction(self, conn: Any, *, pipeline: bool = True) -> Any:
        """An async context: one transaction (pipelined where the driver can)."""
        raise NotImplementedError

    async def fetch(self, conn: Any, sql: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def execute(self, conn: Any, sql: str, *args: Any) -> None:
        raise NotImplementedError

    async def executemany(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def copy(
        self, conn: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> None:
        raise NotImplementedError

    async def listen(self, conn: Any, channel: str, callback: Callable[[str], None]) -> Any:
        """Call `callback(payload)` for each notification; returns what `unlisten` takes."""
        raise NotImplementedError

    async def unlisten(self, conn: Any, handle: Any) -> None:
        raise NotImplementedError


class Asyncpg(Driver):
    name = "asyncpg"

    async def connect(self, url: str) -> Any:
        import asyncpg

        return await asyncpg.connect(url)

    def transaction(self, conn: Any, *, pipeline: bool = True) -> Any:
        return conn.transaction()  # asyncpg has no pipeline mode across statements

    async def fetch(self, conn: Any, sql: str, *args: Any) -> list[Any]:
        return list(await conn.fetch(sql, *args))

    async def execute(self, conn: Any, sql: str, *args: Any) -> None:
        await conn.execute(sql, *args)

    async def executemany(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await conn.executemany(sql, rows)

    async def copy(
        self, conn: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> None:
        await conn.copy_records_to_table(table, records=rows, columns=list(columns))

    async def listen(self, conn: Any, channel: str, callback: Callable[[str], None]) -> Any:
        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        await conn.add_listener(channel, on_notify)
        return (channel, on_notify)

    async def unlisten(self, conn: Any, handle: Any) -> None:
        await conn.remove_listener(*handle)


def _positional(sql: str) -> str:
    """$1, $2, … (asyncpg's placeholders) as psycopg's; each used once, in order.

    %b, binary parameters, as asyncpg always sends them: with %s (text), psycopg escapes
    each array element through a regular expression, which cost it a third of its ingest
    rate with unnest (and a quarter with executemany) here.
    """
    numbers = [int(n) for n in re.findall(r"\$(\d+)", sql)]
    assert numbers == list(range(1, len(numbers) + 1)), sql
    return re.sub(r"\$\d+", "%b", sql)


class Psycopg(Driver):
    name = "psycopg"

    async def connect(self, url: str) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(url, autocommit=True)

    @contextlib.asynccontextmanager
    async def transaction(self, conn: Any, *, pipeline: bool = True) -> AsyncIterator[None]:
        # Pipeline mode: BEGIN, the statements and COMMIT go out without waiting for each
        # answer; a statement whose rows are read (fetch) waits for them. COPY cannot run
        # in a pipeline.
        if pipeline:
            async with conn.pipeline(), conn.transaction():
                yield
        else:
            async with conn.transaction():
                yield

    async def fetch(self, conn: Any, sql: str, *args: Any) -> list[Any]:
        cursor = await conn.execute(_positional(sql), args)
        return list(await cursor.fetchall())

    async def execute(self, conn: Any, sql: str, *args: Any) -> None:
        await conn.execute(_positional(sql), args)

    async def executemany(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        async with conn.cursor() as cursor:
            await cursor.executemany(_positional(sql), rows)

    async def copy(
        self, conn: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> None:
        types = {"tenant": "text", "sequence": "int8", "id": "text", "event": "text"}
        types |= {"accepted_at": "float8", "data": "text"}
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        async with conn.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types([types[c] for c in columns])
            for row in rows:
                await copy.write_row(row)

    async def listen(self, conn: Any, channel: str, callback: Callable[[str], None]) -> Any:
        await conn.execute(f"LISTEN {channel}")

        async def read() -> None:
            async for notify in conn.notifies():
                callback(notify.payload)

        return asyncio.create_task(read())

    async def unlisten(self, conn: Any, handle: Any) -> None:
        handle.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handle


DRIVERS: dict[str, Callable[[], Driver]] = {"asyncpg": Asyncpg, "psycopg": Psycopg}


# -- scenarios ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def database(
    server: PostgresServer, driver: Driver, prefill: int = 0
) -> AsyncIterator[tuple[str, Any]]:
    """A fresh database with the schema (and `prefill` rows per tenant), and a connection."""
    name = server.create_database()
    try:
        statements = [*SCHEMA, "INSERT INTO tenant_state (tenant) SELECT unnest(ARRAY[{}])"]
        statements[-1] = statements[-1].format(", ".join(f"'{t}'" for t in TENANTS))
        server.psql(";\n".join(statements), name)
        if prefill:
            server.psql(prefill_sql(prefill), name)
            server.psql("VACUUM ANALYZE webhooks", name)  # not inside psql -c's transaction
        url = server.database_url(name)
        conn = await driver.connect(url)
        try:
            yield url, conn
        finally:
            await driver.close(conn)
    finally:
        server.drop_database(name)


def columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


async def ingest(server: PostgresServer, driver: Driver, method: str, duration: float) -> Meter:
    """Rows/s in 100-row group commits of 10 tenants × 10 rows, producer ids included."""
    per_tenant, group = 10, 10
    async with database(server, driver) as (_url, conn):
        rows_done, tx = 0, 0
        meter = Meter()
        while meter.elapsed() < duration:
            tenants = [TENANTS[(tx * group + i) % len(TENANTS)] for i in range(group)]
            tx += 1
            now = time.time()
            async with driver.transaction(conn, pipeline=method != "copy"):
                lasts = await driver.fetch(conn, ALLOCATE, tenants, [per_tenant] * group)
                rows: list[tuple[Any, ...]] = []
                ids: list[tuple[Any, ...]] = []
                for tenant, last in lasts:
                    for sequence in range(last - per_tenant + 1, last + 1):
                        webhook_id = f"evt-{tenant}-{sequence}"
                        rows.append((tenant, sequence, webhook_id, EVENT, now, DATA))
                        ids.append((tenant, webhook_id, sequence))
                if method == "executemany":
                    await driver.executemany(conn, INSERT_ID, ids)
                    await driver.executemany(conn, INSERT_ROW, rows)
                elif method == "copy":
                    await driver.copy(conn, "webhook_ids", ID_COLUMNS, ids)
                    await driver.copy(conn, "webhooks", COLUMNS, rows)
                else:
                    await driver.execute(conn, INSERT_IDS_UNNEST, *columns(ids))
                    await driver.execute(conn, INSERT_ROWS_UNNEST, *columns(rows))
            rows_done += len(rows)
        return meter.done(rows_done)


async def commit1(server: PostgresServer, driver: Driver, clients: int, duration: float) -> Meter:
    """One-row INSERT commits per second, over `clients` connections (a tenant each)."""
    async with database(server, driver) as (url, conn):
        conns = [conn] + [await driver.connect(url) for _ in range(clients - 1)]
        counts = [0] * clients
        meter = Meter()

        async def client(n: int) -> None:
            tenant = TENANTS[n]
            while meter.elapsed() < duration:
                counts[n] += 1
                row = (tenant, counts[n], f"evt-{counts[n]}", EVENT, time.time(), DATA)
                await driver.execute(conns[n], INSERT_ROW, *row)

        try:
            await asyncio.gather(*(client(n) for n in range(clients)))
            return meter.done(sum(counts))
        finally:
            for other in conns[1:]:
                await driver.close(other)


async def ack(server: PostgresServer, driver: Driver, method: str, quick: bool) -> Meter:
    """Acknowledgements per second: 20 tenants' acks per transaction, 10 rows each."""
    per_ack, group = 10, 20
    rows_per_tenant = 200 if quick else 1000
    async with database(server, driver, prefill=rows_per_tenant) as (_url, conn):
        acked = dict.fromkeys(TENANTS, 0)
        acks = 0
        meter = Meter()
        for tx in range(rows_per_tenant // per_ack * len(TENANTS) // group):
            tenants = [TENANTS[(tx * group + i) % len(TENANTS)] for i in range(group)]
            afters = [acked[t] for t in tenants]
            throughs = [a + per_ack for a in afters]
            async with driver.transaction(conn):
                if method == "executemany":
                    deletes = list(zip(tenants, afters, throughs, strict=True))
                    await driver.executemany(conn, DELETE_ACKED, deletes)
                    await driver.executemany(
                        conn, SAVE_ACKED, list(zip(throughs, tenants, strict=True))
                    )
                else:
                    await driver.execute(conn, DELETE_ACKED_UNNEST, tenants, afters, throughs)
                    await driver.execute(conn, SAVE_ACKED_UNNEST, tenants, throughs)
            acked.update(zip(tenants, throughs, strict=True))
            acks += group
        meter.done(acks)
        left = await driver.fetch(conn, "SELECT count(*) FROM webhooks")
        assert left[0][0] == 0, left
        return meter


async def head(server: PostgresServer, driver: Driver, duration: float) -> tuple[Meter, Stats]:
    """Queue-head reads per second, and each read's latency."""
    async with database(server, driver, prefill=1000) as (_url, conn):
        latencies: list[float] = []
        n = 0
        meter = Meter()
        while meter.elapsed() < duration:
            now = time.perf_counter()
            n += 1
            tenant, after = TENANTS[n % len(TENANTS)], (n * 7919) % 900
            rows = await driver.fetch(conn, HEAD, tenant, after)
            latencies.append(time.perf_counter() - now)
            assert len(rows) == 100 and rows[0][0] == after + 1, (tenant, after)
        return meter.done(len(latencies)), Stats.of(latencies)


async def notify(server: PostgresServer, driver: Driver, count: int) -> Stats:
    """Round trips from `SELECT pg_notify(…)` on one connection to the other's callback."""
    async with database(server, driver) as (url, conn):
        listener = await driver.connect(url)
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future[float]] = {}

        def arrived(payload: str) -> None:
            future = waiting.pop(payload, None)
            if future is not None:
                future.set_result(time.perf_counter())

        handle = await driver.listen(listener, "wake", arrived)
        latencies: list[float] = []
        try:
            for n in range(count + 10):
                waiting[str(n)] = future = loop.create_future()
                sent = time.perf_counter()
                await driver.execute(conn, "SELECT pg_notify('wake', $1)", str(n))
                received = await asyncio.wait_for(future, 10)
                if n >= 10:  # the first few warm the listener up
                    latencies.append(received - sent)
        finally:
            await driver.unlisten(listener, handle)
            await driver.close(listener)
        return Stats.of(latencies)


class Meter:
    """Wall time and this process's CPU time (the driver's cost to the daemon) over a run."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.rate = self.cpu_us = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def done(self, count: int) -> Meter:
        self.rate = count / self.elapsed()
        self.cpu_us = (time.process_time() - self.cpu) / count * 1e6
        return self


class Stats:
    def __init__(self, p50: float, p99: float) -> None:
        self.p50, self.p99 = p50, p99

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        cuts = statistics.quantiles(seconds, n=100)
        return cls(statistics.median(seconds), cuts[98])


# -- the run ------------------------------------------------------------------------------------


async def one_run(
    server: PostgresServer, driver: Driver, quick: bool, say: Callable[[str], None]
) -> dict[str, float]:
    duration = 1.5 if quick else 4.0
    figures: dict[str, float] = {}

    def note(key: str, value: float, text: str) -> None:
        figures[key] = value
        say(f"  {driver.name:8} {key:28} {text}")

    for method in driver.ingest_methods:
        meter = await ingest(server, driver, method, duration)
        note(f"ingest {method} rows/s", meter.rate, f"{meter.rate:,.0f} rows/s")
        note(f"ingest {method} cpu µs/row", meter.cpu_us, f"{meter.cpu_us:.1f} µs CPU/row")
    for clients in (1, 8):
        meter = await commit1(server, driver, clients, duration)
        note(f"1-row commits x{clients} /s", meter.rate, f"{meter.rate:,.0f} commits/s")
        if clients == 1:
            note("1-row commit cpu µs", meter.cpu_us, f"{meter.cpu_us:.1f} µs CPU/commit")
    for method in ("executemany", "unnest"):
        meter = await ack(server, driver, method, quick)
        note(f"ack {method} acks/s", meter.rate, f"{meter.rate:,.0f} acks/s")
        note(f"ack {method} cpu µs/ack", meter.cpu_us, f"{meter.cpu_us:.1f} µs CPU/ack")
    meter, stats = await head(server, driver, duration)
    note("head reads/s", meter.rate, f"{meter.rate:,.0f} reads/s")
    note("head cpu µs/read", meter.cpu_us, f"{meter.cpu_us:.1f} µs CPU/read")
    note("head p50 ms", stats.p50 * 1000, f"p50 {stats.p50 * 1000:.3f} ms")
    note("head p99 ms", stats.p99 * 1000, f"p99 {stats.p99 * 1000:.3f} ms")
    stats = await notify(server, driver, 100 if quick else 500)
    note("notify p50 ms", stats.p50 * 1000, f"p50 {stats.p50 * 1000:.3f} ms")
    note("notify p99 ms", stats.p99 * 1000, f"p99 {stats.p99 * 1000:.3f} ms")
    return figures


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one line per figure, each driver's min–max over the runs."""
    names = list(results)
    lines = [f"| figure | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for key in results[names[0]][0]:
        cells = []
        for name in names:
            values = [run[key] for run in results[name]]
            low, high = min(values), max(values)
            fmt = "{:,.3f}" if key.endswith("ms") else "{:,.1f}" if "µs" in key else "{:,.0f}"
            cells.append(fmt.format(low) + ("" if low == high else "–" + fmt.format(high)))
        lines.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    drivers = [DRIVERS[name]() for name in args.drivers.split(",")]
    absent = [d.name for d in drivers if importlib.util.find_spec(d.name) is None]
    if absent:
        # Only asyncpg is a dependency; psycopg is installed by hand to compare.
        raise SystemExit(f"not installed: {', '.join(absent)} (see this module's docstring)")
    # PostgreSQL's default shared_buffers (the tests' server is smaller).
    server = started_server({"shared_buffers": "128MB"})
    results: dict[str, list[dict[str, float]]] = {d.name: [] for d in drivers}
    try:
        version = server.psql("SHOW server_version").strip()
        print(f"PostgreSQL {version} on 127.0.0.1:{server.port}, fsync on", flush=True)
        for run in range(args.runs):
            order = drivers if run % 2 == 0 else drivers[::-1]
            print(f"run {run + 1}/{args.runs}", flush=True)
            for driver in order:
                figures = await one_run(server, driver, args.quick, print)
                results[driver.name].append(figures)
    finally:
        server.remove()
    print()
    print(table(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_drivers", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    parser.add_argument("--drivers", default="asyncpg,psycopg", help="comma-separated")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async(args))


if __name__ == "__main__":
    main()
