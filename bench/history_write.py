"""The store's write path with history on and off: batches of 100 webhooks queued, then
acknowledged, through the store alone (no daemon, no HTTP), on each engine.

    .venv/bin/python -m bench.history_write [--rounds N] [--tenants T] [--engines sqlite,postgres]

Each round queues a 100-webhook batch for every tenant at once (group-committed, as
concurrent ingest is), then acknowledges every tenant's batch at once (as the workers'
outcomes are), with history off (`keep=False`), on without payloads, and on with payloads.
It prints webhooks per second through ingest + acknowledgement, and the acknowledgements'
time, side by side. The daemon's own figures (HTTP, the receiver) are `make bench`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import orjson

from bench.load import sample_data
from webhookd.config import PostgresURL
from webhookd.records import Delivered, HistoryPolicy, NewWebhook
from webhookd.store import Store, make_store

POLICIES = {
    "off": HistoryPolicy(keep=False),
    "no payloads": HistoryPolicy(payloads=False),
    "on": HistoryPolicy(),
}
BATCH = 100
OK = Delivered(200, 5.0, 1)


async def run(
    store: Store, policy: HistoryPolicy, rounds: int, tenants: int
) -> tuple[float, float]:
    """(webhooks per second, seconds spent acknowledging) over `rounds` rounds."""
    names = [f"tenant-{n:04d}" for n in range(tenants)]
    data = orjson.dumps(sample_data(0)).decode()
    acked = 0.0
    start = time.perf_counter()
    for round_ in range(rounds):
        items = [NewWebhook(f"r{round_}-{n}", "CHECK_COMPLETED", data) for n in range(BATCH)]
        results = await asyncio.gather(*(store.enqueue(t, items, time.time()) for t in names))
        began = time.perf_counter()
        await asyncio.gather(
            *(
                store.acknowledge(t, r[-1].sequence or 0, time.time(), OK, policy)
                for t, r in zip(names, results, strict=True)
            )
        )
        acked += time.perf_counter() - began
    elapsed = time.perf_counter() - start
    return rounds * tenants * BATCH / elapsed, acked


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--engines", default="sqlite,postgres")
    args = parser.parse_args()
    server = None
    if "postgres" in args.engines:
        from tests.postgres import started_server

        server = await asyncio.to_thread(started_server, {"shared_buffers": "128MB"})
    try:
        for engine in args.engines.split(","):
            figures = {}
            for name, policy in POLICIES.items():
                with tempfile.TemporaryDirectory() as folder:
                    if engine == "sqlite":
                        database: Path | PostgresURL = Path(folder) / "webhookd.db"
                    else:
                        assert server is not None
                        database = PostgresURL(server.database_url(server.create_database()))
                    store = make_store(database)
                    await store.open()
                    try:
                        figures[name] = await run(store, policy, args.rounds, args.tenants)
                    finally:
                        await store.close()
            base = figures["off"][0]
            for name, (rate, acked) in figures.items():
                print(
                    f"{engine:8} history {name:11} {rate:8.0f} webhooks/s "
                    f"({100 * rate / base:5.1f} % of off)  acknowledging {acked:6.2f} s",
                    flush=True,
                )
    finally:
        if server is not None:
            server.remove()


if __name__ == "__main__":
    asyncio.run(main())
